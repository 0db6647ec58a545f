//! The metrics an operator alerts on: the daemon's counters (runs ended, breaker trips, OOM
//! kills, spawn failures), its latencies, and gauges of what a snapshot of the boards, the
//! live workers and the workers' slice said. Rendered in Prometheus' text format 0.0.4:
//! node_exporter's textfile collector reads only that (OpenMetrics' `info` type or `# EOF`
//! make it drop the file), and every Prometheus scrapes it.
//!
//! Every label's values are bounded whatever the boards hold: boards by `max_boards`,
//! statuses and outcomes by the names Hermes uses (anything else is `other`), profiles by
//! `MAX_PROFILES`. No label names a run: 10,000 live workers are a handful of series.

pub mod serve;

use std::collections::BTreeMap;

use prometheus::core::{Collector, GenericCounter};
use prometheus::{
    Counter, CounterVec, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::liveness::{CgroupUse, SliceFacts};

/// The content type of what `render` writes.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The run outcomes counted by name (Hermes' own and ours); any other is `other`.
pub const OUTCOMES: &[&str] = &[
    "completed",
    "blocked",
    "crashed",
    "timed_out",
    "spawn_failed",
    "gave_up",
    "rate_limited",
    "reclaimed",
    "stale",
    "lost",
    "stopped",
];

/// Profiles given their own series; the rest are summed as `other`.
pub const MAX_PROFILES: usize = 100;

/// Buckets of the two latencies, in seconds: a start is milliseconds when systemd is idle,
/// seconds when PID 1 is busy; a booking follows a death by milliseconds, or by a retry.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// `name` if it is one of `known`, else `other`.
pub fn known_or_other<'a>(name: &'a str, known: &[&str]) -> &'a str {
    if known.contains(&name) {
        name
    } else {
        "other"
    }
}

/// What a board looked like at a snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BoardFacts {
    pub board: String,
    /// Tasks by status, statuses already bounded (`known_or_other`).
    pub tasks: BTreeMap<String, i64>,
    /// Seconds since the oldest ready task's last event (its becoming ready, mostly).
    pub oldest_ready_seconds: Option<f64>,
    /// The dispatcher fails to start workers on it (its pass backs off).
    pub failing: bool,
    /// It cannot be opened or checked: not served.
    pub broken: bool,
    /// An operator's hold keeps every task of it (`pause --board` or `--all`).
    pub paused: bool,
    /// Tasks of it held one by one (`pause ID`).
    pub paused_tasks: usize,
}

/// A live worker, for the per-profile sums.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveWorker {
    pub board: String,
    pub profile: String,
    /// What its scope's cgroup said; `None` when it could not be read.
    pub usage: Option<CgroupUse>,
}

/// Everything the gauges show, gathered by the daemon at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Wall clock seconds.
    pub at: f64,
    pub boards: Vec<BoardFacts>,
    pub live: Vec<LiveWorker>,
    /// The workers' slice (`None` where its cgroup cannot be read).
    pub slice: Option<SliceFacts>,
    /// Hermes' emergency stop holds every board.
    pub estop: bool,
    /// Admission by pressure holds new workers.
    pub pressure_held: bool,
    /// The capacity pools.
    pub pools: Vec<PoolGauges>,
    /// The hermes-agent version the workers run (`unknown` when not found), and the
    /// contract they get.
    pub hermes_version: String,
    pub hermes_contract: String,
}

/// A capacity pool, as its slice shows it (labelled by the pool's configured name: bounded
/// by `config::MAX_POOLS`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolGauges {
    pub pool: String,
    pub workers: i64,
    pub max_workers: Option<i64>,
    pub memory_current: Option<u64>,
    pub memory_max: Option<u64>,
    /// Tasks wait for it now.
    pub waiting: bool,
}

/// Per-profile sums of the live workers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfileSums {
    /// Workers by (board, profile).
    pub workers: BTreeMap<(String, String), i64>,
    /// By profile: CPU seconds used so far, memory in use, bytes read and written.
    pub cpu_seconds: BTreeMap<String, f64>,
    pub memory_bytes: BTreeMap<String, u64>,
    pub io_read_bytes: BTreeMap<String, u64>,
    pub io_write_bytes: BTreeMap<String, u64>,
}

