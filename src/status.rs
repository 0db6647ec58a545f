//! What `hermes-mgr status` shows: the board's tasks worth seeing, and for live runs the
//! facts the kernel holds (process state, memory, CPU from the scope's cgroup). Gathered
//! without D-Bus, so it answers even when systemd is busy.

use std::path::Path;

use serde::Serialize;

use crate::board::{self, Board, Run, Task};
use crate::config::Config;
use crate::names;

/// The `--json` document (stable: fields are only ever added).
#[derive(Debug, Serialize)]
pub struct Snapshot {
    /// The board file (the current board when several are shown).
    pub board: String,
    /// The slugs of the boards shown: one, or every board of the root (`status` without
    /// `--board`/`--db`).
    pub boards: Vec<String>,
    /// `running` when a dispatcher (ours or Hermes' gateway) holds the board's dispatcher lock.
    pub dispatcher: &'static str,
    /// What `hermes-dispatcher.service` last said of itself (`STATUS=`), when systemd knows
    /// the service: `FAILING to start workers (…)` while its own side fails.
    pub dispatcher_status: Option<String>,
    /// The Hermes the workers run (its package and version, from its installation) and the
    /// contract they get; `None` when no Hermes package is found beside `hermes_bin`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hermes: Option<HermesServed>,
    /// Hermes' emergency stop (`hermes pause`) while it holds: its file. Nothing is started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estop: Option<String>,
    /// Boards an operator holds from new starts (`hermes-mgr pause --board`/`--all`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paused: Vec<PausedBoard>,
    /// The capacity pools (`[pools.NAME]`), as the kernel shows their slices now.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<crate::dispatch::pools::View>,
    /// Every status on the board with its count (exact, whatever `limit` hides).
    pub counts: std::collections::BTreeMap<String, i64>,
    pub tasks: Vec<TaskRow>,
    pub now: i64,
}

/// A board held by an operator.
#[derive(Debug, Serialize)]
pub struct PausedBoard {
    pub board: String,
    pub since: i64,
    /// Its running workers were frozen too (`--freeze`).
    pub freeze: bool,
    /// Held by `pause --all` (every board), not by its own pause.
    pub all: bool,
}

/// A task's pause (`hermes-mgr pause ID`), or its board's with `--freeze`.
#[derive(Debug, Serialize)]
pub struct PausedTask {
    pub since: i64,
    /// The kernel's word on its run's cgroup (`cgroup.events`: `frozen 1`); `None` when
    /// nothing runs.
    pub frozen: Option<bool>,
}

/// Which Hermes the workers run, and whose contract they get.
#[derive(Debug, Serialize)]
pub struct HermesServed {
    pub package: String,
    pub version: String,
    /// The proven version whose contract (argv, environment, booking) is followed.
    pub contract: &'static str,
}

/// The Hermes `cfg`'s workers run, as its installation says (never run).
fn hermes_served(cfg: &Config) -> Option<HermesServed> {
    let bin = crate::spawn::resolve_binary(&cfg.hermes_bin).ok()?;
    let h = crate::spawn::installed::of_binary(&bin)?;
    Some(HermesServed {
        contract: h.generation().version(),
        package: h.package,
        version: h.version,
    })
}

#[derive(Debug, Serialize)]
pub struct TaskRow {
    /// The board's slug (`default`, or `<root>/kanban/boards/<slug>`).
    pub board: String,
    pub id: String,
    pub title: String,
    pub status: String,
    pub assignee: Option<String>,
    pub priority: i64,
    pub age_seconds: i64,
    pub attempts: i64,
    pub consecutive_failures: i64,
    pub last_error: Option<String>,
    /// The live run (status `running`).
    pub run: Option<LiveRun>,
    /// The newest finished run.
    pub last_run: Option<EndedRun>,
    /// Paused: held, its worker frozen while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paused: Option<PausedTask>,
}

#[derive(Debug, Serialize)]
pub struct LiveRun {
    pub id: i64,
    pub unit: String,
    pub pid: Option<i64>,
    /// `R`, `S`, `D`, `Z`, … from `/proc/<pid>/stat`; `null` when the process is gone.
    pub state: Option<String>,
    /// The scope has a cgroup (the worker's processes are there).
    pub in_scope: bool,
    /// The scope's cgroup directory, for a further look (not in `--json`).
    #[serde(skip)]
    pub cgroup: std::path::PathBuf,
    pub memory_current: Option<u64>,
    pub memory_peak: Option<u64>,
    pub cpu_usec: Option<u64>,
    pub uptime_seconds: i64,
}

