//! The host's checks: privileges, the kernel's cgroups (v2, migration, controllers, the
//! freezer), DAMON, the workers' slice and its capacity pools, and the room the kernel's limits leave.

use super::{check, Check, Level};
use crate::config::Config;
use crate::liveness::MemoryMonitor;

/// Whether the cgroup2 mount at `/sys/fs/cgroup` has the `favordynmods` super option (from
/// `/proc/self/mountinfo`); `None` when there is no such mount.
pub(super) fn favordynmods(mountinfo: &str) -> Option<bool> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let mut fs = fs.split_whitespace();
        let (fstype, _source, superopts) = (fs.next()?, fs.next()?, fs.next().unwrap_or(""));
        (mount.split_whitespace().nth(4)? == "/sys/fs/cgroup" && fstype == "cgroup2")
            .then(|| superopts.split(',').any(|o| o == "favordynmods"))
    })
}

/// cgroup2's statfs magic (`CGROUP2_SUPER_MAGIC`).
const CGROUP2_MAGIC: i64 = 0x6367_7270;

/// Root, or what is missing without it.
pub(super) fn privileges() -> Vec<Check> {
    let mut out = Vec::new();
    out.push(if nix::unistd::geteuid().is_root() {
        check(
            "privileges",
            Level::Ok,
            "running as root: may create scopes and switch to the worker user",
            None,
        )
    } else {
        check(
            "privileges",
            Level::Warn,
            "not root: creating scopes needs a polkit rule, switching users needs CAP_SETUID",
            Some("run the dispatcher as root (hermes-dispatcher.service does)"),
        )
    });
    out
}

/// The unified hierarchy.
pub(super) fn cgroup_v2() -> Vec<Check> {
    let mut out = Vec::new();
    match nix::sys::statfs::statfs("/sys/fs/cgroup") {
        Ok(fs) if fs.filesystem_type().0 == CGROUP2_MAGIC => out.push(check(
            "cgroup v2",
            Level::Ok,
            "unified hierarchy at /sys/fs/cgroup",
            None,
        )),
        Ok(_) => out.push(check(
            "cgroup v2",
            Level::Fail,
            "/sys/fs/cgroup is not cgroup2 (legacy or hybrid mode)",
            Some("boot with systemd.unified_cgroup_hierarchy=1"),
        )),
        Err(e) => out.push(check(
            "cgroup v2",
            Level::Fail,
            format!("statfs /sys/fs/cgroup: {e}"),
            Some("mount cgroup2 at /sys/fs/cgroup"),
        )),
    }
    out
}

/// Whether moving a worker into its scope waits for an RCU grace period.
pub(super) fn cgroup_migration() -> Vec<Check> {
    let mut out = Vec::new();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    match favordynmods(&mountinfo) {
        Some(true) => out.push(check(
            "cgroup migration",
            Level::Ok,
            "cgroup2 mounted with favordynmods",
            None,
        )),
        Some(false) => out.push(check(
            "cgroup migration",
            Level::Warn,
            "cgroup2 is mounted without favordynmods: each worker start waits for an RCU grace period \
             while the kernel moves it into its scope (claim -> exec p50 17 ms instead of 6 ms in BENCHMARKS.md)",
            Some("mount -o remount,favordynmods /sys/fs/cgroup, or boot with cgroup_favordynmods=true (forks and exits get slightly costlier)"),
        )),
        None => {}
    }
    out
}

/// A DAMON instance sampling physical memory checks whether a page was used by walking every
/// mapping of it with the mapping's lock of its file held. A page of a library that every
/// worker and every supervisor maps is a walk over all of them, and every process that maps
/// or unmaps that file — each worker's start and each exit — waits behind it. Nothing at a
/// few hundred workers; tens of ms per start and exit at many thousands (BENCHMARKS.md, 8).
pub(super) fn memory_monitor(monitors: &[MemoryMonitor], cap: Option<usize>) -> Check {
    const NAME: &str = "memory monitor";
    if monitors.is_empty() {
        return check(
            NAME,
            Level::Ok,
            "no DAMON instance samples physical memory",
            None,
        );
    }
    let join = |part: fn(&MemoryMonitor) -> &str, sep: &str| {
        monitors.iter().map(part).collect::<Vec<_>>().join(sep)
    };
    let names = join(|m| &m.name, ", ");
    let cap_is = cap.map_or("unset (no cap)".to_string(), |c| c.to_string());
    if cap.is_some_and(|c| c < 1000) {
        return check(
            NAME,
            Level::Ok,
            format!("{names} samples physical memory; harmless at kanban.max_spawn {cap_is}"),
            None,
        );
    }
    let off = join(|m| &m.off, "; ");
    check(
        NAME,
        Level::Warn,
        format!(
            "{names} samples physical memory: each sample walks every mapping of a shared \
             library's page with its lock held, and with thousands of live workers every worker \
             start and exit waits behind it (20,000 processes: exit p99 65 ms with it, 0.8 ms \
             without); kanban.max_spawn is {cap_is}"
        ),
        Some(&format!(
            "{off} (if it reclaims memory for a VM host, ask the host's owner first); \
             or keep kanban.max_spawn under 1,000"
        )),
    )
}

