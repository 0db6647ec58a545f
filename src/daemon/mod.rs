//! `hermes-mgr dispatcher`: the event-driven daemon behind `hermes-dispatcher.service`.
//!
//! One thread, one `select!` over a closed set of events (`Event`): a supervisor recorded
//! an exit (inotify), a scope went away (`UnitRemoved`), a supervisor child exited, someone
//! else wrote the board (inotify + `PRAGMA data_version`), timers (claim extension, the
//! safety-net pass, retries), and signals. Nothing is polled for liveness; the periodic
//! pass only catches what no event reported.
//!
//! **Invariant:** never two workers for one task: a run's scope name is derived from
//! (task, run) and created with mode `fail`; a run closed by someone else has its scope
//! stopped; a task running on a newer run has the older run's scope stopped at once.

mod notify;
mod reconcile;
mod watch;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::board::lock::FileLock;
use crate::board::{Board, BoardError, OpenMode, Resolver, RunEnd};
use crate::config::Config;
use crate::dispatch;
use crate::spawn::spec::{status_path, RunStatus};
use crate::spawn::Started;
use crate::systemd::{unit_name, Systemd};

/// Options of `hermes-mgr dispatcher`.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub config: Option<PathBuf>,
    pub db: Option<PathBuf>,
    pub board: Option<String>,
}

/// Everything that can wake the daemon.
#[derive(Debug)]
enum Event {
    /// A supervisor that is our child process exited.
    SupervisorExited(String, i64),
}

/// A run whose scope we watch.
#[derive(Debug, Clone)]
struct Live {
    unit: String,
    lock: String,
    max_runtime: Option<i64>,
    /// Since when the board says this run is over while its scope still lives.
    closed_since: Option<Instant>,
}

type Key = (String, i64);

struct Daemon {
    cfg: Config,
    opts: Options,
    board: Board,
    sd: Systemd,
    live: HashMap<Key, Live>,
    /// Runs whose booking failed (board locked): retried on the next timer. `Some` carries
    /// an outcome already decided (a spawn failure), `None` means "decide from the facts".
    pending: BTreeMap<Key, Option<RunEnd>>,
    notifier: notify::Notifier,
    data_version: i64,
    tx: mpsc::UnboundedSender<Event>,
    last_pass: Option<Instant>,
    /// The first reconcile (start-up, the one `READY=1` waits for) is always logged.
    reconciled_once: bool,
    /// Half of `WatchdogSec`, and when we last said `WATCHDOG=1`.
    watchdog: Option<(Duration, Instant)>,
}

/// Exit with a clear message: the daemon cannot work on this board at all.
fn fatal(e: anyhow::Error) -> anyhow::Error {
    error!("{e:#}");
    e
}

pub fn main(opts: Options) -> anyhow::Result<()> {
    crate::logging::init("hermes-dispatcher");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    rt.block_on(run(opts)).map_err(fatal)
}

type Removals = std::pin::Pin<Box<dyn futures_util::Stream<Item = String> + Send>>;

