//! Transient units: a run's scope (`ScopeSpec`, started with what this systemd takes) and
//! one-shot commands as services (`Command`); and a pool's slice's limits (`SliceLimits`),
//! set at runtime.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use zbus::Variant;

use super::{Result, Systemd, SystemdError};

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

/// A slice's budgets (a capacity pool's), as `systemctl set-property --runtime` sets them:
/// every one is sent, an unset one as systemd's "no limit" (`infinity`, or the default
/// weight), so a limit taken out of the configuration is taken off the slice too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SliceLimits {
    pub memory_max: Option<u64>,
    /// `CPUQuota=N%` as systemd takes it: N × 10,000 µs per second.
    pub cpu_quota_per_sec_us: Option<u64>,
    pub cpu_weight: Option<u64>,
    pub tasks_max: Option<u64>,
}

impl SliceLimits {
    pub fn properties(&self) -> Vec<Property> {
        // u64::MAX is systemd's `infinity` (CGROUP_LIMIT_MAX, USEC_INFINITY) and its "unset"
        // weight (CGROUP_WEIGHT_INVALID).
        let or_max = |v: Option<u64>| Variant::from(v.unwrap_or(u64::MAX));
        vec![
            ("MemoryAccounting", Variant::from(true)),
            ("CPUAccounting", Variant::from(true)),
            ("TasksAccounting", Variant::from(true)),
            ("MemoryMax", or_max(self.memory_max)),
            ("CPUQuotaPerSecUSec", or_max(self.cpu_quota_per_sec_us)),
            ("CPUWeight", or_max(self.cpu_weight)),
            ("TasksMax", or_max(self.tasks_max)),
        ]
    }
}

/// What this connection's systemd turned out to take (`Systemd::start_scope`): 0 = not
/// probed, 1 = it takes it, 2 = it does not.
#[derive(Default)]
pub(super) struct Takes {
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

impl Systemd {
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

    /// `SetUnitProperties(slice, runtime, limits)`: the limits in `/run` (gone at reboot, set
    /// again by the daemon's start), applied to the slice's cgroup at once; the slice is
    /// loaded if it was not (a slice needs no unit file).
    pub async fn set_slice_limits(&self, slice: &str, limits: &SliceLimits) -> Result<()> {
        self.manager
            .set_unit_properties(slice, true, limits.properties())
            .await
            .map_err(|e| SystemdError::from_zbus("SetUnitProperties", slice, e))
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
}