/// The controllers that enforce the per-scope limits.
pub(super) fn controllers() -> Vec<Check> {
    let mut out = Vec::new();
    let controllers =
        std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
    let missing: Vec<&str> = ["memory", "pids", "cpu"]
        .into_iter()
        .filter(|c| !controllers.split_whitespace().any(|x| x == *c))
        .collect();
    out.push(if missing.is_empty() {
        check(
            "controllers",
            Level::Ok,
            format!("available: {}", controllers.trim()),
            None,
        )
    } else {
        check(
            "controllers",
            Level::Warn,
            format!(
                "missing: {} — MemoryMax/TasksMax/CPUQuota are accepted but not enforced",
                missing.join(", ")
            ),
            Some("enable the controllers for systemd (they are off inside containers)"),
        )
    });
    out
}

/// The workers' slice has a unit file (and so its budgets).
pub(super) fn slice(cfg: &Config) -> Vec<Check> {
    let mut out = Vec::new();
    let slice_file = [
        "/etc/systemd/system",
        "/usr/lib/systemd/system",
        "/lib/systemd/system",
        "/run/systemd/system",
    ]
    .iter()
    .map(|d| std::path::Path::new(d).join(&cfg.slice))
    .find(|p| p.exists());
    out.push(match slice_file {
        Some(p) => check(
            "slice",
            Level::Ok,
            format!("{} ({})", cfg.slice, p.display()),
            None,
        ),
        None => check(
            "slice",
            Level::Warn,
            format!(
                "{} has no unit file: systemd creates it on demand, without budgets",
                cfg.slice
            ),
            Some("install units/hermes-workers.slice"),
        ),
    });
    out
}

/// Tasks (processes and threads) a live worker needs at the least: its supervisor and
/// the worker; a real agent and its tools need more.
const TASKS_PER_WORKER: u64 = 2;

/// How many live workers the kernel's limits leave room for, against the configured cap:
/// `kernel.pid_max` and `kernel.threads-max` for the host, the slice's `pids.max` (its
/// `TasksMax=`) for all workers together.
pub(super) fn room(
    pid_max: u64,
    threads_max: u64,
    slice_pids: Option<u64>,
    cap: Option<usize>,
) -> Check {
    let (limit, what) = [
        (pid_max, "kernel.pid_max"),
        (threads_max, "kernel.threads-max"),
        (
            slice_pids.unwrap_or(u64::MAX),
            "TasksMax of the workers' slice",
        ),
    ]
    .into_iter()
    .min_by_key(|(n, _)| *n)
    .unwrap_or((u64::MAX, ""));
    let workers = limit / TASKS_PER_WORKER;
    let detail = format!(
        "room for at most ~{workers} live workers ({what} = {limit}, {TASKS_PER_WORKER} tasks per worker at the least)"
    );
    match cap {
        Some(cap) if cap as u64 > workers => check(
            "host limits",
            Level::Warn,
            format!("kanban.max_spawn is {cap}, but there is {detail}"),
            Some(match what {
                "kernel.pid_max" => "raise it: echo kernel.pid_max=4194304 > /etc/sysctl.d/90-hermes.conf && sysctl --system",
                "kernel.threads-max" => "raise kernel.threads-max (sysctl), or lower kanban.max_spawn",
                _ => "raise it: systemctl edit hermes-workers.slice, [Slice] TasksMax=…; or lower kanban.max_spawn",
            }),
        ),
        _ => check("host limits", Level::Ok, detail, None),
    }
}

pub(super) fn host_room(cfg: &Config) -> Check {
    let number =
        |path: &str| -> Option<u64> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
    let slice_pids = number(&format!(
        "/sys/fs/cgroup{}/pids.max",
        crate::liveness::unit_cgroup(&cfg.slice, "").trim_end_matches('/')
    ));
    room(
        number("/proc/sys/kernel/pid_max").unwrap_or(u64::MAX),
        number("/proc/sys/kernel/threads-max").unwrap_or(u64::MAX),
        slice_pids,
        crate::dispatch::caps::of(cfg).most(),
    )
}

