//! Opening a board as upstream's `connect()` does, as its owner (`safe_fs`): header
//! check, integrity check, WAL, pragmas, schema; and the other files beside it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::*;

/// Statements kept compiled per connection (`rows::Cached`): more than the dispatch path's
/// distinct statements (a claim, a start, a booking, the guards, a pass's reads), so none
/// is evicted and compiled again for every run.
const CACHED_STATEMENTS: usize = 128;

pub(super) fn busy_timeout() -> Duration {
    let ms = std::env::var("HERMES_KANBAN_BUSY_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|v| *v > 0)
        .unwrap_or(DEFAULT_BUSY_TIMEOUT_MS);
    Duration::from_millis(ms)
}

/// The board file, not through a link: read-write when `write` and allowed, else read-only.
fn open_to_keep(path: &Path, write: bool) -> std::io::Result<std::fs::File> {
    if write {
        match safe_fs::open_regular(path, safe_fs::Access::ReadWrite) {
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
            Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
            other => return other,
        }
    }
    safe_fs::open_regular(path, safe_fs::Access::Read)
}

/// Refuse a file that is not SQLite before SQLite (or our pragmas) can touch it. Its
/// descriptor is given back (read-write where it can be, `write`) for `OPEN_FILES` to keep:
/// closed now, it would be closed while SQLite opens the file beside it.
pub(super) fn check_header(path: &Path, write: bool) -> Result<Option<std::fs::File>> {
    use std::io::Read;
    let mut f = match open_to_keep(path, write) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
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
        return Ok(Some(f));
    }
    Err(BoardError::NotSqlite {
        path: path.into(),
        header: String::from_utf8_lossy(&head).into_owned(),
    })
}

pub(super) fn classify(path: &Path, op: &'static str, e: rusqlite::Error) -> BoardError {
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
pub(super) fn sqlite_path(paths: &BoardPaths) -> PathBuf {
    match (
        paths.db.strip_prefix(&paths.owner_dir),
        std::fs::canonicalize(&paths.owner_dir),
    ) {
        (Ok(rest), Ok(dir)) => dir.join(rest),
        _ => paths.db.clone(),
    }
}

/// `Board::open`'s file work, run as the board's owner.
/// Upstream's `_INIT_LOCK_TIMEOUT_SECONDS`.
const INIT_LOCK_WAIT: Duration = Duration::from_secs(10);

/// What the daemon's loop gives each of a board's two checks when it opens it: two of them
/// fit well inside the shortest watchdog period it is run with (10 s in the tests).
const CHECK_BUDGET: Duration = Duration::from_secs(2);

/// Upstream's `_cross_process_init_lock`: `kanban.db.init.lock`, waited for at most `wait`,
/// then — as upstream does since its #36644 — the open goes on without it, with a warning:
/// what runs under it (header and integrity checks, `CREATE TABLE IF NOT EXISTS`) is
/// idempotent, and a burst of workers opening one board (64 at once, each checking the
/// whole board) or one wedged holder must not fail every other opener. A lock file that
/// cannot be opened (a FIFO or symlink planted in its place) is still an error.
fn take_init_lock(
    paths: &BoardPaths,
    owner: &Owner,
    wait: Duration,
) -> Result<Option<lock::FileLock>> {
    let path = paths.sibling("init.lock");
    match lock::FileLock::acquire(&path, owner, wait) {
        Ok(l) => Ok(Some(l)),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            let msg = format!(
                "{} not taken within {} s; opening the board without it (what it guards is idempotent)",
                path.display(),
                wait.as_secs_f64()
            );
            // The daemon logs; a command says it on stderr, as upstream's warning does.
            if tracing::dispatcher::has_been_set() {
                tracing::warn!("{msg}");
            } else {
                eprintln!("hermes-mgr: warning: {msg}");
            }
            Ok(None)
        }
        Err(source) => Err(BoardError::Io {
            path,
            op: "take init lock",
            source,
        }),
    }
}

/// How long an open may wait or work, by who opens: people wait, the daemon's loop may not.
#[derive(Debug, Clone, Copy)]
pub(super) struct Patience {
    /// For a writer's lock (`busy_timeout`).
    pub busy: Duration,
    /// For upstream's `kanban.db.init.lock`.
    pub init: Duration,
    /// For each of `integrity_check` and the `quick_check` that stands in for it; `None`:
    /// as long as it takes.
    pub check: Option<Duration>,
}

