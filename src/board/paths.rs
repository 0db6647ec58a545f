//! Where a board lives on disk, resolved exactly as hermes-agent 0.19.0 resolves it
//! (`kanban_db.py`: `kanban_home`, `get_current_board`, `kanban_db_path`, `workspaces_root`,
//! `worker_logs_dir`), so that hermes-mgr and `hermes kanban` always open the same file.

use std::path::{Path, PathBuf};

use super::BoardError;

/// The board every install has; its database sits at `<root>/kanban.db` for back-compat.
pub use crate::names::DEFAULT_BOARD;

/// Everything hermes-mgr needs to know about one board's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoardPaths {
    /// The Hermes root (`~/.hermes`, `$HERMES_HOME`, or `$HERMES_KANBAN_HOME`).
    pub root: PathBuf,
    /// The board slug (`default` unless chosen).
    pub slug: String,
    /// The SQLite file.
    pub db: PathBuf,
    /// Parent of the scratch workspaces (`<workspaces>/<task id>`).
    pub workspaces: PathBuf,
    /// Where upstream's workers append `<task id>.log`.
    pub logs: PathBuf,
    /// The trusted directory whose owner does all file work on this board
    /// (`safe_fs::Owner::of_tree`): the Hermes root, or the directory of a board file named
    /// explicitly (`--db`, `$HERMES_KANBAN_DB`). Never a path found inside the tree.
    pub owner_dir: PathBuf,
}

/// The inputs of path resolution. `from_env` reads the process environment; tests build
/// one by hand so that they never depend on the caller's `$HOME`.
#[derive(Debug, Clone, Default)]
pub struct Resolver {
    pub db_flag: Option<PathBuf>,
    pub board_flag: Option<String>,
    pub kanban_db: Option<String>,
    pub kanban_home: Option<String>,
    pub hermes_home: Option<String>,
    pub kanban_board: Option<String>,
    pub workspaces_root: Option<String>,
    pub home: Option<String>,
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Upstream's slug rule: `^[a-z0-9][a-z0-9\-_]{0,63}$` after lower-casing.
pub fn normalize_slug(raw: &str) -> Result<String, BoardError> {
    let s = raw.trim().to_lowercase();
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && (b == b'-' || b == b'_'))
        });
    if ok {
        Ok(s)
    } else {
        Err(BoardError::BadSlug(raw.to_string()))
    }
}

/// `<root>/kanban/current`, read as the root's owner: a worker may have made it a symlink
/// to a secret or a FIFO that would hang every verb. A slug is short; more is not read.
fn read_current(root: &Path) -> Option<String> {
    let owner = crate::safe_fs::Owner::of_tree(root).ok()?;
    let path = root.join("kanban").join("current");
    let bytes = crate::safe_fs::as_user(&owner, || crate::safe_fs::read_capped(&path, 256))
        .ok()?
        .ok()??;
    Some(String::from_utf8_lossy(&bytes).trim().to_string())
}

fn expand_user(p: &str, home: &Path) -> PathBuf {
    if p == "~" {
        home.to_path_buf()
    } else if let Some(rest) = p.strip_prefix("~/") {
        home.join(rest)
    } else {
        PathBuf::from(p)
    }
}

impl Resolver {
    /// The environment as `hermes kanban` would see it, plus the two command-line flags.
    pub fn from_env(db_flag: Option<PathBuf>, board_flag: Option<String>) -> Resolver {
        Resolver {
            db_flag,
            board_flag,
            kanban_db: env_nonempty("HERMES_KANBAN_DB"),
            kanban_home: env_nonempty("HERMES_KANBAN_HOME"),
            hermes_home: std::env::var("HERMES_HOME").ok().filter(|v| !v.is_empty()),
            kanban_board: env_nonempty("HERMES_KANBAN_BOARD"),
            workspaces_root: env_nonempty("HERMES_KANBAN_WORKSPACES_ROOT"),
            home: std::env::var("HOME").ok().filter(|v| !v.is_empty()),
        }
    }

    fn home(&self) -> PathBuf {
        self.home
            .as_deref()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/root"))
    }