/// Sum the live workers by profile; beyond the `MAX_PROFILES` with the most workers, a
/// profile counts as `other`.
pub fn sum_by_profile(live: &[LiveWorker]) -> ProfileSums {
    let mut per: BTreeMap<&str, usize> = BTreeMap::new();
    for w in live {
        *per.entry(&w.profile).or_default() += 1;
    }
    let mut ranked: Vec<(&str, usize)> = per.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let kept: std::collections::HashSet<&str> =
        ranked.iter().take(MAX_PROFILES).map(|(p, _)| *p).collect();
    let mut s = ProfileSums::default();
    for w in live {
        let profile = if kept.contains(w.profile.as_str()) {
            w.profile.clone()
        } else {
            "other".to_string()
        };
        *s.workers
            .entry((w.board.clone(), profile.clone()))
            .or_default() += 1;
        let Some(u) = &w.usage else { continue };
        if let Some(c) = u.cpu_usec {
            *s.cpu_seconds.entry(profile.clone()).or_default() += c as f64 / 1e6;
        }
        if let Some(m) = u.memory_bytes {
            *s.memory_bytes.entry(profile.clone()).or_default() += m;
        }
        if let Some(r) = u.io_read_bytes {
            *s.io_read_bytes.entry(profile.clone()).or_default() += r;
        }
        if let Some(w) = u.io_write_bytes {
            *s.io_write_bytes.entry(profile).or_default() += w;
        }
    }
    s
}

/// The daemon's metrics: counters and histograms it adds to as things happen, gauges set
/// whole from each `Snapshot`.
pub struct Metrics {
    registry: Registry,
    runs_ended: IntCounterVec,
    breaker_trips: IntCounterVec,
    oom_kills: IntCounterVec,
    spawn_failures: IntCounterVec,
    start_seconds: Histogram,
    booking_seconds: Histogram,
    tasks: IntGaugeVec,
    oldest_ready: GaugeVec,
    board_failing: IntGaugeVec,
    board_broken: IntGaugeVec,
    paused: IntGaugeVec,
    paused_tasks: IntGaugeVec,
    estop: IntGauge,
    pressure_held: IntGauge,
    pool_workers: IntGaugeVec,
    pool_max_workers: IntGaugeVec,
    pool_memory: IntGaugeVec,
    pool_waiting: IntGaugeVec,
    live_workers: IntGaugeVec,
    live_cpu: GaugeVec,
    live_memory: IntGaugeVec,
    live_io: IntGaugeVec,
    slice_cpu: Counter,
    slice_pressure: CounterVec,
    slice_memory: IntGaugeVec,
    slice_tasks: IntGaugeVec,
    slice_cpu_max: GaugeVec,
    build_info: IntGaugeVec,
    snapshot_at: Gauge,
    gather_seconds: Gauge,
    /// The slice's cumulative counters as last read: the counters go up by the difference
    /// (a slice made again starts from zero: counted from there).
    last_slice_cpu: Option<u64>,
    last_pressure: BTreeMap<(String, String), u64>,
}

fn add<C: Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique and valid");
    c
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

