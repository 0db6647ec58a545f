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
//!
//! By what it does: `open` (as the owner; pragmas, schema), `reads`, `tasks` (the task
//! verbs), `runs` (a run's life: claim to `end_run`, which applies `outcome::booking`),
//! `rows` (helpers the writes share), `model` (row types), `schema` (upstream's DDL),
//! `paths` (where a board lives), `lock` (upstream's lock files). SQL only, no policy.

mod busy;
pub mod lock;
mod model;
mod open;
pub mod paths;
mod reads;
mod rows;
mod runs;
mod schema;
mod tasks;

use std::path::PathBuf;

use rusqlite::Connection;

use crate::outcome;
pub use crate::outcome::RunEnd;
use crate::safe_fs;
pub use crate::safe_fs::Owner;
pub use crate::transitions::{BLOCK_KINDS, BLOCK_RECURRENCE_LIMIT};
pub use model::{Claim, EndResult, Event, Listed, NewTask, Run, Status, Task};
use open::classify;
pub use paths::{BoardPaths, Resolver, DEFAULT_BOARD};
use rows::Cached;

/// Upstream's `DEFAULT_CLAIM_TTL_SECONDS`.
pub const DEFAULT_CLAIM_TTL: i64 = 15 * 60;

/// Upstream's `DEFAULT_FAILURE_LIMIT`: consecutive failures before the breaker trips.
pub const DEFAULT_FAILURE_LIMIT: i64 = 2;

/// Upstream's default busy timeout; `HERMES_KANBAN_BUSY_TIMEOUT_MS` overrides it.
pub const DEFAULT_BUSY_TIMEOUT_MS: u64 = 120_000;

#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    #[error("{path}: not a SQLite database (header {header:?}); the file was left untouched")]
    NotSqlite { path: PathBuf, header: String },
    #[error("{path}: the board is corrupt ({detail}); the file was left untouched — restore it from a backup or move it aside")]
    Corrupt { path: PathBuf, detail: String },
    #[error("{path}: the board could not be checked in time (PRAGMA integrity_check, then quick_check, {seconds} s each: a large board, or an index whose expression costs much a row); it is not written until a check completes, and is tried again later")]
    Unchecked { path: PathBuf, seconds: f64 },
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

impl BoardError {
    /// The write failed for want of space (`SQLITE_FULL`, `ENOSPC`, `EDQUOT`): nothing was
    /// written, and the same write succeeds once the board's filesystem has room again.
    pub fn is_full(&self) -> bool {
        match self {
            BoardError::Sqlite {
                source: rusqlite::Error::SqliteFailure(f, _),
                ..
            } => f.code == rusqlite::ErrorCode::DiskFull,
            BoardError::Io { source, .. } => {
                matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
            }
            _ => false,
        }
    }
}

pub use crate::host::{claimer_id, now};

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
    /// `conn`'s busy handler's timeout (`busy`), dropped after it.
    busy: Box<busy::Wait>,
    /// Counted among this process's open board files while `conn` lives (dropped after it).
    _file: open::OpenFile,
    paths: BoardPaths,
    owner: Owner,
    /// The select list for tasks read on the dispatch path (`hot_projection`).
    hot: String,
    /// The same for `running_claims`: only what reconciling a running row reads.
    claims: String,
}

impl std::fmt::Debug for Board {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Board").field("db", &self.paths.db).finish()
    }
}

impl Board {
    pub fn paths(&self) -> &BoardPaths {
        &self.paths
    }

    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    fn err(&self, op: &'static str, e: rusqlite::Error) -> BoardError {
        classify(&self.paths.db, op, e)
    }

    /// Run `f` inside `BEGIN IMMEDIATE … COMMIT`: the write lock is taken up front, so a
    /// compare-and-swap read inside `f` cannot go stale before its write. Rolled back on error.
    fn write<T>(&self, op: &'static str, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        self.conn
            .exec("BEGIN IMMEDIATE", [])
            .map_err(|e| self.err(op, e))?;
        match f(&self.conn) {
            Ok(v) => {
                if let Err(e) = self.conn.exec("COMMIT", []) {
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

    /// Raw connection for tests that must inspect or damage the file as a third party would.
    #[doc(hidden)]
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}
