//! `hermes-mgr dispatcher`: the event-driven daemon behind `hermes-dispatcher.service`.
//!
//! One thread, one `select!` over a closed set of events: a supervisor recorded an exit
//! (inotify), a scope went away (`UnitRemoved`), a supervisor child exited (SIGCHLD),
//! someone else wrote the board (inotify + `PRAGMA data_version`), timers (claim
//! extension, the grace of a closed run, retries, the safety net), and signals. Handlers
//! book (`book`, the one booking site) and mark the board dirty; the loop then runs at most
//! one pass. Nothing is polled for liveness; the safety net only catches what no event
//! reported.
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
use tracing::{error, info, warn};

use crate::board::lock::FileLock;
use crate::board::{Board, BoardError, OpenMode, Resolver};
use crate::config::Config;
use crate::dispatch;
use crate::outcome::{self, Decision, RunEnd, Scope};
use crate::spawn::spec::{status_path, RunStatus};

/// At most this many workers are started per pass; a full batch leaves the board dirty and
/// the loop comes back to it after the watchdog, signals and bookings that are due.
const PASS_BATCH: usize = 64;
use crate::spawn::Started;
use crate::systemd::{unit_name, Systemd};

/// Options of `hermes-mgr dispatcher`.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub config: Option<PathBuf>,
    pub db: Option<PathBuf>,
    pub board: Option<String>,
}

/// A run whose scope we watch.
#[derive(Debug, Clone)]
struct Live {
    unit: String,
    lock: String,
    max_runtime: Option<i64>,
    /// Since when the board says this run is over while its scope still lives.
    closed_since: Option<Instant>,
    /// We saw this worker live (started or adopted it), rather than only finding its row
    /// after a restart: a scope that then vanishes with no word was killed, not lost.
    watched: bool,
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
    /// Supervisors that are our children, by PID: reaped on SIGCHLD.
    supervisors: HashMap<u32, Key>,
    last_pass: Option<Instant>,
    /// Something changed that a dispatch pass should see (a run was booked, someone else
    /// wrote the board, a pass stopped at its batch size): the loop runs one pass after
    /// handling what woke it, never more.
    dirty: bool,
    /// After a failed pass (a corrupt or unreadable board, systemd failing us): no pass
    /// before this instant; the delay doubles up to a minute, a good pass resets it.
    backoff: Option<(Instant, Duration)>,
    /// When the earliest worker whose run was closed on the board runs out of grace.
    grace_due: Option<Instant>,
    /// Why the last pass failed on our side, for the status line; `None` once one succeeds.
    failing: Option<String>,
    /// The first reconcile (start-up, the one `READY=1` waits for) is always logged.
    reconciled_once: bool,
}

/// Exit with a clear message: the daemon cannot work on this board at all.
fn fatal(e: anyhow::Error) -> anyhow::Error {
    error!("{e:#}");
    e
}

pub fn main(opts: Options) -> anyhow::Result<()> {
    crate::logging::init("hermes-dispatcher");
    raise_nofile_limit();
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

/// Open the board, waiting out another writer's lock in short steps (a worker may hold it):
/// each attempt waits `busy_timeout_ms`, systemd hears that start-up goes on, and anything
/// but a lock (a corrupt or foreign file) ends the daemon with the board's own message.
async fn open_board(
    paths: &crate::board::BoardPaths,
    cfg: &Config,
    notifier: &notify::Notifier,
) -> anyhow::Result<Board> {
    let busy = Duration::from_millis(cfg.busy_timeout_ms);
    let mut delay = Duration::from_millis(200);
    loop {
        match Board::open_waiting(paths, OpenMode::CreateIfMissing, busy) {
            Ok(b) => return Ok(b),
            Err(BoardError::Locked { detail, .. }) => {
                warn!(
                    "{} is locked by another writer ({detail}); waiting",
                    paths.db.display()
                );
                notifier.send(&format!(
                    "EXTEND_TIMEOUT_USEC={}",
                    (busy + delay + Duration::from_secs(5)).as_micros()
                ));
                notifier.send("WATCHDOG=1");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("cannot open board {}", paths.db.display())))
            }
        }
    }
}

