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

/// A row's columns by name, looked up once per row: rusqlite's `column_index` asks SQLite
/// for every column's name on each lookup, which made reading 10,000 running tasks (~30
/// columns each) the daemon's main idle cost.
pub(crate) struct Cols<'r, 's> {
    row: &'r Row<'s>,
    names: Vec<&'r str>,
}

impl<'r, 's> Cols<'r, 's> {
    pub(crate) fn of(row: &'r Row<'s>) -> Self {
        Cols {
            names: row.as_ref().column_names().collect(),
            row,
        }
    }

    /// Read a column by name; absent columns and NULLs are `None`.
    pub(crate) fn get<T: rusqlite::types::FromSql>(
        &self,
        name: &str,
    ) -> rusqlite::Result<Option<T>> {
        match self.names.iter().position(|n| n.eq_ignore_ascii_case(name)) {
            Some(i) => self.row.get(i),
            None => Ok(None),
        }
    }

    /// A JSON column; malformed JSON written by someone else is shown as a string, not an error.
    fn json(&self, name: &str) -> rusqlite::Result<Option<Value>> {
        Ok(self
            .get::<String>(name)?
            .map(|s| serde_json::from_str(&s).unwrap_or(Value::String(s))))
    }
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
    /// ~0.22's `provider_override` and `reasoning_effort` (absent on older boards).
    pub provider_override: Option<String>,
    pub reasoning_effort: Option<String>,
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
        let c = Cols::of(row);
        Ok(Task {
            id: row.get("id")?,
            title: c.get("title")?.unwrap_or_default(),
            body: c.get("body")?,
            assignee: c.get("assignee")?,
            status: Status::parse(&c.get::<String>("status")?.unwrap_or_default()),
            priority: c.get("priority")?.unwrap_or(0),
            created_by: c.get("created_by")?,
            created_at: c.get("created_at")?.unwrap_or(0),
            started_at: c.get("started_at")?,
            completed_at: c.get("completed_at")?,
            workspace_kind: c.get("workspace_kind")?.unwrap_or_else(|| "scratch".into()),
            workspace_path: c.get("workspace_path")?,
            branch_name: c.get("branch_name")?,
            tenant: c.get("tenant")?,
            result: c.get("result")?,
            claim_lock: c.get("claim_lock")?,
            claim_expires: c.get("claim_expires")?,
            consecutive_failures: c.get("consecutive_failures")?.unwrap_or(0),
            worker_pid: c.get("worker_pid")?,
            last_failure_error: c.get("last_failure_error")?,
            max_runtime_seconds: c.get("max_runtime_seconds")?,
            last_heartbeat_at: c.get("last_heartbeat_at")?,
            current_run_id: c.get("current_run_id")?,
            skills: c.json("skills")?,
            model_override: c.get("model_override")?,
            provider_override: c.get("provider_override")?,
            reasoning_effort: c.get("reasoning_effort")?,
            max_retries: c.get("max_retries")?,
            goal_mode: c.get::<i64>("goal_mode")?.unwrap_or(0) != 0,
            goal_max_turns: c.get::<i64>("goal_max_turns")?.filter(|n| *n != 0),
            session_id: c.get("session_id")?,
            block_kind: c.get("block_kind")?,
            block_recurrences: c.get("block_recurrences")?.unwrap_or(0),
        })
    }
}

/// A task as `status` lists it: with its number of runs and its newest run.
#[derive(Debug, Clone)]
pub struct Listed {
    pub task: Task,
    pub attempts: i64,
    pub last_run: Option<Run>,
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
        let c = Cols::of(row);
        Ok(Run {
            id: row.get("id")?,
            task_id: row.get("task_id")?,
            profile: c.get("profile")?,
            status: c.get("status")?.unwrap_or_default(),
            claim_lock: c.get("claim_lock")?,
            claim_expires: c.get("claim_expires")?,
            worker_pid: c.get("worker_pid")?,
            max_runtime_seconds: c.get("max_runtime_seconds")?,
            started_at: c.get("started_at")?.unwrap_or(0),
            ended_at: c.get("ended_at")?,
            outcome: c.get("outcome")?,
            summary: c.get("summary")?,
            metadata: c.json("metadata")?,
            error: c.get("error")?,
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
        let c = Cols::of(row);
        Ok(Event {
            id: row.get("id")?,
            task_id: row.get("task_id")?,
            run_id: c.get("run_id")?,
            kind: c.get("kind")?.unwrap_or_default(),
            payload: c.json("payload")?,
            created_at: c.get("created_at")?.unwrap_or(0),
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
    /// The run's outcome as booked (`crashed`, `gave_up`, …).
    pub outcome: String,
    pub status: String,
    pub failures: i64,
    pub gave_up: bool,
}
