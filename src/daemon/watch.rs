//! inotify: the kernel tells the daemon when a supervisor has recorded an exit (a file
//! renamed into `<state_dir>/runs/`), when someone else may have written a board
//! (`kanban.db`, `kanban.db-wal`), when a board was created, archived or removed
//! (`<root>/kanban/boards/`, a `board.json`), and when Hermes' `config.yaml` changed. No
//! polling.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;

use crate::board::{BoardPaths, Owner};

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
    /// Board `slug`'s file or its WAL was written.
    Board(String),
    /// The set of boards may have changed: `<root>/kanban/boards/` gained or lost an entry,
    /// or a `board.json` was written (`archived`).
    Boards,
    /// One of Hermes' `config.yaml` files was written.
    HermesConfig,
    /// An `ESTOP` (Hermes' emergency stop) appeared or went.
    Estop,
    /// The operators' holds file was replaced (`hermes-mgr pause`/`resume`).
    Holds,
    /// The kernel's queue of events overflowed (`IN_Q_OVERFLOW`): some were lost, so any
    /// of the above may have happened.
    Overflow,
}

/// What events in one watched directory mean. One directory can play several parts (the
/// Hermes root holds the default board and `config.yaml`).
#[derive(Debug, Default, Clone, PartialEq)]
struct Role {
    runs: Option<PathBuf>,
    /// `(file name, board)` of the boards whose database lives here.
    boards: Vec<(OsString, String)>,
    /// `<root>/kanban`: its `boards` entry appearing or going.
    kanban_dir: bool,
    /// `<root>/kanban/boards`: any entry.
    boards_dir: bool,
    /// A board's own directory: its `board.json`.
    board_json: bool,
    /// A directory of `boards/` that is no board yet (`boards create` makes the directory
    /// before its files): its `kanban.db` or `board.json` appearing makes it one.
    candidate: bool,
    /// A directory of Hermes' `config.yaml` (its home, its managed layer).
    config: bool,
    /// A directory where Hermes' emergency stop (`ESTOP`) is looked for.
    estop: bool,
    /// The directory of the holds file: its name.
    holds: Option<OsString>,
}

/// What the watches follow besides the boards served.
#[derive(Clone, Copy)]
pub struct Around<'a> {
    /// The Hermes root, where boards come and go (`None`: one board is pinned).
    pub root: Option<&'a Path>,
    /// The directories of Hermes' `config.yaml`.
    pub configs: &'a [PathBuf],
    /// Where Hermes' `ESTOP` is looked for.
    pub estops: &'a [PathBuf],
    /// The operators' holds file.
    pub holds: &'a Path,
    /// At most this many directories of `boards/` that are no board yet.
    pub candidates: usize,
    /// The board tree's owner, as whom its directories are watched.
    pub owner: Option<&'a Owner>,
}

pub struct Watcher {
    fd: AsyncFd<Fd>,
    roles: HashMap<WatchDescriptor, Role>,
    runs_dir: PathBuf,
}

const MASK: AddWatchFlags = AddWatchFlags::IN_MODIFY
    .union(AddWatchFlags::IN_CLOSE_WRITE)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_CREATE)
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_ONLYDIR);

/// A directory that is only the runs directory: a record arrives renamed into place
/// (`supervise::write_status`), and nothing else there is news — not the writes of its
/// temporary file, nor the dispatcher's own removals, three to five wake-ups a run.
const RUNS_MASK: AddWatchFlags = AddWatchFlags::IN_MOVED_TO.union(AddWatchFlags::IN_ONLYDIR);

impl Role {
    fn mask(&self) -> AddWatchFlags {
        let only_runs = Role {
            runs: self.runs.clone(),
            ..Role::default()
        };
        if self.runs.is_some() && *self == only_runs {
            RUNS_MASK
        } else {
            MASK
        }
    }

    fn merge(&mut self, role: Role) {
        self.runs = self.runs.take().or(role.runs);
        self.boards.extend(role.boards);
        self.kanban_dir |= role.kanban_dir;
        self.boards_dir |= role.boards_dir;
        self.board_json |= role.board_json;
        self.candidate |= role.candidate;
        self.config |= role.config;
        self.estop |= role.estop;
        self.holds = self.holds.take().or(role.holds);
    }
}

