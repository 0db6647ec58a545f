//! Which supervisor program this process starts, fixed once: every run of one dispatcher
//! gets the supervisor that dispatcher was built with, whatever a package upgrade puts on
//! disk while it runs (the two speak a private protocol on the supervisor's stdin/stdout).
//!
//! The program is `hermes-mgr-supervise` beside this binary (a cargo build) or in
//! `../libexec/hermes-mgr/` (the packages), held as an `O_PATH` descriptor and started as
//! `/proc/self/fd/N`; without it, this very binary (`/proc/self/exe supervise`), which
//! does the same but costs each run ~300 kB more (see `src/bin/hermes-mgr-supervise.rs`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

pub const NAME: &str = "hermes-mgr-supervise";

pub struct Program {
    /// The separate supervisor, held open; `None`: this binary.
    fd: Option<OwnedFd>,
    /// Where it was found, for the journal.
    pub path: PathBuf,
}

impl Program {
    /// What to execute: `/proc/self/fd/N` in the child is the held file (the descriptor is
    /// close-on-exec, and an ELF file is loaded before it closes).
    pub fn command(&self) -> std::process::Command {
        use std::os::unix::process::CommandExt;
        let mut c = match &self.fd {
            Some(fd) => std::process::Command::new(format!("/proc/self/fd/{}", fd.as_raw_fd())),
            None => std::process::Command::new("/proc/self/exe"),
        };
        // The same command line either way: `ps` and `pgrep` see `hermes-mgr supervise`.
        c.arg0("hermes-mgr").arg("supervise");
        c
    }
}

fn candidates(exe: &Path) -> Vec<PathBuf> {
    let Some(dir) = exe.parent() else {
        return Vec::new();
    };
    vec![dir.join(NAME), dir.join("../libexec/hermes-mgr").join(NAME)]
}

/// The program, found and opened at the first call (the daemon calls it at start-up).
pub fn supervisor() -> &'static Program {
    static PROGRAM: OnceLock<Program> = OnceLock::new();
    PROGRAM.get_or_init(|| {
        let exe = std::fs::read_link("/proc/self/exe").unwrap_or_default();
        for path in candidates(&exe) {
            if let Ok(fd) = nix::fcntl::open(&path, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
            {
                let is_file = nix::sys::stat::fstat(&fd)
                    .is_ok_and(|s| s.st_mode & libc::S_IFMT == libc::S_IFREG);
                if is_file {
                    return Program { fd: Some(fd), path };
                }
            }
        }
        Program {
            fd: None,
            path: exe,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_supervisor_is_looked_for_beside_the_binary_then_in_libexec() {
        assert_eq!(
            candidates(Path::new("/usr/bin/hermes-mgr")),
            [
                PathBuf::from("/usr/bin/hermes-mgr-supervise"),
                PathBuf::from("/usr/bin/../libexec/hermes-mgr/hermes-mgr-supervise")
            ]
        );
    }
}
