//! inotify: the kernel tells the daemon when a supervisor has recorded an exit (a file
//! renamed into `<state_dir>/runs/`) and when someone else may have written the board
//! (`kanban.db`, `kanban.db-wal`). No polling.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;

struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A file appeared in the runs directory (a supervisor's exit record).
    RunRecord(PathBuf),
    /// The board file or its WAL was written.
    Board,
}

pub struct Watcher {
    fd: AsyncFd<Fd>,
    runs: (WatchDescriptor, PathBuf),
    board: (WatchDescriptor, OsString),
}

impl Watcher {
    pub fn new(runs_dir: &Path, db: &Path) -> std::io::Result<Watcher> {
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        std::fs::create_dir_all(runs_dir)?;
        let runs = ino.add_watch(
            runs_dir,
            AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE,
        )?;
        let dir = db
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let board = ino.add_watch(
            dir,
            AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_MOVED_TO,
        )?;
        let name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        // SAFETY: `Fd` owns the inotify fd for as long as the AsyncFd lives, and always
        // returns that same fd.
        let fd = unsafe { AsyncFd::register(Fd(ino)) }
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Watcher {
            fd,
            runs: (runs, runs_dir.to_path_buf()),
            board: (board, name),
        })
    }

    /// Wait for the next batch of changes.
    pub async fn next(&self) -> std::io::Result<Vec<Change>> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.get_inner().0.read_events() {
                Ok(events) => {
                    let mut out = Vec::new();
                    for e in events {
                        let Some(name) = e.name else { continue };
                        if e.wd == self.runs.0 {
                            if name.to_string_lossy().ends_with(".json") {
                                out.push(Change::RunRecord(self.runs.1.join(name)));
                            }
                        } else if e.wd == self.board.0 {
                            let n = name.as_encoded_bytes();
                            let base = self.board.1.as_encoded_bytes();
                            if n.starts_with(base)
                                && (n.len() == base.len() || n[base.len()..].starts_with(b"-wal"))
                                && !out.contains(&Change::Board)
                            {
                                out.push(Change::Board);
                            }
                        }
                    }
                    if !out.is_empty() {
                        return Ok(out);
                    }
                }
                Err(nix::Error::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}