/// The cgroup freezer `hermes-mgr pause` uses (`cgroup.freeze`, kernel 5.2; systemd's
/// `FreezeUnit`, 246): looked for in this process's own cgroup, as every non-root cgroup
/// has it.
pub(super) fn freezer() -> Check {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().trim_start_matches('/').to_string());
    let probe = match path.as_deref() {
        Some("") | None => std::path::PathBuf::from("/sys/fs/cgroup/init.scope/cgroup.freeze"),
        Some(p) => std::path::Path::new("/sys/fs/cgroup")
            .join(p)
            .join("cgroup.freeze"),
    };
    if probe.exists() {
        check(
            "freezer",
            Level::Ok,
            "the cgroup freezer is there: `hermes-mgr pause` freezes a worker whole",
            None,
        )
    } else {
        check(
            "freezer",
            Level::Warn,
            format!(
                "no {}: `hermes-mgr pause` can hold tasks but not freeze workers",
                probe.display()
            ),
            Some("a cgroup v2 host with Linux 5.2 or newer"),
        )
    }
}

/// Each capacity pool: its slice's limits where the kernel enforces them (once its first
/// worker made the slice's cgroup), and whether its next worker would wait now.
pub(super) fn pools(cfg: &Config) -> Vec<Check> {
    let views = crate::dispatch::pools::look(cfg, &Default::default());
    views
        .iter()
        .map(|v| {
            let pool = &cfg.pools[&v.name];
            let dir = crate::dispatch::pools::slice_dir(cfg, &v.name);
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
            let want = |v: Option<u64>| v.map_or("max".to_string(), |v| v.to_string());
            let mut differ = Vec::new();
            let mut seen = Vec::new();
            let quota = pool
                .cpu_quota_percent
                .map_or("max".to_string(), |q| (q * 1000).to_string());
            for (file, want) in [
                ("memory.max", want(pool.memory_max_bytes)),
                ("pids.max", want(pool.tasks_max)),
                ("cpu.max", quota),
            ] {
                // `cpu.max` is "QUOTA PERIOD" (systemd's period is 100 ms: 1 % = 1000 µs).
                if let Some(have) = read(file) {
                    let have = have.split_whitespace().next().unwrap_or("").to_string();
                    if have != want {
                        differ.push(format!("{file} {have}, configured {want}"));
                    } else {
                        seen.push(file);
                    }
                }
            }
            let name = format!("pool {} ({})", v.name, v.slice);
            if !differ.is_empty() {
                return check(
                    "pool",
                    Level::Warn,
                    format!("{name}: the kernel has {}", differ.join("; ")),
                    Some("the dispatcher sets them at its next pass after a change: systemctl reload hermes-dispatcher"),
                );
            }
            let enforced = if !dir.exists() {
                "its slice starts with its first worker".to_string()
            } else if seen.is_empty() {
                "no controller enforces its limits on this host".to_string()
            } else {
                format!("the kernel enforces {}", seen.join(", "))
            };
            match &v.waiting {
                Some(w) => check(
                    "pool",
                    Level::Warn,
                    format!("{name}: {enforced}; its tasks wait: {w}"),
                    Some("they start once it has room; or change the pool (hermes-mgr.toml(5))"),
                ),
                None => check(
                    "pool",
                    Level::Ok,
                    format!("{name}: {} worker(s); {enforced}", v.workers),
                    None,
                ),
            }
        })
        .collect()
}

/// The worker sandbox: off, or which of its layers this kernel gives.
pub(super) fn sandbox(cfg: &Config) -> Check {
    let (mount, landlock) = crate::liveness::sandbox_layers();
    let on = cfg.sandbox != crate::config::SandboxSetting::All(false);
    let layers = match landlock {
        Some(abi) => format!("a mount namespace, then Landlock (ABI {abi})"),
        None => "a mount namespace only (this kernel has no Landlock enabled)".to_string(),
    };
    match (on, mount) {
        (false, _) => check(
            "sandbox",
            Level::Ok,
            format!("off; this host would give {layers}"),
            None,
        ),
        (true, true) => check("sandbox", Level::Ok, format!("on: {layers}"), None),
        (true, false) => check(
            "sandbox",
            Level::Fail,
            "on, but this kernel lacks the mount API it is built with (Linux 5.12): no sandboxed worker can start",
            Some("a newer kernel, or sandbox = false"),
        ),
    }
}
