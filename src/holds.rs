//! Operators' holds (`hermes-mgr pause`): a task, a board, or every board held back from new
//! starts, with or without their running workers frozen. Kept in one root-owned file
//! (`holds_file`, under `/var/lib/hermes-mgr` by default) that survives restarts and
//! reboots: a hold stays until `hermes-mgr resume`, and no worker can lift it (the Hermes
//! tree, where upstream's `ESTOP` lives, is theirs to write). Written by the CLI under a
//! lock, replaced whole by `rename`, read by every pass.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A file larger than this is refused (it is root's, but must not cost a pass memory).
const MAX_BYTES: u64 = 16 << 20;

/// One hold: since when, and whether it also froze the running workers it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub since: i64,
    pub freeze: bool,
}

/// A task's hold. `run`: the run it froze (`None`: nothing was running, or not frozen).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskHold {
    pub since: i64,
    pub run: Option<i64>,
}

/// Every hold of this host. Boards are keyed by their database's absolute path (two Hermes
/// roots may both have a `default` board), tasks by that path and their id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holds {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<Hold>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub boards: BTreeMap<String, Hold>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tasks: BTreeMap<String, BTreeMap<String, TaskHold>>,
}

/// What holds back new starts on a board.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoardHeld {
    /// `pause --all`.
    All(Hold),
    /// `pause --board`.
    Board(Hold),
}

impl BoardHeld {
    pub fn hold(&self) -> Hold {
        match self {
            BoardHeld::All(h) | BoardHeld::Board(h) => *h,
        }
    }
}

impl Holds {
    /// Whether the board at `db` takes no new work: every board held, or this one.
    pub fn board(&self, db: &str) -> Option<BoardHeld> {
        self.all
            .map(BoardHeld::All)
            .or_else(|| self.boards.get(db).copied().map(BoardHeld::Board))
    }

    /// The hold of task `task` of the board at `db`, if it has its own.
    pub fn task(&self, db: &str, task: &str) -> Option<&TaskHold> {
        self.tasks.get(db).and_then(|t| t.get(task))
    }

    /// Whether a run of `task` on the board at `db` is to be left frozen: its task is held
    /// with that run frozen, or its board (or every board) is held with `--freeze`.
    pub fn frozen(&self, db: &str, task: &str, run: i64) -> bool {
        self.task(db, task).is_some_and(|t| t.run == Some(run))
            || self.board(db).is_some_and(|b| b.hold().freeze)
    }

    /// Lift task `task`'s own hold on the board at `db`; what it was.
    pub fn release_task(&mut self, db: &str, task: &str) -> Option<TaskHold> {
        let tasks = self.tasks.get_mut(db)?;
        let was = tasks.remove(task);
        if tasks.is_empty() {
            self.tasks.remove(db);
        }
        was
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_none() && self.boards.is_empty() && self.tasks.is_empty()
    }
}

