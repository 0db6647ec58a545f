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

mod boards;
mod decompose;
mod live;
mod notify;
mod reconcile;
mod watch;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::board::lock::FileLock;
use crate::board::{BoardError, Owner, Resolver};
use crate::config::Config;
use crate::dispatch;
use crate::outcome::{self, Decision, RunEnd, Scope};
use crate::state_dir::record_path;
use boards::Slot;

/// At most this many workers are started per pass, and none after a second; a full batch
/// leaves the board dirty and the loop comes back to it after the watchdog, signals and
/// bookings that are due.
const PASS_BATCH: dispatch::Batch = dispatch::Batch {
    starts: 64,
    time: Duration::from_secs(1),
};

/// The longest a dirty board waits for its pass while events keep the loop busy.
const PASS_AT_MOST_AFTER: Duration = Duration::from_millis(100);
use crate::names;
use crate::spawn::Started;
use crate::systemd::Systemd;

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
    /// We stopped it for showing no heartbeat (`check_stale`): booked `stale` when it ends.
    stale: Option<outcome::Stale>,
}

/// A run: (board, task, run). Task and run ids are only unique within a board.
type Key = (String, String, i64);

struct Daemon {
    cfg: Config,
    opts: Options,
    resolver: Resolver,
    /// The boards served, by slug (`boards.rs`).
    slots: BTreeMap<String, Slot>,
    sd: Systemd,
    /// The runs we watch (`live.rs`): by key, by scope, by exit record.
    live: live::LiveRuns,
    /// Runs whose booking failed (board locked): retried on the next timer. `Some` carries
    /// an outcome already decided (a spawn failure), `None` means "decide from the facts".
    pending: BTreeMap<Key, Option<RunEnd>>,
    notifier: notify::Notifier,
    /// Supervisors that are our children, by PID: reaped on SIGCHLD.
    supervisors: HashMap<u32, Key>,
    /// When the earliest worker whose run was closed on the board runs out of grace.
    grace_due: Option<Instant>,
    /// The first reconcile (start-up, the one `READY=1` waits for) is always logged.
    reconciled_once: bool,
    /// Triage decompositions running and waiting for a retry (`decompose.rs`).
    decomp: decompose::Decompositions,
    /// Where Hermes' emergency stop is looked for (its home, the root served), and the
    /// `ESTOP` seen there at the last look: while there is one, no pass runs.
    estop_dirs: Vec<PathBuf>,
    estop: Option<PathBuf>,
    /// How many listed boards `max_boards` leaves unserved.
    boards_over: usize,
}

/// Exit with a clear message: the daemon cannot work at all.
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

/// A pinned board (`--db`, `--board`) is the daemon's only work: wait out another
/// writer's lock in short steps (systemd hears that start-up goes on), and end the daemon
/// with the board's own message on anything else (a corrupt or foreign file).
async fn open_pinned(d: &mut Daemon) -> anyhow::Result<()> {
    let Some(slug) = d.slots.keys().next().cloned() else {
        return Ok(());
    };
    let busy = Duration::from_millis(d.cfg.busy_timeout_ms);
    let mut delay = Duration::from_millis(200);
    loop {
        match d.open_slot(&slug) {
            boards::Opened::Now | boards::Opened::Already => return Ok(()),
            boards::Opened::NotYet => {}
        }
        let slot = &d.slots[&slug];
        if let Some(b) = &slot.broken {
            bail!("cannot open board {}: {}", slot.paths.db.display(), b.why);
        }
        d.notifier.send(&format!(
            "EXTEND_TIMEOUT_USEC={}",
            (busy + delay + Duration::from_secs(5)).as_micros()
        ));
        d.notifier.send("WATCHDOG=1");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
        if let Some(s) = d.slots.get_mut(&slug) {
            s.backoff = None;
        }
    }
}