#[derive(Debug, Serialize)]
pub struct EndedRun {
    pub id: i64,
    pub outcome: Option<String>,
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    pub error: Option<String>,
    pub ended_at: Option<i64>,
    pub duration_seconds: Option<i64>,
    /// What the run cost (CPU, peak memory, IO), as its scope counted it.
    pub resources: Option<serde_json::Value>,
}

/// A small kernel file (procfs, cgroupfs) in one `read(2)`: these files hand out their
/// whole text at once, and `status` reads a few per live row.
fn read_small(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut buf = [0u8; 4096];
    let n = std::fs::File::open(path).ok()?.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn read_u64(path: &Path) -> Option<u64> {
    read_small(path)?.trim().parse().ok()
}

/// The state letter of a process (`R`, `S`, `Z`, …): the field after the command name,
/// which ends at the last `)`.
fn process_state(pid: i64) -> Option<String> {
    let stat = read_small(Path::new(&format!("/proc/{pid}/stat")))?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().next().map(str::to_string)
}

/// What the live rows read from the kernel: as few files per row as gives the facts (each
/// open and read of a procfs or cgroupfs file costs ~20 µs of kernel time here).
#[derive(Default)]
struct Kernel {
    /// Whether scopes have `memory.*` files (the memory controller is on for the workers'
    /// slices), found at the first scope read: without it, no row tries them.
    memory: std::cell::Cell<Option<bool>>,
}

impl Kernel {
    fn live_run(
        &self,
        cfg: &Config,
        board: &str,
        t: &Task,
        run_id: i64,
        run: Option<&Run>,
        now: i64,
    ) -> LiveRun {
        let unit = names::worker_scope(board, &t.id, run_id);
        let cgroup_dir = |cgroup: String| Path::new("/sys/fs/cgroup").join(&cgroup[1..]);
        let cpu = |dir: &Path| {
            read_small(&dir.join("cpu.stat")).map(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
        };
        // `cpu.stat` is in every cgroup v2 directory: read, it also says the scope's cgroup
        // exists (where the configuration puts it, else in another of its slices).
        let profile = names::profile_of(t.assignee.as_deref(), cfg.default_assignee.as_deref());
        let dir = cgroup_dir(cfg.worker_cgroup(Some(&profile), &unit));
        let cpu_usec = cpu(&dir);
        let memory = |f: &str| {
            if cpu_usec.is_none() || self.memory.get() == Some(false) {
                return None;
            }
            let v = read_u64(&dir.join(f));
            if self.memory.get().is_none() {
                self.memory.set(Some(v.is_some()));
            }
            v
        };
        LiveRun {
            id: run_id,
            pid: t.worker_pid,
            state: t.worker_pid.and_then(process_state),
            in_scope: cpu_usec.is_some(),
            memory_current: memory("memory.current"),
            memory_peak: memory("memory.peak"),
            cpu_usec: cpu_usec.flatten(),
            uptime_seconds: run.map(|r| now - r.started_at).unwrap_or(0),
            cgroup: dir,
            unit,
        }
    }
}

fn ended_run(r: &Run) -> EndedRun {
    let meta = |k: &str| {
        r.metadata
            .as_ref()
            .and_then(|m| m.get(k))
            .and_then(|v| v.as_i64())
    };
    EndedRun {
        id: r.id,
        outcome: r.outcome.clone(),
        exit_code: meta("exit_code"),
        signal: meta("signal"),
        error: r.error.clone(),
        ended_at: r.ended_at,
        duration_seconds: r.ended_at.map(|e| e - r.started_at),
        resources: r
            .metadata
            .as_ref()
            .and_then(|m| m.get("resources"))
            .cloned(),
    }
}

/// How many tasks of each status a snapshot holds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Running tasks (each costs the kernel reads of its live run).
    pub running: usize,
    /// Ready, blocked, triage and todo tasks, each.
    pub others: usize,
}

/// Tasks worth seeing: running ones, then ready, blocked, triage and todo ones, each with
/// its latest facts, as many as `limits` says.
pub fn snapshot(b: &Board, cfg: &Config, limits: Limits) -> board::Result<Snapshot> {
    let now = board::now();
    let kernel = Kernel::default();
    // The operators' holds: a file anyone may read; one that cannot be read shows none
    // (`status` answers whatever else is wrong).
    let holds = crate::holds::read(&cfg.holds_file).unwrap_or_default();
    let db = crate::holds::board_key(&b.paths().db);
    let board_hold = holds.board(&db);
    let mut tasks = Vec::new();
    for (status, cap) in [
        ("running", limits.running),
        ("ready", limits.others),
        ("blocked", limits.others),
        ("triage", limits.others),
        ("todo", limits.others),
    ] {
        for listed in b.in_status_with_runs(status, cap.min(1_000_000))? {
            let (t, runs_last) = (listed.task, listed.last_run);
            let run = match (t.status.as_str(), t.current_run_id) {
                ("running", Some(id)) => Some(kernel.live_run(
                    cfg,
                    &b.paths().slug,
                    &t,
                    id,
                    runs_last.as_ref().filter(|r| r.id == id),
                    now,
                )),
                _ => None,
            };
            let last_run = runs_last
                .as_ref()
                .filter(|r| r.ended_at.is_some())
                .map(ended_run);
            let own = holds.task(&db, &t.id).map(|h| h.since);
            let by_board = board_hold
                .filter(|h| h.hold().freeze && run.is_some())
                .map(|h| h.hold().since);
            let paused = own.or(by_board).map(|since| PausedTask {
                since,
                frozen: run.as_ref().map(|r| frozen(&r.cgroup)),
            });
            tasks.push(TaskRow {
                board: b.paths().slug.clone(),
                attempts: listed.attempts,
                age_seconds: now - t.created_at,
                status: t.status.to_string(),
                last_error: t.last_failure_error.clone(),
                consecutive_failures: t.consecutive_failures,
                id: t.id,
                title: t.title,
                assignee: t.assignee,
                priority: t.priority,
                run,
                last_run,
                paused,
            });
        }
    }
    let dispatcher = if b.dispatcher_lock_held() {
        "running"
    } else {
        "not running"
    };
    Ok(Snapshot {
        board: b.paths().db.display().to_string(),
        boards: vec![b.paths().slug.clone()],
        dispatcher,
        dispatcher_status: None,
        hermes: hermes_served(cfg),
        estop: crate::hermes_config::estop_of_root(&b.paths().root)
            .map(|p| p.display().to_string()),
        paused: board_hold
            .map(|h| PausedBoard {
                board: b.paths().slug.clone(),
                since: h.hold().since,
                freeze: h.hold().freeze,
                all: matches!(h, crate::holds::BoardHeld::All(_)),
            })
            .into_iter()
            .collect(),
        pools: crate::dispatch::pools::look(cfg, &Default::default()),
        counts: b.counts()?,
        tasks,
        now,
    })
}

/// Whether the kernel has the cgroup at `dir` frozen (`cgroup.events`).
fn frozen(dir: &Path) -> bool {
    read_small(&dir.join("cgroup.events")).is_some_and(|e| e.lines().any(|l| l == "frozen 1"))
}

/// `snapshot` of several boards, as one: the first board's file and dispatcher, every
/// board's tasks (running ones first, then by status as `snapshot` orders them), counts
/// summed.
pub fn snapshot_all(boards: &[Board], cfg: &Config, limits: Limits) -> board::Result<Snapshot> {
    let mut all: Option<Snapshot> = None;
    for b in boards {
        let one = snapshot(b, cfg, limits)?;
        match &mut all {
            None => all = Some(one),
            Some(acc) => {
                acc.boards.extend(one.boards);
                acc.paused.extend(one.paused);
                acc.tasks.extend(one.tasks);
                for (k, v) in one.counts {
                    *acc.counts.entry(k).or_default() += v;
                }
            }
        }
    }
    let mut all = all.ok_or_else(|| board::BoardError::NoSuchTask("(no board)".into()))?;
    let rank = |s: &str| {
        ["running", "ready", "blocked", "triage", "todo"]
            .iter()
            .position(|x| *x == s)
            .unwrap_or(usize::MAX)
    };
    all.tasks.sort_by_key(|t| rank(&t.status));
    Ok(all)
}
