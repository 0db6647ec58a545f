//! Hermes' own `kanban.db`: the only module that speaks SQL.
//!
//! The file is shared with `hermes kanban` and with Hermes workers, which write it directly
//! from Python. Everything here follows hermes-agent 0.19.0's rules so that both sides can
//! write at once: upstream's DDL, its pragmas, `BEGIN IMMEDIATE` for every write, and
//! compare-and-swap guards (`WHERE status = … AND claim_lock IS …`) so a lost race changes
//! nothing instead of clobbering the other writer.
//!
//! **Invariant:** `tasks.current_run_id` is non-NULL exactly while an open `task_runs` row
//! (`ended_at IS NULL`) exists for the task; every transition writes a `task_events` row with
//! upstream's kind and payload.

pub mod lock;
mod model;
pub mod paths;
mod schema;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde_json::{json, Map, Value};

use crate::outcome;
pub use crate::outcome::RunEnd;
use crate::safe_fs;
pub use crate::safe_fs::Owner;
pub use model::{Claim, EndResult, Event, NewTask, Run, Status, Task, BLOCK_KINDS};
pub use paths::{BoardPaths, Resolver};

/// Upstream's `DEFAULT_CLAIM_TTL_SECONDS`.
pub const DEFAULT_CLAIM_TTL: i64 = 15 * 60;
/// Upstream's `DEFAULT_FAILURE_LIMIT`: consecutive failures before the breaker trips.
pub const DEFAULT_FAILURE_LIMIT: i64 = 2;
/// Upstream's `BLOCK_RECURRENCE_LIMIT`: re-blocks for one cause before `triage`.
pub const BLOCK_RECURRENCE_LIMIT: i64 = 2;
/// Upstream's default busy timeout; `HERMES_KANBAN_BUSY_TIMEOUT_MS` overrides it.
pub const DEFAULT_BUSY_TIMEOUT_MS: u64 = 120_000;

#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    #[error("{path}: not a SQLite database (header {header:?}); the file was left untouched")]
    NotSqlite { path: PathBuf, header: String },
    #[error("{path}: the board is corrupt ({detail}); the file was left untouched — restore it from a backup or move it aside")]
    Corrupt { path: PathBuf, detail: String },
    #[error("{path}: the board is locked by another writer ({detail}); retry, or find the process holding it with `fuser {path}`")]
    Locked { path: PathBuf, detail: String },
    #[error("{path}: this board was made by a Hermes older than 0.19.0 (missing task columns: {missing}); open it once with `hermes kanban list` to migrate it")]
    OldSchema { path: PathBuf, missing: String },
    #[error(
        "{path}: the board does not exist; create it with `hermes kanban init` or `hermes-mgr add`"
    )]
    Missing { path: PathBuf },
    #[error("invalid board slug {0:?}: use 1-64 lowercase letters, digits, '-' or '_', not starting with '-' or '_'")]
    BadSlug(String),
    #[error("no task {0:?} on this board; `hermes-mgr list` shows the ids")]
    NoSuchTask(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {op}: {source}")]
    Sqlite {
        path: PathBuf,
        op: &'static str,
        source: rusqlite::Error,
    },
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
}

pub type Result<T, E = BoardError> = std::result::Result<T, E>;

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `"<hostname>:<pid>"` — upstream's `_claimer_id()`; its host-local checks compare the
/// hostname prefix, so the format must match exactly.
pub fn claimer_id() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    format!("{host}:{}", std::process::id())
}

/// `t_` + 8 hex digits from the kernel's CSPRNG, as upstream's `secrets.token_hex(4)`.
fn new_task_id() -> std::io::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 4];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(format!(
        "t_{:02x}{:02x}{:02x}{:02x}",
        b[0], b[1], b[2], b[3]
    ))
}

fn payload_text(v: &Value) -> Option<String> {
    // Upstream stores NULL for an empty payload (`json.dumps(payload) if payload else None`).
    match v {
        Value::Null => None,
        Value::Object(m) if m.is_empty() => None,
        other => Some(other.to_string()),
    }
}

/// Whether an operation is allowed to create the board file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Create the file (and upstream's schema) when it is missing, as `hermes kanban` does.
    CreateIfMissing,
    /// Fail with `BoardError::Missing`: for commands that must not leave an empty board
    /// behind a typo'd path.
    MustExist,
    /// Read only (`status`, `list`, `show`, `logs`): must exist; skips the integrity check
    /// (a full scan, 0.4 s on a 100k-task board) and writes nothing, not even the WAL switch.
    Inspect,
}

/// An open board.
pub struct Board {
    conn: Connection,
    paths: BoardPaths,
    owner: Owner,
    /// The select list for tasks read on the dispatch path (`hot_projection`).
    hot: String,
}

impl std::fmt::Debug for Board {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Board").field("db", &self.paths.db).finish()
    }
}

fn busy_timeout() -> Duration {
    let ms = std::env::var("HERMES_KANBAN_BUSY_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|v| *v > 0)
        .unwrap_or(DEFAULT_BUSY_TIMEOUT_MS);
    Duration::from_millis(ms)
}

/// Refuse a file that is not SQLite before SQLite (or our pragmas) can touch it.
fn check_header(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = match safe_fs::open_regular(path, safe_fs::Access::Read) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(BoardError::Io {
                path: path.into(),
                op: "open",
                source,
            })
        }
    };
    let mut head = Vec::with_capacity(16);
    f.by_ref()
        .take(16)
        .read_to_end(&mut head)
        .map_err(|source| BoardError::Io {
            path: path.into(),
            op: "read header",
            source,
        })?;
    // An empty file is an empty database to SQLite, and to upstream.
    if head.is_empty() || head == b"SQLite format 3\0" {
        return Ok(());
    }
    Err(BoardError::NotSqlite {
        path: path.into(),
        header: String::from_utf8_lossy(&head).into_owned(),
    })
}

fn classify(path: &Path, op: &'static str, e: rusqlite::Error) -> BoardError {
    use rusqlite::ErrorCode::*;
    if let rusqlite::Error::SqliteFailure(f, msg) = &e {
        let detail = msg.clone().unwrap_or_else(|| f.to_string());
        match f.code {
            DatabaseCorrupt | NotADatabase => {
                return BoardError::Corrupt {
                    path: path.into(),
                    detail,
                }
            }
            DatabaseBusy | DatabaseLocked => {
                return BoardError::Locked {
                    path: path.into(),
                    detail,
                }
            }
            _ => {}
        }
    }
    BoardError::Sqlite {
        path: path.into(),
        op,
        source: e,
    }
}

