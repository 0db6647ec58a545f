//! Facts about processes from the kernel, never guesses: which cgroup a PID is in, and
//! whether it is a zombie. Later liveness verdicts build on these.

use std::io;
use std::path::Path;

use crate::record::{MemoryFacts, Usage};

/// The cgroup v2 path of `pid` (the `0::` line of `/proc/<pid>/cgroup`), e.g.
/// `/hermes.slice/hermes-workers.slice/hermes-workers-07.slice/hermes-worker-kanban-t_1-run-1.scope`. `None` when
/// the process is gone. On a hybrid host the v1 lines are ignored.
pub fn cgroup_of(pid: u32) -> io::Result<Option<String>> {
    let proc = match procfs::process::Process::new(pid as i32) {
        Ok(p) => p,
        Err(procfs::ProcError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(io::Error::other(e)),
    };
    match proc.cgroups() {
        Ok(cg) => Ok(cg
            .into_iter()
            .find(|c| c.hierarchy == 0)
            .map(|c| c.pathname)),
        Err(procfs::ProcError::NotFound(_)) => Ok(None),
        Err(e) => Err(io::Error::other(e)),
    }
}

/// A process that exists and is not a zombie (a zombie has ended; only its parent has
/// not collected it yet).
pub fn is_alive(pid: u32) -> bool {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .map(|s| s.state != 'Z' && s.state != 'X')
        .unwrap_or(false)
}

/// Whether any process is left in the cgroup at `path` (relative to the cgroup2 root), from
/// the kernel's own `populated` flag in `cgroup.events`. `None` when the cgroup does not
/// exist or cannot be read: no verdict then.
///
/// systemd 252 can keep a scope `active` whose cgroup is empty: when the scope's only PID
/// dies between `StartTransientUnit` and the attach, the kernel skips migrating the exiting
/// task, the write to `cgroup.procs` still succeeds, the cgroup is never populated, and
/// so never reports becoming empty. The unit state alone would wait for ever.
pub fn cgroup_populated(path: &str) -> Option<bool> {
    let events = read_small(format!("/sys/fs/cgroup{path}/cgroup.events")).ok()?;
    populated(&events)
}

/// What a cgroup holds, as far as one process of it matters (`cgroup_holds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holds {
    /// The cgroup is no longer there: the kernel removes none that is populated, and
    /// systemd removes a unit's once it has seen it empty and ended the unit.
    Removed,
    Nothing,
    /// That process, and nothing else.
    Only,
    /// Any other process.
    Others,
}

/// What the cgroup at `path` (`/a.slice/b.scope`) holds besides `pid` (0: any process is
/// another): from the first bytes of its `cgroup.procs` only, however many processes a
/// worker left. Pass only a path known to have been the scope's (`Removed` is read from
/// its absence). `None` when it cannot be read otherwise.
pub fn cgroup_holds(path: &str, pid: u32) -> Option<Holds> {
    use std::io::Read;
    let f = match std::fs::File::open(format!("/sys/fs/cgroup{path}/cgroup.procs")) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(Holds::Removed),
        Err(_) => return None,
    };
    let mut head = Vec::with_capacity(PROCS_HEAD);
    f.take(PROCS_HEAD as u64).read_to_end(&mut head).ok()?;
    Some(holds(&head, pid))
}

/// Enough of `cgroup.procs` for two PIDs: a second one, or a cut, means more than `pid`.
const PROCS_HEAD: usize = 32;

fn holds(head: &[u8], pid: u32) -> Holds {
    if head.len() >= PROCS_HEAD {
        return Holds::Others;
    }
    let mut pids = head.split(|b| *b == b'\n').filter(|l| !l.is_empty());
    match (pids.next(), pids.next()) {
        (None, _) => Holds::Nothing,
        (Some(p), None) if pid != 0 && p == pid.to_string().as_bytes() => Holds::Only,
        _ => Holds::Others,
    }
}

