//! The daemon's metrics (`crate::metrics`): counted where things happen (a booking, a
//! pass), gathered every `metrics_interval_seconds` — the boards' queues, the live workers'
//! cgroups, the workers' slice, the holds — and written out: to the state directory
//! (`hermes-mgr metrics` prints it), to node_exporter's textfile directory when it exists,
//! and to the HTTP endpoint when `metrics_listen` is set.

use std::sync::Arc;

use super::*;
use crate::liveness::CgroupUse;
use crate::metrics::{known_or_other, BoardFacts, LiveWorker, Metrics, Snapshot};

/// At most this long of each gathering goes to reading the live workers' cgroups (three small
/// files each): past it, the others show what they showed last time, and the next gathering
/// goes on from where this one stopped. Read whole, 10,000 live workers took the loop 135 ms
/// (p50; BENCHMARKS.md, 10); a few thousand fit.
const USAGE_BUDGET: Duration = Duration::from_millis(20);

/// What the daemon keeps for its metrics.
pub(super) struct Exposition {
    pub(super) metrics: Metrics,
    /// The latest text, for the HTTP endpoint's clients.
    latest: tokio::sync::watch::Sender<Arc<String>>,
    /// What the endpoint was started with: a change takes a restart.
    listening: Option<String>,
    /// The textfile directory was written last time: its loss (or a failed write) is said
    /// once, not every interval.
    textfile_ok: Option<bool>,
    /// Each live run's cgroup as last read, and the run the next reading starts at.
    usage: HashMap<RunKey, CgroupUse>,
    cursor: Option<RunKey>,
}

impl Exposition {
    /// The metrics, and the HTTP endpoint when `cfg` asks for one. An endpoint that cannot
    /// listen is said and left: the metrics are a view, not a reason to stop dispatching.
    pub(super) async fn start(cfg: &Config) -> Exposition {
        let (latest, rx) = tokio::sync::watch::channel(Arc::new(String::new()));
        if let Some(listen) = &cfg.metrics_listen {
            match listen.parse::<crate::metrics::serve::Listen>() {
                Ok(l) => match crate::metrics::serve::bind(&l).await {
                    Ok(listener) => {
                        info!(metrics_listen = %l, "serving metrics at {l}/metrics");
                        tokio::spawn(crate::metrics::serve::serve(listener, rx));
                    }
                    Err(e) => error!(metrics_listen = %l, "cannot serve metrics at {l}: {e}"),
                },
                Err(e) => error!("metrics_listen: {e}"),
            }
        }
        Exposition {
            metrics: Metrics::new(),
            latest,
            listening: cfg.metrics_listen.clone(),
            textfile_ok: None,
            usage: HashMap::new(),
            cursor: None,
        }
    }
}