/// The SQLite file to open: the trusted directory resolved once (it is the
/// administrator's), the rest of the path as given, so that `SQLITE_OPEN_NOFOLLOW` refuses
/// a symlink inside the owner's tree but not one above it (`/home` → `/srv/home`).
fn sqlite_path(paths: &BoardPaths) -> PathBuf {
    match (
        paths.db.strip_prefix(&paths.owner_dir),
        std::fs::canonicalize(&paths.owner_dir),
    ) {
        (Ok(rest), Ok(dir)) => dir.join(rest),
        _ => paths.db.clone(),
    }
}

/// `Board::open`'s file work, run as the board's owner.
fn open_conn(
    paths: &BoardPaths,
    mode: OpenMode,
    owner: &Owner,
    busy: Duration,
) -> Result<Connection> {
    let db = &paths.db;
    let exists = match std::fs::symlink_metadata(db) {
        Ok(m) if m.is_file() => true,
        Ok(_) => {
            return Err(BoardError::Invalid(format!(
                "{}: not a regular file (a symlink, directory or device); hermes-mgr opens a board only as a plain file, and left it untouched",
                db.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(source) => {
            return Err(BoardError::Io {
                path: db.clone(),
                op: "stat",
                source,
            })
        }
    };
    if !exists && mode != OpenMode::CreateIfMissing {
        return Err(BoardError::Missing { path: db.clone() });
    }
    if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| BoardError::Io {
            path: dir.into(),
            op: "create board directory",
            source,
        })?;
    }
    check_header(db)?;
    let init_lock =
        lock::FileLock::acquire(&paths.sibling("init.lock"), owner, Duration::from_secs(10))
            .map_err(|source| BoardError::Io {
                path: paths.sibling("init.lock"),
                op: "take init lock",
                source,
            })?;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_NOFOLLOW;
    let conn = Connection::open_with_flags(sqlite_path(paths), flags)
        .map_err(|e| classify(db, "open", e))?;
    conn.busy_timeout(busy)
        .map_err(|e| classify(db, "busy_timeout", e))?;
    if exists && mode != OpenMode::Inspect {
        let verdict: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(|e| classify(db, "integrity_check", e))?;
        if verdict != "ok" {
            return Err(BoardError::Corrupt {
                path: db.clone(),
                detail: verdict,
            });
        }
    }
    // The first read opens `-wal` and `-shm`: here, as the owner, not later as root.
    let journal: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .map_err(|e| classify(db, "journal_mode", e))?;
    if !journal.eq_ignore_ascii_case("wal") && mode != OpenMode::Inspect {
        conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0))
            .map_err(|e| classify(db, "journal_mode=WAL", e))?;
    }
    set_chunk_size(&conn, CHUNK_BYTES).map_err(|e| classify(db, "chunk size", e))?;
    conn.execute_batch(
        "PRAGMA synchronous=FULL; PRAGMA wal_autocheckpoint=100; PRAGMA foreign_keys=ON;
         PRAGMA secure_delete=ON; PRAGMA cell_size_check=ON;",
    )
    .map_err(|e| classify(db, "pragmas", e))?;
    let has_tasks: bool = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='tasks'",
            [],
            |_| Ok(true),
        )
        .optional()
        .map_err(|e| classify(db, "read schema", e))?
        .unwrap_or(false);
    if !has_tasks && mode != OpenMode::Inspect {
        conn.execute_batch(schema::DDL)
            .map_err(|e| classify(db, "create schema", e))?;
    }
    drop(init_lock);
    Ok(conn)
}

impl Board {
    /// Open the board at `paths.db` the way upstream's `connect()` does: header check and
    /// `PRAGMA integrity_check` before anything is written, then WAL (only if the file is not
    /// WAL already — re-issuing it was upstream's corruption bug #31158), `synchronous=FULL`,
    /// and the schema under upstream's cross-process `kanban.db.init.lock`.
    ///
    /// Everything here runs as the board's owner (`safe_fs::as_user`): the board's tree is
    /// theirs and their workers', so root neither follows a link planted there nor creates
    /// a file in it; what is created (the board, `-wal`, `-shm`, lock files) is theirs. The
    /// file must be a regular file reached without a symlink below the trusted directory
    /// (`SQLITE_OPEN_NOFOLLOW`), so a linked `kanban.db` cannot make root write another
    /// database.
    pub fn open(paths: &BoardPaths, mode: OpenMode) -> Result<Board> {
        Board::open_waiting(paths, mode, busy_timeout())
    }

    /// `open`, waiting at most `busy` for a writer's lock (upstream's 120 s, or
    /// `$HERMES_KANBAN_BUSY_TIMEOUT_MS`, is for people; the daemon must answer its watchdog).
    pub fn open_waiting(paths: &BoardPaths, mode: OpenMode, busy: Duration) -> Result<Board> {
        let owner = Owner::of_tree(&paths.owner_dir).map_err(|source| BoardError::Io {
            path: paths.owner_dir.clone(),
            op: "stat",
            source,
        })?;
        let conn = safe_fs::as_user(&owner, || open_conn(paths, mode, &owner, busy)).map_err(
            |source| BoardError::Io {
                path: paths.db.clone(),
                op: "open as the board's owner",
                source,
            },
        )??;
        let mut board = Board {
            conn,
            paths: paths.clone(),
            owner,
            hot: String::new(),
        };
        board.check_columns()?;
        board.hot = hot_projection(&board.columns("tasks")?);
        Ok(board)
    }

    /// How long a write waits for another writer's lock before `BoardError::Locked`. The
    /// CLI waits upstream's 120 s; the daemon waits briefly and retries from its loop, so
    /// that a locked board never stalls its watchdog.
    pub fn set_busy_timeout(&self, t: Duration) -> Result<()> {
        self.conn
            .busy_timeout(t)
            .map_err(|e| self.err("busy_timeout", e))
    }

    /// `PRAGMA data_version`: changes when *another* connection commits to the file, so
    /// our own writes never look like someone else's.
    pub fn data_version(&self) -> Result<i64> {
        self.conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(|e| self.err("data_version", e))
    }

    /// The newest run of a task.
    pub fn last_run(&self, id: &str) -> Result<Option<Run>> {
        self.conn
            .query_row(
                "SELECT * FROM task_runs WHERE task_id=?1 ORDER BY id DESC LIMIT 1",
                [id],
                Run::from_row,
            )
            .optional()
            .map_err(|e| self.err("read run", e))
    }