/// The key of the board whose database is `db` (absolute, by its text alone: no link in
/// a tree others write is resolved).
pub fn board_key(db: &Path) -> String {
    std::path::absolute(db)
        .unwrap_or_else(|_| db.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

/// The holds in `path`; none when it does not exist.
pub fn read(path: &Path) -> anyhow::Result<Holds> {
    let bytes = match crate::safe_fs::read_capped(path, MAX_BYTES) {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(Holds::default()),
        Err(e) => anyhow::bail!("read the holds in {}: {e}", path.display()),
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| anyhow::anyhow!("{} is not a holds file: {e}", path.display()))
}

/// Change the holds in `path` under its lock (`<path>.lock`, `flock`), and write them back
/// whole (a temporary file renamed over it): a reader sees the old holds or the new ones.
pub fn update<T>(path: &Path, change: impl FnOnce(&mut Holds) -> T) -> anyhow::Result<T> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("create {}: {e}", dir.display()))?;
    let lock_path = with_suffix(path, ".lock");
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&lock_path)
        .map_err(|e| anyhow::anyhow!("open {}: {e}", lock_path.display()))?;
    nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("lock {}: {e}", lock_path.display()))
        .and_then(|_held| {
            let mut holds = read(path)?;
            let out = change(&mut holds);
            let tmp = with_suffix(path, ".tmp");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)
                .map_err(|e| anyhow::anyhow!("write {}: {e}", tmp.display()))?;
            let text = serde_json::to_vec_pretty(&holds)?;
            f.write_all(&text)
                .and_then(|()| f.write_all(b"\n"))
                .and_then(|()| f.sync_all())
                .map_err(|e| anyhow::anyhow!("write {}: {e}", tmp.display()))?;
            std::fs::rename(&tmp, path)
                .map_err(|e| anyhow::anyhow!("replace {}: {e}", path.display()))?;
            Ok(out)
        })
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The holds file as a pass sees it: read at most once per change of the file (a `stat`
/// per look), so looking before every claim costs a system call, not a parse.
#[derive(Debug)]
pub struct View {
    path: PathBuf,
    seen: Option<(u64, u64, i64, i64, u64)>,
    holds: Holds,
    /// Why the file could not be read: every board counts as held then (a hold that
    /// cannot be read must not be lost).
    pub broken: Option<String>,
}

impl View {
    pub fn new(path: &Path) -> View {
        let mut v = View {
            path: path.to_path_buf(),
            seen: None,
            holds: Holds::default(),
            broken: None,
        };
        v.look();
        v
    }

    /// The holds now.
    pub fn look(&mut self) -> &Holds {
        let sig = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.size()));
        if sig != self.seen || self.seen.is_none() {
            match read(&self.path) {
                Ok(h) => {
                    self.holds = h;
                    self.broken = None;
                }
                Err(e) => self.broken = Some(format!("{e:#}")),
            }
            self.seen = sig;
        }
        &self.holds
    }

    /// The holds as last looked at (no system call).
    pub fn current(&self) -> &Holds {
        &self.holds
    }

    /// Whether the board at `db` takes no new work now, and why (for a person).
    pub fn board_held(&mut self, db: &str) -> Option<String> {
        let why = self.look().board(db).map(|b| describe(&b));
        why.or_else(|| {
            self.broken
                .as_ref()
                .map(|e| format!("the holds cannot be read ({e}): nothing is started"))
        })
    }
}

/// A board's hold, for a person.
pub fn describe(b: &BoardHeld) -> String {
    let (what, h) = match b {
        BoardHeld::All(h) => ("every board", h),
        BoardHeld::Board(h) => ("this board", h),
    };
    format!(
        "PAUSED: {what} held since {} (hermes-mgr pause{}); `hermes-mgr resume` lifts it",
        h.since,
        if h.freeze { ", workers frozen" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_covers_what_it_names() {
        let h = |freeze| Hold { since: 5, freeze };
        let mut holds = Holds::default();
        assert_eq!(holds.board("/a/kanban.db"), None);
        holds.boards.insert("/a/kanban.db".into(), h(false));
        holds
            .tasks
            .entry("/b/kanban.db".into())
            .or_default()
            .insert(
                "t_1".into(),
                TaskHold {
                    since: 6,
                    run: Some(3),
                },
            );
        assert_eq!(
            holds.board("/a/kanban.db"),
            Some(BoardHeld::Board(h(false)))
        );
        assert_eq!(holds.board("/b/kanban.db"), None);
        assert!(holds.frozen("/b/kanban.db", "t_1", 3));
        assert!(
            !holds.frozen("/b/kanban.db", "t_1", 4),
            "a later run was never frozen"
        );
        assert!(
            !holds.frozen("/a/kanban.db", "t_1", 3),
            "a board held without --freeze"
        );
        holds.all = Some(h(true));
        assert_eq!(holds.board("/b/kanban.db"), Some(BoardHeld::All(h(true))));
        assert!(holds.frozen("/c/kanban.db", "t_9", 1));
    }

    #[test]
    fn holds_survive_a_round_trip_and_a_broken_file_holds_everything() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("holds.json");
        let mut view = View::new(&path);
        assert_eq!(view.board_held("/a/kanban.db"), None);
        update(&path, |h| {
            h.boards.insert(
                "/a/kanban.db".into(),
                Hold {
                    since: 1,
                    freeze: false,
                },
            )
        })
        .unwrap();
        assert!(view
            .board_held("/a/kanban.db")
            .unwrap()
            .starts_with("PAUSED: this board"));
        assert_eq!(read(&path).unwrap().boards.len(), 1);
        update(&path, |h| h.boards.clear()).unwrap();
        assert_eq!(view.board_held("/a/kanban.db"), None);
        std::fs::write(&path, b"{not json").unwrap();
        assert!(view
            .board_held("/a/kanban.db")
            .unwrap()
            .contains("cannot be read"));
    }
}
