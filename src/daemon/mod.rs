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
mod book;
mod checks;
mod decompose;
mod live;
mod metrics;
mod notify;
mod passes;
mod pools;
mod reconcile;
mod startup;
mod watch;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

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
    /// Its Hermes profile, for the metrics.
    profile: String,
    /// When this daemon started it: its supervisor and its scope's cgroup.
    spawned: Option<Spawned>,
    /// Its booking failed once for want of space on the board's filesystem: a worker that
    /// failed then most likely failed to write its own verdict (`outcome::Facts::board_full`).
    board_full: bool,
}

impl Live {
    /// Its scope's cgroup: as read back at its start, or looked for where a worker scope
    /// may be (an adopted run).
    fn cgroup(&self, cfg: &Config) -> String {
        match &self.spawned {
            Some(s) => s.cgroup.clone(),
            None => cfg.worker_cgroup(Some(&self.profile), &self.unit),
        }
    }
}

/// A run this daemon started, as the kernel knows it.
#[derive(Debug, Clone)]
struct Spawned {
    /// Its supervisor's PID (our child, reaped on SIGCHLD).
    supervisor: u32,
    /// Its scope's cgroup (`/a.slice/b.scope`), as read back from the kernel at the start.
    cgroup: String,
}

/// A run the daemon watches. Task and run ids are only unique within a board; ordered by
/// board, task, run, so that a task's runs are one range (`runs_of`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct RunKey {
    board: String,
    task: String,
    run: i64,
}

impl RunKey {
    fn new(board: &str, task: &str, run: i64) -> RunKey {
        RunKey {
            board: board.to_string(),
            task: task.to_string(),
            run,
        }
    }
}

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
    pending: BTreeMap<RunKey, Option<RunEnd>>,
    notifier: notify::Notifier,
    /// When the status line last went out, and whether a newer one is owed.
    status: notify::StatusLine,
    /// Supervisors that are our children, by PID: reaped on SIGCHLD.
    supervisors: HashMap<u32, RunKey>,
    /// When the earliest worker whose run was closed on the board runs out of grace.
    grace_due: Option<Instant>,
    /// The first reconcile (start-up, the one `READY=1` waits for) is always logged.
    reconciled_once: bool,
    /// Triage decompositions running and waiting for a retry (`decompose.rs`).
    decomp: decompose::Decompositions,
    /// The TMPDIR of each worker scope we started or adopted, by unit: its supervisor
    /// removes it, unless killed first (a stop's SIGKILL); then we do, once the scope is gone.
    tmpdirs: HashMap<String, book::RunTmpdir>,
    /// Booked runs whose scope systemd has not removed yet, by (board, task): the scope's
    /// name. Their task's next run waits for that (`UnitRemoved`, or a reconcile that no
    /// longer finds it live): never two scopes for one task.
    ending: BTreeMap<(String, String), String>,
    /// The last exit record `forget_ended_records` looked up: the next reconcile goes on
    /// after it, so however many there are, each is looked at within a few reconciles.
    records_after: String,
    /// When a booking last could not ask systemd a unit's state (the bus gone, a call timed
    /// out); `None` once one could.
    bus_failed: Option<Instant>,
    /// Where Hermes' emergency stop is looked for (its home, the root served), and the
    /// `ESTOP` seen there at the last look: while there is one, no pass runs.
    estop_dirs: Vec<PathBuf>,
    estop: Option<PathBuf>,
    /// How many listed boards `max_boards` leaves unserved.
    boards_over: usize,
    /// The operators' holds (`hermes-mgr pause`), as last read.
    holds: crate::holds::View,
    /// The metrics, and where they go (`metrics.rs`).
    exposition: metrics::Exposition,
    /// Admission by pressure holds new workers: why, and when the boards are looked at again.
    pressure: Option<(String, Instant)>,
    /// The capacity pools: their limits as set, what waits for them (`pools.rs`).
    pools: pools::Pools,
}