    pub fn paths(&self) -> &BoardPaths {
        &self.paths
    }

    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    fn check_columns(&self) -> Result<()> {
        let cols = self.columns("tasks")?;
        let missing: Vec<&str> = schema::REQUIRED_TASK_COLUMNS
            .iter()
            .copied()
            .filter(|c| !cols.iter().any(|x| x == c))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(BoardError::OldSchema {
                path: self.paths.db.clone(),
                missing: missing.join(", "),
            })
        }
    }

    /// The columns a table has now (upstream may have added some since 0.19.0).
    pub fn columns(&self, table: &str) -> Result<Vec<String>> {
        let mut st = self
            .conn
            .prepare("SELECT name FROM pragma_table_info(?1)")
            .map_err(|e| self.err("table_info", e))?;
        let cols = st
            .query_map([table], |r| r.get::<_, String>(0))
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err("table_info", e))?;
        Ok(cols)
    }

    fn err(&self, op: &'static str, e: rusqlite::Error) -> BoardError {
        classify(&self.paths.db, op, e)
    }

    /// `PRAGMA integrity_check`, for tests and `doctor`.
    pub fn integrity_check(&self) -> Result<String> {
        self.conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(|e| self.err("integrity_check", e))
    }

    /// Run `f` inside `BEGIN IMMEDIATE … COMMIT`: the write lock is taken up front, so a
    /// compare-and-swap read inside `f` cannot go stale before its write. Rolled back on error.
    fn write<T>(&self, op: &'static str, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| self.err(op, e))?;
        match f(&self.conn) {
            Ok(v) => {
                if let Err(e) = self.conn.execute_batch("COMMIT") {
                    let _ = self.conn.execute_batch("ROLLBACK");
                    return Err(self.err(op, e));
                }
                Ok(v)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    // ---- reads -------------------------------------------------------------------------

    pub fn task(&self, id: &str) -> Result<Option<Task>> {
        self.conn
            .query_row("SELECT * FROM tasks WHERE id = ?1", [id], Task::from_row)
            .optional()
            .map_err(|e| self.err("read task", e))
    }

    pub fn require_task(&self, id: &str) -> Result<Task> {
        self.task(id)?
            .ok_or_else(|| BoardError::NoSuchTask(id.to_string()))
    }

    /// Tasks in upstream's dispatch order (priority high first, then oldest first).
    pub fn list(&self, status: Option<&str>, assignee: Option<&str>) -> Result<Vec<Task>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT * FROM tasks WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR assignee = ?2)
                 ORDER BY priority DESC, created_at ASC, id ASC",
            )
            .map_err(|e| self.err("list tasks", e))?;
        let rows = st
            .query_map(params![status, assignee], Task::from_row)
            .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err("list tasks", e))?;
        Ok(rows)
    }

    /// How many tasks are in each status (one indexed GROUP BY, fast on big boards).
    pub fn counts(&self) -> Result<std::collections::BTreeMap<String, i64>> {
        let mut st = self
            .conn
            .prepare("SELECT status, count(*) FROM tasks GROUP BY status")
            .map_err(|e| self.err("count tasks", e))?;
        let v = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .and_then(|r| r.collect::<rusqlite::Result<_>>())
            .map_err(|e| self.err("count tasks", e))?;
        Ok(v)
    }

    /// Up to `limit` tasks in `status`, in dispatch order (`hot_projection`: for `status`).
    pub fn in_status(&self, status: &str, limit: usize) -> Result<Vec<Task>> {
        let mut st = self
            .conn
            .prepare(&format!("SELECT {} FROM tasks WHERE status = ?1 ORDER BY priority DESC, created_at ASC, id ASC LIMIT ?2", self.hot))
            .map_err(|e| self.err("list tasks", e))?;
        let v = st
            .query_map(params![status, limit as i64], Task::from_row)
            .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err("list tasks", e))?;
        Ok(v)
    }

    /// Number of runs of a task.
    pub fn run_count(&self, id: &str) -> Result<i64> {
        self.conn
            .query_row(
                "SELECT count(*) FROM task_runs WHERE task_id = ?1",
                [id],
                |r| r.get(0),
            )
            .map_err(|e| self.err("count runs", e))
    }

    pub fn parents(&self, id: &str) -> Result<Vec<String>> {
        self.strings(
            "SELECT parent_id FROM task_links WHERE child_id = ?1 ORDER BY parent_id",
            id,
        )
    }

    pub fn children(&self, id: &str) -> Result<Vec<String>> {
        self.strings(
            "SELECT child_id FROM task_links WHERE parent_id = ?1 ORDER BY child_id",
            id,
        )
    }

    fn strings(&self, sql: &str, id: &str) -> Result<Vec<String>> {
        let mut st = self
            .conn
            .prepare(sql)
            .map_err(|e| self.err("read links", e))?;
        let v = st
            .query_map([id], |r| r.get(0))
            .and_then(|r| r.collect::<rusqlite::Result<Vec<String>>>())
            .map_err(|e| self.err("read links", e))?;
        Ok(v)
    }

    pub fn runs(&self, id: &str) -> Result<Vec<Run>> {
        let mut st = self
            .conn
            .prepare("SELECT * FROM task_runs WHERE task_id = ?1 ORDER BY id")
            .map_err(|e| self.err("read runs", e))?;
        let v = st
            .query_map([id], Run::from_row)
            .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err("read runs", e))?;
        Ok(v)
    }

    pub fn run(&self, run_id: i64) -> Result<Option<Run>> {
        self.conn
            .query_row(
                "SELECT * FROM task_runs WHERE id = ?1",
                [run_id],
                Run::from_row,
            )
            .optional()
            .map_err(|e| self.err("read run", e))
    }

    pub fn events(&self, id: &str) -> Result<Vec<Event>> {
        let mut st = self
            .conn
            .prepare("SELECT * FROM task_events WHERE task_id = ?1 ORDER BY id")
            .map_err(|e| self.err("read events", e))?;
        let v = st
            .query_map([id], Event::from_row)
            .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err("read events", e))?;
        Ok(v)
    }

    // ---- writes ------------------------------------------------------------------------

    /// `create_task`: a new id, `ready` when every parent is done, else `todo`, and a
    /// `created` event. Unknown parents are refused. An `idempotency_key` that a live task
    /// already carries returns that task's id instead.
    pub fn create(&self, t: &NewTask) -> Result<String> {
        let title = t.title.trim();
        if title.is_empty() {
            return Err(BoardError::Invalid("a task needs a non-empty title".into()));
        }
        let assignee = t
            .assignee
            .as_deref()
            .map(|a| a.trim().to_lowercase())
            .filter(|a| !a.is_empty());
        if let Some(r) = t.max_retries {
            if r < 1 {
                return Err(BoardError::Invalid(format!(
                    "--max-retries must be at least 1, got {r}"
                )));
            }
        }
        if let Some(r) = t.max_runtime_seconds {
            if r < 1 {
                return Err(BoardError::Invalid(format!(
                    "--max-runtime must be at least 1 second, got {r}"
                )));
            }
        }
        let mut parents: Vec<&str> = Vec::new();
        for p in t.parents.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
            if !parents.contains(&p) {
                parents.push(p);
            }
        }
        if let Some(key) = &t.idempotency_key {
            let existing: Option<String> = self
                .conn
                .query_row(
                    "SELECT id FROM tasks WHERE idempotency_key = ?1 AND status != 'archived'
                     ORDER BY created_at DESC LIMIT 1",
                    [key],
                    |r| r.get(0),
                )
                .optional()
                .map_err(|e| self.err("idempotency lookup", e))?;
            if let Some(id) = existing {
                return Ok(id);
            }
        }
        // Two attempts, as upstream: a fresh id colliding twice means something else is wrong.
        for attempt in 0..2 {
            let id = new_task_id().map_err(|source| BoardError::Io {
                path: "/dev/urandom".into(),
                op: "read",
                source,
            })?;
            let res = self.write("create task", |c| {
                let mut status = "ready";
                for p in &parents {
                    let st: Option<String> = c
                        .query_row("SELECT status FROM tasks WHERE id = ?1", [p], |r| r.get(0))
                        .optional()
                        .map_err(|e| self.err("read parent", e))?;
                    match st.as_deref() {
                        None => return Err(BoardError::Invalid(format!("unknown parent task {p:?}"))),
                        Some("done") => {}
                        Some(_) => status = "todo",
                    }
                }
                c.execute(
                    "INSERT INTO tasks (id, title, body, assignee, status, priority, created_by, created_at,
                        workspace_kind, tenant, idempotency_key, max_runtime_seconds, max_retries, goal_mode)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'scratch', ?9, ?10, ?11, ?12, 0)",
                    params![
                        id, title, t.body, assignee, status, t.priority, t.created_by, now(), t.tenant,
                        t.idempotency_key, t.max_runtime_seconds, t.max_retries
                    ],
                )
                .map_err(|e| self.err("insert task", e))?;
                for p in &parents {
                    c.execute("INSERT OR IGNORE INTO task_links (parent_id, child_id) VALUES (?1, ?2)", params![p, id])
                        .map_err(|e| self.err("link parent", e))?;
                }
                let payload = json!({
                    "assignee": assignee, "status": status, "parents": parents, "tenant": t.tenant,
                    "branch_name": null, "skills": null, "goal_mode": null,
                });
                append_event(c, &id, "created", &payload, None).map_err(|e| self.err("append event", e))?;
                Ok(id.clone())
            });
            match res {
                Err(BoardError::Sqlite {
                    source: rusqlite::Error::SqliteFailure(f, _),
                    ..
                }) if f.code == rusqlite::ErrorCode::ConstraintViolation && attempt == 0 => {
                    continue
                }
                other => return other,
            }
        }
        Err(BoardError::Invalid(
            "could not allocate a unique task id".into(),
        ))
    }

    /// `claim_task`: `ready → running` with `claim_lock = lock`, a `running` run row,
    /// `current_run_id` and a `claimed` event. `None` when someone else got there first or
    /// the task is not ready; a task whose parents reopened is demoted to `todo`.
    pub fn claim(&self, id: &str, lock: &str, ttl: i64) -> Result<Option<Claim>> {
        let now = now();
        let expires = now + ttl;
        self.write("claim", |c| {
            let open_parent: bool = c
                .query_row(
                    "SELECT 1 FROM task_links l JOIN tasks p ON p.id = l.parent_id
                     WHERE l.child_id = ?1 AND p.status NOT IN ('done','archived') LIMIT 1",
                    [id],
                    |_| Ok(true),
                )
                .optional()
                .map_err(|e| self.err("claim", e))?
                .unwrap_or(false);
            if open_parent {
                let n = c
                    .execute("UPDATE tasks SET status='todo' WHERE id=?1 AND status='ready'", [id])
                    .map_err(|e| self.err("claim", e))?;
                if n == 1 {
                    append_event(c, id, "claim_rejected", &json!({"reason": "parents_not_done"}), None)
                        .map_err(|e| self.err("append event", e))?;
                }
                return Ok(None);
            }
            // A dangling run pointer on a ready task is closed before the new run opens.
            let stale: Option<i64> = c
                .query_row("SELECT current_run_id FROM tasks WHERE id=?1 AND status='ready'", [id], |r| r.get(0))
                .optional()
                .map_err(|e| self.err("claim", e))?
                .flatten();
            if let Some(run) = stale {
                c.execute(
                    "UPDATE task_runs SET status='reclaimed', outcome='reclaimed',
                        summary=COALESCE(summary,'invariant recovery on re-claim'), ended_at=?1,
                        claim_lock=NULL, claim_expires=NULL, worker_pid=NULL
                     WHERE id=?2 AND ended_at IS NULL",
                    params![now, run],
                )
                .map_err(|e| self.err("claim", e))?;
            }
            let n = c
                .execute(
                    "UPDATE tasks SET status='running', claim_lock=?1, claim_expires=?2,
                        started_at=COALESCE(started_at, ?3)
                     WHERE id=?4 AND status='ready' AND claim_lock IS NULL",
                    params![lock, expires, now, id],
                )
                .map_err(|e| self.err("claim", e))?;
            if n != 1 {
                return Ok(None);
            }
            c.execute(
                "INSERT INTO task_runs (task_id, profile, step_key, status, claim_lock, claim_expires,
                    max_runtime_seconds, started_at)
                 SELECT id, assignee, current_step_key, 'running', ?2, ?3, max_runtime_seconds, ?4
                 FROM tasks WHERE id=?1",
                params![id, lock, expires, now],
            )
            .map_err(|e| self.err("open run", e))?;
            let run_id = c.last_insert_rowid();
            c.execute("UPDATE tasks SET current_run_id=?1 WHERE id=?2", params![run_id, id])
                .map_err(|e| self.err("claim", e))?;
            append_event(c, id, "claimed", &json!({"lock": lock, "expires": expires, "run_id": run_id}), Some(run_id))
                .map_err(|e| self.err("append event", e))?;
            let task = c.query_row("SELECT * FROM tasks WHERE id=?1", [id], Task::from_row).map_err(|e| self.err("claim", e))?;
            Ok(Some(Claim { task, run_id, lock: lock.to_string(), expires }))
        })
    }

    /// `heartbeat_claim`: push `claim_expires` out by `ttl` while `lock` still owns the task,
    /// so upstream's stale-claim sweep never reclaims a live worker. `false` = not ours any more.
    pub fn extend_claim(&self, id: &str, lock: &str, ttl: i64) -> Result<bool> {
        let expires = now() + ttl;
        self.write("extend claim", |c| {
            let n = c
                .execute(
                    "UPDATE tasks SET claim_expires=?1 WHERE id=?2 AND status='running' AND claim_lock=?3",
                    params![expires, id, lock],
                )
                .map_err(|e| self.err("extend claim", e))?;
            if n == 1 {
                c.execute(
                    "UPDATE task_runs SET claim_expires=?1
                     WHERE id=(SELECT current_run_id FROM tasks WHERE id=?2)",
                    params![expires, id],
                )
                .map_err(|e| self.err("extend claim", e))?;
            }
            Ok(n == 1)
        })
    }

    /// Record the worker's PID on task and run, with upstream's `spawned {pid}` event.
    /// Guarded by the run id so a late write cannot land on a newer run.
    pub fn set_worker_pid(&self, id: &str, run_id: i64, pid: i64) -> Result<bool> {
        self.write("set worker pid", |c| {
            let n = c
                .execute(
                    "UPDATE tasks SET worker_pid=?1 WHERE id=?2 AND current_run_id=?3 AND status='running'",
                    params![pid, id, run_id],
                )
                .map_err(|e| self.err("set worker pid", e))?;
            if n == 1 {
                c.execute("UPDATE task_runs SET worker_pid=?1 WHERE id=?2", params![pid, run_id])
                    .map_err(|e| self.err("set worker pid", e))?;
                append_event(c, id, "spawned", &json!({"pid": pid}), Some(run_id)).map_err(|e| self.err("append event", e))?;
            }
            Ok(n == 1)
        })
    }

    /// Persist the workspace a run uses, as upstream's `resolve_workspace` does at spawn.
    pub fn set_workspace(&self, id: &str, run_id: i64, path: &Path) -> Result<bool> {
        let p = path.to_string_lossy();
        self.write("set workspace", |c| {
            let n = c
                .execute(
                    "UPDATE tasks SET workspace_path=?1 WHERE id=?2 AND current_run_id=?3 AND status='running'",
                    params![p, id, run_id],
                )
                .map_err(|e| self.err("set workspace", e))?;
            Ok(n == 1)
        })
    }

    /// `complete_task`: `running|ready|blocked → done`, the open run closed `completed` (or a
    /// zero-length run synthesized when there was none and there is something to record), a
    /// `completed` event, the failure counter reset, and children promoted. With
    /// `expected_run` the write only lands while that run is still the current one.
    pub fn complete(
        &self,
        id: &str,
        result: Option<&str>,
        summary: Option<&str>,
        metadata: Option<&Value>,
        expected_run: Option<i64>,
    ) -> Result<bool> {
        let now = now();
        let summary = summary.or(result);
        let done = self.write("complete", |c| {
            let n = c
                .execute(
                    "UPDATE tasks SET status='done', result=?1, completed_at=?2, claim_lock=NULL,
                        claim_expires=NULL, worker_pid=NULL, block_kind=NULL, block_recurrences=0,
                        consecutive_failures=0, last_failure_error=NULL
                     WHERE id=?3 AND status IN ('running','ready','blocked')
                       AND (?4 IS NULL OR current_run_id = ?4)",
                    params![result, now, id, expected_run],
                )
                .map_err(|e| self.err("complete", e))?;
            if n != 1 {
                return Ok(false);
            }
            let meta = metadata.filter(|m| !m.is_null());
            let mut run_id =
                close_current_run(c, id, "done", "completed", summary, None, meta, now)
                    .map_err(|e| self.err("close run", e))?;
            if run_id.is_none() && (summary.is_some() || meta.is_some() || result.is_some()) {
                run_id = Some(
                    synthesize_run(c, id, "completed", summary, None, meta, now)
                        .map_err(|e| self.err("close run", e))?,
                );
            }
            let first_line = summary
                .and_then(|s| s.trim().lines().next())
                .map(|l| l.chars().take(400).collect::<String>());
            let payload = json!({
                "result_len": result.map(|r| r.chars().count()).unwrap_or(0),
                "summary": first_line.filter(|s| !s.is_empty()),
            });
            append_event(c, id, "completed", &payload, run_id)
                .map_err(|e| self.err("append event", e))?;
            Ok(true)
        })?;
        if done {
            self.recompute_ready(DEFAULT_FAILURE_LIMIT)?;
        }
        Ok(done)
    }

    /// `block_task`: `running|ready → blocked`, routed as upstream routes it: kind
    /// `dependency` goes to `todo` (parent gating frees it), a re-block for the same cause
    /// `BLOCK_RECURRENCE_LIMIT` times goes to `triage`. Returns the status the task landed
    /// in, or `None` when it was not blockable.
    pub fn block(
        &self,
        id: &str,
        reason: Option<&str>,
        kind: Option<&str>,
        expected_run: Option<i64>,
    ) -> Result<Option<String>> {
        if let Some(k) = kind {
            if !BLOCK_KINDS.contains(&k) {
                return Err(BoardError::Invalid(format!(
                    "block kind must be one of {}, got {k:?}",
                    BLOCK_KINDS.join(", ")
                )));
            }
        }
        let now = now();
        self.write("block", |c| {
            let cur: Option<(Option<String>, i64)> = c
                .query_row("SELECT block_kind, block_recurrences FROM tasks WHERE id=?1", [id], |r| {
                    Ok((r.get(0)?, r.get::<_, Option<i64>>(1)?.unwrap_or(0)))
                })
                .optional()
                .map_err(|e| self.err("block", e))?;
            let Some((prev_kind, prev_rec)) = cur else { return Ok(None) };
            let (to, recurrences, event) = if kind == Some("dependency") {
                ("todo", prev_rec, "dependency_wait")
            } else {
                let rec = if prev_kind.as_deref() == kind { prev_rec + 1 } else { 1 };
                if rec >= BLOCK_RECURRENCE_LIMIT {
                    ("triage", rec, "block_loop_detected")
                } else {
                    ("blocked", rec, "blocked")
                }
            };
            let n = c
                .execute(
                    "UPDATE tasks SET status=?1, claim_lock=NULL, claim_expires=NULL, worker_pid=NULL,
                        block_kind=?2, block_recurrences=?3
                     WHERE id=?4 AND status IN ('running','ready') AND (?5 IS NULL OR current_run_id=?5)",
                    params![to, kind, recurrences, id, expected_run],
                )
                .map_err(|e| self.err("block", e))?;
            if n != 1 {
                return Ok(None);
            }
            let mut run_id =
                close_current_run(c, id, "blocked", "blocked", reason, None, None, now).map_err(|e| self.err("close run", e))?;
            if run_id.is_none() && reason.is_some() {
                run_id = Some(synthesize_run(c, id, "blocked", reason, None, None, now).map_err(|e| self.err("close run", e))?);
            }
            let payload = match event {
                "dependency_wait" => json!({"reason": reason, "kind": kind}),
                "block_loop_detected" => json!({"reason": reason, "kind": kind, "recurrences": recurrences, "limit": BLOCK_RECURRENCE_LIMIT}),
                _ => json!({"reason": reason, "kind": kind, "recurrences": recurrences}),
            };
            append_event(c, id, event, &payload, run_id).map_err(|e| self.err("append event", e))?;
            Ok(Some(to.to_string()))
        })
    }

    /// `unblock_task`: `blocked|scheduled → ready` (or `todo` while a parent is open), the
    /// failure counter reset, an `unblocked` event.
    pub fn unblock(&self, id: &str) -> Result<Option<String>> {
        let now = now();
        self.write("unblock", |c| {
            let stale: Option<i64> = c
                .query_row("SELECT current_run_id FROM tasks WHERE id=?1 AND status IN ('blocked','scheduled')", [id], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(|e| self.err("unblock", e))?
                .flatten();
            if let Some(run) = stale {
                c.execute(
                    "UPDATE task_runs SET status='reclaimed', outcome='reclaimed',
                        summary=COALESCE(summary,'invariant recovery on unblock'), ended_at=?1,
                        claim_lock=NULL, claim_expires=NULL, worker_pid=NULL
                     WHERE id=?2 AND ended_at IS NULL",
                    params![now, run],
                )
                .map_err(|e| self.err("unblock", e))?;
            }
            let open_parent: bool = c
                .query_row(
                    "SELECT 1 FROM task_links l JOIN tasks p ON p.id=l.parent_id
                     WHERE l.child_id=?1 AND p.status != 'done' LIMIT 1",
                    [id],
                    |_| Ok(true),
                )
                .optional()
                .map_err(|e| self.err("unblock", e))?
                .unwrap_or(false);
            let to = if open_parent { "todo" } else { "ready" };
            let n = c
                .execute(
                    "UPDATE tasks SET status=?1, current_run_id=NULL, consecutive_failures=0, last_failure_error=NULL
                     WHERE id=?2 AND status IN ('blocked','scheduled')",
                    params![to, id],
                )
                .map_err(|e| self.err("unblock", e))?;
            if n != 1 {
                return Ok(None);
            }
            let payload = if to == "ready" { Value::Null } else { json!({"status": to}) };
            append_event(c, id, "unblocked", &payload, None).map_err(|e| self.err("append event", e))?;
            Ok(Some(to.to_string()))
        })
    }

    /// `reclaim_task` (hermes-mgr's `requeue`): release a claimed task back to `ready`,
    /// closing its run `reclaimed`; not counted as a failure, and the counter is reset as
    /// upstream does for an operator's reclaim. Stopping a live worker is the caller's job
    /// (its scope), and happens before this.
    pub fn requeue(&self, id: &str, reason: Option<&str>) -> Result<bool> {
        let now = now();
        self.write("requeue", |c| {
            let row: Option<(String, Option<String>, Option<i64>)> = c
                .query_row("SELECT status, claim_lock, worker_pid FROM tasks WHERE id=?1", [id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()
                .map_err(|e| self.err("requeue", e))?;
            let Some((status, prev_lock, prev_pid)) = row else { return Ok(false) };
            if status != "running" && prev_lock.is_none() {
                return Ok(false);
            }
            let n = c
                .execute(
                    "UPDATE tasks SET status='ready', claim_lock=NULL, claim_expires=NULL, worker_pid=NULL,
                        consecutive_failures=0, last_failure_error=NULL
                     WHERE id=?1 AND status IN ('running','ready','blocked') AND claim_lock IS ?2",
                    params![id, prev_lock],
                )
                .map_err(|e| self.err("requeue", e))?;
            if n != 1 {
                return Ok(false);
            }
            let error = match reason {
                Some(r) => format!("manual_reclaim: {r}"),
                None => format!("manual_reclaim lock={}", prev_lock.as_deref().unwrap_or("None")),
            };
            let termination = json!({"prev_pid": prev_pid, "host_local": false, "termination_attempted": false,
                                     "terminated": false, "sigkill": false});
            let run_id = close_current_run(c, id, "reclaimed", "reclaimed", None, Some(&error), Some(&termination), now)
                .map_err(|e| self.err("close run", e))?;
            let mut payload = json!({"manual": true, "reason": reason, "prev_lock": prev_lock});
            merge(&mut payload, &termination);
            append_event(c, id, "reclaimed", &payload, run_id).map_err(|e| self.err("append event", e))?;
            Ok(true)
        })
    }

    /// An operator stops run `run_id`: `running → blocked` (sticky, like an explicit block:
    /// the task does not start again until unblocked), the run closed `stopped`. Done before
    /// the worker is signalled, so nothing — not a dispatcher seeing the worker exit — can
    /// requeue the task in between. `false` when the task is not running on that run.
    pub fn stop_run(&self, id: &str, run_id: i64, reason: &str) -> Result<bool> {
        let now = now();
        self.write("stop run", |c| {
            let n = c
                .execute(
                    "UPDATE tasks SET status='blocked', claim_lock=NULL, claim_expires=NULL, worker_pid=NULL,
                        current_run_id=NULL, block_kind=NULL
                     WHERE id=?1 AND status='running' AND current_run_id=?2",
                    params![id, run_id],
                )
                .map_err(|e| self.err("stop run", e))?;
            if n != 1 {
                return Ok(false);
            }
            close_run(c, run_id, "stopped", "stopped", None, Some(reason), None, now).map_err(|e| self.err("close run", e))?;
            let payload = json!({"reason": reason, "kind": null, "stopped_by_operator": true});
            append_event(c, id, "blocked", &payload, Some(run_id)).map_err(|e| self.err("append event", e))?;
            Ok(true)
        })
    }

    /// Replace a closed run's error text (the stop's final word on how the worker ended).
    pub fn annotate_run(&self, run_id: i64, error: &str) -> Result<()> {
        self.write("annotate run", |c| {
            c.execute(
                "UPDATE task_runs SET error=?1 WHERE id=?2",
                params![error, run_id],
            )
            .map_err(|e| self.err("annotate run", e))?;
            Ok(())
        })
    }

    /// `recompute_ready`: promote `todo` (and non-sticky, under-the-limit `blocked`) tasks
    /// whose parents are all done or archived. Returns how many were promoted.
    pub fn recompute_ready(&self, failure_limit: i64) -> Result<usize> {
        self.write("recompute ready", |c| {
            let mut st = c
                .prepare(
                    "SELECT t.id, t.status, t.consecutive_failures, t.max_retries FROM tasks t
                     WHERE t.status IN ('todo','blocked')
                       AND NOT EXISTS (SELECT 1 FROM task_links l JOIN tasks p ON p.id=l.parent_id
                                       WHERE l.child_id=t.id AND p.status NOT IN ('done','archived'))",
                )
                .map_err(|e| self.err("recompute ready", e))?;
            let rows: Vec<(String, String, i64, Option<i64>)> = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, Option<i64>>(2)?.unwrap_or(0), r.get(3)?)))
                .and_then(|r| r.collect())
                .map_err(|e| self.err("recompute ready", e))?;
            drop(st);
            let mut promoted = 0;
            for (id, status, failures, max_retries) in rows {
                if status == "blocked" {
                    // An explicit block is sticky until unblocked (#28712); a tripped
                    // breaker stays blocked while at its limit (#35072).
                    let last: Option<String> = c
                        .query_row(
                            "SELECT kind FROM task_events WHERE task_id=?1 AND kind IN ('blocked','unblocked')
                             ORDER BY id DESC LIMIT 1",
                            [&id],
                            |r| r.get(0),
                        )
                        .optional()
                        .map_err(|e| self.err("recompute ready", e))?;
                    if last.as_deref() == Some("blocked") || failures >= max_retries.unwrap_or(failure_limit) {
                        continue;
                    }
                }
                let n = c
                    .execute("UPDATE tasks SET status='ready' WHERE id=?1 AND status=?2", params![id, status])
                    .map_err(|e| self.err("recompute ready", e))?;
                if n == 1 {
                    append_event(c, &id, "promoted", &Value::Null, None).map_err(|e| self.err("append event", e))?;
                    promoted += 1;
                }
            }
            Ok(promoted)
        })
    }

    /// Close run `run_id` of a `running` task that its worker did not end itself: read the
    /// task's counters and apply `outcome::booking` (the policy lives there) in one
    /// transaction. Nothing happens — `Ok(None)` — unless the task is still `running` on
    /// that very run, so a late or duplicate report is harmless.
    pub fn end_run(
        &self,
        id: &str,
        run_id: i64,
        end: &RunEnd,
        failure_limit: i64,
    ) -> Result<Option<EndResult>> {
        let now = now();
        self.write("end run", |c| {
            let row: Option<(i64, Option<i64>, Option<String>)> = c
                .query_row(
                    "SELECT consecutive_failures, max_retries, claim_lock FROM tasks
                     WHERE id=?1 AND status='running' AND current_run_id=?2",
                    params![id, run_id],
                    |r| Ok((r.get::<_, Option<i64>>(0)?.unwrap_or(0), r.get(1)?, r.get(2)?)),
                )
                .optional()
                .map_err(|e| self.err("end run", e))?;
            let Some((failures, max_retries, claimer)) = row else { return Ok(None) };
            let violation_streak = if matches!(end, RunEnd::ProtocolViolation { .. }) {
                protocol_violation_streak(c, id).map_err(|e| self.err("end run", e))?
            } else {
                0
            };
            let counters = outcome::Counters { failures, max_retries, violation_streak, claimer };
            let b = outcome::booking(end, &counters, failure_limit);
            c.execute(
                "UPDATE tasks SET status=?3, claim_lock=NULL, claim_expires=NULL, worker_pid=NULL, current_run_id=NULL
                 WHERE id=?1 AND status='running' AND current_run_id=?2",
                params![id, run_id, b.status()],
            )
            .map_err(|e| self.err("end run", e))?;
            close_run(c, run_id, b.run_outcome, b.run_outcome, None, Some(&b.error), Some(&b.run_metadata), now)
                .map_err(|e| self.err("close run", e))?;
            if b.stamp_error {
                c.execute(
                    "UPDATE tasks SET consecutive_failures=?1, last_failure_error=?2 WHERE id=?3",
                    params![b.failures, b.error, id],
                )
                .map_err(|e| self.err("end run", e))?;
            }
            if let Some((kind, payload)) = &b.event {
                append_event(c, id, kind, payload, Some(run_id)).map_err(|e| self.err("append event", e))?;
            }
            if let Some(payload) = &b.gave_up {
                append_event(c, id, "gave_up", payload, b.gave_up_on_run.then_some(run_id))
                    .map_err(|e| self.err("append event", e))?;
            }
            Ok(Some(EndResult { run_id: Some(run_id), status: b.status().to_string(), failures: b.failures, gave_up: b.gave_up.is_some() }))
        })
    }

    /// How many tasks have `status` (an index lookup; no row is read).
    pub fn count(&self, status: &str) -> Result<i64> {
        self.conn
            .query_row(
                "SELECT count(*) FROM tasks WHERE status=?1",
                [status],
                |r| r.get(0),
            )
            .map_err(|e| self.err("count tasks", e))
    }

    /// Every running task's current run (`task id → run id`): one indexed read.
    pub fn running_runs(&self) -> Result<std::collections::HashMap<String, i64>> {
        let mut st = self
            .conn
            .prepare("SELECT id, current_run_id FROM tasks WHERE status='running' AND current_run_id IS NOT NULL")
            .map_err(|e| self.err("running runs", e))?;
        let v = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .and_then(|r| r.collect::<rusqlite::Result<_>>())
            .map_err(|e| self.err("running runs", e))?;
        Ok(v)
    }

    /// The running tasks, read for the dispatcher (`hot_projection`: no body or result).
    pub fn running_tasks(&self) -> Result<Vec<Task>> {
        let mut st = self
            .conn
            .prepare(&format!(
                "SELECT {} FROM tasks WHERE status='running' ORDER BY id",
                self.hot
            ))
            .map_err(|e| self.err("running tasks", e))?;
        let v = st
            .query_map([], Task::from_row)
            .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err("running tasks", e))?;
        Ok(v)
    }

    /// Tasks that `dispatch` may claim, in upstream's order (`hot_projection`).
    pub fn ready_tasks(&self, limit: usize) -> Result<Vec<Task>> {
        let mut st = self
            .conn
            .prepare(&format!(
                "SELECT {} FROM tasks WHERE status='ready' AND claim_lock IS NULL
                 ORDER BY priority DESC, created_at ASC LIMIT ?1",
                self.hot
            ))
            .map_err(|e| self.err("ready tasks", e))?;
        let v = st
            .query_map([limit as i64], Task::from_row)
            .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err("ready tasks", e))?;
        Ok(v)
    }

    /// Create a directory beside the board (workspaces, logs) owned by the board's owner.
    pub fn make_dir(&self, dir: &Path) -> Result<()> {
        safe_fs::as_user(&self.owner, || std::fs::create_dir_all(dir))
            .and_then(|r| r)
            .map_err(|source| BoardError::Io {
                path: dir.into(),
                op: "create directory",
                source,
            })
    }

    /// Whether a dispatcher holds this board's root-wide `.dispatcher.lock`.
    pub fn dispatcher_lock_held(&self) -> bool {
        lock::held(&self.paths.dispatcher_lock(), &self.owner)
    }

    /// Raw connection for tests that must inspect or damage the file as a third party would.
    #[doc(hidden)]
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