/// Connect, subscribe and watch `UnitRemoved`, retrying (and feeding the watchdog) until
/// systemd answers: a restarted dbus-daemon or systemd must not end the daemon.
async fn connect_systemd(notifier: &notify::Notifier) -> (Systemd, Removals) {
    let mut delay = Duration::from_millis(200);
    loop {
        let attempt = async {
            let sd = Systemd::connect().await?;
            let removed = sd.unit_removed_stream();
            Ok::<_, crate::systemd::SystemdError>((sd, removed))
        };
        match attempt.await {
            Ok(ok) => return ok,
            Err(e) => {
                warn!("cannot reach systemd ({e}), retrying in {delay:?}");
                notifier.send("WATCHDOG=1");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn run(opts: Options) -> anyhow::Result<()> {
    let cfg = Config::load(opts.config.as_deref())?;
    let paths = Resolver::from_env(opts.db.clone(), opts.board.clone()).resolve()?;
    let board = Board::open(&paths, OpenMode::CreateIfMissing)
        .with_context(|| format!("cannot open board {}", paths.db.display()))?;
    board.set_busy_timeout(Duration::from_millis(cfg.busy_timeout_ms))?;
    // One dispatcher per Hermes root, for life: the same lock Hermes' gateway takes.
    let life_path = paths.dispatcher_lock();
    board.make_dir(life_path.parent().unwrap_or(&paths.root))?;
    let Some(_life) = FileLock::acquire_or_held(&life_path, board.owner())
        .with_context(|| format!("open {}", life_path.display()))?
    else {
        bail!(
            "another dispatcher holds {} — a Hermes gateway dispatching kanban (set kanban.dispatch_in_gateway: false) \
             or another hermes-mgr dispatcher; stop it first",
            life_path.display()
        );
    };
    let notifier = notify::Notifier::from_env();
    let (sd, mut removed) = connect_systemd(&notifier).await;
    let runs_dir = cfg.state_dir.join("runs");
    let watcher = watch::Watcher::new(&runs_dir, &paths.db)
        .with_context(|| format!("watch {} and {}", runs_dir.display(), paths.db.display()))?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let data_version = board.data_version()?;
    let mut d = Daemon {
        cfg,
        opts,
        board,
        sd,
        live: HashMap::new(),
        pending: BTreeMap::new(),
        notifier,
        data_version,
        tx,
        last_pass: None,
        reconciled_once: false,
        watchdog: notify::watchdog_interval().map(|i| (i, Instant::now())),
    };
    info!(db = %paths.db.display(), "hermes-dispatcher starting");
    d.reconcile().await?;
    d.notifier.send("READY=1");
    d.pass().await;

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let wd = notify::watchdog_interval();
    let mut watchdog = tokio::time::interval(wd.unwrap_or(Duration::from_secs(3600)));
    let mut tick = tokio::time::interval(Duration::from_secs(d.cfg.tick_seconds));
    let extend_every = Duration::from_secs((d.cfg.claim_ttl_seconds as u64 / 3).clamp(1, 300));
    let mut extend = tokio::time::interval(extend_every);
    let mut retry = tokio::time::interval(Duration::from_secs(1));
    for t in [&mut watchdog, &mut tick, &mut extend, &mut retry] {
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }

    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => d.reload(),
            _ = watchdog.tick(), if wd.is_some() => d.keepalive(),
            changes = watcher.next() => match changes {
                Ok(changes) => d.on_changes(changes).await,
                Err(e) => warn!("inotify: {e}, ignoring"),
            },
            sig = removed.next() => match sig {
                Some(unit) => d.on_unit_removed(&unit).await,
                None => {
                    warn!("lost the system bus; reconnecting");
                    (d.sd, removed) = connect_systemd(&d.notifier).await;
                    d.reconciled_once = false;
                    if let Err(e) = d.reconcile().await {
                        warn!("reconcile after reconnect: {e:#}");
                    }
                    d.pass().await;
                }
            },
            Some(ev) = rx.recv() => match ev {
                Event::SupervisorExited(task, run) => d.book(&task, run).await,
            },
            _ = extend.tick() => d.extend_claims(),
            _ = retry.tick(), if !d.pending.is_empty() => d.retry_pending().await,
            _ = tick.tick() => {
                // The safety net: whatever no event reported (e.g. a claim left behind).
                if let Err(e) = d.reconcile().await {
                    warn!("periodic reconcile: {e:#}");
                }
                d.check_closed_runs().await;
                d.pass().await;
            }
        }
    }
    d.notifier.send("STOPPING=1");
    if d.cfg.stop_workers_on_exit {
        for (key, live) in d.live.clone() {
            info!(hermes_kanban_task = %key.0, hermes_kanban_run_id = key.1, unit = %live.unit, "stopping worker on exit");
            let _ = d.sd.stop(&live.unit).await;
        }
    }
    info!(
        workers = d.live.len(),
        "hermes-dispatcher exiting; workers keep running in their scopes"
    );
    Ok(())
}

impl Daemon {
    /// `WATCHDOG=1` when half the interval has passed. Called by the loop's timer and from
    /// inside long batches (many runs booked at once, a pass starting many workers, each
    /// write possibly waiting on a busy board): the loop is making progress, and a batch
    /// must not outlast `WatchdogSec` and get the daemon killed.
    fn keepalive(&mut self) {
        feed(&mut self.watchdog, &self.notifier);
    }

    fn reload(&mut self) {
        match Config::load(self.opts.config.as_deref()) {
            Ok(cfg) => {
                if let Err(e) = self
                    .board
                    .set_busy_timeout(Duration::from_millis(cfg.busy_timeout_ms))
                {
                    warn!("{e}");
                }
                self.cfg = cfg;
                info!("configuration reloaded");
            }
            Err(e) => warn!("configuration not reloaded, keeping the old one: {e:#}"),
        }
    }

    fn status_text(&self) -> String {
        let count = |s: &str| self.board.count(s).unwrap_or(0);
        format!(
            "{} running ({} in scopes), {} ready, {} blocked, {} todo",
            count("running"),
            self.live.len(),
            count("ready"),
            count("blocked"),
            count("todo")
        )
    }

    fn update_status(&self) {
        self.notifier.status(&self.status_text());
    }

    /// Track a worker that we started: its supervisor is our child, reap it and say so.
    fn track_started(&mut self, s: Started) {
        let key = (s.task.clone(), s.run_id);
        let max_runtime = self
            .board
            .task(&s.task)
            .ok()
            .flatten()
            .and_then(|t| t.max_runtime_seconds);
        let lock = self
            .board
            .task(&s.task)
            .ok()
            .flatten()
            .and_then(|t| t.claim_lock)
            .unwrap_or_default();
        info!(hermes_kanban_task = %s.task, hermes_kanban_run_id = s.run_id, unit = %s.unit, object_systemd_unit = %s.unit,
              pid = s.worker_pid, "worker started");
        self.live.insert(
            key.clone(),
            Live {
                unit: s.unit,
                lock,
                max_runtime,
                closed_since: None,
            },
        );
        let tx = self.tx.clone();
        let mut child = s.supervisor;
        tokio::spawn(async move {
            let _ = child.wait().await;
            let _ = tx.send(Event::SupervisorExited(key.0, key.1));
        });
    }

    /// One dispatch pass (claims and starts), then the status line.
    async fn pass(&mut self) {
        self.keepalive();
        self.last_pass = Some(Instant::now());
        // Read before the pass reads the board: a commit by someone else after this point
        // changes data_version again, and its inotify event triggers the next pass. (Read
        // after, it would swallow a task created while this pass ran.)
        self.data_version = self.board.data_version().unwrap_or(self.data_version);
        let (wd, notifier) = (&mut self.watchdog, &self.notifier);
        let mut progress = || feed(wd, notifier);
        match dispatch::once(&self.board, &self.sd, &self.cfg, None, &mut progress).await {
            Ok((report, started)) => {
                for f in &report.spawn_failed {
                    warn!(hermes_kanban_task = %f.task_id, hermes_kanban_run_id = f.run_id, gave_up = f.gave_up, "spawn failed: {}", crate::text::clean(&f.error));
                }
                for s in started {
                    self.track_started(s);
                }
                for u in report.unbooked {
                    warn!(hermes_kanban_task = %u.task_id, hermes_kanban_run_id = u.run_id,
                          "spawn failed ({}) and the board would not take the record ({}); retrying", u.error, u.why);
                    self.pending.insert(
                        (u.task_id, u.run_id),
                        Some(dispatch::spawn_end(&u.error, u.infrastructure)),
                    );
                }
            }
            Err(e) => warn!("dispatch pass failed, retrying on the next event: {e:#}"),
        }
        self.update_status();
        self.keepalive();
    }

    async fn on_changes(&mut self, changes: Vec<watch::Change>) {
        let mut board_changed = false;
        for c in changes {
            match c {
                watch::Change::RunRecord(path) => {
                    let key = self
                        .live
                        .iter()
                        .find(|(k, _)| status_path(&self.cfg.state_dir, &k.0, k.1) == path)
                        .map(|(k, _)| k.clone());
                    if let Some((task, run)) = key {
                        self.book(&task, run).await;
                    }
                }
                watch::Change::Board => board_changed = true,
            }
        }
        if board_changed {
            // Only another writer's commit changes data_version; our own writes do not.
            match self.board.data_version() {
                Ok(v) if v != self.data_version => {
                    self.data_version = v;
                    self.check_closed_runs().await;
                    self.pass().await;
                }
                Ok(_) => {}
                Err(e) => warn!("read the board's data_version: {e}"),
            }
        }
    }

    async fn on_unit_removed(&mut self, unit: &str) {
        let key = self
            .live
            .iter()
            .find(|(_, l)| l.unit == unit)
            .map(|(k, _)| k.clone());
        if let Some((task, run)) = key {
            self.book(&task, run).await;
        }
    }

    /// A run's worker may have ended: decide its outcome from facts and record it.
    /// Facts: the board (a verdict the worker wrote itself wins), the supervisor's exit
    /// record, whether the scope still exists.
    async fn book(&mut self, task: &str, run: i64) {
        self.keepalive();
        let Some(live) = self.live.get(&(task.to_string(), run)).cloned() else {
            return;
        };
        let status = match RunStatus::read(&self.cfg.state_dir, task, run) {
            Ok(s) => s,
            Err(e) => {
                warn!(hermes_kanban_task = %task, hermes_kanban_run_id = run, "cannot read the exit record: {e}");
                None
            }
        };
        let scope = match self.sd.active_state(&live.unit).await {
            Ok(Some(_)) if self.husk(&live.unit).await => None,
            Ok(s) => s,
            Err(e) => {
                warn!(unit = %live.unit, "unit state unknown ({e}); retrying");
                self.pending.insert((task.to_string(), run), None);
                return;
            }
        };
        let end = match &status {
            Some(st) => outcome(st, live.max_runtime),
            None if scope.is_none() => RunEnd::Crashed {
                error: format!(
                    "{} ended without an exit status (worker and supervisor were killed)",
                    live.unit
                ),
                details: serde_json::json!({"unit": live.unit, "signal": 9}),
            },
            // Still running (a UnitRemoved for a name we reuse, a stray event): nothing to do.
            None => return,
        };
        match self.board.end_run(task, run, &end, self.cfg.failure_limit) {
            Ok(result) => {
                match &result {
                    Some(r) => {
                        info!(hermes_kanban_task = %task, hermes_kanban_run_id = run, unit = %live.unit,
                                     object_systemd_unit = %live.unit, status = %r.status, failures = r.failures,
                                     gave_up = r.gave_up, "run ended: {}", end_text(&end))
                    }
                    None => {
                        info!(hermes_kanban_task = %task, hermes_kanban_run_id = run, unit = %live.unit,
                                  object_systemd_unit = %live.unit, "run ended; the worker had recorded its own verdict")
                    }
                }
                self.pending.remove(&(task.to_string(), run));
                self.live.remove(&(task.to_string(), run));
                let _ = std::fs::remove_file(status_path(&self.cfg.state_dir, task, run));
                // Leftovers of the worker (daemonized grandchildren) go with the run.
                if scope.is_some() {
                    if let Err(e) = self.sd.stop(&live.unit).await {
                        warn!(unit = %live.unit, "stop leftovers: {e}");
                    }
                }
                self.pass().await;
            }
            Err(BoardError::Locked { .. }) => {
                warn!(hermes_kanban_task = %task, hermes_kanban_run_id = run, "board locked; will retry booking the run");
                self.pending.insert((task.to_string(), run), None);
            }
            Err(e) => {
                warn!(hermes_kanban_task = %task, hermes_kanban_run_id = run, "cannot book the run: {e}; will retry");
                self.pending.insert((task.to_string(), run), None);
            }
        }
    }

    async fn retry_pending(&mut self) {
        for ((task, run), decided) in std::mem::take(&mut self.pending) {
            match decided {
                None => self.book(&task, run).await,
                Some(end) => match self.board.end_run(&task, run, &end, self.cfg.failure_limit) {
                    Ok(_) => {
                        info!(hermes_kanban_task = %task, hermes_kanban_run_id = run, "recorded: {}", crate::text::clean(&end_text(&end)));
                        self.pass().await;
                    }
                    Err(_) => {
                        self.pending.insert((task, run), Some(end));
                    }
                },
            }
        }
    }

    /// Keep our workers' claims alive so upstream's stale-claim sweep never reclaims a
    /// live worker. The lock stays the one the worker was given.
    fn extend_claims(&mut self) {
        for ((task, run), live) in &self.live {
            match self
                .board
                .extend_claim(task, &live.lock, self.cfg.claim_ttl_seconds)
            {
                Ok(true) => {}
                Ok(false) => {} // closed by someone else: check_closed_runs deals with it
                Err(e) => {
                    warn!(hermes_kanban_task = %task, hermes_kanban_run_id = run, "extend claim: {e}; retrying later")
                }
            }
        }
    }

    /// Runs the board says are over while their scope lives: the worker's own verdict
    /// (it exits by itself soon), or an operator's reclaim. A task already running on a
    /// newer run must not have two workers: the old scope is stopped at once; otherwise
    /// after `verdict_grace_seconds`.
    async fn check_closed_runs(&mut self) {
        let grace = Duration::from_secs(self.cfg.verdict_grace_seconds);
        let keys: Vec<Key> = self.live.keys().cloned().collect();
        for key in keys {
            let Ok(Some(t)) = self.board.task(&key.0) else {
                continue;
            };
            let current = t.status.as_str() == "running" && t.current_run_id == Some(key.1);
            let Some(live) = self.live.get_mut(&key) else {
                continue;
            };
            if current {
                live.closed_since = None;
                continue;
            }
            let superseded = t.status.as_str() == "running";
            let since = *live.closed_since.get_or_insert_with(Instant::now);
            if superseded || since.elapsed() >= grace {
                let unit = live.unit.clone();
                warn!(hermes_kanban_task = %key.0, hermes_kanban_run_id = key.1, unit = %unit, superseded,
                      "the run was closed on the board but its worker still runs; stopping it");
                if let Err(e) = self.sd.stop(&unit).await {
                    warn!(unit = %unit, "stop: {e}");
                }
            }
        }
    }
}

/// `WATCHDOG=1` when half the ping interval has passed since the last one.
fn feed(watchdog: &mut Option<(Duration, Instant)>, notifier: &notify::Notifier) {
    if let Some((every, last)) = watchdog {
        if last.elapsed() >= *every / 2 {
            notifier.send("WATCHDOG=1");
            *last = Instant::now();
        }
    }
}

/// The outcome of a run whose worker ended without recording a verdict.
fn outcome(st: &RunStatus, max_runtime: Option<i64>) -> RunEnd {
    let details = serde_json::json!({"pid": st.worker_pid, "exit_code": st.exit_code, "signal": st.signal, "unit": st.unit});
    if st.sigterm_received {
        // A stop from outside the worker: systemd's RuntimeMaxSec, an operator, a shutdown.
        if max_runtime.is_some_and(|m| st.ended_at - st.started_at >= m - 1) {
            return RunEnd::TimedOut {
                error: format!(
                    "pid {} exceeded max_runtime_seconds={}",
                    st.worker_pid,
                    max_runtime.unwrap_or(0)
                ),
                details,
            };
        }
        return RunEnd::Stopped {
            error: format!(
                "pid {} stopped from outside ({})",
                st.worker_pid,
                st.describe()
            ),
        };
    }
    dispatch::classify(st)
}

fn end_text(e: &RunEnd) -> String {
    match e {
        RunEnd::Crashed { error, .. }
        | RunEnd::ProtocolViolation { error, .. }
        | RunEnd::RateLimited { error, .. }
        | RunEnd::TimedOut { error, .. } => error.clone(),
        RunEnd::SpawnFailed { error }
        | RunEnd::Infrastructure { error }
        | RunEnd::Lost { error }
        | RunEnd::Stopped { error } => error.clone(),
    }
}

/// For `reconcile`: the unit a run of ours has.
fn unit_of(task: &str, run: i64) -> String {
    unit_name::worker_scope(task, run)
}
