//! Start-up: the configuration, the Hermes root's `.dispatcher.lock` (taken back from
//! workers that hold it), systemd, the boards and their watches, the first reconcile —
//! then the loop (`Daemon::serve`) until SIGTERM, and what is done on the way out.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use tracing::{info, warn};

use super::{boards, live, notify, watch, Daemon, Follow, Options, Removals};
use crate::board::lock::FileLock;
use crate::board::{BoardPaths, Owner, Resolver};
use crate::config::Config;
use crate::systemd::Systemd;

/// Connect, subscribe and watch `UnitRemoved`, retrying (and feeding the watchdog) until
/// systemd answers: a restarted dbus-daemon or systemd must not end the daemon.
pub(super) async fn connect_systemd(notifier: &notify::Notifier) -> (Systemd, Removals) {
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

pub(super) async fn run(opts: Options) -> anyhow::Result<()> {
    let cfg = Config::load(opts.config.as_deref())?;
    let resolver = Resolver::from_env(opts.db.clone(), opts.board.clone());
    let pinned = resolver.pinned();
    let first = resolver.resolve()?;
    let notifier = notify::Notifier::from_env();
    let owner = Owner::of_tree(&first.owner_dir)
        .with_context(|| format!("stat {}", first.owner_dir.display()))?;
    let _life = life_lock(&first, &owner, &cfg.slice)?;
    let (sd, removed) = connect_systemd(&notifier).await;
    let runs_dir = cfg.state_dir.join("runs");
    let mut watcher =
        watch::Watcher::new(&runs_dir).with_context(|| format!("watch {}", runs_dir.display()))?;
    let root = first.root.clone();
    let cfg_holds = cfg.holds_file.clone();
    // Made now, so it is watched from the start (the first `pause` writes into it).
    if let Some(dir) = cfg_holds.parent() {
        if let Err(e) = std::fs::create_dir_all(dir) {
            warn!(
                "cannot make {} for the operators' holds: {e}",
                dir.display()
            );
        }
    }
    let exposition = super::metrics::Exposition::start(&cfg).await;
    let mut d = Daemon {
        cfg,
        opts,
        resolver,
        slots: BTreeMap::new(),
        sd,
        live: live::LiveRuns::default(),
        pending: BTreeMap::new(),
        notifier,
        status: Default::default(),
        supervisors: HashMap::new(),
        grace_due: None,
        reconciled_once: false,
        decomp: Default::default(),
        tmpdirs: HashMap::new(),
        ending: BTreeMap::new(),
        records_after: String::new(),
        bus_failed: None,
        estop_dirs: Vec::new(),
        estop: None,
        boards_over: 0,
        holds: crate::holds::View::new(&cfg_holds),
        exposition,
        pressure: None,
        pools: Default::default(),
    };
    d.clear_env_files();
    d.refresh_boards();
    let hermes_files = crate::hermes_config::Files::from_env();
    d.estop_dirs = crate::hermes_config::estop_dirs(&root);
    d.check_estop();
    let follow = Follow {
        root: (!pinned).then(|| root.clone()),
        config_dirs: std::iter::once(&hermes_files.user)
            .chain(hermes_files.managed.as_ref())
            .filter_map(|f| f.parent().map(|p| p.to_path_buf()))
            .collect(),
        estop_dirs: d.estop_dirs.clone(),
        holds_file: d.cfg.holds_file.clone(),
        owner,
    };
    for w in &d.cfg.warnings {
        warn!("{w}");
    }
    follow.apply(&d, &mut watcher);
    if pinned {
        open_pinned(&mut d).await?;
    }
    // Fixed now, before any upgrade can replace it on disk (spawn::program).
    let supervisor = crate::spawn::program::supervisor();
    // Supervisors forked from one server of that program, not each started anew; without
    // it, each is started anew.
    let forks = match crate::spawn::program::serve_forks() {
        Ok(pid) => pid.to_string(),
        Err(e) => {
            warn!("cannot start the supervisor fork server ({e}); each supervisor is started anew");
            "none".into()
        }
    };
    info!(root = %root.display(), boards = d.slots.len(), pinned, supervisor = %supervisor.path.display(),
          fork_server = %forks, "hermes-dispatcher starting");
    log_hermes_version(&d.cfg);
    d.open_boards();
    d.reconcile().await?;
    // The metrics are there from the start (before READY=1: `systemctl start` returns then):
    // `hermes-mgr metrics`, `doctor` and a first scrape find them.
    d.publish_metrics();
    // Ready with a status line: `systemctl status` right after a start shows what runs,
    // whether or not a pass follows at once.
    d.notifier.send(&format!(
        "READY=1\nSTATUS={}",
        d.status_text().replace('\n', " ")
    ));
    d.serve(watcher, removed, &follow).await?;
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

/// One dispatcher per Hermes root, for life: the same lock Hermes' gateway takes.
fn life_lock(first: &BoardPaths, owner: &Owner, slice: &str) -> anyhow::Result<FileLock> {
    let life_path = first.dispatcher_lock();
    let life_dir = life_path.parent().unwrap_or(&first.root).to_path_buf();
    crate::safe_fs::as_user(owner, || std::fs::create_dir_all(&life_dir))
        .and_then(|r| r)
        .with_context(|| format!("create {}", life_dir.display()))?;
    let life = match FileLock::acquire_or_held(&life_path, owner) {
        Ok(Some(l)) => Some(l),
        Ok(None) => take_from_workers(&life_path, owner, slice, false),
        // A file no Hermes process can lock — one the tree's owner may not open (a worker
        // runs as the owner: it can chmod it), a symlink, a FIFO — is no one's lock.
        Err(e) if unlockable(&life_path, &e) => {
            warn!(lock = %life_path.display(), "the dispatcher lock cannot be taken ({e}); replacing the file");
            take_from_workers(&life_path, owner, slice, true)
        }
        Err(e) => return Err(e).with_context(|| format!("open {}", life_path.display())),
    };
    life.ok_or_else(|| anyhow::anyhow!("{}", lock_taken(&life_path)))
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
fn lock_taken(path: &std::path::Path) -> String {
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

/// The soft `RLIMIT_NOFILE` up to the hard one (systemd gives services 1024 soft, 524288
/// hard): a thousand live workers must not run the dispatcher out of descriptors.
pub(super) fn raise_nofile_limit() {
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