/// Longest text or blob the dispatch path reads from any one column of a task.
const HOT_COLUMN_MAX: usize = 64 * 1024;

/// The select list the dispatcher reads tasks with: every column the board has, except the
/// ones it never needs (`body`, `result`), each text or blob cut at `HOT_COLUMN_MAX`. Any
/// column is writable by anyone who may write the board: three 64 MiB bodies must not cost
/// the daemon 500 MB after every pass. Names are quoted (a column name is data too).
fn hot_projection(columns: &[String]) -> String {
    columns
        .iter()
        .filter(|c| !matches!(c.as_str(), "body" | "result"))
        .map(|c| {
            let q = format!("\"{}\"", c.replace('"', "\"\""));
            format!(
                "CASE WHEN typeof({q}) IN ('text','blob') THEN substr({q},1,{HOT_COLUMN_MAX}) ELSE {q} END AS {q}"
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Grow the database file in steps of this many bytes, before pages are written to it.
const CHUNK_BYTES: i32 = 64 * 1024;

/// `SQLITE_FCNTL_CHUNK_SIZE`: with a chunk size set, SQLite extends the file *before* a
/// checkpoint copies pages into it. Without one it writes page 1 (whose header carries the
/// new page count) first and grows the file page by page after, and every hermes-agent
/// 0.19.0 write that commits in that window fails its "torn-extend" check (header page
/// count > file size, `_check_file_length_invariant`). Our checkpoints must never make
/// Hermes workers crash, so the file is always at least as long as its header says.
fn set_chunk_size(conn: &Connection, bytes: i32) -> rusqlite::Result<()> {
    let mut size: std::os::raw::c_int = bytes;
    // SAFETY: `handle()` is the live connection owned by `conn`; the file control reads
    // one int from a pointer that outlives the call and keeps no reference to it.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            rusqlite::ffi::SQLITE_FCNTL_CHUNK_SIZE,
            (&mut size as *mut std::os::raw::c_int).cast(),
        )
    };
    if rc == rusqlite::ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rc),
            Some("SQLITE_FCNTL_CHUNK_SIZE".into()),
        ))
    }
}

