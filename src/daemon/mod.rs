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
mod notify;
mod passes;
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
    /// Supervisors that are our children, by PID: reaped on SIGCHLD.
    supervisors: HashMap<u32, RunKey>,
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
            info!(board = %key.board, hermes_kanban_task = %key.task, hermes_kanban_run_id = key.run, unit = %live.unit, "stopping worker on exit");
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
    fn runs_of<'a>(&'a self, slug: &str, task: &str) -> impl Iterator<Item = &'a RunKey> + 'a {
        let (lo, hi) = (
            RunKey::new(slug, task, i64::MIN),
            RunKey::new(slug, task, i64::MAX),
        );
        self.live.range(lo..=hi).map(|(k, _)| k)
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