fn populated(events: &str) -> Option<bool> {
    events
        .lines()
        .find_map(|l| l.strip_prefix("populated "))
        .map(|v| v.trim() != "0")
}

/// The cgroup path systemd gives a unit in `slice`: each dash-separated prefix of a slice
/// name is a parent slice (`hermes-workers.slice` lives in `hermes.slice`).
pub fn unit_cgroup(slice: &str, unit: &str) -> String {
    let mut path = String::new();
    if let Some(stem) = slice
        .strip_suffix(".slice")
        .filter(|s| !s.is_empty() && *s != "-")
    {
        let parts: Vec<&str> = stem.split('-').collect();
        for i in 1..=parts.len() {
            path.push('/');
            path.push_str(&parts[..i].join("-"));
            path.push_str(".slice");
        }
    }
    path.push('/');
    path.push_str(unit);
    path
}

/// The first of `cgroups` (`/a.slice/b.scope`) that exists, else the first; one `stat` each
/// until one does (`config::Config::worker_cgroup` lists where a worker scope may be).
pub fn first_existing(cgroups: &[String]) -> String {
    let exists = |p: &str| {
        std::path::Path::new("/sys/fs/cgroup")
            .join(p.trim_start_matches('/'))
            .exists()
    };
    cgroups
        .iter()
        .find(|c| exists(c))
        .or(cgroups.first())
        .cloned()
        .unwrap_or_default()
}

/// A process that holds (or likely holds) a lock file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// Its command line, escaped for a terminal.
    pub cmd: String,
    /// Seen holding this very file; `false`: a likely dispatcher, named because the
    /// kernel's view could not be matched (see `flock_holders`).
    pub certain: bool,
}

impl std::fmt::Display for Holder {
    /// `pid 42 (hermes gateway run)`, `likely ` in front when not certain.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let likely = if self.certain { "" } else { "likely " };
        write!(f, "{likely}pid {} ({})", self.pid, self.cmd)
    }
}

/// The holders, for a message: `pid 1 (…), pid 2 (…)`.
pub fn describe(holders: &[Holder]) -> String {
    holders
        .iter()
        .map(Holder::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The processes holding a `flock(2)` on the file at `path`: whoever keeps a dispatcher out
/// of `.dispatcher.lock`. First through each process's descriptors (`/proc/<pid>/fd` names
/// the file, its `fdinfo` lists the lock; needs ptrace rights, which the hardened service
/// lacks), then `/proc/locks` (device and inode; on overlayfs it names the layer below, so
/// it may not match), and last, when neither names anyone, the processes that look like a
/// dispatcher (a Hermes gateway, a hermes-mgr dispatcher) among the `/proc/locks` holders.
pub fn flock_holders(path: &std::path::Path) -> Vec<Holder> {
    let by_fd = holders_by_fd(path);
    if !by_fd.is_empty() {
        return by_fd;
    }
    let locks = read_small("/proc/locks").unwrap_or_default();
    // "1: FLOCK  ADVISORY  WRITE 1234 08:01:123456 0 EOF"
    let flock_pids = locks.lines().filter_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(3) == Some(&"WRITE"))
            .then(|| Some((f.get(4)?.parse::<u32>().ok()?, f.get(5)?.to_string())))
            .flatten()
    });
    let ino = std::fs::metadata(path).ok().map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.ino()
    });
    let mut certain = Vec::new();
    let mut likely = Vec::new();
    for (pid, dev_ino) in flock_pids {
        let Some(cmd) = cmdline(pid) else { continue };
        let same_inode = ino.is_some_and(|i| dev_ino.rsplit(':').next() == Some(&i.to_string()));
        if same_inode {
            certain.push(Holder {
                pid,
                cmd,
                certain: true,
            });
        } else if (cmd.contains("hermes") && cmd.contains("gateway"))
            || (cmd.contains("hermes-mgr") && cmd.contains("dispatcher"))
        {
            likely.push(Holder {
                pid,
                cmd,
                certain: false,
            });
        }
    }
    if certain.is_empty() {
        likely.dedup();
        likely
    } else {
        certain
    }
}

