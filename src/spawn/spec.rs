//! What the dispatcher hands a run's supervisor, and what the supervisor leaves behind.
//! Both cross a process boundary as JSON, so both are plain data.

use std::path::{Path, PathBuf};

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
    /// Where the supervisor writes the worker's exit status (`RunStatus`).
    pub status_file: PathBuf,
    /// `SYSLOG_IDENTIFIER` of the worker's output in the journal.
    pub identifier: String,
    /// Also append the output here (upstream's `kanban/logs/<task>.log`), so `hermes
    /// kanban log` keeps working; opened and rotated with `log_owner`'s (the board owner's)
    /// file system identity, never root's.
    pub log_file: Option<PathBuf>,
    pub log_owner: crate::safe_fs::Owner,
    /// What only upstream's own code can say about this run, asked in the scope by the
    /// worker's own process before it becomes the worker (`upstream::PRELUDE`); `None` when
    /// the binary is no Python script (nothing to ask).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prelude: Option<Prelude>,
    /// Keep the last `OUTPUT_TAIL` bytes of the worker's output in its exit record: ~0.22
    /// books a dead worker with its last words (`worker_output`).
    #[serde(default)]
    pub output_tail: bool,
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

/// A run whose worker never started, said by its supervisor from inside the scope.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NotStarted {
    pub reason: String,
    pub fault: crate::outcome::Fault,
}

/// How a worker ended, written by its supervisor the moment it was reaped, so the exit
/// status survives the death or restart of whoever launched it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunStatus {
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

impl Usage {
    /// Read it for the cgroup at `dir`; `None` when nothing there could be read.
    pub fn read(dir: &Path) -> Option<Usage> {
        let text = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
        let cpu_usec = text("cpu.stat").and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse().ok())
        });
        let memory_peak_bytes = text("memory.peak").and_then(|v| v.trim().parse().ok());
        // `io.stat`: one line per device, `MAJ:MIN rbytes=N wbytes=N rios=N …`.
        let io = text("io.stat").map(|t| {
            let sum = |key: &str| -> u64 {
                t.split_whitespace()
                    .filter_map(|f| f.strip_prefix(key))
                    .filter_map(|v| v.parse::<u64>().ok())
                    .sum()
            };
            (sum("rbytes="), sum("wbytes="))
        });
        let u = Usage {
            cpu_usec,
            memory_peak_bytes,
            io_read_bytes: io.map(|i| i.0),
            io_write_bytes: io.map(|i| i.1),
        };
        (u != Usage::default()).then_some(u)
    }
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

impl MemoryFacts {
    /// Read them for the cgroup at `dir` (`/sys/fs/cgroup/...`); `None` without a memory
    /// controller there.
    pub fn read(dir: &Path) -> Option<MemoryFacts> {
        let events = std::fs::read_to_string(dir.join("memory.events")).ok()?;
        let oom_kills = events
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let number = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        Some(MemoryFacts {
            oom_kills,
            max: number("memory.max"),
            peak: number("memory.peak"),
        })
    }
}

/// What the supervisor reports on its stdout once the worker was started, or not.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Report {
    Started {
        pid: u32,
    },
    Failed {
        reason: String,
        /// Whose side the failure is on (the workspace and the binary are the task's).
        fault: crate::outcome::Fault,
    },
}

/// `<state_dir>/runs/<task>-run-<run>.json`, `<board>.` in front off the default board
/// (`unit_name::run_record`: bounded, one component, whatever the ids are).
pub fn status_path(state_dir: &Path, board: &str, task: &str, run_id: i64) -> PathBuf {
    state_dir
        .join("runs")
        .join(crate::systemd::unit_name::run_record(board, task, run_id))
}

/// `<state_dir>/claimers`: one line `<boot id> <claimer id>` for every hermes-mgr process
/// that claimed a task on this boot (`note_claimer`). A `running` row of this host with no
/// worker, no scope and no exit record is ours to requeue only when its claim lock is one
/// of these: the dispatcher that claimed it died before the worker started. Any other lock
/// is someone's hand claim (`hermes kanban claim`, a terminal lane), left to its claim TTL
/// as upstream leaves it. Noted once per process, before its first claim, so no kill can
/// fall between a claim and its being known as ours.
pub fn claimers_path(state_dir: &Path) -> PathBuf {
    state_dir.join("claimers")
}