/// Exit with a clear message: the daemon cannot work at all. Said once: as a structured
/// journal entry when the logs go there (the caller's stderr is the same journal), else by
/// the caller on stderr.
fn fatal(e: anyhow::Error) -> anyhow::Error {
    if crate::logging::to_journal() {
        error!("{e:#}");
    }
    e
}

pub fn main(opts: Options) -> anyhow::Result<()> {
    crate::logging::init("hermes-dispatcher");
    startup::raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    rt.block_on(startup::run(opts)).map_err(fatal)
}

type Removals = std::pin::Pin<Box<dyn futures_util::Stream<Item = String> + Send>>;

/// What the daemon's inotify watches follow besides the runs directory: the served boards,
/// the Hermes root (unless one board is pinned), the directories of Hermes' `config.yaml`
/// and of its emergency stop.
struct Follow {
    root: Option<PathBuf>,
    config_dirs: Vec<PathBuf>,
    estop_dirs: Vec<PathBuf>,
    holds_file: PathBuf,
    owner: Owner,
}

impl Follow {
    fn apply(&self, d: &Daemon, w: &mut watch::Watcher) {
        let paths: Vec<_> = d.slots.values().map(|s| s.paths.clone()).collect();
        // A directory of `boards/` that is no board yet is watched only while the cap leaves
        // room for it to become one served.
        let room = d.cfg.max_boards.saturating_sub(paths.len());
        w.set_boards(
            &paths,
            &watch::Around {
                root: self.root.as_deref(),
                configs: &self.config_dirs,
                estops: &self.estop_dirs,
                holds: &self.holds_file,
                candidates: room,
                owner: Some(&self.owner),
            },
        );
    }
}

/// A timer of `secs` (at least 1 s), its first tick one period away: the start-up reconcile
/// and pass just ran.
/// What woke the loop (`serve`).
enum Wake {
    Watchdog,
    Hup,
    Changes(std::io::Result<Vec<watch::Change>>),
    Removed(Option<String>),
    Child,
    Grace,
    Decompose,
    Status,
    Extend,
    Retry,
    Tick,
    Gather,
    Pass,
    Due,
}