    /// `kanban_home()`: `$HERMES_KANBAN_HOME`, else `get_default_hermes_root()`.
    pub fn root(&self) -> PathBuf {
        let home = self.home();
        if let Some(k) = &self.kanban_home {
            return expand_user(k, &home);
        }
        let native = home.join(".hermes");
        let Some(env_home) = &self.hermes_home else {
            return native;
        };
        let env_path = PathBuf::from(env_home);
        // A HERMES_HOME inside ~/.hermes (a profile) shares the native root.
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        if canon(&env_path).starts_with(canon(&native)) {
            return native;
        }
        // <root>/profiles/<name> → <root>
        if let Some(parent) = env_path.parent() {
            if parent.file_name().is_some_and(|n| n == "profiles") {
                if let Some(root) = parent.parent() {
                    return root.to_path_buf();
                }
            }
        }
        env_path
    }

    fn board_dir(root: &Path, slug: &str) -> PathBuf {
        root.join("kanban").join("boards").join(slug)
    }

    fn board_exists(root: &Path, slug: &str) -> bool {
        if slug == DEFAULT_BOARD {
            return true;
        }
        let d = Self::board_dir(root, slug);
        d.join("board.json").exists() || d.join("kanban.db").exists()
    }

    /// `get_current_board()`: `$HERMES_KANBAN_BOARD`, then `<root>/kanban/current`, each only
    /// when that board exists, else `default`.
    fn current_board(&self, root: &Path) -> String {
        let candidates = [self.kanban_board.clone(), read_current(root)];
        for c in candidates.into_iter().flatten() {
            if let Ok(slug) = normalize_slug(&c) {
                if Self::board_exists(root, &slug) {
                    return slug;
                }
            }
        }
        DEFAULT_BOARD.to_string()
    }

    /// Resolve the board. An explicit `--board` must name a valid slug; it need not exist
    /// yet (upstream creates it on first open).
    pub fn resolve(&self) -> Result<BoardPaths, BoardError> {
        let root = self.root();
        let slug = match &self.board_flag {
            Some(b) => normalize_slug(b)?,
            None => self.current_board(&root),
        };
        Ok(self.paths_of(&root, slug))
    }

    /// A board file is named (`--db`, `$HERMES_KANBAN_DB`) or a board is chosen with
    /// `--board`: a dispatcher serves that board alone. Otherwise it serves every board.
    pub fn pinned(&self) -> bool {
        self.db_flag.is_some() || self.kanban_db.is_some() || self.board_flag.is_some()
    }

    /// The paths of board `slug` (a valid slug) under this root, as `resolve` would give
    /// them for `--board <slug>`.
    pub fn board(&self, slug: &str) -> BoardPaths {
        self.paths_of(&self.root(), slug.to_string())
    }

    /// The boards a dispatcher serves, as upstream's gateway does
    /// (`list_boards(include_archived=False)`): the default board first, then every
    /// directory of `<root>/kanban/boards/` named as a slug that holds a `kanban.db` or a
    /// `board.json` whose `archived` is not true, alphabetically. Pinned: that board alone.
    /// Read as the root's owner: the tree is the workers' to write.
    pub fn served_boards(&self) -> Vec<BoardPaths> {
        if self.pinned() {
            return self.resolve().into_iter().collect();
        }
        let root = self.root();
        let mut out = vec![self.paths_of(&root, DEFAULT_BOARD.to_string())];
        out.extend(
            listed_slugs(&root)
                .into_iter()
                .map(|slug| self.paths_of(&root, slug)),
        );
        out
    }

    fn paths_of(&self, root: &Path, slug: String) -> BoardPaths {
        let home = self.home();
        let per_board = |leaf: &str| -> PathBuf {
            if slug == DEFAULT_BOARD {
                root.join("kanban").join(leaf)
            } else {
                Self::board_dir(root, &slug).join(leaf)
            }
        };
        let explicit_db = if let Some(p) = &self.db_flag {
            Some(p.clone())
        } else {
            self.kanban_db.as_ref().map(|p| expand_user(p, &home))
        };
        let db = if let Some(p) = &explicit_db {
            p.clone()
        } else if slug == DEFAULT_BOARD {
            root.join("kanban.db")
        } else {
            Self::board_dir(root, &slug).join("kanban.db")
        };
        let workspaces = match &self.workspaces_root {
            Some(p) => expand_user(p, &home),
            None => per_board("workspaces"),
        };
        let owner_dir = match &explicit_db {
            Some(p) => parent_dir(p),
            None => root.to_path_buf(),
        };
        BoardPaths {
            logs: per_board("logs"),
            workspaces,
            db,
            slug,
            root: root.to_path_buf(),
            owner_dir,
        }
    }
}

