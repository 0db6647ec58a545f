//! systemd's manager over D-Bus: the only module that knows zbus.
//!
//! zbus 6 (async; it has no blocking API any more) on the caller's Tokio runtime. The daemon
//! is an event loop over unit signals anyway, and the CLI drives the same calls from a
//! current-thread runtime, so one async API serves both.
//!
//! Signals are read by one task per connection (`pump`), never at the caller's await
//! points. zbus's socket reader waits when any signal stream's queue is full, and while it
//! waits it reads no method reply either: a dispatcher busy starting workers (not polling
//! its `UnitRemoved` stream) while dozens of scopes came and went waited for ever on a
//! `StartTransientUnit` reply (found by the throughput benchmark). Every method call also
//! has a timeout, so no await on the bus is unbounded.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use zbus::proxy::CacheProperties;
use zbus::{Connection, OwnedObjectPath, Variant};

/// No reply to a method call within this long: systemd answers in milliseconds, or is
/// stuck. Below the dispatcher's `WatchdogSec` (30 s), so a stuck bus is reported, not
/// mistaken for a hung daemon.
const METHOD_TIMEOUT: Duration = Duration::from_secs(10);

/// Results of jobs nobody has asked about yet (another client's, or ours before its
/// reply was read). Bounded: a job's result is claimed within a few messages of its reply.
const FINISHED_JOBS_KEPT: usize = 4096;

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
pub trait Manager {
    fn subscribe(&self) -> zbus::Result<()>;

    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: Vec<(&str, Variant<'_>)>,
        aux: Vec<(&str, Vec<(&str, Variant<'_>)>)>,
    ) -> zbus::Result<OwnedObjectPath>;

    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

    fn kill_unit(&self, name: &str, whom: &str, signal: i32) -> zbus::Result<()>;

    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;

    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;

    #[allow(clippy::type_complexity)]
    fn list_units_by_patterns(
        &self,
        states: Vec<&str>,
        patterns: Vec<&str>,
    ) -> zbus::Result<
        Vec<(
            String,
            String,
            String,
            String,
            String,
            String,
            OwnedObjectPath,
            u32,
            String,
            OwnedObjectPath,
        )>,
    >;

    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: OwnedObjectPath,
        unit: String,
        result: String,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    fn unit_removed(&self, unit: String, path: OwnedObjectPath) -> zbus::Result<()>;

    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
pub trait Unit {
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn sub_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn description(&self) -> zbus::Result<String>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1"
)]
pub trait Service {
    #[zbus(property)]
    fn status_text(&self) -> zbus::Result<String>;
}

/// What went wrong talking to systemd, by the D-Bus error names that change what the
/// caller should do.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("{op} {unit}: no such unit")]
    NoSuchUnit { op: &'static str, unit: String },
    #[error("{op} {unit}: a unit of that name already exists")]
    UnitExists { op: &'static str, unit: String },
    #[error("{op} {unit}: access denied by systemd ({msg}); run as root or grant org.freedesktop.systemd1.manage-units")]
    AccessDenied {
        op: &'static str,
        unit: String,
        msg: String,
    },
    #[error("{op} {unit}: systemd rejected property: {msg}")]
    PropertyRejected {
        op: &'static str,
        unit: String,
        msg: String,
    },
    #[error("{op} {unit}: job finished with result {result:?}")]
    JobFailed {
        op: &'static str,
        unit: String,
        result: String,
    },
    #[error("{op} {unit}: no answer from systemd within {timeout:?}")]
    Timeout {
        op: &'static str,
        unit: String,
        timeout: Duration,
    },
    #[error("cannot reach systemd on the system bus: {0}; is systemd PID 1 and dbus running?")]
    Unreachable(zbus::Error),
    #[error("{op} {unit}: {name}: {msg}")]
    Other {
        op: &'static str,
        unit: String,
        name: String,
        msg: String,
    },
}

impl SystemdError {
    fn from_zbus(op: &'static str, unit: &str, e: zbus::Error) -> SystemdError {
        use zbus::DBusError;
        let unit = unit.to_string();
        // zbus reports the error names org.freedesktop.DBus defines as `FDO` and all others
        // as `MethodError`: take the name and the message from either.
        let (name, msg) = match &e {
            zbus::Error::MethodError(name, detail, _) => (
                name.as_str().to_string(),
                detail.clone().unwrap_or_default(),
            ),
            zbus::Error::FDO(fe) => (
                fe.name().as_str().to_string(),
                fe.description().unwrap_or_default().to_string(),
            ),
            zbus::Error::InputOutput(_) | zbus::Error::Address(_) | zbus::Error::Handshake(_) => {
                return SystemdError::Unreachable(e);
            }
            other => {
                return SystemdError::Other {
                    op,
                    unit,
                    name: "zbus".into(),
                    msg: other.to_string(),
                }
            }
        };
        match name.as_str() {
            "org.freedesktop.systemd1.NoSuchUnit" => SystemdError::NoSuchUnit { op, unit },
            "org.freedesktop.systemd1.UnitExists" => SystemdError::UnitExists { op, unit },
            "org.freedesktop.DBus.Error.AccessDenied"
            | "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired" => {
                SystemdError::AccessDenied { op, unit, msg }
            }
            "org.freedesktop.DBus.Error.PropertyReadOnly"
            | "org.freedesktop.DBus.Error.UnknownProperty" => {
                SystemdError::PropertyRejected { op, unit, msg }
            }
            // 252 reports a name in use this way ("Unit X was already loaded or has a
            // fragment file") rather than with UnitExists.
            "org.freedesktop.DBus.Error.InvalidArgs"
                if msg.contains("already loaded") || msg.contains("already exists") =>
            {
                SystemdError::UnitExists { op, unit }
            }
            _ => SystemdError::Other {
                op,
                unit,
                name,
                msg,
            },
        }
    }
}

pub type Result<T, E = SystemdError> = std::result::Result<T, E>;

/// A command `run_command` runs as a transient service.
#[derive(Debug, Clone)]
pub struct Command {
    /// The program (absolute) and its arguments; never a shell.
    pub argv: Vec<String>,
    pub user: String,
    /// `NAME=value`: what is no secret, as the unit's `Environment=` (which any local user
    /// may read with `systemctl show`, and which systemd writes to a 0644 file).
    pub env: Vec<String>,
    /// An `EnvironmentFile=` for the rest: read by PID 1, as root, when it starts the unit;
    /// only its path is a property.
    pub env_file: Option<std::path::PathBuf>,
    pub slice: String,
    pub description: String,
    /// `RuntimeMaxSec=`: systemd stops it after this long.
    pub runtime_max: Duration,
}

/// A property of a transient unit, as sent on the bus (`(sv)`).
pub type Property = (&'static str, Variant<'static>);

/// A run's scope in systemd's terms (design §3.2): everything but its process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeSpec {
    pub description: String,
    pub slice: String,
    /// `TimeoutStopSec=`, in µs.
    pub stop_timeout_us: u64,
    /// `RuntimeMaxSec=`, in µs.
    pub runtime_max_us: Option<u64>,
    pub memory_max: Option<u64>,
    pub tasks_max: Option<u64>,
    /// `CPUQuota=N%` as systemd takes it: N × 10,000 µs per second.
    pub cpu_quota_per_sec_us: Option<u64>,
}

impl ScopeSpec {
    /// Its properties, in layers as systemd-run builds them.
    pub fn properties(&self) -> Vec<Property> {
        let mut p: Vec<Property> = vec![
            ("Description", Variant::from(self.description.clone())),
            ("Slice", Variant::from(self.slice.clone())),
            (
                "CollectMode",
                Variant::from("inactive-or-failed".to_string()),
            ),
            // On a scope only control-group delivers SIGTERM to the processes: `mixed` means
            // an immediate SIGKILL and `process` kills nothing (systemd.scope(5), scope.c).
            ("KillMode", Variant::from("control-group".to_string())),
            ("KillSignal", Variant::from(libc::SIGTERM)),
            ("SendSIGKILL", Variant::from(true)),
            // What the run cost is kept with it (`record::Usage`): the kernel counts memory
            // and IO only for a cgroup whose controllers are on, and systemd turns them on
            // per unit.
            ("MemoryAccounting", Variant::from(true)),
            ("IOAccounting", Variant::from(true)),
            ("TasksAccounting", Variant::from(true)),
            ("TimeoutStopUSec", Variant::from(self.stop_timeout_us)),
        ];
        if let Some(rt) = self.runtime_max_us {
            p.push(("RuntimeMaxUSec", Variant::from(rt)));
        }
        if let Some(m) = self.memory_max {
            p.push(("MemoryMax", Variant::from(m)));
        }
        if let Some(t) = self.tasks_max {
            p.push(("TasksMax", Variant::from(t)));
        }
        if let Some(q) = self.cpu_quota_per_sec_us {
            p.push(("CPUAccounting", Variant::from(true)));
            p.push(("CPUQuotaPerSecUSec", Variant::from(q)));
        }
        p
    }
}

/// What this connection's systemd turned out to take (`Systemd::start_scope`): 0 = not
/// probed, 1 = it takes it, 2 = it does not.
#[derive(Default)]
struct Takes {
    /// `PIDFDs` (v255 on).
    pidfds: AtomicU8,
    /// `OOMPolicy` on scopes (v253 on).
    oom_policy: AtomicU8,
}

fn pidfd_open(pid: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// A connection to PID 1's manager on the system bus.
#[derive(Clone)]
pub struct Systemd {
    conn: Connection,
    manager: ManagerProxy<'static>,
    signals: Arc<Signals>,
    takes: Arc<Takes>,
}

/// What the signal pump learnt, shared with the callers waiting for it.
#[derive(Default)]
struct SignalState {
    /// Job path → result, of jobs removed before anyone asked.
    finished: HashMap<String, String>,
    finished_order: VecDeque<String>,
    /// Job path → the caller waiting for that job's end.
    waiting: HashMap<String, oneshot::Sender<String>>,
    /// Subscribers to `UnitRemoved` (the daemon's loop, a stop waiting for a unit to go).
    removed: Vec<mpsc::UnboundedSender<String>>,
    /// The connection is gone: no signal will come any more.
    closed: bool,
}

struct Signals {
    state: Arc<Mutex<SignalState>>,
    pump: tokio::task::JoinHandle<()>,
}

impl Drop for Signals {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

fn lock(state: &Mutex<SignalState>) -> std::sync::MutexGuard<'_, SignalState> {
    // The state stays consistent at every step, so a panic elsewhere does not spoil it.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Read `JobRemoved` and `UnitRemoved` for the connection's life and hand them on; when
/// the connection ends, wake every waiter with "closed".
async fn pump(
    mut jobs: JobRemovedStream,
    mut units: UnitRemovedStream,
    state: Arc<Mutex<SignalState>>,
) {
    loop {
        tokio::select! {
            sig = jobs.next() => {
                let Some(sig) = sig else { break };
                let Ok(args) = sig.args() else { continue };
                let job = args.job.as_str().to_string();
                let mut st = lock(&state);
                match st.waiting.remove(&job) {
                    Some(tx) => {
                        let _ = tx.send(args.result);
                    }
                    None => {
                        st.finished.insert(job.clone(), args.result);
                        st.finished_order.push_back(job);
                        while st.finished_order.len() > FINISHED_JOBS_KEPT {
                            if let Some(old) = st.finished_order.pop_front() {
                                st.finished.remove(&old);
                            }
                        }
                    }
                }
            }
            sig = units.next() => {
                let Some(sig) = sig else { break };
                let Ok(args) = sig.args() else { continue };
                lock(&state).removed.retain(|tx| tx.send(args.unit.clone()).is_ok());
            }
        }
    }
    let mut st = lock(&state);
    st.closed = true;
    st.waiting.clear();
    st.removed.clear();
}

impl Systemd {
    /// Connect to the system bus and `Subscribe()`, without which systemd emits most unit
    /// signals to nobody. The signal matches are in place before this returns, so no job
    /// started afterwards can end unseen.
    pub async fn connect() -> Result<Systemd> {
        let conn = zbus::connection::Builder::system()
            .method_timeout(METHOD_TIMEOUT)
            .max_queued(NonZeroUsize::new(1024).unwrap_or(NonZeroUsize::MIN))
            .build()
            .await
            .map_err(SystemdError::Unreachable)?;
        let manager = ManagerProxy::builder(&conn)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(SystemdError::Unreachable)?;
        let jobs = manager
            .receive_job_removed()
            .await
            .map_err(|e| SystemdError::from_zbus("JobRemoved", "", e))?;
        let units = manager
            .receive_unit_removed()
            .await
            .map_err(|e| SystemdError::from_zbus("UnitRemoved", "", e))?;
        manager
            .subscribe()
            .await
            .map_err(|e| SystemdError::from_zbus("Subscribe", "", e))?;
        let state = Arc::new(Mutex::new(SignalState::default()));
        let pump = tokio::spawn(pump(jobs, units, state.clone()));
        Ok(Systemd {
            conn,
            manager,
            signals: Arc::new(Signals { state, pump }),
            takes: Arc::default(),
        })
    }

    /// Create the scope `unit` of `spec` around `pid`: `PIDFDs` (immune to PID reuse) where
    /// systemd accepts it, `PIDs` otherwise, remembering which for this connection; the
    /// retry is what systemd-run does (#29547). The same for `OOMPolicy=stop`, which
    /// systemd takes on scopes since v253.
    ///
    /// `OOMPolicy=stop`, on purpose: `MemoryMax=` is the run's budget, and a run that hits it
    /// ends — whichever of its processes the kernel picked (the agent or one of its tools) —
    /// and is booked as an OOM kill (`outcome`), counted like a crash, so the breaker stops
    /// a task that always runs out of memory. It is also what systemd 252 (Debian 12) does
    /// with every scope and cannot be told otherwise (tests/vm: "Failed with result
    /// 'oom-kill'", then SIGTERM to the agent); saying it explicitly keeps newer systemds the
    /// same, whatever their `DefaultOOMPolicy=`. `continue` would leave an agent running
    /// whose tool was killed, with the memory still at the limit; `kill` would give the
    /// agent no SIGTERM.
    pub async fn start_scope(
        &self,
        unit: &str,
        spec: &ScopeSpec,
        pid: u32,
        timeout: Duration,
    ) -> Result<()> {
        let takes = &self.takes;
        loop {
            let mut all = spec.properties();
            let oom_policy = takes.oom_policy.load(Ordering::Relaxed) != 2;
            if oom_policy {
                all.push(("OOMPolicy", Variant::from("stop".to_string())));
            }
            let use_fd = takes.pidfds.load(Ordering::Relaxed) != 2;
            if use_fd {
                match pidfd_open(pid) {
                    Ok(fd) => all.push(("PIDFDs", Variant::from(vec![zbus::Fd::from(fd)]))),
                    Err(_) => {
                        takes.pidfds.store(2, Ordering::Relaxed);
                        continue;
                    }
                }
            } else {
                all.push(("PIDs", Variant::from(vec![pid])));
            }
            // A systemd too old for a property names it in its refusal (`PropertyRejected`
            // is the bus's UnknownProperty/PropertyReadOnly).
            match self.start_transient(unit, all, timeout).await {
                Err(SystemdError::PropertyRejected { ref msg, .. })
                    if use_fd && msg.contains("PIDFDs") =>
                {
                    takes.pidfds.store(2, Ordering::Relaxed);
                }
                Err(SystemdError::PropertyRejected { ref msg, .. })
                    if oom_policy && msg.contains("OOMPolicy") =>
                {
                    takes.oom_policy.store(2, Ordering::Relaxed);
                }
                Ok(()) => {
                    if use_fd {
                        takes.pidfds.store(1, Ordering::Relaxed);
                    }
                    if oom_policy {
                        takes.oom_policy.store(1, Ordering::Relaxed);
                    }
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Unit names as systemd removes them, from now on; ends when the connection does.
    fn subscribe_removed(&self) -> mpsc::UnboundedReceiver<String> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut st = lock(&self.signals.state);
        if !st.closed {
            st.removed.push(tx);
        }
        rx
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub async fn version(&self) -> Result<String> {
        self.manager
            .version()
            .await
            .map_err(|e| SystemdError::from_zbus("Version", "", e))
    }

    /// Run a method that queues a job, and wait for that job's `JobRemoved`; returns its
    /// result (`done`, `failed`, `canceled`, …). The pump has watched since `connect`,
    /// because the job can finish before the reply is read (crun and systemd-run also
    /// subscribe first).
    async fn run_job<F>(
        &self,
        op: &'static str,
        name: &str,
        call: F,
        timeout: Duration,
    ) -> Result<String>
    where
        F: std::future::Future<Output = zbus::Result<OwnedObjectPath>>,
    {
        let job = call
            .await
            .map_err(|e| SystemdError::from_zbus(op, name, e))?;
        let job = job.as_str().to_string();
        let ended = {
            let mut st = lock(&self.signals.state);
            if let Some(result) = st.finished.remove(&job) {
                return Ok(result);
            }
            let (tx, rx) = oneshot::channel();
            if !st.closed {
                st.waiting.insert(job.clone(), tx);
            }
            rx
        };
        match tokio::time::timeout(timeout, ended).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(_)) => Err(SystemdError::Unreachable(zbus::Error::Failure(
                "the bus connection ended while waiting for the job".into(),
            ))),
            Err(_) => {
                lock(&self.signals.state).waiting.remove(&job);
                Err(SystemdError::Timeout {
                    op,
                    unit: name.into(),
                    timeout,
                })
            }
        }
    }

    /// `StartTransientUnit(name, "fail", props)` and wait for its job: the reply only means
    /// "queued", and a scope's PIDs move when the job runs.
    pub async fn start_transient(
        &self,
        name: &str,
        props: Vec<Property>,
        timeout: Duration,
    ) -> Result<()> {
        let op = "StartTransientUnit";
        let call = self
            .manager
            .start_transient_unit(name, "fail", props, Vec::new());
        match self.run_job(op, name, call, timeout).await? {
            r if r == "done" => Ok(()),
            result => Err(SystemdError::JobFailed {
                op,
                unit: name.into(),
                result,
            }),
        }
    }

    /// A one-shot command as a transient service: systemd forks, drops to `c.user` (no
    /// capabilities, `no_new_privs`), execs `c.argv` with exactly `c.env`, logs its output
    /// to the journal, and forgets the unit when it ends (`UnitRemoved`). Returns once it
    /// was started.
    pub async fn run_command(&self, name: &str, c: &Command, timeout: Duration) -> Result<()> {
        let exec: Vec<(String, Vec<String>, bool)> =
            vec![(c.argv[0].clone(), c.argv.to_vec(), false)];
        let mut props: Vec<Property> = vec![
            ("Description", Variant::from(c.description.clone())),
            ("Slice", Variant::from(c.slice.clone())),
            ("ExecStart", Variant::from(exec)),
            ("User", Variant::from(c.user.clone())),
            ("Environment", Variant::from(c.env.clone())),
            ("WorkingDirectory", Variant::from("/".to_string())),
            ("NoNewPrivileges", Variant::from(true)),
            ("CapabilityBoundingSet", Variant::from(0u64)),
            ("RemainAfterExit", Variant::from(false)),
            (
                "CollectMode",
                Variant::from("inactive-or-failed".to_string()),
            ),
            (
                "RuntimeMaxUSec",
                Variant::from(c.runtime_max.as_micros() as u64),
            ),
        ];
        if let Some(f) = &c.env_file {
            let files: Vec<(String, bool)> = vec![(f.to_string_lossy().into_owned(), false)];
            props.push(("EnvironmentFiles", Variant::from(files)));
        }
        self.start_transient(name, props, timeout).await
    }

    /// `StopUnit(name, "replace")`, returning once the stop job has finished (for a scope:
    /// every process is gone, or SIGKILL was sent and `TimeoutStopSec` ran out again).
    pub async fn stop_and_wait(&self, name: &str, timeout: Duration) -> Result<String> {
        self.run_job(
            "StopUnit",
            name,
            self.manager.stop_unit(name, "replace"),
            timeout,
        )
        .await
    }

    /// Queue `StopUnit(name, "replace")` without waiting for it.
    pub async fn stop(&self, name: &str) -> Result<()> {
        match self.manager.stop_unit(name, "replace").await {
            Ok(_) => Ok(()),
            Err(e) => match SystemdError::from_zbus("StopUnit", name, e) {
                SystemdError::NoSuchUnit { .. } => Ok(()),
                other => Err(other),
            },
        }
    }

    /// Names of units as systemd removes them; the stream ends when the bus connection does.
    pub fn unit_removed_stream(
        &self,
    ) -> std::pin::Pin<Box<dyn futures_util::Stream<Item = String> + Send>> {
        let rx = self.subscribe_removed();
        Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|unit| (unit, rx))
        }))
    }

    pub async fn kill(&self, name: &str, signal: i32) -> Result<()> {
        self.manager
            .kill_unit(name, "all", signal)
            .await
            .map_err(|e| SystemdError::from_zbus("KillUnit", name, e))
    }

    /// `KillUnit(name, "all", signal)`, then wait until systemd has removed the unit (every
    /// process gone; worker scopes are collected when inactive). `true` when it went within
    /// `timeout` (or was gone already), `false` when it is still there.
    pub async fn kill_and_wait_gone(
        &self,
        name: &str,
        signal: i32,
        timeout: Duration,
    ) -> Result<bool> {
        // Watch before acting: the removal can come before the kill call returns.
        let mut removed = self.subscribe_removed();
        match self.kill(name, signal).await {
            Err(SystemdError::NoSuchUnit { .. }) => return Ok(true),
            other => other?,
        }
        if self.active_state(name).await?.is_none() {
            return Ok(true);
        }
        let wait = async {
            while let Some(unit) = removed.recv().await {
                if unit == name {
                    return true;
                }
            }
            false
        };
        Ok(tokio::time::timeout(timeout, wait).await.unwrap_or(false)
            || self.active_state(name).await?.is_none())
    }

    pub async fn reset_failed(&self, name: &str) -> Result<()> {
        self.manager
            .reset_failed_unit(name)
            .await
            .map_err(|e| SystemdError::from_zbus("ResetFailedUnit", name, e))
    }

    /// The object path of a loaded unit; `None` when systemd has no such unit.
    async fn unit_path(&self, name: &str) -> Result<Option<OwnedObjectPath>> {
        match self.manager.get_unit(name).await {
            Ok(p) => Ok(Some(p)),
            Err(e) => match SystemdError::from_zbus("GetUnit", name, e) {
                SystemdError::NoSuchUnit { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    /// `ActiveState` of a loaded unit; `None` when systemd has no such unit (never
    /// started, or collected after it ended).
    pub async fn active_state(&self, name: &str) -> Result<Option<String>> {
        let Some(path) = self.unit_path(name).await? else {
            return Ok(None);
        };
        let unit = UnitProxy::builder(&self.conn)
            .cache_properties(CacheProperties::No)
            .path(path)
            .build()
            .await
            .map_err(|e| SystemdError::from_zbus("GetUnit", name, e))?;
        match unit.active_state().await {
            Ok(s) => Ok(Some(s)),
            Err(e) => match SystemdError::from_zbus("ActiveState", name, e) {
                SystemdError::NoSuchUnit { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    /// A loaded service's `StatusText` (what it last said with `STATUS=`); `None` when
    /// systemd has no such unit.
    pub async fn status_text(&self, name: &str) -> Result<Option<String>> {
        let Some(path) = self.unit_path(name).await? else {
            return Ok(None);
        };
        let service = ServiceProxy::builder(&self.conn)
            .cache_properties(CacheProperties::No)
            .path(path)
            .build()
            .await
            .map_err(|e| SystemdError::from_zbus("GetUnit", name, e))?;
        service
            .status_text()
            .await
            .map(Some)
            .map_err(|e| SystemdError::from_zbus("StatusText", name, e))
    }

    /// Names of loaded units matching `pattern` (e.g. `names::WORKER_SCOPE_GLOB`).
    pub async fn list_units(&self, pattern: &str) -> Result<Vec<(String, String)>> {
        let units = self
            .manager
            .list_units_by_patterns(Vec::new(), vec![pattern])
            .await
            .map_err(|e| SystemdError::from_zbus("ListUnitsByPatterns", pattern, e))?;
        Ok(units.into_iter().map(|u| (u.0, u.3)).collect())
    }
}