async fn run(opts: Options) -> anyhow::Result<()> {
    let cfg = Config::load(opts.config.as_deref())?;
    let resolver = Resolver::from_env(opts.db.clone(), opts.board.clone());
    let pinned = resolver.pinned();
    let first = resolver.resolve()?;
    let notifier = notify::Notifier::from_env();
    // One dispatcher per Hermes root, for life: the same lock Hermes' gateway takes.
    let owner = Owner::of_tree(&first.owner_dir)
        .with_context(|| format!("stat {}", first.owner_dir.display()))?;
    let life_path = first.dispatcher_lock();
    let life_dir = life_path.parent().unwrap_or(&first.root).to_path_buf();
    crate::safe_fs::as_user(&owner, || std::fs::create_dir_all(&life_dir))
        .and_then(|r| r)
        .with_context(|| format!("create {}", life_dir.display()))?;
    let life = match FileLock::acquire_or_held(&life_path, &owner) {
        Ok(Some(l)) => Some(l),
        Ok(None) => take_from_workers(&life_path, &owner, &cfg.slice, false),
        // A file no Hermes process can lock — one the tree's owner may not open (a worker
        // runs as the owner: it can chmod it), a symlink, a FIFO — is no one's lock.
        Err(e) if unlockable(&life_path, &e) => {
            warn!(lock = %life_path.display(), "the dispatcher lock cannot be taken ({e}); replacing the file");
            take_from_workers(&life_path, &owner, &cfg.slice, true)
        }
        Err(e) => return Err(e).with_context(|| format!("open {}", life_path.display())),
    };
    let Some(_life) = life else {
        bail!("{}", lock_taken(&life_path));
    };
    let (sd, mut removed) = connect_systemd(&notifier).await;
    let runs_dir = cfg.state_dir.join("runs");
    let mut watcher =
        watch::Watcher::new(&runs_dir).with_context(|| format!("watch {}", runs_dir.display()))?;
    let root = first.root.clone();
    let mut d = Daemon {
        cfg,
        opts,
        resolver,
        slots: BTreeMap::new(),
        sd,
        live: live::LiveRuns::default(),
        pending: BTreeMap::new(),
        notifier,
        supervisors: HashMap::new(),
        grace_due: None,
        reconciled_once: false,
        decomp: Default::default(),
        estop_dirs: Vec::new(),
        estop: None,
        boards_over: 0,
    };
    d.clear_env_files();
    d.refresh_boards();
    let watch_root = (!pinned).then_some(root.as_path());
    let hermes_files = crate::hermes_config::Files::from_env();
    let config_dirs: Vec<PathBuf> = std::iter::once(&hermes_files.user)
        .chain(hermes_files.managed.as_ref())
        .filter_map(|f| f.parent().map(|p| p.to_path_buf()))
        .collect();
    d.estop_dirs = crate::hermes_config::estop_dirs(&root);
    d.check_estop();
    let estop_dirs = d.estop_dirs.clone();
    let follow = |d: &Daemon, w: &mut watch::Watcher| {
        let paths: Vec<_> = d.slots.values().map(|s| s.paths.clone()).collect();
        // A directory of `boards/` that is no board yet is watched only while the cap leaves
        // room for it to become one served.
        let room = d.cfg.max_boards.saturating_sub(paths.len());
        w.set_boards(
            &paths,
            watch_root,
            &config_dirs,
            &estop_dirs,
            room,
            Some(&owner),
        );
    };
    for w in &d.cfg.warnings {
        warn!("{w}");
    }
    follow(&d, &mut watcher);
    if pinned {
        open_pinned(&mut d).await?;
    }
    // Fixed now, before any upgrade can replace it on disk (spawn::program).
    let supervisor = crate::spawn::program::supervisor();
    info!(root = %root.display(), boards = d.slots.len(), pinned, supervisor = %supervisor.path.display(),
          "hermes-dispatcher starting");
    log_hermes_version(&d.cfg);
    d.open_boards();
    d.reconcile().await?;
    d.notifier.send("READY=1");

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigchld = signal(SignalKind::child())?;
    let wd = notify::watchdog_interval();
    // Half of WatchdogSec (watchdog_interval halves it): fed by the loop, and within it only
    // by work that is bounded and progressing (each board's pass), so a loop that stops
    // turning gets the daemon restarted. Upstream's code is never waited on here: it runs
    // in each run's scope (`spawn::upstream`).
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

    let mut last_pass = Instant::now();
    loop {
        // One pass per board after the events that are there have been handled — a pass
        // then sees every slot they freed and starts those workers together — but never
        // more than `PASS_AT_MOST_AFTER` after the last while events keep coming.
        let wake = d.next_wake();
        let due_now = wake.is_some_and(|w| w <= Instant::now());
        if due_now && last_pass.elapsed() >= PASS_AT_MOST_AFTER {
            d.pass().await;
            last_pass = Instant::now();
            continue;
        }
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
                d.mark_all_dirty();
            }
            changes = watcher.next() => match changes {
                Ok(changes) => {
                    if d.on_changes(changes).await {
                        follow(&d, &mut watcher);
                        // What changed between the scan and the new watches (a board's
                        // files written just after its directory) is seen now.
                        if d.refresh_boards() {
                            follow(&d, &mut watcher);
                        }
                    }
                }
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
                    d.check_decompositions().await;
                    d.mark_all_dirty();
                }
            },
            _ = sigchld.recv() => d.reap().await,
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(d.grace_due.unwrap_or_else(Instant::now))), if d.grace_due.is_some() => {
                d.check_closed_runs().await;
            }
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(d.decomp.next_retry().unwrap_or_else(Instant::now))), if d.decomp.next_retry().is_some() => {
                d.decompositions_due();
            }
            _ = extend.tick() => d.extend_claims(),
            _ = retry.tick(), if !d.pending.is_empty() => d.retry_pending().await,
            _ = tick.tick() => {
                // The safety net: whatever no event reported (e.g. a claim left behind, a
                // board whose quarantine ran out).
                if d.refresh_boards() {
                    follow(&d, &mut watcher);
                }
                d.open_boards();
                if let Err(e) = d.reconcile().await {
                    warn!("periodic reconcile: {e:#}");
                }
                d.check_closed_runs().await;
                d.check_decompositions().await;
                d.check_stale().await;
                d.mark_all_dirty();
            }
            // Nothing else is ready: a dirty board's pass (also one cut short by its batch
            // size, or whose backoff ran out).
            _ = async {}, if due_now => {
                d.pass().await;
                last_pass = Instant::now();
            }
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake.unwrap_or_else(Instant::now))), if wake.is_some() && !due_now => {}
        }
    }
    d.notifier.send("STOPPING=1");
    if d.cfg.stop_workers_on_exit {
        for (key, live) in d.live.clone() {
            info!(board = %key.0, hermes_kanban_task = %key.1, hermes_kanban_run_id = key.2, unit = %live.unit, "stopping worker on exit");
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
                for s in self.slots.values() {
                    if let Some(b) = &s.board {
                        if let Err(e) =
                            b.set_busy_timeout(Duration::from_millis(cfg.busy_timeout_ms))
                        {
                            warn!("{e}");
                        }
                    }
                }
                for w in &cfg.warnings {
                    warn!("{w}");
                }
                info!(
                    max_spawn = ?cfg.max_spawn,
                    max_in_progress = ?cfg.max_in_progress,
                    failure_limit = cfg.failure_limit,
                    default_assignee = ?cfg.default_assignee,
                    max_in_progress_per_profile = ?cfg.max_in_progress_per_profile,
                    "configuration reloaded"
                );
                self.cfg = cfg;
            }
            Err(e) => warn!("configuration not reloaded, keeping the old one: {e:#}"),
        }
    }

    fn mark_all_dirty(&mut self) {
        for s in self.slots.values_mut() {
            s.dirty = true;
        }
    }

    /// When the loop must come back for a pass with no event: now (a pass cut short by its
    /// batch), or when the earliest backoff runs out. `None`: only events bring it back.
    fn next_wake(&self) -> Option<Instant> {
        self.slots
            .values()
            .filter(|s| s.listed && s.dirty)
            .map(|s| s.backoff.map_or_else(Instant::now, |(until, _)| until))
            .min()
    }

    /// Look at Hermes' emergency stop again; `true` while it holds. Its coming and going are
    /// said once each, in the journal and the service status.
    fn check_estop(&mut self) -> bool {
        let dirs: Vec<&Path> = self.estop_dirs.iter().map(PathBuf::as_path).collect();
        let now = crate::hermes_config::estop(&dirs);
        if now != self.estop {
            match &now {
                Some(p) => warn!(estop = %p.display(), "{}", crate::hermes_config::estop_text(p)),
                None => {
                    info!("emergency stop lifted: dispatching again");
                    self.mark_all_dirty();
                }
            }
            self.estop = now;
            self.update_status();
        }
        self.estop.is_some()
    }

    fn status_text(&self) -> String {
        let count = |st: &str| -> i64 {
            self.slots
                .values()
                .filter_map(|s| s.board.as_ref())
                .map(|b| b.count(st).unwrap_or(0))
                .sum()
        };
        let mut line = format!(
            "{} running ({} in scopes), {} ready, {} blocked, {} todo",
            count("running"),
            self.live.len(),
            count("ready"),
            count("blocked"),
            count("todo")
        );
        let listed = self.slots.values().filter(|s| s.listed).count();
        if listed != 1 {
            line.push_str(&format!(" on {listed} boards"));
        }
        if self.boards_over > 0 {
            line.push_str(&format!(
                "; {} boards not served (max_boards = {})",
                self.boards_over, self.cfg.max_boards
            ));
        }
        for (slug, s) in &self.slots {
            if let Some(b) = &s.broken {
                line.push_str(&format!(
                    "; board {slug} skipped: {}",
                    crate::text::clean(&b.why)
                ));
            }
        }
        let failing: Vec<String> = self
            .slots
            .iter()
            .filter_map(|(slug, s)| s.failing.as_ref().map(|w| (slug, w)))
            .map(|(slug, why)| {
                if self.slots.len() == 1 {
                    why.clone()
                } else {
                    format!("board {slug}: {why}")
                }
            })
            .collect();
        let line = if failing.is_empty() {
            line
        } else {
            format!("FAILING to start workers ({}); {line}", failing.join("; "))
        };
        match &self.estop {
            Some(p) => format!("{}; {line}", crate::hermes_config::estop_text(p)),
            None => line,
        }
    }

    fn update_status(&self) {
        self.notifier.status(&self.status_text());
    }

    /// Track a worker that we started. Its supervisor is our child: `reap` collects it.
    fn track_started(&mut self, board: &str, s: Started) {
        let key = (board.to_string(), s.task.clone(), s.run_id);
        info!(board = %board, hermes_kanban_task = %s.task, hermes_kanban_run_id = s.run_id, unit = %s.unit, object_systemd_unit = %s.unit,
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
                stale: None,
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
                    if let Some(key) = self.supervisors.remove(&(pid.as_raw() as u32)) {
                        self.book(&key).await;
                    }
                }
            }
        }
    }

    /// One dispatch pass over each board that needs one (claims and starts, at most
    /// `PASS_BATCH` per board), then the status line. Only the loop calls it, once per
    /// wake-up.
    async fn pass(&mut self) {
        if self.check_estop() {
            // Held: the boards are clean until the stop is lifted (which marks them all
            // dirty); the status line says what waits.
            for s in self.slots.values_mut() {
                s.dirty = false;
            }
            self.update_status();
            return;
        }
        let due: Vec<String> = self
            .slots
            .iter()
            .filter(|(_, s)| s.may_pass())
            .map(|(slug, _)| slug.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        for slug in due {
            self.pass_board(&slug).await;
            // Each board's pass is bounded (its batch and time): many boards are progress,
            // each fed to the watchdog as it ends.
            self.notifier.alive();
        }
        self.update_status();
    }

    async fn pass_board(&mut self, slug: &str) {
        // Clean before trying: a board that cannot be opened waits for its file to change
        // (or its backoff), it does not spin the loop.
        if let Some(s) = self.slots.get_mut(slug) {
            s.dirty = false;
        }
        match self.open_slot(slug) {
            boards::Opened::Now => {
                if let Err(e) = self.reconcile_board(slug).await {
                    warn!(board = %slug, "reconcile: {e:#}");
                }
            }
            boards::Opened::Already => {}
            boards::Opened::NotYet => return,
        }
        // A host-wide cap (0.22's `max_in_progress`) leaves this board what the others'
        // live workers do not use.
        let room = dispatch::caps::of(&self.cfg)
            .host
            .map(|host| host.saturating_sub(self.live_elsewhere(slug)));
        let Some(slot) = self.slots.get_mut(slug) else {
            return;
        };
        let Some(board) = slot.board.as_ref() else {
            return;
        };
        // Read before the pass reads the board: a commit by someone else after this point
        // changes data_version again, and its inotify event triggers the next pass. (Read
        // after, it would swallow a task created while this pass ran.)
        slot.data_version = board.data_version().unwrap_or(slot.data_version);
        let result = dispatch::once(board, &self.sd, &self.cfg, room, Some(PASS_BATCH)).await;
        match result {
            Ok((report, started)) => {
                let held = report.estop.is_some();
                let mut infra_failure = None;
                for f in &report.spawn_failed {
                    let error = crate::text::clean(&f.error);
                    if f.infrastructure {
                        // Ours, not the task's: said loudly, not counted, retried later.
                        error!(board = %slug, hermes_kanban_task = %f.task_id, hermes_kanban_run_id = f.run_id,
                               "the dispatcher cannot start workers: {error}; the task is requeued, not charged");
                        infra_failure = Some(error);
                    } else {
                        warn!(board = %slug, hermes_kanban_task = %f.task_id, hermes_kanban_run_id = f.run_id, gave_up = f.gave_up, "spawn failed: {error}");
                    }
                }
                // A task that got a new run while an older run's worker still lives (it was
                // reclaimed under it): that older worker goes now, not after its grace.
                let superseded = started.iter().any(|s| {
                    self.runs_of(slug, &s.task)
                        .any(|(_, _, run)| *run != s.run_id)
                });
                if let Some(s) = self.slots.get_mut(slug) {
                    s.host_capped = room.is_some() && report.skipped_capped > 0;
                }
                for s in started {
                    self.track_started(slug, s);
                }
                if superseded {
                    self.check_closed_runs().await;
                }
                for u in report.unbooked {
                    warn!(board = %slug, hermes_kanban_task = %u.task_id, hermes_kanban_run_id = u.run_id,
                          "spawn failed ({}) and the board would not take the record ({}); retrying", crate::text::clean(&u.error), u.why);
                    self.pending.insert(
                        (slug.to_string(), u.task_id, u.run_id),
                        Some(crate::outcome::spawn_failure(u.fault, &u.error)),
                    );
                }
                let Some(slot) = self.slots.get_mut(slug) else {
                    return;
                };
                match infra_failure {
                    Some(why) => slot.back_off(&why),
                    None => {
                        slot.backoff = None;
                        slot.failing = None;
                    }
                }
                // A full batch leaves work: the loop comes back after what else is due.
                slot.dirty |= report.batch_full;
                if held {
                    // An emergency stop the pass saw before the loop did: the board waits,
                    // dirty, for the moment it is lifted, and the loop says why.
                    slot.dirty = true;
                    self.check_estop();
                    return;
                }
                self.decompose(slug).await;
            }
            Err(e) => {
                warn!(board = %slug, "dispatch pass failed: {e:#}");
                if let Some(slot) = self.slots.get_mut(slug) {
                    slot.back_off(&format!("{e:#}"));
                }
            }
        }
    }

    /// Handle what inotify saw; `true` when the set of boards may have changed (the watches
    /// follow).
    async fn on_changes(&mut self, changes: Vec<watch::Change>) -> bool {
        let mut boards_changed = false;
        for c in changes {
            match c {
                watch::Change::RunRecord(path) => {
                    let key = path
                        .file_name()
                        .and_then(|name| self.live.of_record(name))
                        .filter(|k| record_path(&self.cfg.state_dir, &k.0, &k.1, k.2) == path)
                        .cloned();
                    if let Some(key) = key {
                        self.book(&key).await;
                    }
                }
                watch::Change::Board(slug) => {
                    let Some(slot) = self.slots.get_mut(&slug) else {
                        continue;
                    };
                    let Some(board) = &slot.board else {
                        // A board we could not open changed: worth another try.
                        slot.dirty = true;
                        continue;
                    };
                    // Only another writer's commit changes data_version; our own writes do not.
                    match board.data_version() {
                        Ok(v) if v != slot.data_version => {
                            slot.data_version = v;
                            slot.dirty = true;
                            self.check_touched_runs(&slug).await;
                        }
                        Ok(_) => {}
                        Err(e) => warn!(board = %slug, "read the board's data_version: {e}"),
                    }
                }
                watch::Change::Boards => {
                    // Even with no board gained or lost, `boards/` may have a new directory
                    // to watch for its files.
                    self.refresh_boards();
                    boards_changed = true;
                }
                watch::Change::Estop => {
                    self.check_estop();
                }
                watch::Change::HermesConfig => {
                    // Hermes' kanban settings take effect without a restart, as upstream's
                    // auto_decompose toggle does.
                    self.reload();
                    self.mark_all_dirty();
                }
            }
        }
        boards_changed
    }

    async fn on_unit_removed(&mut self, unit: &str) {
        if self.on_decompose_unit_removed(unit) {
            return;
        }
        if let Some(key) = self.live.of_unit(unit).cloned() {
            self.book(&key).await;
        }
    }

    /// The one place that books a run: gather the facts (the supervisor's exit record, the
    /// scope as systemd and the kernel see it), let `outcome::decide` say how the run
    /// ended, and record that. A verdict the worker wrote itself wins: the board then
    /// refuses the booking (`Ok(None)`). A fact we cannot read (the bus is down) is retried.
    async fn book(&mut self, key: &Key) {
        let (slug, task, run) = (&key.0, &key.1, key.2);
        let Some(live) = self.live.get(key).cloned() else {
            return;
        };
        let record = match crate::state_dir::read_record(&self.cfg.state_dir, slug, task, run) {
            Ok(s) => s,
            Err(e) => {
                warn!(board = %slug, hermes_kanban_task = %task, hermes_kanban_run_id = run, "cannot read the exit record: {e}");
                None
            }
        };
        let scope = match self.sd.active_state(&live.unit).await {
            Ok(Some(_)) if self.husk(&live.unit).await => Scope::Empty,
            Ok(Some(_)) => Scope::Live,
            Ok(None) => Scope::Gone,
            Err(e) => {
                warn!(unit = %live.unit, "unit state unknown ({e}); retrying");
                self.pending.insert(key.clone(), None);
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
            stale: live.stale.as_ref(),
            hermes: crate::spawn::hermes_generation(&self.cfg),
        };
        // Still running (a UnitRemoved for a name we reuse, a stray event): nothing to do.
        let Decision::Ended(end) = outcome::decide(&facts) else {
            return;
        };
        let Some(board) = self.board(slug) else {
            warn!(board = %slug, hermes_kanban_task = %task, hermes_kanban_run_id = run, "board not open; will retry booking the run");
            self.pending.insert(key.clone(), None);
            return;
        };
        let cost = record
            .as_ref()
            .and_then(|r| r.usage.as_ref())
            .and_then(|u| serde_json::to_value(u).ok());
        match board.end_run_costed(task, run, &end, dispatch::rules(&self.cfg), cost.as_ref()) {
            Ok(result) => {
                match &result {
                    Some(r) => {
                        info!(board = %slug, hermes_kanban_task = %task, hermes_kanban_run_id = run, unit = %live.unit,
                                     object_systemd_unit = %live.unit, status = %r.status, failures = r.failures,
                                     gave_up = r.gave_up, "run ended: {}", crate::text::clean(end.error()))
                    }
                    None => {
                        info!(board = %slug, hermes_kanban_task = %task, hermes_kanban_run_id = run, unit = %live.unit,
                                  object_systemd_unit = %live.unit, "run ended; the worker had recorded its own verdict")
                    }
                }
                self.pending.remove(key);
                self.live.remove(key);
                // A host-wide cap has room again: boards it held see it now.
                for s in self.slots.values_mut().filter(|s| s.host_capped) {
                    s.host_capped = false;
                    s.dirty = true;
                }
                crate::state_dir::forget_run(&self.cfg.state_dir, slug, task, run);
                // Leftovers of the worker (daemonized grandchildren) go with the run.
                if scope == Scope::Live {
                    if let Err(e) = self.sd.stop(&live.unit).await {
                        warn!(unit = %live.unit, "stop leftovers: {e}");
                    }
                }
                if let Some(s) = self.slots.get_mut(slug) {
                    s.dirty = true;
                    // Found in the scope after the pass (Hermes' own code could not be
                    // started): ours, said loudly, and the board backs off as after a pass
                    // that failed to start a worker.
                    if let crate::outcome::RunEnd::Infrastructure { error: why } = &end {
                        error!(board = %slug, hermes_kanban_task = %task, hermes_kanban_run_id = run,
                               "the dispatcher cannot start workers: {}; the task is requeued, not charged", crate::text::clean(why));
                        s.start_failures = s.start_failures.saturating_add(1);
                        s.back_off(why);
                    } else {
                        s.start_failures = 0;
                    }
                }
            }
            Err(BoardError::Locked { .. }) => {
                warn!(board = %slug, hermes_kanban_task = %task, hermes_kanban_run_id = run, "board locked; will retry booking the run");
                self.pending.insert(key.clone(), None);
            }
            Err(e) => {
                warn!(board = %slug, hermes_kanban_task = %task, hermes_kanban_run_id = run, "cannot book the run: {e}; will retry");
                self.pending.insert(key.clone(), None);
            }
        }
    }

    async fn retry_pending(&mut self) {
        for (key, decided) in std::mem::take(&mut self.pending) {
            match decided {
                None => self.book(&key).await,
                Some(end) => {
                    let (slug, task, run) = (&key.0, &key.1, key.2);
                    let booked = self
                        .board(slug)
                        .map(|b| b.end_run(task, run, &end, dispatch::rules(&self.cfg)));
                    match booked {
                        Some(Ok(_)) => {
                            crate::state_dir::forget_run(&self.cfg.state_dir, slug, task, run);
                            info!(board = %slug, hermes_kanban_task = %task, hermes_kanban_run_id = run, "recorded: {}", crate::text::clean(end.error()));
                            if let Some(s) = self.slots.get_mut(slug) {
                                s.dirty = true;
                            }
                        }
                        _ => {
                            self.pending.insert(key, Some(end));
                        }
                    }
                }
            }
        }
    }

    /// The live runs we track of one task.
    /// Our live workers on boards other than `slug`.
    fn live_elsewhere(&self, slug: &str) -> usize {
        let here = self
            .live
            .range((slug.to_string(), String::new(), i64::MIN)..)
            .take_while(|(k, _)| k.0 == slug)
            .count();
        self.live.len() - here
    }

    fn runs_of<'a>(&'a self, slug: &str, task: &str) -> impl Iterator<Item = &'a Key> + 'a {
        let (lo, hi) = (
            (slug.to_string(), task.to_string(), i64::MIN),
            (slug.to_string(), task.to_string(), i64::MAX),
        );
        self.live.range(lo..=hi).map(|(k, _)| k)
    }

    /// Keep our workers' claims alive so upstream's stale-claim sweep never reclaims a
    /// live worker. The lock stays the one the worker was given.
    fn extend_claims(&mut self) {
        // One transaction per board. A claim no longer ours was closed by someone else:
        // check_closed_runs deals with it.
        let mut by_board: HashMap<&str, Vec<(&str, &str)>> = HashMap::new();
        for ((slug, task, _), live) in self.live.iter() {
            by_board
                .entry(slug.as_str())
                .or_default()
                .push((task.as_str(), live.lock.as_str()));
        }
        for (slug, claims) in by_board {
            let Some(board) = self.board(slug) else {
                continue;
            };
            if let Err(e) = board.extend_claims(&claims, self.cfg.claim_ttl_seconds) {
                warn!(board = %slug, claims = claims.len(), "extend claims: {e}; retrying later");
            }
        }
    }

    /// Upstream's stale detection (`kanban.dispatch_stale_timeout_seconds`, 0 = off): a
    /// run going for that long with no heartbeat for an hour has its scope stopped, and is
    /// booked `stale` (requeued, not counted) when it is gone. On the safety-net tick.
    async fn check_stale(&mut self) {
        let timeout = self.cfg.stale_timeout_seconds;
        if timeout <= 0 {
            return;
        }
        let now = crate::board::now();
        let mut found = Vec::new();
        for (slug, s) in &self.slots {
            let Some(b) = &s.board else { continue };
            let Ok(running) = b.running_claims() else {
                continue;
            };
            for t in running {
                let Some(run) = t.current_run_id else {
                    continue;
                };
                let key: Key = (slug.clone(), t.id.clone(), run);
                if self.live.get(&key).is_none_or(|l| l.stale.is_some()) {
                    continue;
                }
                // A run starts no earlier than its task first did.
                if t.started_at.is_some_and(|s| now - s < timeout) {
                    continue;
                }
                let Ok(Some(r)) = b.run(run) else { continue };
                if let Some(st) = outcome::stale(
                    r.started_at,
                    t.last_heartbeat_at,
                    now,
                    timeout,
                    t.worker_pid,
                ) {
                    found.push((key, st));
                }
            }
        }
        for (key, st) in found {
            let Some(live) = self.live.get_mut(&key) else {
                continue;
            };
            warn!(board = %key.0, hermes_kanban_task = %key.1, hermes_kanban_run_id = key.2, unit = %live.unit,
                  elapsed = st.elapsed_seconds, "no heartbeat from the worker (dispatch_stale_timeout_seconds); stopping it, the task is requeued");
            live.stale = Some(st);
            let unit = live.unit.clone();
            if let Err(e) = self.sd.stop(&unit).await {
                warn!(unit = %unit, "stop: {e}");
            }
        }
    }

    /// Runs the board says are over while their scope lives: the worker's own verdict
    /// (it exits by itself soon), or an operator's reclaim. A task already running on a
    /// newer run must not have two workers: the old scope is stopped at once; otherwise
    /// after `verdict_grace_seconds`. Every live run of every board, read in one indexed
    /// read per board: on the safety-net tick, when a grace runs out, after a pass.
    async fn check_closed_runs(&mut self) {
        let mut running = HashMap::new();
        for (slug, s) in &mut self.slots {
            let Some(b) = &s.board else { continue };
            // Whatever an event names from here on is looked at again (`check_touched_runs`).
            s.events_seen = b.last_event_id().ok();
            match b.running_runs() {
                Ok(r) => {
                    running.insert(slug.clone(), r);
                }
                Err(e) => warn!(board = %slug, "read the running runs: {e}"),
            }
        }
        self.grace_due = None;
        let keys: Vec<Key> = self.live.keys().cloned().collect();
        for key in keys {
            let Some(on_board) = running.get(&key.0) else {
                continue;
            };
            let now_on = on_board.get(&key.1).copied();
            self.check_closed(&key, now_on).await;
        }
    }

    /// `check_closed_runs` for what another writer just changed on board `slug`: only the
    /// live runs of tasks with a new event (each commit of 10,000 workers must not read
    /// 10,000 rows). A write that left no event (a hand `UPDATE`) is seen by the next full
    /// check, on the safety-net tick at the latest.
    async fn check_touched_runs(&mut self, slug: &str) {
        let Some(slot) = self.slots.get(slug) else {
            return;
        };
        let Some(board) = slot.board.as_ref() else {
            return;
        };
        let touched = match slot.events_seen {
            Some(after) => board.tasks_touched_since(after, 1000),
            None => Ok(None),
        };
        let (tasks, last) = match touched {
            Ok(Some(t)) => t,
            Ok(None) => return self.check_closed_runs().await,
            Err(e) => {
                warn!(board = %slug, "read the board's new events: {e}; checking every run");
                return self.check_closed_runs().await;
            }
        };
        let mut now = Vec::new();
        for task in &tasks {
            let keys: Vec<Key> = self.runs_of(slug, task).cloned().collect();
            if keys.is_empty() {
                continue;
            }
            match board.current_run(task) {
                Ok(on) => now.extend(keys.into_iter().map(|k| (k, on))),
                Err(e) => {
                    warn!(board = %slug, hermes_kanban_task = %task, "read the task's current run: {e}; checking every run");
                    return self.check_closed_runs().await;
                }
            }
        }
        if let Some(s) = self.slots.get_mut(slug) {
            s.events_seen = Some(last);
        }
        for (key, on) in now {
            self.check_closed(&key, on).await;
        }
    }

    /// One live run against the run its task is on now (`None`: not running).
    async fn check_closed(&mut self, key: &Key, now_on: Option<i64>) {
        let grace = Duration::from_secs(self.cfg.verdict_grace_seconds);
        let Some(live) = self.live.get_mut(key) else {
            return;
        };
        if now_on == Some(key.2) {
            live.closed_since = None;
            return;
        }
        let superseded = now_on.is_some();
        let since = *live.closed_since.get_or_insert_with(Instant::now);
        if superseded || since.elapsed() >= grace {
            let unit = live.unit.clone();
            warn!(board = %key.0, hermes_kanban_task = %key.1, hermes_kanban_run_id = key.2, unit = %unit, superseded,
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

/// `.dispatcher.lock` held only by processes of worker scopes (a worker swapped in a file of
/// its own and holds it: workers outlive restarts, so it would keep every start out) is no
/// dispatcher's: said loudly, the file is replaced — as the tree's owner, by name, as any
/// Hermes process may — and the new one taken. `None`: a real dispatcher (or one we cannot
/// tell from a worker) holds it. `unheld`: a file held by nobody is replaced too (it cannot
/// be locked at all).
fn take_from_workers(path: &Path, owner: &Owner, slice: &str, unheld: bool) -> Option<FileLock> {
    let holders = crate::liveness::flock_holders(path);
    let workers = crate::liveness::unit_cgroup(slice, "");
    let in_worker_scope = |pid: u32| {
        crate::liveness::cgroup_of(pid)
            .ok()
            .flatten()
            .is_some_and(|cg| cg.starts_with(&workers))
    };
    if (holders.is_empty() && !unheld)
        || !holders.iter().all(|h| h.certain && in_worker_scope(h.pid))
    {
        return None;
    }
    for _ in 0..3 {
        if !holders.is_empty() {
            warn!(lock = %path.display(), holders = %crate::liveness::describe(&holders),
                  "the dispatcher lock is held by a worker's process, not a dispatcher: replacing the file");
        }
        if let Err(e) =
            crate::safe_fs::as_user(owner, || std::fs::remove_file(path)).and_then(|r| r)
        {
            warn!(lock = %path.display(), "cannot replace the dispatcher lock: {e}");
            return None;
        }
        if let Ok(Some(l)) = FileLock::acquire_or_held(path, owner) {
            return Some(l);
        }
    }
    None
}

/// Whether opening the lock at `path` failed because of the file itself — the owner may not
/// open it, or it is no regular file — rather than the file system (full, read-only, gone).
fn unlockable(path: &Path, e: &std::io::Error) -> bool {
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return false;
    };
    e.kind() == std::io::ErrorKind::PermissionDenied || !m.file_type().is_file()
}

/// Why the daemon cannot start while `.dispatcher.lock` is held, by whom, and what to do.
pub fn lock_taken(path: &std::path::Path) -> String {
    let holders = crate::liveness::flock_holders(path);
    let who = if holders.is_empty() {
        "a process we cannot see".to_string()
    } else {
        crate::liveness::describe(&holders)
    };
    format!(
        "another dispatcher holds {}: {who} — a Hermes gateway that dispatches kanban itself \
         (kanban.dispatch_in_gateway, on by default) or another hermes-mgr dispatcher; one dispatcher per \
         Hermes root. To switch to hermes-dispatcher: stop that gateway, start hermes-dispatcher, then start \
         the gateway again — it finds the lock held, does not dispatch, and keeps delivering kanban \
         notifications",
        path.display()
    )
}

/// The soft `RLIMIT_NOFILE` up to the hard one (systemd gives services 1024 soft, 524288
/// hard): a thousand live workers must not run the dispatcher out of descriptors.
/// Which Hermes the workers run, said once at start (doctor says the same).
fn log_hermes_version(cfg: &crate::config::Config) {
    use crate::spawn::installed::{self, Contract};
    let Ok(bin) = crate::spawn::resolve_binary(&cfg.hermes_bin) else {
        return;
    };
    match installed::of_binary(&bin) {
        Some(h) if h.contract() == Contract::Proven => {
            info!(hermes_version = %h.version, hermes_package = %h.package, "workers run {h}")
        }
        Some(h) => {
            warn!(hermes_version = %h.version, hermes_package = %h.package,
                  "workers run {h}, not one of the versions whose contract hermes-mgr proves ({}); they get the nearest older one's (README: Which Hermes)", installed::PROVEN.join(", "))
        }
        None => warn!(
            "cannot tell which Hermes {} runs: no Hermes package beside its interpreter",
            bin.display()
        ),
    }
}

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
fn unit_of(board: &str, task: &str, run: i64) -> String {
    names::worker_scope(board, task, run)
}
