//! The exit record: how a run's worker ended, written by its supervisor (in the run's scope)
//! the moment it was reaped, so the exit status survives the death or restart of whoever
//! launched it; with what the scope's cgroup said of it, and whose side a start that failed
//! is on. Data only: `liveness` reads the cgroup, `state_dir` keeps the files. A leaf: it
//! imports nothing of the crate.

use serde::{Deserialize, Serialize};

/// Whose side a spawn failure is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// The task itself (a `dir:` workspace the worker may not enter, an assignee that is no
    /// profile, data exec refuses): counted, so a broken task trips the breaker.
    Task,
    /// The dispatcher's side: never counted against the task.
    Infrastructure,
}

/// A run whose worker never started, said by its supervisor from inside the scope.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NotStarted {
    pub reason: String,
    pub fault: Fault,
}

/// How a worker ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitRecord {
    pub task: String,
    pub run_id: i64,
    pub unit: String,
    pub worker_pid: u32,
    pub started_at: i64,
    pub ended_at: i64,
    /// Set when the worker exited.
    pub exit_code: Option<i32>,
    /// Set when the worker was killed by a signal.
    pub signal: Option<i32>,
    /// The supervisor had received SIGTERM (a stop of the scope) before the worker ended.
    pub sigterm_received: bool,
    /// What the scope's memory controller said when the worker had ended (`memory.events`
    /// `oom_kill`, `memory.max`, `memory.peak`); absent without the controller, and in
    /// records written by older supervisors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryFacts>,
    /// What the run cost, from its scope's cgroup when the worker had ended; absent in
    /// records written by older supervisors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// The process ended before it became the worker (upstream's code, asked first, refused
    /// or failed): a spawn failure, by whose side it is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_started: Option<NotStarted>,
    /// The last `OUTPUT_TAIL` bytes the worker (and its processes) wrote, stdout and stderr
    /// as they came, when the spec asked for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tail: Option<String>,
    /// Seconds the run spent frozen (`hermes-mgr pause`): not charged to its runtime.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub paused_seconds: u64,
    /// The supervisor ended the run at its runtime limit (`max_runtime_seconds`, paused
    /// time not counted): SIGTERM to every process of the scope, SIGKILL after the stop
    /// timeout.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
    /// The board's filesystem had no room for a write when the worker ended: a worker that
    /// failed then most likely failed writing its verdict (`outcome`: not charged). Seen by
    /// the supervisor at that moment — the dispatcher may book the run much later, once
    /// there is room again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub board_full: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The time a run spent frozen, kept beside its exit record by whoever pauses and resumes
/// it (before the freeze, before the thaw), read by its supervisor: its runtime limit does
/// not charge it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Paused {
    /// Seconds of the pauses that ended.
    pub seconds: u64,
    /// When the pause in progress began (wall clock seconds), if one is.
    pub since: Option<i64>,
}

impl Paused {
    /// Every second paused by `now`, the pause in progress included.
    pub fn total(&self, now: i64) -> u64 {
        self.seconds
            + self
                .since
                .map_or(0, |s| now.saturating_sub(s).max(0) as u64)
    }

    /// A pause begins at `now` (again: nothing changes).
    pub fn begin(self, now: i64) -> Paused {
        Paused {
            since: self.since.or(Some(now)),
            ..self
        }
    }

    /// The pause in progress ends at `now`.
    pub fn end(self, now: i64) -> Paused {
        Paused {
            seconds: self.total(now),
            since: None,
        }
    }
}

/// A run's private `TMPDIR`, noted by its supervisor beside the exit record the moment it
/// is made (`state_dir::tmpdir_note_path`), and removed after it: a dispatcher that did not
/// start the run (it was restarted since) learns from it what to remove should the
/// supervisor be killed before it could.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TmpdirNote {
    pub dir: std::path::PathBuf,
    pub uid: u32,
    pub gid: u32,
}

/// A run's cost as its scope's cgroup counted it (what `systemctl status` shows as
/// "Consumed … CPU time"); each figure absent where its controller is not enabled.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Usage {
    /// CPU time, user and system (`cpu.stat` `usage_usec`; always counted on cgroup v2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_usec: Option<u64>,
    /// The most memory the run ever used (`memory.peak`, kernel 5.19+).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_peak_bytes: Option<u64>,
    /// Bytes read from and written to block devices (`io.stat`, summed over devices).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub io_read_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub io_write_bytes: Option<u64>,
}

/// The memory controller's account of a run's scope.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct MemoryFacts {
    /// Processes of the scope the kernel's OOM killer killed.
    pub oom_kills: u64,
    /// `MemoryMax=`, in bytes; `None` for no limit.
    pub max: Option<u64>,
    /// The most the scope ever used, in bytes (kernel 5.19+).
    pub peak: Option<u64>,
}

impl ExitRecord {
    pub fn describe(&self) -> String {
        match (self.exit_code, self.signal) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(s)) => format!("killed by signal {s} ({})", signal_name(s)),
            (None, None) => "ended".into(),
        }
    }
}

pub fn signal_name(sig: i32) -> &'static str {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str())
        .unwrap_or("unknown")
}
