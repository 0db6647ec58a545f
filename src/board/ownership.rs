//! Files hermes-mgr creates next to a board belong to the board's owner.
//!
//! The daemon runs as root while the board usually belongs to the user who runs
//! `hermes kanban`. A root-owned `kanban.db-shm`, lock file or workspace would lock that
//! user out of their own board, so whatever we create there is handed to the owner of the
//! board file (or, for a board about to be created, of its directory). SQLite itself already
//! does this for `-wal`/`-shm` when running as root; this covers the rest and new boards.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    /// The owner of `db`, or of its nearest existing ancestor directory when `db` is new.
    pub fn of_board(db: &Path) -> io::Result<Owner> {
        let mut p = Some(db);
        while let Some(cur) = p {
            match std::fs::metadata(cur) {
                Ok(m) => {
                    return Ok(Owner {
                        uid: m.uid(),
                        gid: m.gid(),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => p = cur.parent(),
                Err(e) => return Err(e),
            }
        }
        Ok(Owner {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        })
    }

    /// Give `path` to this owner if we are root and it is someone else's. Missing files are
    /// fine (SQLite removes `-wal`/`-shm` when the last connection closes).
    pub fn adopt(&self, path: &Path) -> io::Result<()> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(());
        }
        let m = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if m.file_type().is_symlink() || (m.uid() == self.uid && m.gid() == self.gid) {
            return Ok(());
        }
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))
    }
}

pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)
}

/// `mkdir -p`, each directory it creates given to `owner`.
pub fn create_dir_all_owned(dir: &Path, owner: &Owner) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(p) = cur {
        if p.exists() {
            break;
        }
        missing.push(p.to_path_buf());
        cur = p.parent();
    }
    for p in missing.iter().rev() {
        match std::fs::create_dir(p) {
            Ok(()) => owner.adopt(p)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// An exclusive `flock(2)` on a lock file, released on drop. Compatible with upstream's
/// `fcntl.flock` on the same files (`kanban.db.init.lock`, `kanban.db.dispatch.lock`).
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

fn open_lock(path: &Path, owner: &Owner) -> io::Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)?;
    owner.adopt(path)?;
    Ok(f)
}

fn try_flock(f: &File) -> io::Result<bool> {
    // SAFETY: flock on an fd we own; no memory is passed.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
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
        loop {
            if try_flock(&f)? {
                return Ok(FileLock { _file: f });
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("{} is held by another process", path.display()),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
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
        Ok(try_flock(&f)?.then_some(FileLock { _file: f }))
    }
}
