//! Board rows as Rust values. Columns are read by name, and a column that an older or newer
//! Hermes lacks reads as `None`, so hermes-mgr never depends on column order or count.

use rusqlite::Row;
use serde::Serialize;
use serde_json::Value;

/// A task status. Hermes may grow new ones; those round-trip as `Other`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    Triage,
    Todo,
    Scheduled,
    Ready,
    Running,
    Blocked,
    Review,
    Done,
    Archived,
    Other(String),
}

impl Status {
    pub const KNOWN: &'static [&'static str] = &[
        "triage",
        "todo",
        "scheduled",
        "ready",
        "running",
        "blocked",
        "review",
        "done",
        "archived",
    ];

    pub fn parse(s: &str) -> Status {
        match s {
            "triage" => Status::Triage,
            "todo" => Status::Todo,
            "scheduled" => Status::Scheduled,
            "ready" => Status::Ready,
            "running" => Status::Running,
            "blocked" => Status::Blocked,
            "review" => Status::Review,
            "done" => Status::Done,
            "archived" => Status::Archived,
            other => Status::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Status::Triage => "triage",
            Status::Todo => "todo",
            Status::Scheduled => "scheduled",
            Status::Ready => "ready",
            Status::Running => "running",
            Status::Blocked => "blocked",
            Status::Review => "review",
            Status::Done => "done",
            Status::Archived => "archived",
            Status::Other(s) => s,
        }
    }
}

/// A status nobody knows was written by whoever wrote the board: it is shown escaped
/// (ASCII only) and short, so it cannot repaint a terminal or forge a log line.
impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Other(s) => {
                let shown: String = s.chars().take(64).flat_map(char::escape_default).collect();
                write!(f, "\"{shown}\"")
            }
            known => f.write_str(known.as_str()),
        }
    }
}