/// Seconds from `then` to now; 0 for a time in the future (a clock stepped back).
fn seconds_since(then: std::time::SystemTime) -> f64 {
    std::time::SystemTime::now()
        .duration_since(then)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Daemon {
    /// Read the live workers' cgroups, for at most `USAGE_BUDGET`, going round the runs.
    fn refresh_usage(&mut self) {
        let t0 = Instant::now();
        let (live, x) = (&self.live, &mut self.exposition);
        x.usage.retain(|k, _| live.contains_key(k));
        let runs: Box<dyn Iterator<Item = (&RunKey, &Live)>> = match x.cursor.take() {
            Some(c) => Box::new(live.range(c.clone()..).chain(live.range(..c))),
            None => Box::new(live.iter()),
        };
        let cgroups = std::path::Path::new("/sys/fs/cgroup");
        for (k, l) in runs {
            if t0.elapsed() >= USAGE_BUDGET {
                x.cursor = Some(k.clone());
                break;
            }
            let dir = l.cgroup(&self.cfg);
            match crate::liveness::cgroup_use(&cgroups.join(&dir[1..])) {
                Some(u) => x.usage.insert(k.clone(), u),
                None => x.usage.remove(k),
            };
        }
    }

    /// What the gauges show now.
    fn snapshot(&self) -> Snapshot {
        let now = crate::host::now();
        let holds = self.holds.current();
        let all_held = holds.all.is_some() || self.holds.broken.is_some();
        let boards = self
            .slots
            .iter()
            .filter(|(_, s)| s.listed)
            .map(|(slug, s)| {
                let key = s.db_key();
                let mut tasks = std::collections::BTreeMap::new();
                let mut oldest_ready_seconds = None;
                if let Some(b) = &s.board {
                    for (status, n) in b.counts().unwrap_or_default() {
                        let status = known_or_other(&status, crate::board::Status::KNOWN);
                        *tasks.entry(status.to_string()).or_insert(0) += n;
                    }
                    oldest_ready_seconds = b
                        .oldest_ready_since()
                        .ok()
                        .flatten()
                        .map(|t| now.saturating_sub(t).max(0) as f64);
                }
                BoardFacts {
                    board: slug.clone(),
                    tasks,
                    oldest_ready_seconds,
                    failing: s.failing.is_some(),
                    broken: s.broken.is_some(),
                    paused: all_held || holds.board(&key).is_some(),
                    paused_tasks: holds.tasks.get(&key).map_or(0, |t| t.len()),
                }
            })
            .collect();
        let cgroups = std::path::Path::new("/sys/fs/cgroup");
        let live = self
            .live
            .iter()
            .map(|(k, l)| LiveWorker {
                board: k.board.clone(),
                profile: l.profile.clone(),
                usage: self.exposition.usage.get(k).copied(),
            })
            .collect();
        let slice_dir = crate::liveness::unit_cgroup(&self.cfg.slice, "");
        let slice = crate::liveness::slice_facts(&cgroups.join(slice_dir.trim_matches('/')));
        // As `spawn::hermes_generation` finds it, from the same minute-long cache.
        let bin = crate::spawn::resolve_binary(&self.cfg.hermes_bin)
            .unwrap_or_else(|_| std::path::PathBuf::from(&self.cfg.hermes_bin));
        let hermes = crate::spawn::installed::of_binary_kept(&bin);
        Snapshot {
            at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            boards,
            live,
            slice,
            estop: self.estop.is_some(),
            pressure_held: self.pressure.is_some(),
            pools: {
                let waits = self.pool_waits();
                crate::dispatch::pools::look(&self.cfg, &self.pools.faults)
                    .into_iter()
                    .map(|v| crate::metrics::PoolGauges {
                        waiting: waits.contains_key(&v.name),
                        workers: v.workers as i64,
                        max_workers: v.max_workers.map(|m| m as i64),
                        memory_current: v.memory_current,
                        memory_max: v.memory_max,
                        pool: v.name,
                    })
                    .collect()
            },
            hermes_version: hermes
                .as_ref()
                .map_or_else(|| "unknown".into(), |h| h.version.clone()),
            hermes_contract: hermes
                .as_ref()
                .map_or(crate::contract::Generation::V019, |h| h.generation())
                .version()
                .to_string(),
        }
    }

    /// Gather, render and write out the metrics.
    pub(super) fn publish_metrics(&mut self) {
        let t0 = Instant::now();
        self.refresh_usage();
        let snapshot = self.snapshot();
        let x = &mut self.exposition;
        x.metrics.set(&snapshot);
        x.metrics.gathered_in(t0.elapsed().as_secs_f64());
        let text = x.metrics.render();
        if let Err(e) = crate::metrics::write_atomically(
            &self.cfg.state_dir,
            crate::state_dir::METRICS_FILE,
            &text,
        ) {
            warn!(state_dir = %self.cfg.state_dir.display(), "cannot write the metrics: {e}");
        }
        let dir = &self.cfg.metrics_textfile_dir;
        if dir.is_dir() {
            let result = crate::metrics::write_atomically(dir, "hermes-mgr.prom", &text);
            match (&result, x.textfile_ok) {
                (Err(e), Some(true) | None) => {
                    warn!(dir = %dir.display(), "cannot write the metrics for node_exporter: {e}")
                }
                (Ok(()), Some(false) | None) => {
                    info!(dir = %dir.display(), "metrics written for node_exporter's textfile collector")
                }
                _ => {}
            }
            x.textfile_ok = Some(result.is_ok());
        }
        x.latest.send_replace(Arc::new(text));
    }

    /// After a reload: a new endpoint takes a restart, which is said.
    pub(super) fn metrics_reloaded(&self) {
        if self.cfg.metrics_listen != self.exposition.listening {
            warn!(
                metrics_listen = ?self.cfg.metrics_listen,
                "metrics_listen changed: it takes effect when the dispatcher restarts"
            );
        }
    }

    /// A run booked: count how it ended (and a start that failed inside its scope), and how
    /// long its booking took after its end.
    pub(super) fn count_booking(
        &self,
        key: &RunKey,
        outcome: &str,
        gave_up: bool,
        record: Option<&crate::record::ExitRecord>,
        written: Option<std::time::SystemTime>,
    ) {
        let oom = record
            .and_then(|r| r.memory.as_ref())
            .map_or(0, |m| m.oom_kills);
        let m = &self.exposition.metrics;
        m.run_ended(&key.board, outcome, gave_up, oom);
        // A start that failed in the scope (upstream's code, asked first, refused).
        if let Some(n) = record.and_then(|r| r.not_started.as_ref()) {
            m.spawn_failed(&key.board, n.fault == crate::record::Fault::Infrastructure);
        }
        if let Some(w) = written {
            m.booked(seconds_since(w));
        }
    }

    /// A pass's starts and spawn failures.
    pub(super) fn count_pass(&self, slug: &str, report: &dispatch::PassReport) {
        let m = &self.exposition.metrics;
        for s in &report.spawned {
            m.started(s.start_seconds);
        }
        for f in &report.spawn_failed {
            m.spawn_failed(slug, f.infrastructure);
            let outcome = if f.gave_up { "gave_up" } else { "spawn_failed" };
            m.run_ended(slug, outcome, f.gave_up, 0);
        }
        for u in &report.unbooked {
            // Booked later (`retry_pending`), counted there as a run that ended.
            m.spawn_failed(slug, u.fault == crate::record::Fault::Infrastructure);
        }
    }
}