fn cmdline(pid: u32) -> Option<String> {
    let c = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let words: Vec<String> = c
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some(crate::text::clean(&words.join(" ")))
}

fn holders_by_fd(path: &std::path::Path) -> Vec<Holder> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|t| t == path)
                && read_small(p.path().join("fdinfo").join(fd.file_name())).is_ok_and(|info| {
                    info.lines()
                        .any(|l| l.starts_with("lock:") && l.contains("FLOCK"))
                })
        });
        if holds {
            out.push(Holder {
                pid,
                cmd: cmdline(pid).unwrap_or_default(),
                certain: true,
            });
        }
    }
    out
}

/// ~0.22's restart-stable identity of a live process (`_process_fingerprint`):
/// `<boot_id>:<PID 1's start time>|<the process's start time>`, start times in clock ticks
/// (`/proc/<pid>/stat` field 22). `None` when the process is gone.
pub fn fingerprint(pid: u32) -> Option<String> {
    let start = |pid: u32| -> Option<String> {
        let stat = read_small(format!("/proc/{pid}/stat")).ok()?;
        // "<pid> (<comm>) <state> …": comm may hold spaces and parentheses.
        Some(
            stat.rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(19)?
                .to_string(),
        )
    };
    let own = start(pid)?;
    let epoch = format!(
        "{}:{}",
        crate::host::boot_id().unwrap_or_default(),
        start(1).unwrap_or_default()
    );
    Some(format!("{}|{own}", if epoch == ":" { "" } else { &epoch }))
}

/// What the supervisor records of its scope once the worker is reaped, each file read once:
/// the memory facts (`memory_facts`) and the run's cost; the cost `None` when nothing of
/// it could be read.
pub fn exit_facts(dir: &Path) -> (Option<MemoryFacts>, Option<Usage>) {
    let memory = memory_facts(dir);
    // No `memory.events`, no memory controller: no `memory.peak` either.
    let memory_peak_bytes = memory.as_ref().and_then(|m| m.peak);
    let io = read_small(dir.join("io.stat")).ok().map(|t| io_bytes(&t));
    let u = Usage {
        cpu_usec: cpu_usec(dir),
        memory_peak_bytes,
        io_read_bytes: io.map(|i| i.0),
        io_write_bytes: io.map(|i| i.1),
    };
    (memory, (u != Usage::default()).then_some(u))
}

/// A kernel file (procfs, cgroupfs) read whole: open, read until end of file, close.
/// `fs::read_to_string` (and `File::read_to_end`) first ask `statx` and `lseek` for a size
/// such files do not give, then read 32, 32, 64 … bytes at a time: twice the system calls,
/// on the supervisor's way to its exit record. `take` hides the file from that probing.
fn read_small(path: impl AsRef<Path>) -> std::io::Result<String> {
    use std::io::Read;
    let mut buf = Vec::with_capacity(1024);
    std::fs::File::open(path)?
        .take(u64::MAX)
        .read_to_end(&mut buf)?;
    String::from_utf8(buf).map_err(std::io::Error::other)
}

/// `io.stat`'s bytes read and written, summed over its devices (one line per device,
/// `MAJ:MIN rbytes=N wbytes=N rios=N …`).
fn io_bytes(text: &str) -> (u64, u64) {
    let sum = |key: &str| -> u64 {
        text.split_whitespace()
            .filter_map(|f| f.strip_prefix(key))
            .filter_map(|v| v.parse::<u64>().ok())
            .sum()
    };
    (sum("rbytes="), sum("wbytes="))
}

/// What a live cgroup uses now: CPU so far, memory in use, bytes read and written so far;
/// each absent where its controller is not enabled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupUse {
    pub cpu_usec: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub io_read_bytes: Option<u64>,
    pub io_write_bytes: Option<u64>,
}

fn read_number(dir: &Path, file: &str) -> Option<u64> {
    read_small(dir.join(file))
        .ok()
        .and_then(|v| v.trim().parse().ok())
}