fn every(secs: u64) -> tokio::time::Interval {
    let p = Duration::from_secs(secs.max(1));
    let mut t = tokio::time::interval_at(tokio::time::Instant::now() + p, p);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

fn extend_every(cfg: &Config) -> u64 {
    (cfg.claim_ttl_seconds as u64 / 3).clamp(1, 300)
}

impl Daemon {
    /// The loop, until SIGTERM or SIGINT.
    async fn serve(
        &mut self,
        mut watcher: watch::Watcher,
        mut removed: Removals,
        follow: &Follow,
    ) -> anyhow::Result<()> {
        let d = self;
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sighup = signal(SignalKind::hangup())?;
        let mut sigchld = signal(SignalKind::child())?;
        let wd = notify::watchdog_interval();
        // Half of WatchdogSec (watchdog_interval halves it): fed by the loop, and within it
        // only by work that is bounded and progressing (each board's pass), so a loop that
        // stops turning gets the daemon restarted. Upstream's code is never waited on here:
        // it runs in each run's scope (`spawn::upstream`).
        let mut watchdog = tokio::time::interval(wd.unwrap_or(Duration::from_secs(3600)));
        let mut tick = every(d.cfg.tick_seconds);
        let mut extend = every(extend_every(&d.cfg));
        let mut retry = every(1);
        let mut gather = every(d.cfg.metrics_interval_seconds);
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
            // The watchdog and the signals that end the daemon first; then whatever else is
            // ready, chosen fairly (tokio's random order): under a load that keeps one source
            // always ready (inotify at ~150 ended runs a second), a fixed order starved the
            // sources after it — SIGCHLD (supervisors left as zombies), the timers (no
            // reconcile, no retried bookings) — found by the soak. Only when nothing else
            // is ready, a pass.
            let (grace_due, decomp_due) = (d.grace_due, d.decomp.next_retry());
            let status_due = d.status.due();
            let pending = !d.pending.is_empty();
            let at = |t: Option<Instant>| {
                tokio::time::sleep_until(tokio::time::Instant::from_std(
                    t.unwrap_or_else(Instant::now),
                ))
            };
            let woke = tokio::select! {
                biased;
                _ = watchdog.tick(), if wd.is_some() => Wake::Watchdog,
                _ = sigterm.recv() => return Ok(()),
                _ = sigint.recv() => return Ok(()),
                w = async {
                    tokio::select! {
                        _ = sighup.recv() => Wake::Hup,
                        changes = watcher.next() => Wake::Changes(changes),
                        sig = removed.next() => Wake::Removed(sig),
                        _ = sigchld.recv() => Wake::Child,
                        _ = at(grace_due), if grace_due.is_some() => Wake::Grace,
                        _ = at(decomp_due), if decomp_due.is_some() => Wake::Decompose,
                        _ = at(status_due), if status_due.is_some() => Wake::Status,
                        _ = extend.tick() => Wake::Extend,
                        _ = retry.tick(), if pending => Wake::Retry,
                        _ = tick.tick() => Wake::Tick,
                        _ = gather.tick() => Wake::Gather,
                    }
                } => w,
                // Nothing else is ready: a dirty board's pass (also one cut short by its
                // batch size, or whose backoff ran out).
                _ = async {}, if due_now => Wake::Pass,
                _ = at(wake), if wake.is_some() && !due_now => Wake::Due,
            };
            match woke {
                Wake::Watchdog => d.notifier.send("WATCHDOG=1"),
                Wake::Hup => {
                    let (old_tick, old_extend) = (d.cfg.tick_seconds, extend_every(&d.cfg));
                    let old_gather = d.cfg.metrics_interval_seconds;
                    d.reload();
                    // Timers whose period changed start over with the new one.
                    if d.cfg.tick_seconds != old_tick {
                        tick = every(d.cfg.tick_seconds);
                    }
                    if d.cfg.metrics_interval_seconds != old_gather {
                        gather = every(d.cfg.metrics_interval_seconds);
                    }
                    if extend_every(&d.cfg) != old_extend {
                        extend = every(extend_every(&d.cfg));
                    }
                    d.mark_all_dirty();
                }
                Wake::Changes(Ok(changes)) => {
                    if d.on_changes(changes).await {
                        follow.apply(d, &mut watcher);
                        // What changed between the scan and the new watches (a board's
                        // files written just after its directory) is seen now.
                        if d.refresh_boards() {
                            follow.apply(d, &mut watcher);
                        }
                    }
                }
                Wake::Changes(Err(e)) => warn!("inotify: {e}, ignoring"),
                Wake::Removed(Some(unit)) => d.on_unit_removed(&unit).await,
                Wake::Removed(None) => removed = d.on_bus_lost().await,
                Wake::Child => d.reap().await,
                Wake::Grace => d.check_closed_runs().await,
                Wake::Decompose => d.decompositions_due(),
                Wake::Status => d.update_status(),
                Wake::Extend => d.extend_claims(),
                Wake::Retry => d.retry_pending().await,
                Wake::Tick => d.on_tick(follow, &mut watcher).await,
                Wake::Gather => d.publish_metrics(),
                Wake::Pass => {
                    d.pass().await;
                    last_pass = Instant::now();
                }
                Wake::Due => {}
            }
        }
    }

    /// The bus connection ended (its `UnitRemoved` stream did): reconnect, re-subscribe,
    /// reconcile.
    async fn on_bus_lost(&mut self) -> Removals {
        warn!("lost the system bus; reconnecting");
        let (sd, removed) = startup::connect_systemd(&self.notifier).await;
        self.sd = sd;
        self.reconciled_once = false;
        if let Err(e) = self.reconcile().await {
            warn!("reconcile after reconnect: {e:#}");
        }
        self.check_decompositions().await;
        self.mark_all_dirty();
        removed
    }

    /// The safety net: whatever no event reported (e.g. a claim left behind, a board whose
    /// quarantine ran out).
    async fn on_tick(&mut self, follow: &Follow, watcher: &mut watch::Watcher) {
        if self.look_again().await {
            follow.apply(self, watcher);
        }
    }

    /// Every board, run and hold looked at again, as if each event had come: the safety-net
    /// tick, and inotify's queue overflow (events lost). `true` when the set of boards
    /// changed (the watches follow).
    async fn look_again(&mut self) -> bool {
        let changed = self.refresh_boards();
        self.open_boards();
        if let Err(e) = self.reconcile().await {
            warn!("reconcile: {e:#}");
        }
        self.check_closed_runs().await;
        self.check_decompositions().await;
        self.check_stale().await;
        self.retry_pools();
        self.check_estop();
        self.holds.look();
        self.mark_all_dirty();
        self.update_status();
        changed
    }
}