/// Note this process (`board::claimer_id()`) as a claimer of this boot; once per process
/// and state directory.
pub fn note_claimer(state_dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    static NOTED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut noted = NOTED.lock().unwrap_or_else(|e| e.into_inner());
    if noted.iter().any(|d| d == state_dir) {
        return Ok(());
    }
    std::fs::create_dir_all(state_dir)?;
    // One short `write` with O_APPEND: lines of concurrent claimers never interleave.
    let line = format!(
        "{} {}\n",
        crate::liveness::boot_id().unwrap_or_default(),
        crate::board::claimer_id()
    );
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(claimers_path(state_dir))?
        .write_all(line.as_bytes())?;
    noted.push(state_dir.to_path_buf());
    Ok(())
}

/// The claimer ids hermes-mgr processes noted on this boot.
pub fn claimers_of_this_boot(state_dir: &Path) -> std::collections::HashSet<String> {
    let boot = crate::liveness::boot_id().unwrap_or_default();
    std::fs::read_to_string(claimers_path(state_dir))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(b, _)| *b == boot)
        .map(|(_, c)| c.to_string())
        .collect()
}

/// A booked run's file in the runtime directory: its exit record.
pub fn forget_run(state_dir: &Path, board: &str, task: &str, run_id: i64) {
    let _ = std::fs::remove_file(status_path(state_dir, board, task, run_id));
}

impl RunStatus {
    /// The names of the exit records there are (`unit_name::run_record`), in one listing;
    /// `None` when the directory cannot be listed. Reconcile goes through every live run,
    /// and most have no record.
    pub fn present(state_dir: &Path) -> Option<std::collections::HashSet<String>> {
        let names = std::fs::read_dir(state_dir.join("runs"))
            .ok()?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        Some(names)
    }

    /// The status a supervisor left for this run, if any.
    pub fn read(
        state_dir: &Path,
        board: &str,
        task: &str,
        run_id: i64,
    ) -> std::io::Result<Option<RunStatus>> {
        match std::fs::read(status_path(state_dir, board, task, run_id)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake cgroup directory: this sandbox has no memory controller, so the kernel's own
    /// files cannot be made to show an OOM kill here (the VM tier's job).
    #[test]
    fn memory_facts_are_read_from_the_controllers_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(MemoryFacts::read(dir.path()), None);
        std::fs::write(
            dir.path().join("memory.events"),
            "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("memory.max"), "67108864\n").unwrap();
        std::fs::write(dir.path().join("memory.peak"), "67100000\n").unwrap();
        assert_eq!(
            MemoryFacts::read(dir.path()),
            Some(MemoryFacts {
                oom_kills: 1,
                max: Some(67108864),
                peak: Some(67100000)
            })
        );
        std::fs::write(dir.path().join("memory.max"), "max\n").unwrap();
        assert_eq!(MemoryFacts::read(dir.path()).unwrap().max, None);
    }

    /// The same fake directory for the figures of a run's cost (the VM tier reads real ones).
    #[test]
    fn usage_is_read_from_cpu_memory_and_io_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Usage::read(dir.path()), None);
        std::fs::write(
            dir.path().join("cpu.stat"),
            "usage_usec 4121000\nuser_usec 4000000\nsystem_usec 121000\n",
        )
        .unwrap();
        assert_eq!(
            Usage::read(dir.path()),
            Some(Usage {
                cpu_usec: Some(4121000),
                ..Usage::default()
            })
        );
        std::fs::write(dir.path().join("memory.peak"), "67100000\n").unwrap();
        std::fs::write(
            dir.path().join("io.stat"),
            "254:0 rbytes=4096 wbytes=1048576 rios=1 wios=8 dbytes=0 dios=0\n254:16 rbytes=100 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n",
        )
        .unwrap();
        assert_eq!(
            Usage::read(dir.path()),
            Some(Usage {
                cpu_usec: Some(4121000),
                memory_peak_bytes: Some(67100000),
                io_read_bytes: Some(4196),
                io_write_bytes: Some(1048576),
            })
        );
    }
}