fn cpu_usec(dir: &Path) -> Option<u64> {
    read_small(dir.join("cpu.stat")).ok().and_then(|t| {
        t.lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// A live cgroup's use (three small reads); `None` when it is gone.
pub fn cgroup_use(dir: &Path) -> Option<CgroupUse> {
    let io = read_small(dir.join("io.stat")).ok().map(|t| io_bytes(&t));
    let u = CgroupUse {
        cpu_usec: cpu_usec(dir),
        memory_bytes: read_number(dir, "memory.current"),
        io_read_bytes: io.map(|i| i.0),
        io_write_bytes: io.map(|i| i.1),
    };
    (u != CgroupUse::default()).then_some(u)
}

/// The workers' slice: what it uses, its limits (absent when unlimited or without the
/// controller), and how long its tasks stalled (PSI: resource, `some`/`full`, µs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SliceFacts {
    pub cpu_usec: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub memory_max: Option<u64>,
    pub tasks: Option<u64>,
    pub tasks_max: Option<u64>,
    pub cpu_max_cores: Option<f64>,
    pub pressure: Vec<(&'static str, &'static str, u64)>,
}

/// The stall totals of a `*.pressure` file: `some avg10=… total=N` and `full … total=N`.
fn pressure_totals(text: &str) -> Vec<(&'static str, u64)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let kind = match f.next()? {
                "some" => "some",
                "full" => "full",
                _ => return None,
            };
            let total = f.find_map(|x| x.strip_prefix("total="))?.parse().ok()?;
            Some((kind, total))
        })
        .collect()
}

/// `some avg10` of a pressure file's text (percent of the last 10 s).
fn some_avg10(text: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with("some "))?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))?
        .parse()
        .ok()
}

/// `some avg10` of memory, CPU and IO for the cgroup at `cgroup` (its `*.pressure` files) and
/// for the host (`/proc/pressure/*`), as `(scope, resource, percent)`; what cannot be read
/// is left out (a kernel without PSI).
pub fn pressure(cgroup: &Path) -> Vec<(&'static str, &'static str, f64)> {
    let mut out = Vec::new();
    for resource in ["memory", "cpu", "io"] {
        let files = [
            ("slice", cgroup.join(format!("{resource}.pressure"))),
            ("host", Path::new("/proc/pressure").join(resource)),
        ];
        for (scope, file) in files {
            if let Some(v) = read_small(file).ok().and_then(|t| some_avg10(&t)) {
                out.push((scope, resource, v));
            }
        }
    }
    out
}

/// `some avg10` of memory, CPU and IO of one cgroup (a pool's slice), by resource.
pub fn cgroup_pressure(cgroup: &Path) -> Vec<(&'static str, f64)> {
    ["memory", "cpu", "io"]
        .into_iter()
        .filter_map(|r| {
            let t = read_small(cgroup.join(format!("{r}.pressure"))).ok()?;
            Some((r, some_avg10(&t)?))
        })
        .collect()
}

/// The scopes directly in a slice's cgroup, each with its `memory.current` when `memory` (0
/// when not asked, or there is none: no memory controller, or the scope just went). One
/// `readdir`, and a read per scope only when asked.
pub fn scopes_memory(slice: &Path, memory: bool) -> Vec<u64> {
    let Ok(dir) = std::fs::read_dir(slice) else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".scope"))
        .map(|e| {
            memory
                .then(|| read_number(&e.path(), "memory.current"))
                .flatten()
                .unwrap_or(0)
        })
        .collect()
}