impl Watcher {
    pub fn new(runs_dir: &Path) -> std::io::Result<Watcher> {
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        std::fs::create_dir_all(runs_dir)?;
        // SAFETY: `Fd` owns the inotify fd for as long as the AsyncFd lives, and always
        // returns that same fd.
        let fd = unsafe { AsyncFd::register(Fd(ino)) }
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut w = Watcher {
            fd,
            roles: HashMap::new(),
            runs_dir: runs_dir.to_path_buf(),
        };
        w.set_boards(
            &[],
            &Around {
                root: None,
                configs: &[],
                estops: &[],
                holds: Path::new(""),
                candidates: 0,
                owner: None,
            },
        );
        if w.roles.is_empty() {
            return Err(std::io::Error::other(format!(
                "cannot watch {}",
                runs_dir.display()
            )));
        }
        Ok(w)
    }

    /// Watch exactly what serving `boards` needs (and, unless the board is pinned, the
    /// directories where boards come and go, under `root`). Directories in the board tree
    /// are watched as its `owner`: the tree is the workers' to write, and inotify follows a
    /// symlinked directory with the caller's file system identity. A directory that cannot
    /// be watched yet (not created) is retried on the next call.
    pub fn set_boards(&mut self, boards: &[BoardPaths], around: &Around) {
        let Around {
            root,
            configs,
            estops,
            holds,
            candidates,
            owner,
        } = *around;
        let mut want: Vec<(PathBuf, Role, bool)> = vec![(
            self.runs_dir.clone(),
            Role {
                runs: Some(self.runs_dir.clone()),
                ..Role::default()
            },
            false,
        )];
        for b in boards {
            let dir =
                b.db.parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
                    .to_path_buf();
            let name =
                b.db.file_name()
                    .map(OsStr::to_os_string)
                    .unwrap_or_default();
            want.push((
                dir,
                Role {
                    boards: vec![(name, b.slug.clone())],
                    board_json: b.slug != crate::board::DEFAULT_BOARD,
                    ..Role::default()
                },
                true,
            ));
        }
        for dir in configs {
            want.push((
                dir.clone(),
                Role {
                    config: true,
                    ..Role::default()
                },
                !dir.starts_with("/etc"),
            ));
        }
        for dir in estops {
            want.push((
                dir.clone(),
                Role {
                    estop: true,
                    ..Role::default()
                },
                true,
            ));
        }
        if let (Some(dir), Some(name)) = (holds.parent(), holds.file_name()) {
            // Root's directory, outside the board tree: watched with our own powers.
            if !dir.as_os_str().is_empty() {
                want.push((
                    dir.to_path_buf(),
                    Role {
                        holds: Some(name.to_os_string()),
                        ..Role::default()
                    },
                    false,
                ));
            }
        }
        if let Some(root) = root {
            want.extend(root_watches(root, boards, candidates, owner));
        }
        // One watch a directory, asked for what all its parts need: a second
        // `inotify_add_watch` of a directory replaces the first one's mask.
        let mut merged: Vec<(PathBuf, Role, bool)> = Vec::new();
        for (dir, role, in_tree) in want {
            match merged.iter_mut().find(|(d, _, _)| *d == dir) {
                Some((_, r, t)) => {
                    r.merge(role);
                    *t |= in_tree;
                }
                None => merged.push((dir, role, in_tree)),
            }
        }
        let ino = &self.fd.get_ref().0;
        let mut roles: HashMap<WatchDescriptor, Role> = HashMap::new();
        for (dir, role, in_tree) in merged {
            let add = |mask| {
                let add = || ino.add_watch(&dir, mask);
                match (in_tree, owner) {
                    (true, Some(o)) => crate::safe_fs::as_user(o, add).ok().and_then(|r| r.ok()),
                    _ => add().ok(),
                }
            };
            let Some(wd) = add(role.mask()) else { continue };
            match roles.get_mut(&wd) {
                // The same directory by another path (a link): both parts' events.
                Some(r) => {
                    r.merge(role);
                    let _ = add(MASK);
                }
                None => {
                    roles.insert(wd, role);
                }
            }
        }
        for wd in self.roles.keys() {
            if !roles.contains_key(wd) {
                let _ = ino.rm_watch(*wd);
            }
        }
        self.roles = roles;
    }