/// The non-default, non-archived boards under `root` (`list_boards`' scan). A directory
/// whose name is not already a slug is not a board (upstream would look for it under its
/// lower-cased name and find nothing consistent); `_archived/` is not a slug.
fn listed_slugs(root: &Path) -> Vec<String> {
    let Ok(owner) = crate::safe_fs::Owner::of_tree(root) else {
        return Vec::new();
    };
    let dir = root.join("kanban").join("boards");
    let scan = || -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut slugs: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| normalize_slug(n).is_ok_and(|s| s == *n) && n != DEFAULT_BOARD)
            .filter(|n| {
                let d = dir.join(n);
                d.is_dir() && (d.join("kanban.db").exists() || d.join("board.json").exists())
            })
            .filter(|n| !archived(&dir.join(n).join("board.json")))
            .collect();
        slugs.sort();
        slugs
    };
    crate::safe_fs::as_user(&owner, scan).unwrap_or_default()
}

/// `board.json`'s `archived`, truthy as Python reads it. A file that is missing, not a
/// regular file, over 1 MiB or not a JSON object says nothing: the board is live.
fn archived(board_json: &Path) -> bool {
    let Ok(Some(bytes)) = crate::safe_fs::read_capped(board_json, 1 << 20) else {
        return false;
    };
    let Ok(serde_json::Value::Object(meta)) = serde_json::from_slice(&bytes) else {
        return false;
    };
    match meta.get("archived") {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Bool(b)) => *b,
        Some(serde_json::Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
        Some(serde_json::Value::String(s)) => !s.is_empty(),
        Some(serde_json::Value::Array(a)) => !a.is_empty(),
        Some(serde_json::Value::Object(o)) => !o.is_empty(),
    }
}

