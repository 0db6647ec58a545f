//! What the dispatcher hands a run's supervisor, and what the supervisor leaves behind.
//! Both cross a process boundary as JSON, so both are plain data.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything the supervisor needs to start one worker; built by the dispatcher, which
/// did every lookup (user, groups, binary, workspace) before any scope existed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerSpec {
    pub task: String,
    pub run_id: i64,
    pub unit: String,
    /// `argv[0]` is the absolute path that is executed.
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The workspace: the worker's cwd, entered after the privilege drop.
    pub cwd: PathBuf,
    /// Create the workspace (`mkdir -p`, as the worker) before entering it: a scratch one.
    pub make_cwd: bool,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// Where the supervisor makes the run's private `TMPDIR` (a new, unguessable name each
    /// time, mode 0700, the worker's), removed when the worker ends.
    pub tmp_root: PathBuf,
    /// Where the supervisor writes the worker's exit status (`ExitRecord`).
    pub status_file: PathBuf,
    /// `SYSLOG_IDENTIFIER` of the worker's output in the journal.
    pub identifier: String,
    /// Also append the output here (upstream's `kanban/logs/<task>.log`), so `hermes
    /// kanban log` keeps working; opened and rotated with `log_owner`'s (the board owner's)
    /// file system identity, never root's.
    pub log_file: Option<PathBuf>,
    pub log_owner: crate::safe_fs::Owner,
    /// `log_owner`'s groups, looked up by the dispatcher: the supervisor, linked statically,
    /// never asks the user database (static glibc's NSS loads the system's shared modules).
    #[serde(default)]
    pub log_owner_groups: Vec<u32>,
    /// What only upstream's own code can say about this run, asked in the scope by the
    /// worker's own process before it becomes the worker (`upstream::PRELUDE`); `None` when
    /// the binary is no Python script (nothing to ask).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prelude: Option<Prelude>,
    /// Keep the last `OUTPUT_TAIL` bytes of the worker's output in its exit record: ~0.22
    /// books a dead worker with its last words (`worker_output`).
    #[serde(default)]
    pub output_tail: bool,
    /// The task's runtime limit in seconds, enforced by the supervisor (paused time not
    /// counted): SIGTERM to every process of the scope, SIGKILL `stop_timeout` later.
    #[serde(default)]
    pub max_runtime: Option<u64>,
    #[serde(default)]
    pub stop_timeout: u64,
    /// Where the run's pauses are kept (`state_dir::paused_path`).
    #[serde(default)]
    pub paused_file: PathBuf,
    /// The worker's sandbox (`sandbox` in the configuration): built by the supervisor's child,
    /// as root, before it becomes the worker; `None`: the worker sees the host as its user may.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<Sandbox>,
    /// The board's directory: the supervisor looks at its filesystem's room when the worker
    /// ends (`ExitRecord::board_full`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub board_dir: Option<PathBuf>,
    /// Where the supervisor notes the run's TMPDIR while it lives (`record::TmpdirNote`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmpdir_note: Option<PathBuf>,
}

/// What a sandboxed worker sees (`spawn::sandbox::plan`): a mount namespace of its own in
/// which everything is read-only but `writable`, the `hidden` directories are empty tmpfs
/// (their `exposed` paths put back), and — where the kernel has Landlock — a second layer
/// that allows writes only beneath the writable paths.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Sandbox {
    /// Replaced by an empty tmpfs: read-only (`/home`, other tasks' workspaces), or a fresh
    /// writable one of the worker's alone (`/tmp`, `/var/tmp`, `/dev/shm`).
    pub hidden: Vec<Hidden>,
    /// Paths shown as they are on the host — under a hidden directory, or inside a writable
    /// one — read-only or writable (the workspace, the board, `config.yaml` read-only).
    pub exposed: Vec<Exposed>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hidden {
    pub path: PathBuf,
    pub writable: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Exposed {
    pub path: PathBuf,
    pub writable: bool,
}

/// How much of a worker's last output its exit record keeps (upstream reads the last 4,000
/// bytes of its log).
pub const OUTPUT_TAIL: usize = 4000;

/// The questions for upstream's code, asked as the worker in its scope (`upstream.rs`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Prelude {
    /// The interpreter of the `hermes` script (its `#!` line).
    pub python: PathBuf,
    /// `--toolsets` of the profile at this Hermes home, inserted into `argv` at `toolsets_at`.
    pub toolsets_home: PathBuf,
    pub toolsets_at: usize,
    /// The run it starts.
    pub run: RunRef,
    /// A worktree task: upstream materializes its workspace (then `cwd` is only where the
    /// asking starts, and the path and branch are upstream's answer).
    pub worktree: bool,
    /// Record upstream's pid fingerprint of this process (~0.22's `worker_started_at`), which
    /// its own tools check before they call a worker alive or signal it.
    pub fingerprint: bool,
}

/// A run, as upstream's code finds it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunRef {
    pub board: String,
    pub task: String,
    pub run_id: i64,
    /// `HERMES_KANBAN_HOME` while upstream is asked (the root whose boards it reads).
    pub kanban_home: PathBuf,
}

/// What the supervisor reports on its stdout once the worker was started, or not.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Report {
    Started {
        pid: u32,
        /// The run's TMPDIR: removed by the supervisor when the worker has ended, by the
        /// dispatcher when the supervisor was killed first (a stop's SIGKILL).
        #[serde(default)]
        tmpdir: Option<std::path::PathBuf>,
    },
    Failed {
        reason: String,
        /// Whose side the failure is on (the workspace and the binary are the task's).
        fault: crate::record::Fault,
    },
}