    /// Wait for the next batch of changes.
    pub async fn next(&self) -> std::io::Result<Vec<Change>> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.get_inner().0.read_events() {
                Ok(events) => {
                    let mut out = Vec::new();
                    let mut push = |c: Change| {
                        if !out.contains(&c) {
                            out.push(c);
                        }
                    };
                    for e in events {
                        if e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                            push(Change::Overflow);
                            continue;
                        }
                        let Some(name) = e.name else { continue };
                        let Some(role) = self.roles.get(&e.wd) else {
                            continue;
                        };
                        let n = name.as_encoded_bytes();
                        if let Some(runs) = &role.runs {
                            if n.ends_with(b".json") {
                                push(Change::RunRecord(runs.join(&name)));
                            }
                        }
                        for (db, slug) in &role.boards {
                            let base = db.as_encoded_bytes();
                            if n.starts_with(base)
                                && (n.len() == base.len() || n[base.len()..].starts_with(b"-wal"))
                            {
                                push(Change::Board(slug.clone()));
                            }
                        }
                        if role.boards_dir
                            || (role.kanban_dir && n == b"boards")
                            || (role.board_json && n == b"board.json")
                            || (role.candidate && (n == b"board.json" || n == b"kanban.db"))
                        {
                            push(Change::Boards);
                        }
                        if role.config && n == b"config.yaml" {
                            push(Change::HermesConfig);
                        }
                        if role.estop && n == crate::hermes_config::ESTOP.as_bytes() {
                            push(Change::Estop);
                        }
                        if role
                            .holds
                            .as_ref()
                            .is_some_and(|h| h.as_encoded_bytes() == n)
                        {
                            push(Change::Holds);
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

/// The watches the Hermes root needs: `kanban/`, `kanban/boards/`, and each directory of
/// `boards/` named as a board but not served yet (at most `candidates` of them), listed as
/// the tree's owner.
fn root_watches(
    root: &Path,
    boards: &[BoardPaths],
    candidates: usize,
    owner: Option<&Owner>,
) -> Vec<(PathBuf, Role, bool)> {
    let mut out = Vec::new();
    let kanban = root.join("kanban");
    out.push((
        kanban.clone(),
        Role {
            kanban_dir: true,
            ..Role::default()
        },
        true,
    ));
    out.push((
        kanban.join("boards"),
        Role {
            boards_dir: true,
            ..Role::default()
        },
        true,
    ));
    let served: Vec<&std::path::Path> = boards.iter().filter_map(|b| b.db.parent()).collect();
    let list = || -> Vec<PathBuf> {
        std::fs::read_dir(kanban.join("boards"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let dirs = match owner {
        Some(o) => crate::safe_fs::as_user(o, list).unwrap_or_default(),
        None => list(),
    };
    let mut room = candidates;
    for dir in dirs {
        if room == 0 {
            break;
        }
        let named_as_slug = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| crate::board::paths::normalize_slug(n).is_ok_and(|s| s == n));
        if named_as_slug && !served.contains(&dir.as_path()) {
            room -= 1;
            out.push((
                dir,
                Role {
                    candidate: true,
                    ..Role::default()
                },
                true,
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// `test` with the tokio runtime the watcher's descriptor needs.
    fn with_runtime(test: impl std::future::Future<Output = ()>) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(test)
    }

    async fn next(w: &Watcher) -> Vec<Change> {
        tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("a change")
            .unwrap()
    }

    /// A record renamed into the runs directory is news; nothing else there is: a file
    /// written in place, a temporary file, a removal (the dispatcher's own, after booking).
    #[test]
    fn the_runs_directory_reports_only_records_renamed_into_place() {
        with_runtime(async {
            let dir = tempfile::tempdir().unwrap();
            let runs = dir.path().join("runs");
            let w = Watcher::new(&runs).unwrap();
            std::fs::write(runs.join("a.json"), "{}").unwrap();
            std::fs::write(runs.join("b.json.tmp"), "{}").unwrap();
            std::fs::remove_file(runs.join("a.json")).unwrap();
            std::fs::rename(runs.join("b.json.tmp"), runs.join("b.json")).unwrap();
            assert_eq!(next(&w).await, vec![Change::RunRecord(runs.join("b.json"))]);
        });
    }

    /// A directory that is the runs directory and more (here, where `config.yaml` is) is
    /// watched for what every part of it needs.
    #[test]
    fn a_directory_with_two_parts_reports_what_each_needs() {
        with_runtime(async {
            let dir = tempfile::tempdir().unwrap();
            let runs = dir.path().join("runs");
            let mut w = Watcher::new(&runs).unwrap();
            w.set_boards(
                &[],
                &Around {
                    root: None,
                    configs: std::slice::from_ref(&runs),
                    estops: &[],
                    holds: Path::new(""),
                    candidates: 0,
                    owner: None,
                },
            );
            std::fs::write(runs.join("config.yaml"), "model: x\n").unwrap();
            assert_eq!(next(&w).await, vec![Change::HermesConfig]);
        });
    }
}