/// The directory of a file, `.` for a bare file name.
fn parent_dir(p: &Path) -> PathBuf {
    p.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

impl BoardPaths {
    /// All board files under one directory: used by tests and `--db` users who want a
    /// self-contained board.
    pub fn for_db(db: &Path) -> BoardPaths {
        let dir = parent_dir(db);
        BoardPaths {
            owner_dir: dir.clone(),
            root: dir.clone(),
            slug: DEFAULT_BOARD.to_string(),
            db: db.to_path_buf(),
            workspaces: dir.join("kanban").join("workspaces"),
            logs: dir.join("kanban").join("logs"),
        }
    }

    /// `<db>.<suffix>` — upstream's sibling lock files (`init.lock`, `dispatch.lock`).
    pub fn sibling(&self, suffix: &str) -> PathBuf {
        let mut s = self.db.clone().into_os_string();
        s.push(".");
        s.push(suffix);
        PathBuf::from(s)
    }

    /// `<root>/kanban/.dispatcher.lock`, the gateway-wide dispatcher singleton.
    pub fn dispatcher_lock(&self) -> PathBuf {
        self.root.join("kanban").join(".dispatcher.lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(home: &str) -> Resolver {
        Resolver {
            home: Some(home.into()),
            ..Default::default()
        }
    }

    #[test]
    fn default_board_under_dot_hermes() {
        let p = r("/h").resolve().unwrap();
        assert_eq!(p.db, PathBuf::from("/h/.hermes/kanban.db"));
        assert_eq!(p.workspaces, PathBuf::from("/h/.hermes/kanban/workspaces"));
        assert_eq!(p.logs, PathBuf::from("/h/.hermes/kanban/logs"));
    }

    #[test]
    fn hermes_home_outside_native_is_the_root() {
        let p = Resolver {
            hermes_home: Some("/opt/data".into()),
            ..r("/h")
        }
        .resolve()
        .unwrap();
        assert_eq!(p.db, PathBuf::from("/opt/data/kanban.db"));
    }

    #[test]
    fn profile_home_maps_to_its_root() {
        let p = Resolver {
            hermes_home: Some("/opt/data/profiles/coder".into()),
            ..r("/h")
        }
        .resolve()
        .unwrap();
        assert_eq!(p.root, PathBuf::from("/opt/data"));
        let p = Resolver {
            hermes_home: Some("/h/.hermes/profiles/coder".into()),
            ..r("/h")
        }
        .resolve()
        .unwrap();
        assert_eq!(p.root, PathBuf::from("/h/.hermes"));
    }

    #[test]
    fn kanban_home_beats_hermes_home_and_db_env_beats_both() {
        let base = Resolver {
            kanban_home: Some("/k".into()),
            hermes_home: Some("/opt/data".into()),
            ..r("/h")
        };
        assert_eq!(base.resolve().unwrap().db, PathBuf::from("/k/kanban.db"));
        let p = Resolver {
            kanban_db: Some("/x/y.db".into()),
            ..base.clone()
        }
        .resolve()
        .unwrap();
        assert_eq!(p.db, PathBuf::from("/x/y.db"));
        let p = Resolver {
            db_flag: Some("/flag.db".into()),
            kanban_db: Some("/x/y.db".into()),
            ..base
        }
        .resolve()
        .unwrap();
        assert_eq!(p.db, PathBuf::from("/flag.db"));
    }

    #[test]
    fn named_board_lives_under_boards() {
        let p = Resolver {
            board_flag: Some("Ops".into()),
            ..r("/h")
        }
        .resolve()
        .unwrap();
        assert_eq!(p.slug, "ops");
        assert_eq!(
            p.db,
            PathBuf::from("/h/.hermes/kanban/boards/ops/kanban.db")
        );
        assert_eq!(
            p.workspaces,
            PathBuf::from("/h/.hermes/kanban/boards/ops/workspaces")
        );
    }

    #[test]
    fn env_board_only_when_it_exists() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join(".hermes");
        let res = Resolver {
            kanban_board: Some("ops".into()),
            home: Some(dir.path().to_string_lossy().into()),
            ..Default::default()
        };
        assert_eq!(res.resolve().unwrap().slug, "default");
        std::fs::create_dir_all(root.join("kanban/boards/ops")).unwrap();
        std::fs::write(root.join("kanban/boards/ops/board.json"), "{}").unwrap();
        assert_eq!(res.resolve().unwrap().slug, "ops");
    }

    #[test]
    fn every_live_board_is_served_default_first() {
        let dir = tempfile::tempdir().unwrap();
        let boards = dir.path().join(".hermes/kanban/boards");
        for (name, meta) in [
            ("ops", Some(r#"{"archived": false}"#)),
            ("alpha", None),
            ("old", Some(r#"{"archived": 1}"#)),
            ("Caps", Some("{}")),
            ("_archived", Some("{}")),
            ("empty", None),
            ("junk", Some("not json")),
        ] {
            std::fs::create_dir_all(boards.join(name)).unwrap();
            match meta {
                Some(m) => std::fs::write(boards.join(name).join("board.json"), m).unwrap(),
                None if name != "empty" => {
                    std::fs::write(boards.join(name).join("kanban.db"), "").unwrap()
                }
                None => {}
            }
        }
        let res = Resolver {
            home: Some(dir.path().to_string_lossy().into()),
            ..Default::default()
        };
        let slugs: Vec<String> = res.served_boards().into_iter().map(|p| p.slug).collect();
        assert_eq!(slugs, ["default", "alpha", "junk", "ops"]);
        let pinned = Resolver {
            board_flag: Some("ops".into()),
            ..res
        };
        let slugs: Vec<String> = pinned.served_boards().into_iter().map(|p| p.slug).collect();
        assert_eq!(slugs, ["ops"]);
    }

    #[test]
    fn hostile_slugs_are_refused() {
        for bad in ["../etc", "-x", "_x", "a/b", "", &"a".repeat(65), "a b"] {
            assert!(normalize_slug(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(normalize_slug(" My-Board_2 ").unwrap(), "my-board_2");
    }
}
