//! Upstream's lock files beside a board (`kanban.db.init.lock`, `kanban.db.dispatch.lock`,
//! `kanban/.dispatcher.lock`), taken with `flock(2)` as upstream's `fcntl.flock` takes them.
//!
//! They live in the board owner's tree, so they are opened as the owner
//! (`safe_fs::as_user`), never through a symlink and never as a FIFO: a planted link must
//! not make root create `/run/nologin`, and a FIFO must not hang a dispatcher.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::safe_fs::{self, Access, Owner};

/// An exclusive `flock(2)` on a lock file, released on drop.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

fn open_lock(path: &Path, owner: &Owner) -> io::Result<File> {
    safe_fs::as_user(owner, || {
        safe_fs::open_regular(path, Access::ReadWriteCreate)
    })?
}

fn try_flock(f: &File, how: libc::c_int) -> io::Result<bool> {
    // SAFETY: flock on an fd we own; no memory is passed.
    let rc = unsafe { libc::flock(f.as_raw_fd(), how | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

impl FileLock {
    /// Take the lock, waiting at most `wait` (upstream bounds its init lock at 10 s).
    pub fn acquire(path: &Path, owner: &Owner, wait: Duration) -> io::Result<FileLock> {
        let f = open_lock(path, owner)?;
        let deadline = Instant::now() + wait;
        // Polled, since `flock` cannot time out: from 200 µs, doubling up to 5 ms. Holders
        // are brief (a worker's first open checks the board's integrity under the init
        // lock), and a burst of workers opening the board queues here: a coarse poll left
        // the lock idle most of the time they waited.
        let mut pause = Duration::from_micros(200);
        loop {
            if try_flock(&f, libc::LOCK_EX)? {
                return Ok(FileLock { _file: f });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("{} is held by another process", path.display()),
                ));
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }

    /// Take a life lock: `None` when another process holds it for more than two seconds
    /// (a brief holder — `status` probing it — is waited out).
    pub fn acquire_or_held(path: &Path, owner: &Owner) -> io::Result<Option<FileLock>> {
        match FileLock::acquire(path, owner, Duration::from_secs(2)) {
            Ok(l) => Ok(Some(l)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Take the lock now or report `None` (the per-pass dispatch lock: a loser skips).
    pub fn try_acquire(path: &Path, owner: &Owner) -> io::Result<Option<FileLock>> {
        let f = open_lock(path, owner)?;
        Ok(try_flock(&f, libc::LOCK_EX)?.then_some(FileLock { _file: f }))
    }
}

/// Whether some process holds an exclusive lock on `path` (a dispatcher's life lock).
/// Probed with a shared, non-blocking lock that is released at once; dispatchers wait a
/// moment for their lock, so this probe never makes one refuse to start. (`/proc/locks`
/// would avoid the probe, but names the inode of the layer below on overlayfs.) A file
/// that is missing, or is no regular file, is held by nobody.
pub fn held(path: &Path, owner: &Owner) -> bool {
    let Ok(Ok(f)) = safe_fs::as_user(owner, || safe_fs::open_regular(path, Access::Read)) else {
        return false;
    };
    matches!(try_flock(&f, libc::LOCK_SH), Ok(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_seen_without_taking_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let me = Owner::of_tree(dir.path()).unwrap();
        assert!(!held(&path, &me));
        let l = FileLock::try_acquire(&path, &me).unwrap().unwrap();
        assert!(held(&path, &me));
        assert!(FileLock::try_acquire(&path, &me).unwrap().is_none());
        drop(l);
        assert!(!held(&path, &me));
    }

    #[test]
    fn a_fifo_or_a_symlink_is_never_a_lock() {
        let dir = tempfile::tempdir().unwrap();
        let me = Owner::of_tree(dir.path()).unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let link = dir.path().join("link");
        let target = dir.path().join("created-through-the-link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(FileLock::try_acquire(&fifo, &me).is_err());
        assert!(!held(&fifo, &me));
        assert!(FileLock::try_acquire(&link, &me).is_err());
        assert!(!target.exists(), "the lock followed a symlink");
    }
}
