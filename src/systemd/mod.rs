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

    fn set_unit_properties(
        &self,
        name: &str,
        runtime: bool,
        properties: Vec<(&str, Variant<'_>)>,
    ) -> zbus::Result<()>;

    /// Answered once the unit's cgroup is frozen (systemd ≥ 246, cgroup v2).
    fn freeze_unit(&self, name: &str) -> zbus::Result<()>;

    fn thaw_unit(&self, name: &str) -> zbus::Result<()>;

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
    #[zbus(property)]
    fn freezer_state(&self) -> zbus::Result<String>;
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

mod transient;
use transient::Takes;
pub use transient::{Command, Property, ScopeSpec, SliceLimits};

/// A loaded unit's `ActiveState` (systemd.unit(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitState {
    Active,
    Reloading,
    Inactive,
    Failed,
    Activating,
    Deactivating,
    Maintenance,
    Refreshing,
    /// A state this code does not know (a newer systemd's).
    Other(String),
}

impl UnitState {
    pub fn parse(s: &str) -> UnitState {
        match s {
            "active" => UnitState::Active,
            "reloading" => UnitState::Reloading,
            "inactive" => UnitState::Inactive,
            "failed" => UnitState::Failed,
            "activating" => UnitState::Activating,
            "deactivating" => UnitState::Deactivating,
            "maintenance" => UnitState::Maintenance,
            "refreshing" => UnitState::Refreshing,
            other => UnitState::Other(other.to_string()),
        }
    }

    /// Its processes may still run: the one meaning of a "live" scope (reconcile, booking
    /// and `stop` ask this; whether its cgroup still has a process is the kernel's answer,
    /// `liveness::cgroup_populated`). An unknown state counts as live: nothing is booked
    /// over a worker that may still run.
    pub fn is_live(&self) -> bool {
        !matches!(
            self,
            UnitState::Inactive | UnitState::Failed | UnitState::Maintenance
        )
    }

    pub fn as_str(&self) -> &str {
        match self {
            UnitState::Active => "active",
            UnitState::Reloading => "reloading",
            UnitState::Inactive => "inactive",
            UnitState::Failed => "failed",
            UnitState::Activating => "activating",
            UnitState::Deactivating => "deactivating",
            UnitState::Maintenance => "maintenance",
            UnitState::Refreshing => "refreshing",
            UnitState::Other(s) => s,
        }
    }
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

    /// `FreezeUnit`: every process of the unit frozen by the kernel's cgroup freezer, its
    /// descendants in other sessions too; returns once they are.
    pub async fn freeze(&self, name: &str) -> Result<()> {
        self.manager
            .freeze_unit(name)
            .await
            .map_err(|e| SystemdError::from_zbus("FreezeUnit", name, e))
    }

    /// `ThawUnit`: the same processes go on where they stopped.
    pub async fn thaw(&self, name: &str) -> Result<()> {
        self.manager
            .thaw_unit(name)
            .await
            .map_err(|e| SystemdError::from_zbus("ThawUnit", name, e))
    }

    /// A proxy of a loaded unit (properties read afresh each time); `None` when systemd has
    /// no such unit.
    async fn unit_proxy(&self, name: &str) -> Result<Option<UnitProxy<'static>>> {
        let Some(path) = self.unit_path(name).await? else {
            return Ok(None);
        };
        UnitProxy::builder(&self.conn)
            .cache_properties(CacheProperties::No)
            .path(path)
            .build()
            .await
            .map(Some)
            .map_err(|e| SystemdError::from_zbus("GetUnit", name, e))
    }

    /// A loaded unit's `FreezerState` (`running`, `freezing`, `frozen`, `thawing`); `None`
    /// when systemd has no such unit.
    pub async fn freezer_state(&self, name: &str) -> Result<Option<String>> {
        let Some(unit) = self.unit_proxy(name).await? else {
            return Ok(None);
        };
        match unit.freezer_state().await {
            Ok(s) => Ok(Some(s)),
            Err(e) => match SystemdError::from_zbus("FreezerState", name, e) {
                SystemdError::NoSuchUnit { .. } => Ok(None),
                other => Err(other),
            },
        }
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
    pub async fn active_state(&self, name: &str) -> Result<Option<UnitState>> {
        let Some(unit) = self.unit_proxy(name).await? else {
            return Ok(None);
        };
        match unit.active_state().await {
            Ok(s) => Ok(Some(UnitState::parse(&s))),
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
    pub async fn list_units(&self, pattern: &str) -> Result<Vec<(String, UnitState)>> {
        let units = self
            .manager
            .list_units_by_patterns(Vec::new(), vec![pattern])
            .await
            .map_err(|e| SystemdError::from_zbus("ListUnitsByPatterns", pattern, e))?;
        Ok(units
            .into_iter()
            .map(|u| (u.0, UnitState::parse(&u.3)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unit_is_live_unless_systemd_says_it_ended() {
        let rows = [
            ("active", true),
            ("activating", true),
            ("deactivating", true),
            ("reloading", true),
            ("refreshing", true),
            ("inactive", false),
            ("failed", false),
            ("maintenance", false),
            ("a-state-of-a-newer-systemd", true),
        ];
        for (text, live) in rows {
            let state = UnitState::parse(text);
            assert_eq!(state.is_live(), live, "{text}");
            assert_eq!(state.as_str(), text);
        }
    }
}