/// `PRAGMA <check>`'s verdict, or `None` when it ran out of `budget`: the board's schema is
/// its writers' — a worker can add an index whose expression costs seconds a row, and the
/// check evaluates it for every row.
fn check_within(
    conn: &mut Connection,
    db: &Path,
    check: &'static str,
    budget: Option<Duration>,
) -> Result<Option<String>> {
    if let Some(b) = budget {
        let deadline = std::time::Instant::now() + b;
        // Every 64 virtual-machine steps: one costly expression is a single step, so a coarser
        // period let a few rows' worth of them run unchecked.
        conn.progress_handler(64, Some(move || std::time::Instant::now() >= deadline))
            .map_err(|e| classify(db, check, e))?;
    }
    let verdict = conn.query_row(&format!("PRAGMA {check}"), [], |r| r.get::<_, String>(0));
    if budget.is_some() {
        conn.progress_handler(0, None::<fn() -> bool>)
            .map_err(|e| classify(db, check, e))?;
    }
    match verdict {
        Ok(v) => Ok(Some(v)),
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::OperationInterrupted =>
        {
            Ok(None)
        }
        Err(e) => Err(classify(db, check, e)),
    }
}

pub(super) fn open_conn(
    paths: &BoardPaths,
    mode: OpenMode,
    owner: &Owner,
    wait: Patience,
) -> Result<(Connection, OpenFile, Box<busy::Wait>)> {
    let (busy, init_wait) = (wait.busy, wait.init);
    let db = &paths.db;
    // Held until this connection is counted (`OpenFile`): no other thread of this process
    // opens a connection to the file between the header check's open and its close.
    let mut open_files = OPEN_FILES.lock().unwrap_or_else(|e| e.into_inner());
    let file = file_id(db)?;
    let (exists, known) = (
        file.is_some(),
        file.is_some_and(|f| open_files.contains_key(&f)),
    );
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
    // A file this process has a connection to is SQLite, and must not be opened and closed
    // here: a close drops every POSIX lock the process holds on it (`OPEN_FILES`).
    let header_fd = if known {
        None
    } else {
        check_header(db, mode != OpenMode::Inspect)?
    };
    let init_lock = take_init_lock(paths, owner, init_wait)?;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_NOFOLLOW;
    // Declared before the connection, so dropped after it on every return.
    let busy_wait = busy::Wait::new(busy);
    let mut conn = Connection::open_with_flags(sqlite_path(paths), flags)
        .map_err(|e| classify(db, "open", e))?;
    busy_wait
        .install(&conn)
        .map_err(|e| classify(db, "busy_handler", e))?;
    conn.set_prepared_statement_cache_capacity(CACHED_STATEMENTS);
    // The plan a statement was compiled with stands whatever is bound to it (SQLite's
    // query planner stability guarantee): otherwise SQLite compiles a kept statement
    // again for each new value it may plan on — a tenth of the daemon's CPU per run.
    // Upstream's boards carry no `sqlite_stat4` for such plans to use.
    let _ = conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    );
    if exists && mode != OpenMode::Inspect {
        // Out of time, the quicker check (no index against its table) still finds a torn
        // or garbled file; out of time again, the board waits (the daemon tries it later).
        let verdict = match check_within(&mut conn, db, "integrity_check", wait.check)? {
            Some(v) => v,
            None => match check_within(&mut conn, db, "quick_check", wait.check)
                .inspect(|_| {
                    tracing::warn!(
                        "{}: PRAGMA integrity_check did not finish within {} s; PRAGMA quick_check stands in for it",
                        db.display(),
                        wait.check.unwrap_or_default().as_secs_f64()
                    )
                })? {
                Some(v) => v,
                None => {
                    return Err(BoardError::Unchecked {
                        path: db.clone(),
                        seconds: wait.check.unwrap_or_default().as_secs_f64(),
                    })
                }
            },
        };
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
    let file = count(&mut open_files, db, mode, header_fd, &conn)?;
    Ok((conn, file, busy_wait))
}