impl Daemon {
    fn reload(&mut self) {
        match Config::load(self.opts.config.as_deref()) {
            Ok(cfg) => {
                if cfg.holds_file != self.cfg.holds_file {
                    self.holds = crate::holds::View::new(&cfg.holds_file);
                }
                for s in self.slots.values() {
                    if let Some(b) = &s.board {
                        b.set_busy_timeout(Duration::from_millis(cfg.busy_timeout_ms));
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
                self.metrics_reloaded();
            }
            Err(e) => warn!("configuration not reloaded, keeping the old one: {e:#}"),
        }
    }
    /// The profile a run of an assignee runs as (`names::profile_of`), for the metrics.
    fn profile_of(&self, assignee: Option<&str>) -> String {
        names::profile_of(assignee, self.cfg.default_assignee.as_deref())
    }
    fn mark_all_dirty(&mut self) {
        for s in self.slots.values_mut() {
            s.dirty = true;
        }
    }
    /// When the loop must come back for a pass with no event: now (a pass cut short by its
    /// batch), or when the earliest backoff runs out. `None`: only events bring it back.
    fn next_wake(&self) -> Option<Instant> {
        // While pressure (the host's, or a pool's) holds new workers, not before its next look.
        let held = self
            .pressure
            .as_ref()
            .map(|(_, at)| *at)
            .max(self.pools.look);
        self.slots
            .values()
            .filter(|s| s.listed && s.dirty)
            .map(|s| s.backoff.map_or_else(Instant::now, |(until, _)| until))
            .map(|w| held.map_or(w, |h| w.max(h)))
            .min()
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
                        .filter(|k| {
                            record_path(&self.cfg.state_dir, &k.board, &k.task, k.run) == path
                        })
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
                watch::Change::Holds => {
                    // A pause or resume: what a pass may start changed (a resume frees
                    // work; a pause is seen by every pass on its own).
                    self.holds.look();
                    self.mark_all_dirty();
                    self.update_status();
                }
                watch::Change::HermesConfig => {
                    // Hermes' kanban settings take effect without a restart, as upstream's
                    // auto_decompose toggle does.
                    self.reload();
                    self.mark_all_dirty();
                }
                watch::Change::Overflow => {
                    // Events were lost (a loop busier than the kernel's queue is long): what
                    // they would have said is looked up instead — every board, the runs
                    // that may have ended, the emergency stop, the holds, the settings.
                    warn!("inotify's queue overflowed: events were lost; looking at every board and run");
                    // Hermes' settings too: the tick does not read them (they are read
                    // when written), and their write may be among the lost events.
                    self.reload();
                    self.look_again().await;
                    // Even with no board gained or lost, a new directory may need a watch.
                    boards_changed = true;
                }
            }
        }
        boards_changed
    }
    fn runs_of<'a>(&'a self, slug: &str, task: &str) -> impl Iterator<Item = &'a RunKey> + 'a {
        let (lo, hi) = (
            RunKey::new(slug, task, i64::MIN),
            RunKey::new(slug, task, i64::MAX),
        );
        self.live.range(lo..=hi).map(|(k, _)| k)
    }
}

/// For `reconcile`: the unit a run of ours has.
fn unit_of(board: &str, task: &str, run: i64) -> String {
    names::worker_scope(board, task, run)
}