async fn run(opts: Options) -> anyhow::Result<()> {
    let cfg = Config::load(opts.config.as_deref())?;
    let paths = Resolver::from_env(opts.db.clone(), opts.board.clone()).resolve()?;
    let notifier = notify::Notifier::from_env();
    let board = open_board(&paths, &cfg, &notifier).await?;
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
    let (sd, mut removed) = connect_systemd(&notifier).await;
    let runs_dir = cfg.state_dir.join("runs");
    let watcher = watch::Watcher::new(&runs_dir, &paths.db)
        .with_context(|| format!("watch {} and {}", runs_dir.display(), paths.db.display()))?;
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
        supervisors: HashMap::new(),
        last_pass: None,
        dirty: true,
        backoff: None,
        grace_due: None,
        failing: None,
        reconciled_once: false,
    };
    info!(db = %paths.db.display(), "hermes-dispatcher starting");
    d.reconcile().await?;
    d.notifier.send("READY=1");

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigchld = signal(SignalKind::child())?;
    let wd = notify::watchdog_interval();
    // Half of WatchdogSec (watchdog_interval halves it): fed by the loop alone, so a loop
    // that stops turning is what gets the daemon restarted.
    let mut watchdog = tokio::time::interval(wd.unwrap_or(Duration::from_secs(3600)));
    // The start-up reconcile and pass just ran: each timer's first tick is one period away.
    let every = |secs: u64| {
        let p = Duration::from_secs(secs.max(1));
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + p, p);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    };
    let mut tick = every(d.cfg.tick_seconds);
    let extend_every = |cfg: &Config| (cfg.claim_ttl_seconds as u64 / 3).clamp(1, 300);
    let mut extend = every(extend_every(&d.cfg));
    let mut retry = every(1);

    loop {
        // At most one pass per wake-up, after whatever woke the loop was handled.
        if d.dirty && d.backoff.is_none_or(|(until, _)| Instant::now() >= until) {
            d.pass().await;
        }
        let backoff_over = d
            .backoff
            .map(|(until, _)| tokio::time::Instant::from_std(until));
        tokio::select! {
            biased;
            _ = watchdog.tick(), if wd.is_some() => d.notifier.send("WATCHDOG=1"),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => {
                let (old_tick, old_extend) = (d.cfg.tick_seconds, extend_every(&d.cfg));
                d.reload();
                // Timers whose period changed start over with the new one.
                if d.cfg.tick_seconds != old_tick {
                    tick = every(d.cfg.tick_seconds);
                }
                if extend_every(&d.cfg) != old_extend {
                    extend = every(extend_every(&d.cfg));
                }
                d.dirty = true;
            }
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
                    d.dirty = true;
                }
            },
            _ = sigchld.recv() => d.reap().await,
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(d.grace_due.unwrap_or_else(Instant::now))), if d.grace_due.is_some() => {
                d.check_closed_runs().await;
            }
            _ = extend.tick() => d.extend_claims(),
            _ = retry.tick(), if !d.pending.is_empty() => d.retry_pending().await,
            _ = tick.tick() => {
                // The safety net: whatever no event reported (e.g. a claim left behind).
                if let Err(e) = d.reconcile().await {
                    warn!("periodic reconcile: {e:#}");
                }
                d.check_closed_runs().await;
                d.dirty = true;
            }
            // A pass cut short by its batch size, or a backoff that ran out, goes on.
            _ = async {}, if d.dirty && backoff_over.is_none() => {}
            _ = tokio::time::sleep_until(backoff_over.unwrap_or_else(tokio::time::Instant::now)), if d.dirty && backoff_over.is_some() => {}
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
        let line = format!(
            "{} running ({} in scopes), {} ready, {} blocked, {} todo",
            count("running"),
            self.live.len(),
            count("ready"),
            count("blocked"),
            count("todo")
        );
        match &self.failing {
            Some(why) => format!("FAILING to start workers ({why}); {line}"),
            None => line,
        }
    }

    fn update_status(&self) {
        self.notifier.status(&self.status_text());
    }

    /// Track a worker that we started. Its supervisor is our child: `reap` collects it.
    fn track_started(&mut self, s: Started) {
        let key = (s.task.clone(), s.run_id);
        info!(hermes_kanban_task = %s.task, hermes_kanban_run_id = s.run_id, unit = %s.unit, object_systemd_unit = %s.unit,
              pid = s.worker_pid, "worker started");
        self.supervisors.insert(s.supervisor_pid, key.clone());
        self.live.insert(
            key,
            Live {
                unit: s.unit,
                lock: s.lock,
                max_runtime: s.max_runtime,
                closed_since: None,
                watched: true,
            },
        );
    }

    /// SIGCHLD: collect every supervisor that exited (no zombie is left), and book its run
    /// (its exit record's inotify event usually came first; booking twice changes nothing).
    async fn reap(&mut self) {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(st) => {
                    let Some(pid) = st.pid() else { continue };
                    if let Some((task, run)) = self.supervisors.remove(&(pid.as_raw() as u32)) {
                        self.book(&task, run).await;
                    }
                }
            }
        }
    }

    /// One dispatch pass (claims and starts, at most `PASS_BATCH` of them), then the
    /// status line. Only the loop calls it, once per wake-up.
    async fn pass(&mut self) {
        self.dirty = false;
        self.last_pass = Some(Instant::now());
        // Read before the pass reads the board: a commit by someone else after this point
        // changes data_version again, and its inotify event triggers the next pass. (Read
        // after, it would swallow a task created while this pass ran.)
        self.data_version = self.board.data_version().unwrap_or(self.data_version);
        match dispatch::once(&self.board, &self.sd, &self.cfg, None, Some(PASS_BATCH)).await {
            Ok((report, started)) => {
                let mut infra_failure = None;
                for f in &report.spawn_failed {
                    let error = crate::text::clean(&f.error);
                    if f.infrastructure {
                        // Ours, not the task's: said loudly, not counted, retried later.
                        error!(hermes_kanban_task = %f.task_id, hermes_kanban_run_id = f.run_id,
                               "the dispatcher cannot start workers: {error}; the task is requeued, not charged");
                        infra_failure = Some(error);
                    } else {
                        warn!(hermes_kanban_task = %f.task_id, hermes_kanban_run_id = f.run_id, gave_up = f.gave_up, "spawn failed: {error}");
                    }
                }
                // A task that got a new run while an older run's worker still lives (it was
                // reclaimed under it): that older worker goes now, not after its grace.
                let superseded = started.iter().any(|s| {
                    self.live
                        .keys()
                        .any(|(task, run)| *task == s.task && *run != s.run_id)
                });
                for s in started {
                    self.track_started(s);
                }
                if superseded {
                    self.check_closed_runs().await;
                }
                for u in report.unbooked {
                    warn!(hermes_kanban_task = %u.task_id, hermes_kanban_run_id = u.run_id,
                          "spawn failed ({}) and the board would not take the record ({}); retrying", crate::text::clean(&u.error), u.why);
                    self.pending.insert(
                        (u.task_id, u.run_id),
                        Some(crate::outcome::spawn_failure(u.fault, &u.error)),
                    );
                }
                match infra_failure {
                    Some(why) => self.back_off(&why),
                    None => {
                        self.backoff = None;
                        self.failing = None;
                    }
                }
                // A full batch leaves work: the loop comes back after what else is due.
                self.dirty |= report.batch_full;
            }
            Err(e) => {
                warn!("dispatch pass failed: {e:#}");
                self.back_off(&format!("{e:#}"));
            }
        }
        self.update_status();
    }

    /// A pass failed on our side: wait before the next (doubling, at most a minute), and
    /// say so in the service status until a pass succeeds.
    fn back_off(&mut self, why: &str) {
        let delay = self
            .backoff
            .map(|(_, d)| (d * 2).min(Duration::from_secs(60)))
            .unwrap_or(Duration::from_secs(1));
        self.backoff = Some((Instant::now() + delay, delay));
        self.failing = Some(why.chars().take(200).collect());
        self.dirty = true;
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
                    self.dirty = true;
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

    /// The one place that books a run: gather the facts (the supervisor's exit record, the
    /// scope as systemd and the kernel see it), let `outcome::decide` say how the run
    /// ended, and record that. A verdict the worker wrote itself wins: the board then
    /// refuses the booking (`Ok(None)`). A fact we cannot read (the bus is down) is retried.
    async fn book(&mut self, task: &str, run: i64) {
        let key = (task.to_string(), run);
        let Some(live) = self.live.get(&key).cloned() else {
            return;
        };
        let record = match RunStatus::read(&self.cfg.state_dir, task, run) {
            Ok(s) => s,
            Err(e) => {
                warn!(hermes_kanban_task = %task, hermes_kanban_run_id = run, "cannot read the exit record: {e}");
                None
            }
        };
        let scope = match self.sd.active_state(&live.unit).await {
            Ok(Some(_)) if self.husk(&live.unit).await => Scope::Empty,
            Ok(Some(_)) => Scope::Live,
            Ok(None) => Scope::Gone,
            Err(e) => {
                warn!(unit = %live.unit, "unit state unknown ({e}); retrying");
                self.pending.insert(key, None);
                return;
            }
        };
        let facts = outcome::Facts {
            unit: &live.unit,
            record: record.as_ref(),
            scope,
            watched: live.watched,
            operator_stop: None,
            max_runtime: live.max_runtime,
        };
        // Still running (a UnitRemoved for a name we reuse, a stray event): nothing to do.
        let Decision::Ended(end) = outcome::decide(&facts) else {
            return;
        };
        match self.board.end_run(task, run, &end, self.cfg.failure_limit) {
            Ok(result) => {
                match &result {
                    Some(r) => {
                        info!(hermes_kanban_task = %task, hermes_kanban_run_id = run, unit = %live.unit,
                                     object_systemd_unit = %live.unit, status = %r.status, failures = r.failures,
                                     gave_up = r.gave_up, "run ended: {}", crate::text::clean(end.error()))
                    }
                    None => {
                        info!(hermes_kanban_task = %task, hermes_kanban_run_id = run, unit = %live.unit,
                                  object_systemd_unit = %live.unit, "run ended; the worker had recorded its own verdict")
                    }
                }
                self.pending.remove(&key);
                self.live.remove(&key);
                let _ = std::fs::remove_file(status_path(&self.cfg.state_dir, task, run));
                // Leftovers of the worker (daemonized grandchildren) go with the run.
                if scope == Scope::Live {
                    if let Err(e) = self.sd.stop(&live.unit).await {
                        warn!(unit = %live.unit, "stop leftovers: {e}");
                    }
                }
                self.dirty = true;
            }
            Err(BoardError::Locked { .. }) => {
                warn!(hermes_kanban_task = %task, hermes_kanban_run_id = run, "board locked; will retry booking the run");
                self.pending.insert(key, None);
            }
            Err(e) => {
                warn!(hermes_kanban_task = %task, hermes_kanban_run_id = run, "cannot book the run: {e}; will retry");
                self.pending.insert(key, None);
            }
        }
    }

    async fn retry_pending(&mut self) {
        for ((task, run), decided) in std::mem::take(&mut self.pending) {
            match decided {
                None => self.book(&task, run).await,
                Some(end) => match self.board.end_run(&task, run, &end, self.cfg.failure_limit) {
                    Ok(_) => {
                        info!(hermes_kanban_task = %task, hermes_kanban_run_id = run, "recorded: {}", crate::text::clean(end.error()));
                        self.dirty = true;
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
        // One indexed read for all tracked runs, not one row per worker.
        let running = match self.board.running_runs() {
            Ok(r) => r,
            Err(e) => {
                warn!("read the running runs: {e}");
                return;
            }
        };
        self.grace_due = None;
        let keys: Vec<Key> = self.live.keys().cloned().collect();
        for key in keys {
            let now_on = running.get(&key.0).copied();
            let Some(live) = self.live.get_mut(&key) else {
                continue;
            };
            if now_on == Some(key.1) {
                live.closed_since = None;
                continue;
            }
            let superseded = now_on.is_some();
            let since = *live.closed_since.get_or_insert_with(Instant::now);
            if superseded || since.elapsed() >= grace {
                let unit = live.unit.clone();
                warn!(hermes_kanban_task = %key.0, hermes_kanban_run_id = key.1, unit = %unit, superseded,
                      "the run was closed on the board but its worker still runs; stopping it");
                if let Err(e) = self.sd.stop(&unit).await {
                    warn!(unit = %unit, "stop: {e}");
                }
            } else {
                // Come back when its grace is over, event or no event.
                let due = since + grace;
                self.grace_due = Some(self.grace_due.map_or(due, |d| d.min(due)));
            }
        }
    }
}

/// The soft `RLIMIT_NOFILE` up to the hard one (systemd gives services 1024 soft, 524288
/// hard): a thousand live workers must not run the dispatcher out of descriptors.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => warn!("cannot read the open-file limit: {e}"),
    }
}

/// For `reconcile`: the unit a run of ours has.
fn unit_of(task: &str, run: i64) -> String {
    unit_name::worker_scope(task, run)
}