fn latency(name: &str, help: &str) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
        .expect("valid buckets")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new_custom(Some("hermes_mgr".into()), None).expect("valid prefix");
        let ivec = |n: &str, h: &str, l: &[&str]| IntCounterVec::new(opts(n, h), l).unwrap();
        let igauge = |n: &str, h: &str, l: &[&str]| IntGaugeVec::new(opts(n, h), l).unwrap();
        let gauge = |n: &str, h: &str, l: &[&str]| GaugeVec::new(opts(n, h), l).unwrap();
        Metrics {
            runs_ended: add(&r, ivec("runs_ended_total", "Runs booked by this dispatcher since it started, by how they ended (the worker's own verdict for completed and blocked).", &["board", "outcome"])),
            breaker_trips: add(&r, ivec("breaker_trips_total", "Tasks the failure breaker blocked (gave_up) since the dispatcher started.", &["board"])),
            oom_kills: add(&r, ivec("oom_kills_total", "Processes of ended runs the kernel's OOM killer killed (memory.events oom_kill of each run's scope).", &["board"])),
            spawn_failures: add(&r, ivec("spawn_failures_total", "Workers that could not be started, by whose fault: task (counted against it) or infrastructure (the dispatcher's side).", &["board", "fault"])),
            start_seconds: add(&r, latency("start_seconds", "From a task's claim to its worker running in its scope.")),
            booking_seconds: add(&r, latency("booking_seconds", "From a worker's end (its exit record written) to its run booked on the board.")),
            tasks: add(&r, igauge("tasks", "Tasks on the board by status (statuses Hermes does not use are 'other').", &["board", "status"])),
            oldest_ready: add(&r, gauge("oldest_ready_seconds", "Seconds since the oldest ready task's last event (mostly: since it became ready); absent with no ready task.", &["board"])),
            board_failing: add(&r, igauge("board_failing", "1 while the dispatcher fails to start workers on the board (its passes back off).", &["board"])),
            board_broken: add(&r, igauge("board_broken", "1 while the board cannot be opened or fails its checks: it is not served.", &["board"])),
            paused: add(&r, igauge("board_paused", "1 while an operator's hold (hermes-mgr pause --board or --all) keeps every task of the board.", &["board"])),
            paused_tasks: add(&r, igauge("paused_tasks", "Tasks held one by one (hermes-mgr pause ID).", &["board"])),
            estop: add(&r, IntGauge::with_opts(opts("estop", "1 while Hermes' emergency stop (ESTOP) holds every board.")).unwrap()),
            pressure_held: add(&r, IntGauge::with_opts(opts("admission_held", "1 while admission by pressure (admit_* thresholds) holds new workers.")).unwrap()),
            pool_workers: add(&r, igauge("pool_workers", "Worker scopes in a capacity pool's slice now, every board counted.", &["pool"])),
            pool_max_workers: add(&r, igauge("pool_max_workers", "A capacity pool's max_workers; absent when it has none.", &["pool"])),
            pool_memory: add(&r, igauge("pool_memory_bytes", "A capacity pool's slice's memory: in use now (current) and its limit (max; absent when unlimited).", &["pool", "kind"])),
            pool_waiting: add(&r, igauge("pool_waiting", "1 while tasks wait for a capacity pool (its cap, its memory, its pressure, or its limits not set).", &["pool"])),
            live_workers: add(&r, igauge("live_workers", "Workers running in their scopes, by board and profile.", &["board", "profile"])),
            live_cpu: add(&r, gauge("live_worker_cpu_seconds", "CPU seconds the live workers of a profile have used so far (their scopes' cpu.stat); falls when workers end.", &["profile"])),
            live_memory: add(&r, igauge("live_worker_memory_bytes", "Memory the live workers of a profile use now (their scopes' memory.current).", &["profile"])),
            live_io: add(&r, igauge("live_worker_io_bytes", "Bytes the live workers of a profile have read from and written to block devices so far (io.stat).", &["profile", "direction"])),
            slice_cpu: add(&r, Counter::with_opts(opts("slice_cpu_seconds_total", "CPU seconds used in the workers' slice (cpu.stat usage_usec).")).unwrap()),
            slice_pressure: add(&r, CounterVec::new(opts("slice_pressure_seconds_total", "Seconds some (or all) of the workers' slice's tasks stalled on a resource (PSI, cpu/memory/io.pressure total).") , &["resource", "kind"]).unwrap()),
            slice_memory: add(&r, igauge("slice_memory_bytes", "The workers' slice's memory: in use now (current) and its limit (max; absent when unlimited).", &["kind"])),
            slice_tasks: add(&r, igauge("slice_tasks", "The workers' slice's tasks (threads): now (current) and its limit (max; absent when unlimited).", &["kind"])),
            slice_cpu_max: add(&r, gauge("slice_cpu_limit_cores", "The workers' slice's CPU quota in cores (cpu.max); absent when unlimited.", &[])),
            build_info: add(&r, igauge("build_info", "1, labelled with hermes-mgr's version, and the Hermes version and contract its workers get.", &["version", "hermes_version", "hermes_contract"])),
            snapshot_at: add(&r, Gauge::with_opts(opts("snapshot_timestamp_seconds", "When the gauges were last gathered (Unix time): a stale textfile shows here.")).unwrap()),
            gather_seconds: add(&r, Gauge::with_opts(opts("gather_seconds", "How long the last gathering of the gauges took the dispatcher's loop (board queries, the live workers' cgroups, the slice).")).unwrap()),
            last_slice_cpu: None,
            last_pressure: BTreeMap::new(),
            registry: r,
        }
    }

    /// A run booked: how it ended, whether the breaker tripped, how many of its processes
    /// the OOM killer took.
    pub fn run_ended(&self, board: &str, outcome: &str, gave_up: bool, oom_kills: u64) {
        self.runs_ended
            .with_label_values(&[board, known_or_other(outcome, OUTCOMES)])
            .inc();
        if gave_up {
            self.breaker_trips.with_label_values(&[board]).inc();
        }
        self.oom_kills.with_label_values(&[board]).inc_by(oom_kills);
    }

    /// A worker that could not be started; `infrastructure`: the dispatcher's side.
    pub fn spawn_failed(&self, board: &str, infrastructure: bool) {
        let fault = if infrastructure {
            "infrastructure"
        } else {
            "task"
        };
        self.spawn_failures.with_label_values(&[board, fault]).inc();
    }

    pub fn started(&self, seconds: f64) {
        self.start_seconds.observe(seconds);
    }

    pub fn booked(&self, seconds: f64) {
        self.booking_seconds.observe(seconds.max(0.0));
    }

    /// Set every gauge from `s`; a board, profile or limit that is gone loses its series.
    pub fn set(&mut self, s: &Snapshot) {
        for g in [
            &self.tasks,
            &self.board_failing,
            &self.board_broken,
            &self.paused,
            &self.paused_tasks,
            &self.live_workers,
            &self.live_memory,
            &self.live_io,
            &self.slice_memory,
            &self.slice_tasks,
            &self.build_info,
            &self.pool_workers,
            &self.pool_max_workers,
            &self.pool_memory,
            &self.pool_waiting,
        ] {
            g.reset();
        }
        self.oldest_ready.reset();
        self.live_cpu.reset();
        self.slice_cpu_max.reset();
        for b in &s.boards {
            let l = [b.board.as_str()];
            // Counters a board has from the start, at zero: `increase()` then sees their
            // first step (a series born at 1 shows no increase).
            self.breaker_trips.with_label_values(&l);
            self.oom_kills.with_label_values(&l);
            for fault in ["task", "infrastructure"] {
                self.spawn_failures.with_label_values(&[&b.board, fault]);
            }
            for (status, n) in &b.tasks {
                self.tasks.with_label_values(&[&b.board, status]).set(*n);
            }
            if let Some(age) = b.oldest_ready_seconds {
                self.oldest_ready.with_label_values(&l).set(age.max(0.0));
            }
            self.board_failing
                .with_label_values(&l)
                .set(b.failing as i64);
            self.board_broken.with_label_values(&l).set(b.broken as i64);
            self.paused.with_label_values(&l).set(b.paused as i64);
            self.paused_tasks
                .with_label_values(&l)
                .set(b.paused_tasks as i64);
        }
        self.estop.set(s.estop as i64);
        self.pressure_held.set(s.pressure_held as i64);
        for p in &s.pools {
            let l = [p.pool.as_str()];
            self.pool_workers.with_label_values(&l).set(p.workers);
            self.pool_waiting
                .with_label_values(&l)
                .set(p.waiting as i64);
            if let Some(m) = p.max_workers {
                self.pool_max_workers.with_label_values(&l).set(m);
            }
            for (kind, v) in [("current", p.memory_current), ("max", p.memory_max)] {
                if let Some(v) = v {
                    self.pool_memory
                        .with_label_values(&[&p.pool, kind])
                        .set(v as i64);
                }
            }
        }
        let sums = sum_by_profile(&s.live);
        for ((board, profile), n) in &sums.workers {
            self.live_workers
                .with_label_values(&[board, profile])
                .set(*n);
        }
        for (p, v) in &sums.cpu_seconds {
            self.live_cpu.with_label_values(&[p]).set(*v);
        }
        for (p, v) in &sums.memory_bytes {
            self.live_memory.with_label_values(&[p]).set(*v as i64);
        }
        for (dir, m) in [
            ("read", &sums.io_read_bytes),
            ("write", &sums.io_write_bytes),
        ] {
            for (p, v) in m {
                self.live_io.with_label_values(&[p, dir]).set(*v as i64);
            }
        }
        if let Some(sl) = &s.slice {
            self.set_slice(sl);
        }
        self.build_info
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                &s.hermes_version,
                &s.hermes_contract,
            ])
            .set(1);
        self.snapshot_at.set(s.at);
    }

    fn set_slice(&mut self, sl: &SliceFacts) {
        fn grow(c: &GenericCounter<prometheus::core::AtomicF64>, last: Option<u64>, now: u64) {
            let delta = match last {
                Some(l) if now >= l => now - l,
                // First read, or a slice made again: its count starts from zero.
                _ => now,
            };
            c.inc_by(delta as f64 / 1e6);
        }
        if let Some(now) = sl.cpu_usec {
            grow(&self.slice_cpu, self.last_slice_cpu, now);
            self.last_slice_cpu = Some(now);
        }
        for (resource, kind, total) in &sl.pressure {
            let key = (resource.to_string(), kind.to_string());
            let c = self.slice_pressure.with_label_values(&[resource, kind]);
            grow(&c, self.last_pressure.get(&key).copied(), *total);
            self.last_pressure.insert(key, *total);
        }
        let pairs = [
            (&self.slice_memory, "current", sl.memory_bytes),
            (&self.slice_memory, "max", sl.memory_max),
            (&self.slice_tasks, "current", sl.tasks),
            (&self.slice_tasks, "max", sl.tasks_max),
        ];
        for (g, kind, v) in pairs {
            if let Some(v) = v {
                g.with_label_values(&[kind]).set(v as i64);
            }
        }
        if let Some(cores) = sl.cpu_max_cores {
            self.slice_cpu_max.with_label_values::<&str>(&[]).set(cores);
        }
    }

    /// How long gathering the snapshot took.
    pub fn gathered_in(&self, seconds: f64) {
        self.gather_seconds.set(seconds);
    }

    /// Every metric, in the text format (`CONTENT_TYPE`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut out)
            .expect("encoding to a String cannot fail");
        out
    }
}