/// The connection `conn` to `db` counted in `OPEN_FILES` (with a descriptor of the file kept
/// beside it, if none is yet), and the file grown ahead.
fn count(
    open_files: &mut std::collections::BTreeMap<(u64, u64), Opened>,
    db: &Path,
    mode: OpenMode,
    header_fd: Option<std::fs::File>,
    conn: &Connection,
) -> Result<OpenFile> {
    let Some(id) = file_id(db)? else {
        return Err(BoardError::Missing { path: db.into() });
    };
    let opened = open_files.entry(id).or_default();
    if opened.fd.is_none() {
        // The descriptor of the file the connection has (not of one renamed over it since);
        // opened now if the file was made by this open. Opening one is harmless: only a
        // close while connections live would not be.
        let write = mode != OpenMode::Inspect;
        opened.fd = header_fd
            .or_else(|| open_to_keep(db, write).ok())
            .filter(|f| {
                use std::os::unix::fs::MetadataExt;
                f.metadata().is_ok_and(|m| (m.dev(), m.ino()) == id)
            });
    }
    if mode != OpenMode::Inspect {
        // A hint: a board whose file cannot grow now still works (SQLite grows it later).
        if let Err(e) = keep_ahead(conn, opened.fd.as_ref()) {
            tracing::debug!(board = %db.display(), "file not grown ahead: {e}");
        }
    }
    opened.connections += 1;
    Ok(OpenFile(id))
}

