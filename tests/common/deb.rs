//! The `.deb` built from this build's binary (the dev profile: no release build needed),
//! shared by the sandbox tests (`tests/it`) and the VM tier (`tests/vm`).

use std::path::Path;
use std::process::Command;

/// `cargo deb` of revision `revision` into `out`.
pub fn build_deb(repo: &Path, out: &Path, revision: &str) {
    let o = Command::new("cargo")
        .args([
            "deb",
            "--no-build",
            "--profile",
            "dev",
            "--fast",
            "--locked",
        ])
        .args(["--deb-revision", revision, "-o"])
        .arg(out)
        .current_dir(repo)
        .env("CARGO_NET_OFFLINE", "true")
        .output()
        .expect("cargo deb (tests/setup.sh installs cargo-deb)");
    assert!(
        o.status.success(),
        "cargo deb: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}