/// Replace `dir/name` with `text` at once (a temporary file beside it, renamed over it): a
/// reader — node_exporter's textfile collector, `hermes-mgr metrics` — never sees half of it.
/// The temporary has a new, unguessable name, made with `O_EXCL|O_NOFOLLOW`, and does not end
/// in `.prom` (the collector skips it); the rename replaces whatever `name` was without
/// following it. Nothing else in `dir` is touched.
pub fn write_atomically(dir: &std::path::Path, name: &str, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", crate::host::random_u64()?));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        std::fs::rename(&tmp, dir.join(name))
    })();
    if let Err(e) = &result {
        // Ours to remove only if we made it.
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(board: &str, profile: &str, cpu: u64, mem: u64) -> LiveWorker {
        LiveWorker {
            board: board.into(),
            profile: profile.into(),
            usage: Some(CgroupUse {
                cpu_usec: Some(cpu),
                memory_bytes: Some(mem),
                io_read_bytes: Some(1),
                io_write_bytes: None,
            }),
        }
    }

    #[test]
    fn a_write_replaces_the_file_whole_and_leaves_nothing_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        // A link where the file goes is replaced, not followed.
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, "keep").unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join("m.prom")).unwrap();
        write_atomically(dir.path(), "m.prom", "a 1\n").unwrap();
        write_atomically(dir.path(), "m.prom", "a 2\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("m.prom")).unwrap(),
            "a 2\n"
        );
        assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "keep");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(write_atomically(&dir.path().join("none"), "m.prom", "x").is_err());
    }

    #[test]
    fn names_outside_the_known_ones_are_other() {
        for (name, want) in [
            ("completed", "completed"),
            ("gave_up", "gave_up"),
            ("", "other"),
            ("Completed", "other"),
            ("x\ny", "other"),
        ] {
            assert_eq!(known_or_other(name, OUTCOMES), want, "{name:?}");
        }
    }

    #[test]
    fn live_workers_are_summed_by_profile_and_board() {
        let live = vec![
            worker("a", "coder", 2_000_000, 10),
            worker("b", "coder", 1_000_000, 5),
            worker("a", "default", 500_000, 1),
            LiveWorker {
                usage: None,
                ..worker("a", "coder", 0, 0)
            },
        ];
        let s = sum_by_profile(&live);
        assert_eq!(s.workers[&("a".into(), "coder".into())], 2);
        assert_eq!(s.workers[&("b".into(), "coder".into())], 1);
        assert_eq!(s.workers[&("a".into(), "default".into())], 1);
        assert_eq!(s.cpu_seconds["coder"], 3.0);
        assert_eq!(s.memory_bytes["coder"], 15);
        assert_eq!(s.io_read_bytes["default"], 1);
        assert!(s.io_write_bytes.is_empty());
    }

    #[test]
    fn profiles_beyond_the_cap_are_other_and_the_busiest_keep_their_names() {
        let mut live: Vec<LiveWorker> = (0..MAX_PROFILES + 5)
            .map(|i| worker("a", &format!("p{i:03}"), 1, 1))
            .collect();
        // A busy profile whose name sorts last still keeps its series.
        live.push(worker("a", "zz-busy", 1, 1));
        live.push(worker("a", "zz-busy", 1, 1));
        let s = sum_by_profile(&live);
        assert_eq!(s.memory_bytes.len(), MAX_PROFILES + 1);
        assert_eq!(s.memory_bytes["zz-busy"], 2);
        assert_eq!(s.memory_bytes["other"], 6);
    }

    #[test]
    fn a_snapshot_replaces_the_gauges_and_the_counters_add_up() {
        let mut m = Metrics::new();
        let board = |name: &str| BoardFacts {
            board: name.into(),
            tasks: [("ready".to_string(), 3)].into(),
            oldest_ready_seconds: Some(12.5),
            ..BoardFacts::default()
        };
        m.set(&Snapshot {
            at: 1.0,
            boards: vec![board("gone"), board("kept")],
            hermes_version: "0.19.0".into(),
            hermes_contract: "0.19".into(),
            ..Snapshot::default()
        });
        m.run_ended("kept", "crashed", true, 2);
        m.run_ended("kept", "made-up", false, 0);
        m.spawn_failed("kept", true);
        m.set(&Snapshot {
            at: 2.0,
            boards: vec![board("kept")],
            hermes_version: "0.19.0".into(),
            hermes_contract: "0.19".into(),
            slice: Some(SliceFacts {
                cpu_usec: Some(3_000_000),
                pressure: vec![("memory", "full", 1_500_000)],
                memory_max: None,
                ..SliceFacts::default()
            }),
            ..Snapshot::default()
        });
        let text = m.render();
        for want in [
            "hermes_mgr_tasks{board=\"kept\",status=\"ready\"} 3",
            "hermes_mgr_oldest_ready_seconds{board=\"kept\"} 12.5",
            "hermes_mgr_runs_ended_total{board=\"kept\",outcome=\"crashed\"} 1",
            "hermes_mgr_runs_ended_total{board=\"kept\",outcome=\"other\"} 1",
            "hermes_mgr_breaker_trips_total{board=\"kept\"} 1",
            "hermes_mgr_oom_kills_total{board=\"kept\"} 2",
            "hermes_mgr_spawn_failures_total{board=\"kept\",fault=\"infrastructure\"} 1",
            "hermes_mgr_slice_cpu_seconds_total 3",
            "hermes_mgr_slice_pressure_seconds_total{kind=\"full\",resource=\"memory\"} 1.5",
            "hermes_mgr_snapshot_timestamp_seconds 2",
            "# TYPE hermes_mgr_start_seconds histogram",
        ] {
            assert!(text.contains(want), "{want} not in:\n{text}");
        }
        // A board gone loses its gauges; its counters stay (a counter never goes back), and
        // were there from its first snapshot, at zero.
        assert!(!text.contains("hermes_mgr_tasks{board=\"gone\""), "{text}");
        assert!(
            !text.contains("hermes_mgr_board_paused{board=\"gone\""),
            "{text}"
        );
        assert!(
            text.contains("hermes_mgr_breaker_trips_total{board=\"gone\"} 0"),
            "{text}"
        );
        assert!(!text.contains("kind=\"max\""), "{text}");
        // The next read adds only what grew.
        m.set(&Snapshot {
            slice: Some(SliceFacts {
                cpu_usec: Some(4_000_000),
                ..SliceFacts::default()
            }),
            ..Snapshot::default()
        });
        assert!(m
            .render()
            .contains("hermes_mgr_slice_cpu_seconds_total 4\n"));
    }
}