/// The board file's identity (device, inode); `None` when there is none yet. Only a plain
/// file is a board.
fn file_id(db: &Path) -> Result<Option<(u64, u64)>> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(db) {
        Ok(m) if m.is_file() => Ok(Some((m.dev(), m.ino()))),
        Ok(_) => Err(BoardError::Invalid(format!(
            "{}: not a regular file (a symlink, directory or device); hermes-mgr opens a board only as a plain file, and left it untouched",
            db.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(BoardError::Io {
            path: db.into(),
            op: "stat",
            source,
        }),
    }
}

/// The board files this process has SQLite connections to (device, inode), and how many.
/// A file of these is never opened outside SQLite: closing any descriptor of a file drops
/// every POSIX lock the process holds on it — among them the SHARED lock each connection in
/// WAL mode holds while open, which tells another process closing its own connection that
/// it is not the last. Without it, that process checkpoints and removes the WAL under our
/// open connections, and the board is corrupt (SQLite's "How To Corrupt", 2.2; found by
/// the chaos soak).
static OPEN_FILES: std::sync::Mutex<std::collections::BTreeMap<(u64, u64), Opened>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// A board file this process has connections to: how many, and the descriptor its header
/// was checked through, kept (closed only with the last connection, so no lock is lost) for
/// `keep_ahead`.
#[derive(Default)]
struct Opened {
    connections: usize,
    fd: Option<std::fs::File>,
}

/// One connection to a board file, counted in `OPEN_FILES` until it is dropped (after the
/// connection: `Board` declares it after `conn`).
#[derive(Debug)]
pub(super) struct OpenFile((u64, u64));

impl Drop for OpenFile {
    fn drop(&mut self) {
        let mut open_files = OPEN_FILES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = open_files.get_mut(&self.0) {
            o.connections -= 1;
            if o.connections == 0 {
                open_files.remove(&self.0);
            }
        }
    }
}

/// How far the file is kept ahead of the pages its header counts.
pub(super) const AHEAD_BYTES: i64 = 1 << 20;

/// Grow the file now, in one step, `AHEAD_BYTES` past the pages it holds (the header and the
/// WAL's newest), so that checkpoints write pages into a file that is already long enough.
/// hermes-agent 0.19.0's "torn-extend" check reads the file's size *before* its header: a
/// checkpoint that grows the file and raises the header's page count between those two
/// reads — even one that grows the file first (`set_chunk_size`) — makes its write fail
/// (counted in `interop::both_tools_writing_at_once_lose_nothing`). With the file ahead,
/// checkpoints leave its size alone unless the board grows by half of `AHEAD_BYTES` with no
/// open of it in between (each open tops it up). An empty
/// file (no schema yet) is left as it is: zeros where the header goes are no database.
fn keep_ahead(conn: &Connection, fd: Option<&std::fs::File>) -> std::io::Result<()> {
    let fd = fd.ok_or_else(|| std::io::Error::other("no descriptor of the file kept"))?;
    let pragma = |p: &str| -> std::io::Result<i64> {
        conn.query_row(&format!("PRAGMA {p}"), [], |r| r.get(0))
            .map_err(std::io::Error::other)
    };
    let (pages, page) = (pragma("page_count")?, pragma("page_size")?);
    if pages == 0 {
        return Ok(());
    }
    // Grown when less than half of `AHEAD_BYTES` is left, not at every open by a page.
    let (want, len) = (pages * page + AHEAD_BYTES, fd.metadata()?.len() as i64);
    if len >= want - AHEAD_BYTES / 2 {
        return Ok(());
    }
    // Mode 0: what is not allocated yet is, the size grows if it is short, and no byte is
    // ever written — it may race another process's checkpoint writing pages past the end.
    // Not SQLite's `SQLITE_FCNTL_SIZE_HINT`, which did this before: built without
    // `posix_fallocate` (the bundled build is), it writes a zero byte at the end of each
    // block past the size it saw, outside any lock of SQLite's when asked from here; a
    // checkpoint writing those pages meanwhile lost their last byte (a board corrupt twice
    // in the chaos soak, "row … missing from index").
    nix::fcntl::fallocate(fd, nix::fcntl::FallocateFlags::empty(), len, want - len)
        .map_err(std::io::Error::from)
}

/// `sqlite3_file_control` of the main database with one value (`int` or `i64`, as `op` reads).
fn file_control<T>(conn: &Connection, op: i32, value: &mut T, name: &str) -> rusqlite::Result<()> {
    // SAFETY: `handle()` is the live connection owned by `conn`; the file control reads one
    // value of the type `op` expects from a pointer that outlives the call and keeps no
    // reference to it.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            op,
            (value as *mut T).cast(),
        )
    };
    if rc == rusqlite::ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rc),
            Some(name.into()),
        ))
    }
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
        Board::open_with(
            paths,
            mode,
            Patience {
                busy: busy_timeout(),
                init: INIT_LOCK_WAIT,
                check: None,
            },
        )
    }

    /// The daemon's `open`: at most `busy` for a writer's lock (upstream's 120 s, or
    /// `$HERMES_KANBAN_BUSY_TIMEOUT_MS`, is for people; the daemon must answer its watchdog),
    /// and a held init lock gone around at once, as upstream goes around it after its wait
    /// (what it guards is idempotent): a worker holding the locks of many boards must not
    /// cost the loop, or a start, ten seconds a board.
    pub fn open_waiting(paths: &BoardPaths, mode: OpenMode, busy: Duration) -> Result<Board> {
        Board::open_with(
            paths,
            mode,
            Patience {
                busy,
                init: Duration::ZERO,
                check: Some(CHECK_BUDGET),
            },
        )
    }

    fn open_with(paths: &BoardPaths, mode: OpenMode, wait: Patience) -> Result<Board> {
        let owner = Owner::of_tree(&paths.owner_dir).map_err(|source| BoardError::Io {
            path: paths.owner_dir.clone(),
            op: "stat",
            source,
        })?;
        let conn = safe_fs::as_user(&owner, || open_conn(paths, mode, &owner, wait)).map_err(
            |source| BoardError::Io {
                path: paths.db.clone(),
                op: "open as the board's owner",
                source,
            },
        )??;
        let (conn, file, busy) = conn;
        let mut board = Board {
            conn,
            busy,
            _file: file,
            paths: paths.clone(),
            owner,
            hot: String::new(),
            claims: String::new(),
        };
        let columns = board.check_columns()?;
        board.hot = hot_projection(&columns);
        board.claims = hot_projection(
            &columns
                .into_iter()
                .filter(|c| CLAIM_COLUMNS.contains(&c.as_str()))
                .collect::<Vec<_>>(),
        );
        Ok(board)
    }

    /// How long a write waits for another writer's lock before `BoardError::Locked`. The
    /// CLI waits upstream's 120 s; the daemon waits briefly and retries from its loop, so
    /// that a locked board never stalls its watchdog.
    pub fn set_busy_timeout(&self, t: Duration) {
        self.busy.set(t)
    }

    /// `PRAGMA data_version`: changes when *another* connection commits to the file, so
    /// our own writes never look like someone else's.
    pub fn data_version(&self) -> Result<i64> {
        self.conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(|e| self.err("data_version", e))
    }

    /// The tasks table's columns, or `OldSchema` when one upstream 0.19.0 has is missing.
    pub(super) fn check_columns(&self) -> Result<Vec<String>> {
        let cols = self.columns("tasks")?;
        let missing: Vec<&str> = schema::REQUIRED_TASK_COLUMNS
            .iter()
            .copied()
            .filter(|c| !cols.iter().any(|x| x == c))
            .collect();
        if missing.is_empty() {
            Ok(cols)
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

    /// `PRAGMA integrity_check`, for tests and `doctor`.
    pub fn integrity_check(&self) -> Result<String> {
        self.conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(|e| self.err("integrity_check", e))
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
}

/// Longest text or blob the dispatch path reads from any one column of a task.
pub(super) const HOT_COLUMN_MAX: usize = 64 * 1024;

/// The select list the dispatcher reads tasks with: every column the board has, except the
/// ones it never needs (`body`, `result`), each text or blob cut at `HOT_COLUMN_MAX`. Any
/// column is writable by anyone who may write the board: three 64 MiB bodies must not cost
/// the daemon 500 MB after every pass. Names are quoted (a column name is data too).
/// What `running_claims` reads of a running task.
const CLAIM_COLUMNS: &[&str] = &[
    "id",
    "status",
    "current_run_id",
    "claim_lock",
    "claim_expires",
    "worker_pid",
    "max_runtime_seconds",
    "started_at",
    "last_heartbeat_at",
];

pub(super) fn hot_projection(columns: &[String]) -> String {
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
pub(super) const CHUNK_BYTES: i32 = 64 * 1024;

/// `SQLITE_FCNTL_CHUNK_SIZE`: with a chunk size set, SQLite extends the file *before* a
/// checkpoint copies pages into it. Without one it writes page 1 (whose header carries the
/// new page count) first and grows the file page by page after, and every hermes-agent
/// 0.19.0 write that commits in that window fails its "torn-extend" check (header page
/// count > file size, `_check_file_length_invariant`). Our checkpoints must never make
/// Hermes workers crash, so the file is always at least as long as its header says.
pub(super) fn set_chunk_size(conn: &Connection, bytes: i32) -> rusqlite::Result<()> {
    let mut size: std::os::raw::c_int = bytes;
    file_control(
        conn,
        rusqlite::ffi::SQLITE_FCNTL_CHUNK_SIZE,
        &mut size,
        "SQLITE_FCNTL_CHUNK_SIZE",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // Found by the chaos soak (a board corrupt: "row … missing from index"): the header check
    // opened the board's file and closed it, and a close drops every POSIX lock this process
    // holds on the file — among them the SHARED lock that each of its SQLite connections in
    // WAL mode holds while open. Another process closing its connection then took itself for
    // the last one and checkpointed and removed the WAL under our open connections.
    #[test]
    fn a_second_open_of_a_board_in_this_process_keeps_the_locks_of_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let paths = BoardPaths::for_db(&dir.path().join("kanban.db"));
        let first = Board::open(&paths, OpenMode::CreateIfMissing).unwrap();
        let new = |b: &Board| {
            b.create(&NewTask {
                title: "t".into(),
                ..Default::default()
            })
            .unwrap()
        };
        new(&first);
        let wal = dir.path().join("kanban.db-wal");
        assert!(wal.exists());
        let second = Board::open(&paths, OpenMode::MustExist).unwrap();
        // Another process (upstream's Python, as a worker's `hermes kanban` is) reads the
        // board and closes it: it removes the WAL only if it finds itself the last user.
        let st = std::process::Command::new("python3")
            .arg("-c")
            .arg("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('SELECT count(*) FROM tasks').fetchall(); c.close()")
            .arg(&paths.db)
            .status()
            .unwrap();
        assert!(st.success());
        assert!(
            wal.exists(),
            "another process took itself for the board's last user and removed its WAL under our two open connections"
        );
        new(&second);
        new(&first);
        assert_eq!(first.integrity_check().unwrap(), "ok");
    }

    // Found by the chaos soak (a board corrupt twice, "row … missing from index"; once just
    // after the dispatcher's restart opened every board): growing the file at open went
    // through SQLite's `SQLITE_FCNTL_SIZE_HINT`, which — built without `posix_fallocate` —
    // writes a zero byte at the end of each block past the size it saw, outside any lock of
    // SQLite's when asked from here. Another process's checkpoint writing pages there
    // meanwhile lost their last byte. Here a thread plays that checkpoint (the file cut back
    // to its pages, then pages written past the end) while the file is grown ahead: every
    // byte written must stay.
    #[test]
    fn growing_the_file_ahead_never_writes_over_pages_written_meanwhile() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("kanban.db");
        let board = Board::open(&BoardPaths::for_db(&db), OpenMode::CreateIfMissing).unwrap();
        let size = |p: &str| -> u64 {
            board
                .conn
                .query_row(&format!("PRAGMA {p}"), [], |r| r.get::<_, i64>(0))
                .unwrap() as u64
        };
        let end = size("page_count") * size("page_size");
        // The other process's descriptor (closing it drops this process's locks: no other
        // process uses this board).
        let theirs = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&db)
            .unwrap();
        let id = {
            let m = theirs.metadata().unwrap();
            (m.dev(), m.ino())
        };
        // Grown ahead through the descriptor kept for it.
        theirs.set_len(end).unwrap();
        {
            let open_files = OPEN_FILES.lock().unwrap();
            keep_ahead(&board.conn, open_files.get(&id).unwrap().fd.as_ref()).unwrap();
        }
        assert!(theirs.metadata().unwrap().len() >= end + AHEAD_BYTES as u64);
        let pages = vec![0xABu8; 256 * 1024];
        let mut back = vec![0u8; pages.len()];
        for round in 0..2000 {
            theirs.set_len(end).unwrap();
            let start = std::sync::Barrier::new(2);
            std::thread::scope(|s| {
                s.spawn(|| {
                    start.wait();
                    theirs.write_all_at(&pages, end).unwrap();
                });
                let open_files = OPEN_FILES.lock().unwrap();
                start.wait();
                let _ = keep_ahead(&board.conn, open_files.get(&id).unwrap().fd.as_ref());
            });
            theirs.read_exact_at(&mut back, end).unwrap();
            let lost = back.iter().filter(|b| **b != 0xAB).count();
            assert_eq!(
                lost, 0,
                "round {round}: bytes written past the end were overwritten"
            );
        }
    }

    #[test]
    fn an_init_lock_held_past_the_wait_is_gone_around_as_upstream_does() {
        let dir = tempfile::tempdir().unwrap();
        let paths = BoardPaths::for_db(&dir.path().join("kanban.db"));
        let me = Owner::of_tree(dir.path()).unwrap();
        let held = lock::FileLock::try_acquire(&paths.sibling("init.lock"), &me)
            .unwrap()
            .unwrap();
        let t0 = std::time::Instant::now();
        let got = take_init_lock(&paths, &me, Duration::from_millis(50)).unwrap();
        assert!(got.is_none(), "a held lock was taken");
        assert!(t0.elapsed() >= Duration::from_millis(50), "it did not wait");
        drop(held);
        assert!(take_init_lock(&paths, &me, Duration::from_millis(50))
            .unwrap()
            .is_some());
    }

    /// A writer of the board (a worker) adds an index whose expression costs about a quarter
    /// of a second a row: `integrity_check` evaluates it for every row, the daemon's budget
    /// stops it, and `quick_check` (no index against its table) answers at once.
    #[test]
    fn a_check_out_of_budget_stops_and_the_quick_check_stands_in() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("kanban.db");
        let mut conn = Connection::open(&db).unwrap();
        conn.execute_batch(
            "CREATE TABLE t(id INTEGER PRIMARY KEY, title TEXT);
             INSERT INTO t(title) VALUES ('a'), ('b'), ('c'), ('d'), ('e'), ('f');
             CREATE INDEX slow ON t(length(printf('%.*c', 50000000, title)));",
        )
        .unwrap();
        let budget = Some(Duration::from_millis(300));
        let t0 = std::time::Instant::now();
        assert_eq!(
            check_within(&mut conn, &db, "integrity_check", budget).unwrap(),
            None
        );
        let spent = t0.elapsed();
        assert_eq!(
            check_within(&mut conn, &db, "quick_check", budget).unwrap(),
            Some("ok".to_string())
        );
        // No budget: as long as it takes (a person's command), and the handler is gone.
        assert_eq!(
            check_within(&mut conn, &db, "integrity_check", None).unwrap(),
            Some("ok".to_string())
        );
        println!("integrity_check stopped after {spent:?} (budget 300 ms)");
    }

    #[test]
    fn an_init_lock_that_is_no_lock_file_is_still_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let paths = BoardPaths::for_db(&dir.path().join("kanban.db"));
        let me = Owner::of_tree(dir.path()).unwrap();
        nix::unistd::mkfifo(
            &paths.sibling("init.lock"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        assert!(take_init_lock(&paths, &me, Duration::from_millis(50)).is_err());
    }
}
