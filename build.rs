//! The run's supervisor (`hermes-mgr-supervise`) is linked statically: one is started for
//! every run, and a dynamic one spent ~40 % of its start in the dynamic loader (BENCHMARKS.md,
//! 14). It resolves no user or group (the dispatcher hands it numeric ids), so static glibc's
//! NSS caveat does not apply.
//!
//! rustc links every binary of a package the same way (`-Bdynamic -lgcc_s … -lc`), and
//! per-binary `rustflags` do not exist. So this binary's link alone gets `-static-pie` and a
//! directory searched first in which each of those libraries is only an archive: a linker
//! script naming the system's `libX.a` (`libgcc_s` names `libgcc_eh`, libgcc's static
//! unwinder). Without the archives (no `libc6-dev`'s `libc.a`), it stays dynamic.

use std::path::{Path, PathBuf};

fn archive(cc: &str, name: &str) -> Option<PathBuf> {
    let out = std::process::Command::new(cc)
        .arg(format!("-print-file-name={name}"))
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    (path.is_absolute() && path.exists()).then_some(path)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    if !target.ends_with("-linux-gnu") {
        return;
    }
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let dir = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("static-supervisor");
    std::fs::create_dir_all(&dir).unwrap();
    let libs = [
        ("gcc_s", "libgcc_eh.a"),
        ("c", "libc.a"),
        ("m", "libm.a"),
        ("dl", "libdl.a"),
        ("pthread", "libpthread.a"),
        ("rt", "librt.a"),
        ("util", "libutil.a"),
    ];
    for (lib, file) in libs {
        let Some(path) = archive(&cc, file) else {
            println!("cargo:warning=no {file}: hermes-mgr-supervise is linked dynamically");
            return;
        };
        let script = dir.join(format!("lib{lib}.a"));
        std::fs::write(&script, format!("INPUT({})\n", path.display())).unwrap();
    }
    let bin = "hermes-mgr-supervise";
    println!("cargo:rustc-link-arg-bin={bin}=-static-pie");
    println!(
        "cargo:rustc-link-arg-bin={bin}=-L{}",
        Path::new(&dir).display()
    );
}