fn merge(into: &mut Value, from: &Value) {
    if let (Value::Object(a), Value::Object(b)) = (into, from) {
        for (k, v) in b {
            a.insert(k.clone(), v.clone());
        }
    }
}

fn append_event(
    c: &Connection,
    task: &str,
    kind: &str,
    payload: &Value,
    run_id: Option<i64>,
) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO task_events (task_id, run_id, kind, payload, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![task, run_id, kind, payload_text(payload), now()],
    )?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn close_run(
    c: &Connection,
    run_id: i64,
    status: &str,
    outcome: &str,
    summary: Option<&str>,
    error: Option<&str>,
    metadata: Option<&Value>,
    now: i64,
) -> rusqlite::Result<()> {
    c.execute(
        "UPDATE task_runs SET status=?1, outcome=?2, summary=?3, error=?4, metadata=?5, ended_at=?6,
            claim_lock=NULL, claim_expires=NULL, worker_pid=NULL
         WHERE id=?7 AND ended_at IS NULL",
        params![status, outcome, summary, error, metadata.and_then(payload_text), now, run_id],
    )?;
    Ok(())
}

/// `_end_run`: close the task's current run and clear the pointer; `None` if there was none.
#[allow(clippy::too_many_arguments)]
fn close_current_run(
    c: &Connection,
    task: &str,
    status: &str,
    outcome: &str,
    summary: Option<&str>,
    error: Option<&str>,
    metadata: Option<&Value>,
    now: i64,
) -> rusqlite::Result<Option<i64>> {
    let run: Option<i64> = c
        .query_row(
            "SELECT current_run_id FROM tasks WHERE id=?1",
            [task],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    let Some(run) = run else { return Ok(None) };
    close_run(c, run, status, outcome, summary, error, metadata, now)?;
    c.execute("UPDATE tasks SET current_run_id=NULL WHERE id=?1", [task])?;
    Ok(Some(run))
}

/// `_synthesize_ended_run`: a zero-length, already-closed run for a verdict on a task that
/// was never claimed, so the summary is not lost.
fn synthesize_run(
    c: &Connection,
    task: &str,
    outcome: &str,
    summary: Option<&str>,
    error: Option<&str>,
    metadata: Option<&Value>,
    now: i64,
) -> rusqlite::Result<i64> {
    c.execute(
        "INSERT INTO task_runs (task_id, profile, step_key, status, outcome, summary, error, metadata, started_at, ended_at)
         SELECT id, assignee, current_step_key, ?2, ?2, ?3, ?4, ?5, ?6, ?6 FROM tasks WHERE id=?1",
        params![task, outcome, summary, error, metadata.and_then(payload_text), now],
    )?;
    Ok(c.last_insert_rowid())
}

/// The task's trailing run of clean-exit protocol violations (rate-limited runs are neutral).
fn protocol_violation_streak(c: &Connection, task: &str) -> rusqlite::Result<i64> {
    let mut st = c.prepare(
        "SELECT outcome, metadata FROM task_runs WHERE task_id=?1 AND ended_at IS NOT NULL ORDER BY id DESC LIMIT 50",
    )?;
    let rows: Vec<(Option<String>, Option<String>)> = st
        .query_map([task], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut streak = 0;
    for (outcome, meta) in rows {
        match outcome.as_deref() {
            Some("rate_limited") => continue,
            Some("crashed") => {
                let v: Option<Map<String, Value>> =
                    meta.and_then(|m| serde_json::from_str(&m).ok());
                if v.and_then(|m| m.get("protocol_violation").and_then(Value::as_bool))
                    .unwrap_or(false)
                {
                    streak += 1;
                    continue;
                }
                break;
            }
            _ => break,
        }
    }
    Ok(streak)
}
