//! The run's runtime limit, kept by its supervisor: the worker's active time — wall time
//! less what a pause kept it frozen (`record::Paused`, written by `hermes-mgr pause` before
//! the freeze and before the thaw) — past `max_runtime`, every process of the scope gets
//! SIGTERM, and what is left `stop_timeout` later SIGKILL, as systemd's `RuntimeMaxSec` would
//! do (whose timer counts frozen time and cannot be moved on a running scope).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::host::now;

pub(super) struct Limit {
    max: Option<Duration>,
    stop_timeout: Duration,
    paused_file: PathBuf,
    /// The worker user: every process of the scope is theirs.
    uid: libc::uid_t,
    start: Instant,
    /// Paused seconds, as last read.
    paused: u64,
    /// When the timeout's SIGTERM went out.
    termed: Option<Instant>,
    /// When the SIGKILL went out: its leftovers are waited for one more stop timeout (one
    /// stuck in the kernel is then systemd's to see).
    killed: Option<Instant>,
}

impl Limit {
    pub(super) fn new(spec: &crate::spawn::spec::WorkerSpec, start: Instant) -> Limit {
        Limit {
            max: spec.max_runtime.map(Duration::from_secs),
            stop_timeout: Duration::from_secs(spec.stop_timeout.max(1)),
            paused_file: spec.paused_file.clone(),
            uid: spec.uid,
            start,
            paused: 0,
            termed: None,
            killed: None,
        }
    }

    /// The run was ended at its limit.
    pub(super) fn timed_out(&self) -> bool {
        self.termed.is_some()
    }

    /// Seconds the run was paused, by now.
    pub(super) fn paused_seconds(&self) -> u64 {
        crate::state_dir::read_paused(&self.paused_file).total(now())
    }

    /// How long the supervisor may wait before the limit needs a look; `None`: no limit.
    pub(super) fn wait(&self) -> Option<Duration> {
        let due = match (self.termed, self.max) {
            _ if self.killed.is_some() => return None,
            (Some(t), _) => t + self.stop_timeout,
            (None, Some(max)) => self.start + max + Duration::from_secs(self.paused),
            (None, None) => return None,
        };
        Some(due.saturating_duration_since(Instant::now()))
    }

    /// Act on the limit if it is due: SIGTERM, then SIGKILL, to every process of the scope
    /// but this one. The pauses are read only when the limit looks due. `Some`: what went
    /// wrong, for the journal (the signals went out as root, which may not be allowed).
    pub(super) fn check(&mut self) -> Option<String> {
        if self.wait() != Some(Duration::ZERO) {
            return None;
        }
        if self.termed.is_some() {
            self.killed = Some(Instant::now());
            return signal_scope(libc::SIGKILL, self.uid).err();
        }
        self.paused = self.paused_seconds();
        if self.wait() == Some(Duration::ZERO) {
            self.termed = Some(Instant::now());
            return signal_scope(libc::SIGTERM, self.uid).err();
        }
        None
    }

    /// After a timeout: processes of the scope other than this one remain, and are still
    /// waited for.
    pub(super) fn leftovers(&self) -> bool {
        let waited = self.killed.is_some_and(|k| k.elapsed() > self.stop_timeout);
        self.timed_out() && !waited && !others().is_empty()
    }
}

/// The PIDs of this process's cgroup (the run's scope) but its own.
fn others() -> Vec<i32> {
    let me = std::process::id() as i32;
    super::own_cgroup()
        .and_then(|cg| std::fs::read_to_string(cg.join("cgroup.procs")).ok())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .filter(|p| *p != me)
        .collect()
}

/// `sig` to every process of the scope but this one, as systemd kills a unit's cgroup: round
/// after round until a round finds no process it has not signalled (a process forked
/// meanwhile is found by the next). Sent as the worker user `uid`, whose processes they all
/// are (`no_new_privs`: none became anyone else): the dispatcher's service gives root no
/// `CAP_KILL`, and needs none for anything else.
/// `Err` when this process could not become the worker user: the signals were sent as root.
fn signal_scope(sig: i32, uid: libc::uid_t) -> Result<(), String> {
    let as_worker = AsUser::new(uid);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..64 {
        let fresh: Vec<i32> = others().into_iter().filter(|p| seen.insert(*p)).collect();
        if fresh.is_empty() {
            break;
        }
        for pid in fresh {
            // SAFETY: kill(2) of a PID of our own scope; ESRCH (it ended) is harmless.
            unsafe { libc::kill(pid, sig) };
        }
    }
    as_worker.map(drop)
}

/// This process's effective uid as `uid` while it lives (real and saved stay root, so the
/// capabilities come back with it). The supervisor is single-threaded.
struct AsUser;

impl AsUser {
    fn new(uid: libc::uid_t) -> Result<AsUser, String> {
        // SAFETY: setresuid(2) with -1 (unchanged) for the real and saved uid.
        if unsafe { libc::setresuid(libc::uid_t::MAX, uid, libc::uid_t::MAX) } != 0 {
            return Err(format!(
                "runtime limit: cannot become uid {uid} to signal the run's processes ({}); signalled as root",
                std::io::Error::last_os_error()
            ));
        }
        Ok(AsUser)
    }
}

impl Drop for AsUser {
    fn drop(&mut self) {
        // SAFETY: back to effective root: the saved uid is root's.
        unsafe { libc::setresuid(libc::uid_t::MAX, 0, libc::uid_t::MAX) };
    }
}