/// The layers of the worker sandbox this kernel gives: the new mount API (`open_tree`,
/// `move_mount`, `fsopen`: Linux 5.2; `mount_setattr`: 5.12) and Landlock's ABI version
/// (`None`: no Landlock, or not enabled among the kernel's security modules).
pub fn sandbox_layers() -> (bool, Option<i32>) {
    // SAFETY: probes with invalid or harmless arguments; each returns a new descriptor
    // (closed) or an error.
    unsafe {
        let exists = |r: libc::c_long| {
            r >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS)
        };
        let t = libc::syscall(libc::SYS_open_tree, -1, c"".as_ptr(), 0x1000u32);
        let s = libc::syscall(
            libc::SYS_mount_setattr,
            -1,
            c"".as_ptr(),
            0u32,
            std::ptr::null::<u8>(),
            0usize,
        );
        let mount = exists(t) && exists(s);
        let abi = libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        );
        (mount, (abi >= 1).then_some(abi as i32))
    }
}

/// This kernel gives pressure stall information (`/proc/pressure`; not with
/// `CONFIG_PSI_DEFAULT_DISABLED` unless booted with `psi=1`).
pub fn has_psi() -> bool {
    Path::new("/proc/pressure/memory").exists()
}

/// The host's `MemAvailable`, in bytes.
pub fn memory_available() -> Option<u64> {
    read_small("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

/// `cpu.max` (`QUOTA PERIOD`, or `max PERIOD`) as cores.
fn cpu_max_cores(text: &str) -> Option<f64> {
    let mut f = text.split_whitespace();
    let quota: f64 = f.next()?.parse().ok()?;
    let period: f64 = f.next()?.parse().ok()?;
    (period > 0.0).then(|| quota / period)
}

/// The slice's facts from its cgroup at `dir`; `None` when it does not exist.
pub fn slice_facts(dir: &Path) -> Option<SliceFacts> {
    if !dir.is_dir() {
        return None;
    }
    let mut pressure = Vec::new();
    for resource in ["cpu", "memory", "io"] {
        if let Ok(t) = read_small(dir.join(format!("{resource}.pressure"))) {
            for (kind, total) in pressure_totals(&t) {
                pressure.push((resource, kind, total));
            }
        }
    }
    Some(SliceFacts {
        cpu_usec: cpu_usec(dir),
        memory_bytes: read_number(dir, "memory.current"),
        // "max" does not parse: unlimited.
        memory_max: read_number(dir, "memory.max"),
        tasks: read_number(dir, "pids.current"),
        tasks_max: read_number(dir, "pids.max"),
        cpu_max_cores: read_small(dir.join("cpu.max"))
            .ok()
            .and_then(|t| cpu_max_cores(&t)),
        pressure,
    })
}

/// The memory controller's account for the cgroup at `dir` (`/sys/fs/cgroup/...`); `None`
/// without a memory controller there.
pub fn memory_facts(dir: &Path) -> Option<MemoryFacts> {
    let events = read_small(dir.join("memory.events")).ok()?;
    let oom_kills = events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let number = |f: &str| {
        read_small(dir.join(f))
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some(MemoryFacts {
        oom_kills,
        max: number("memory.max"),
        peak: number("memory.peak"),
    })
}

/// A DAMON instance watching physical memory: who it is and how to turn it off.
#[derive(Debug)]
pub struct MemoryMonitor {
    pub name: String,
    pub off: String,
}

/// Every running DAMON instance that samples physical memory (`paddr`): those set up in
/// `/sys/kernel/mm/damon/admin`, and the DAMON_RECLAIM, DAMON_LRU_SORT and DAMON_STAT
/// modules (always `paddr`).
pub fn memory_monitors() -> Vec<MemoryMonitor> {
    let read = |p: &std::path::Path| read_small(p).unwrap_or_default();
    let mut out = Vec::new();
    let admin = std::path::Path::new("/sys/kernel/mm/damon/admin/kdamonds");
    for k in std::fs::read_dir(admin).into_iter().flatten().flatten() {
        let dir = k.path();
        let physical = std::fs::read_dir(dir.join("contexts"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|c| read(&c.path().join("operations")).trim() == "paddr");
        if read(&dir.join("state")).trim() == "on" && physical {
            out.push(MemoryMonitor {
                name: format!(
                    "kdamond {} (pid {})",
                    dir.display(),
                    read(&dir.join("pid")).trim()
                ),
                off: format!("echo off > {}/state", dir.display()),
            });
        }
    }
    for module in ["damon_reclaim", "damon_lru_sort", "damon_stat"] {
        let enabled = format!("/sys/module/{module}/parameters/enabled");
        if read(std::path::Path::new(&enabled)).trim() == "Y" {
            out.push(MemoryMonitor {
                name: format!("the {module} module"),
                off: format!("echo N > {enabled}"),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_holds_only_its_supervisor_when_its_procs_say_so_and_no_more() {
        for (head, pid, want) in [
            (&b""[..], 4242, Holds::Nothing),
            (b"", 0, Holds::Nothing),
            (b"4242\n", 4242, Holds::Only),
            (b"4242", 4242, Holds::Only),
            (b"4242\n", 0, Holds::Others),
            (b"4243\n", 4242, Holds::Others),
            (b"4242\n77\n", 4242, Holds::Others),
            (b"77\n4242\n", 4242, Holds::Others),
            // Cut at the head's size: more PIDs follow.
            (
                b"4242\n10\n11\n12\n13\n14\n15\n16\n17\n",
                4242,
                Holds::Others,
            ),
        ] {
            assert_eq!(
                holds(head, pid),
                want,
                "{:?} besides {pid}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn a_scope_whose_cgroup_is_gone_is_read_as_removed() {
        assert_eq!(
            cgroup_holds("/hermes-mgr-no-such.slice/none.scope", 4242),
            Some(Holds::Removed)
        );
    }

    #[test]
    fn pressure_and_cpu_limits_are_read_as_the_kernel_writes_them() {
        let psi = "some avg10=0.00 avg60=0.00 avg300=0.00 total=1234\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=56\n";
        assert_eq!(pressure_totals(psi), vec![("some", 1234), ("full", 56)]);
        // cpu.pressure before 5.13 has no `full` line; garbage is skipped.
        assert_eq!(pressure_totals("some total=7\nnoise\n"), vec![("some", 7)]);
        assert_eq!(some_avg10(psi), Some(0.0));
        assert_eq!(
            some_avg10("full avg10=9.00\nsome avg10=31.25 avg60=1.00 total=5\n"),
            Some(31.25)
        );
        assert_eq!(some_avg10("garbage"), None);
        for (text, want) in [
            ("max 100000\n", None),
            ("150000 100000\n", Some(1.5)),
            ("50000 0", None),
            ("", None),
        ] {
            assert_eq!(cpu_max_cores(text), want, "{text:?}");
        }
        assert_eq!(
            io_bytes("8:0 rbytes=10 wbytes=2 rios=1\n8:16 rbytes=5 wbytes=1\n"),
            (15, 3)
        );
    }

    /// A slice directory as the kernel lays it out, limits and all; "max" is no limit.
    #[test]
    fn a_slices_facts_are_its_files_and_unlimited_is_absent() {
        let dir = tempfile::tempdir().unwrap();
        let put = |f: &str, t: &str| std::fs::write(dir.path().join(f), t).unwrap();
        put("cpu.stat", "usage_usec 2500000\nuser_usec 1\n");
        put("memory.current", "4096\n");
        put("memory.max", "max\n");
        put("pids.current", "7\n");
        put("pids.max", "512\n");
        put("cpu.max", "200000 100000\n");
        put("memory.pressure", "some avg10=0.00 avg60=0.00 avg300=0.00 total=9\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=3\n");
        let f = slice_facts(dir.path()).unwrap();
        assert_eq!(f.cpu_usec, Some(2_500_000));
        assert_eq!((f.memory_bytes, f.memory_max), (Some(4096), None));
        assert_eq!((f.tasks, f.tasks_max), (Some(7), Some(512)));
        assert_eq!(f.cpu_max_cores, Some(2.0));
        assert_eq!(
            f.pressure,
            vec![("memory", "some", 9), ("memory", "full", 3)]
        );
        assert_eq!(slice_facts(&dir.path().join("none")), None);
    }

    /// A fake cgroup directory: this sandbox has no memory controller, so the kernel's own
    /// files cannot be made to show an OOM kill here (the VM tier's job).
    #[test]
    fn memory_facts_are_read_from_the_controllers_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(memory_facts(dir.path()), None);
        std::fs::write(
            dir.path().join("memory.events"),
            "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("memory.max"), "67108864\n").unwrap();
        std::fs::write(dir.path().join("memory.peak"), "67100000\n").unwrap();
        assert_eq!(
            memory_facts(dir.path()),
            Some(MemoryFacts {
                oom_kills: 1,
                max: Some(67108864),
                peak: Some(67100000)
            })
        );
        std::fs::write(dir.path().join("memory.max"), "max\n").unwrap();
        assert_eq!(memory_facts(dir.path()).unwrap().max, None);
    }

    /// The same fake directory for the figures of a run's cost (the VM tier reads real ones).
    #[test]
    fn usage_is_read_from_cpu_memory_and_io_files() {
        let dir = tempfile::tempdir().unwrap();
        let usage = |d: &Path| exit_facts(d).1;
        assert_eq!(usage(dir.path()), None);
        std::fs::write(
            dir.path().join("cpu.stat"),
            "usage_usec 4121000\nuser_usec 4000000\nsystem_usec 121000\n",
        )
        .unwrap();
        assert_eq!(
            usage(dir.path()),
            Some(Usage {
                cpu_usec: Some(4121000),
                ..Usage::default()
            })
        );
        std::fs::write(dir.path().join("memory.peak"), "67100000\n").unwrap();
        // The peak is the memory controller's: read along with its `memory.events`.
        assert_eq!(usage(dir.path()).unwrap().memory_peak_bytes, None);
        std::fs::write(dir.path().join("memory.events"), "oom_kill 0\n").unwrap();
        std::fs::write(
            dir.path().join("io.stat"),
            "254:0 rbytes=4096 wbytes=1048576 rios=1 wios=8 dbytes=0 dios=0\n254:16 rbytes=100 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n",
        )
        .unwrap();
        assert_eq!(
            usage(dir.path()),
            Some(Usage {
                cpu_usec: Some(4121000),
                memory_peak_bytes: Some(67100000),
                io_read_bytes: Some(4196),
                io_write_bytes: Some(1048576),
            })
        );
    }

    #[test]
    fn kernel_files_longer_than_the_first_read_are_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let line = "254:0 rbytes=1 wbytes=2 rios=1 wios=1 dbytes=0 dios=0\n";
        std::fs::write(dir.path().join("io.stat"), line.repeat(100)).unwrap();
        std::fs::write(dir.path().join("cpu.stat"), "usage_usec 1\n").unwrap();
        let u = exit_facts(dir.path()).1.unwrap();
        assert_eq!((u.io_read_bytes, u.io_write_bytes), (Some(100), Some(200)));
    }

    #[test]
    fn nested_slices_follow_the_dashes() {
        assert_eq!(
            unit_cgroup("hermes-workers.slice", "x.scope"),
            "/hermes.slice/hermes-workers.slice/x.scope"
        );
        assert_eq!(
            unit_cgroup("system.slice", "x.scope"),
            "/system.slice/x.scope"
        );
        assert_eq!(unit_cgroup("-.slice", "x.scope"), "/x.scope");
    }

    #[test]
    fn the_populated_flag_is_read_from_cgroup_events() {
        assert_eq!(populated("populated 1\nfrozen 0\n"), Some(true));
        assert_eq!(populated("populated 0\nfrozen 0\n"), Some(false));
        assert_eq!(populated("frozen 0\n"), None);
        assert_eq!(cgroup_populated("/no-such-cgroup.scope"), None);
    }

    #[test]
    fn our_own_cgroup_is_readable_and_a_dead_pid_has_none() {
        assert!(cgroup_of(std::process::id()).unwrap().is_some());
        assert_eq!(cgroup_of(u32::MAX / 2).unwrap(), None);
    }
}