impl Serialize for Status {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Upstream's block kinds (`VALID_BLOCK_KINDS`).
pub const BLOCK_KINDS: &[&str] = &["dependency", "needs_input", "capability", "transient"];

/// Read a column by name; absent columns and NULLs are `None`.
pub(crate) fn col<T: rusqlite::types::FromSql>(
    row: &Row<'_>,
    name: &str,
) -> rusqlite::Result<Option<T>> {
    match row.as_ref().column_index(name) {
        Ok(i) => row.get(i),
        Err(rusqlite::Error::InvalidColumnName(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

fn json_col(row: &Row<'_>, name: &str) -> rusqlite::Result<Option<Value>> {
    // Malformed JSON written by someone else is shown as a string, not an error.
    Ok(col::<String>(row, name)?.map(|s| serde_json::from_str(&s).unwrap_or(Value::String(s))))
}

#[derive(Debug, Clone, Serialize)]
pub struct Task {
    pub id: String,
    pub title: String,
    pub body: Option<String>,
    pub assignee: Option<String>,
    pub status: Status,
    pub priority: i64,
    pub created_by: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub workspace_kind: String,
    pub workspace_path: Option<String>,
    pub branch_name: Option<String>,
    pub tenant: Option<String>,
    pub result: Option<String>,
    pub claim_lock: Option<String>,
    pub claim_expires: Option<i64>,
    pub consecutive_failures: i64,
    pub worker_pid: Option<i64>,
    pub last_failure_error: Option<String>,
    pub max_runtime_seconds: Option<i64>,
    pub last_heartbeat_at: Option<i64>,
    pub current_run_id: Option<i64>,
    pub skills: Option<Value>,
    pub model_override: Option<String>,
    pub max_retries: Option<i64>,
    pub goal_mode: bool,
    /// Bound of the goal loop (upstream reads NULL and 0 alike: no bound).
    pub goal_max_turns: Option<i64>,
    pub session_id: Option<String>,
    pub block_kind: Option<String>,
    pub block_recurrences: i64,
}

impl Task {
    pub(crate) fn from_row(row: &Row<'_>) -> rusqlite::Result<Task> {
        Ok(Task {
            id: row.get("id")?,
            title: col(row, "title")?.unwrap_or_default(),
            body: col(row, "body")?,
            assignee: col(row, "assignee")?,
            status: Status::parse(&col::<String>(row, "status")?.unwrap_or_default()),
            priority: col(row, "priority")?.unwrap_or(0),
            created_by: col(row, "created_by")?,
            created_at: col(row, "created_at")?.unwrap_or(0),
            started_at: col(row, "started_at")?,
            completed_at: col(row, "completed_at")?,
            workspace_kind: col(row, "workspace_kind")?.unwrap_or_else(|| "scratch".into()),
            workspace_path: col(row, "workspace_path")?,
            branch_name: col(row, "branch_name")?,
            tenant: col(row, "tenant")?,
            result: col(row, "result")?,
            claim_lock: col(row, "claim_lock")?,
            claim_expires: col(row, "claim_expires")?,
            consecutive_failures: col(row, "consecutive_failures")?.unwrap_or(0),
            worker_pid: col(row, "worker_pid")?,
            last_failure_error: col(row, "last_failure_error")?,
            max_runtime_seconds: col(row, "max_runtime_seconds")?,
            last_heartbeat_at: col(row, "last_heartbeat_at")?,
            current_run_id: col(row, "current_run_id")?,
            skills: json_col(row, "skills")?,
            model_override: col(row, "model_override")?,
            max_retries: col(row, "max_retries")?,
            goal_mode: col::<i64>(row, "goal_mode")?.unwrap_or(0) != 0,
            goal_max_turns: col::<i64>(row, "goal_max_turns")?.filter(|n| *n != 0),
            session_id: col(row, "session_id")?,
            block_kind: col(row, "block_kind")?,
            block_recurrences: col(row, "block_recurrences")?.unwrap_or(0),
        })
    }
}

/// One attempt at a task (`task_runs`).
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub id: i64,
    pub task_id: String,
    pub profile: Option<String>,
    pub status: String,
    pub claim_lock: Option<String>,
    pub claim_expires: Option<i64>,
    pub worker_pid: Option<i64>,
    pub max_runtime_seconds: Option<i64>,
    pub started_at: i64,
    pub ended_at: Option<i64>,
    pub outcome: Option<String>,
    pub summary: Option<String>,
    pub metadata: Option<Value>,
    pub error: Option<String>,
}

impl Run {
    pub(crate) fn from_row(row: &Row<'_>) -> rusqlite::Result<Run> {
        Ok(Run {
            id: row.get("id")?,
            task_id: row.get("task_id")?,
            profile: col(row, "profile")?,
            status: col(row, "status")?.unwrap_or_default(),
            claim_lock: col(row, "claim_lock")?,
            claim_expires: col(row, "claim_expires")?,
            worker_pid: col(row, "worker_pid")?,
            max_runtime_seconds: col(row, "max_runtime_seconds")?,
            started_at: col(row, "started_at")?.unwrap_or(0),
            ended_at: col(row, "ended_at")?,
            outcome: col(row, "outcome")?,
            summary: col(row, "summary")?,
            metadata: json_col(row, "metadata")?,
            error: col(row, "error")?,
        })
    }
}

/// One `task_events` row: upstream's audit trail, read by its notifier and guards.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub id: i64,
    pub task_id: String,
    pub run_id: Option<i64>,
    pub kind: String,
    pub payload: Option<Value>,
    pub created_at: i64,
}

impl Event {
    pub(crate) fn from_row(row: &Row<'_>) -> rusqlite::Result<Event> {
        Ok(Event {
            id: row.get("id")?,
            task_id: row.get("task_id")?,
            run_id: col(row, "run_id")?,
            kind: col(row, "kind")?.unwrap_or_default(),
            payload: json_col(row, "payload")?,
            created_at: col(row, "created_at")?.unwrap_or(0),
        })
    }
}

/// What `create_task` needs; mirrors `hermes kanban create`'s flags that hermes-mgr offers.
#[derive(Debug, Clone, Default)]
pub struct NewTask {
    pub title: String,
    pub body: Option<String>,
    pub assignee: Option<String>,
    pub priority: i64,
    pub parents: Vec<String>,
    pub max_runtime_seconds: Option<i64>,
    pub max_retries: Option<i64>,
    pub created_by: Option<String>,
    pub tenant: Option<String>,
    pub idempotency_key: Option<String>,
}

/// A successful claim: the task as it is now, and the run row opened for it.
#[derive(Debug, Clone, Serialize)]
pub struct Claim {
    pub task: Task,
    pub run_id: i64,
    pub lock: String,
    pub expires: i64,
    /// Claimed from `review` (upstream's review lane): the worker gets the `sdlc-review`
    /// skill instead of the task's own.
    pub review: bool,
}

/// What became of a task after `end_run`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndResult {
    pub run_id: Option<i64>,
    pub status: String,
    pub failures: i64,
    pub gave_up: bool,
}
