//! The run's supervisor: the first process of every worker scope (`hermes-mgr supervise`,
//! started by `spawn::start_worker`).
//!
//! It is the conmon pattern: the dispatcher may die or restart at any time, so the process
//! that reaps the worker and records its exit status lives inside the scope, not in the
//! dispatcher. The supervisor is single-threaded, so forking the worker from it is safe;
//! everything the worker's child side needs is still allocated before the fork.
//!
//! Protocol on its stdin: one JSON line (`WorkerSpec`), then one byte `G` once systemd has
//! put this process into its scope (EOF instead of `G`: abort, start nothing). On its
//! stdout: one JSON line (`Report`).

use std::ffi::CString;
use std::io::{BufRead, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid};

use super::journal::{Journal, Lines};
use super::spec::{Report, WorkerSpec};
use crate::board::now;
use crate::outcome::Fault;
use crate::record::ExitRecord;
use crate::safe_fs::{self, Access, Owner};

fn report(r: &Report) {
    // Best effort: a dispatcher that died no longer listens, and that must not stop the run.
    if let Ok(line) = serde_json::to_string(r) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

fn cstr(s: &str, what: &str) -> Result<CString, Failure> {
    CString::new(s).map_err(|_| task(format!("{what} contains a NUL byte")))
}

/// Everything the forked child needs, allocated before the fork.
struct ChildPlan {
    path: CString,
    /// Owners of the strings `argv_ptrs` and `envp_ptrs` point into.
    _argv: Vec<CString>,
    _envp: Vec<CString>,
    cwd: CString,
    /// `cwd` and its ancestors, outermost first, to create (`mkdir -p`) as the worker.
    mkdirs: Vec<CString>,
    /// `argv` and `envp` as the NULL-terminated pointer arrays `execve(2)` takes, built
    /// before the fork (they point into `argv` and `envp`, which live as long).
    argv_ptrs: Vec<*const libc::c_char>,
    envp_ptrs: Vec<*const libc::c_char>,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    stdin: OwnedFd,
    stdout: RawFd,
    stderr: RawFd,
    /// The prelude's pipe to us, made its descriptor 3 (`upstream::PRELUDE`).
    said: Option<RawFd>,
}

/// The steps of the child side, reported by number through the error pipe: the child
/// writes 8 bytes (step, errno) and formats nothing.
const STEPS: &[&str] = &[
    "setsid",
    "dup2",
    "setgroups",
    "setresgid",
    "clear the capability bounding set",
    "setresuid",
    "clear capabilities",
    "set no_new_privs",
    "enter the workspace",
    "exec",
    "make the workspace",
    "mark inherited descriptors close-on-exec",
];
const STEP_CHDIR: u32 = 8;
const STEP_EXEC: u32 = 9;
const STEP_MKDIR: u32 = 10;
const STEP_CLOSE_RANGE: u32 = 11;

/// Why the worker did not start, and whose side that is on (`outcome::Fault`): only its
/// workspace and the task's own data are the task's.
#[derive(Debug)]
struct Failure {
    fault: Fault,
    reason: String,
}

fn infra(reason: String) -> Failure {
    Failure {
        fault: Fault::Infrastructure,
        reason,
    }
}

fn task(reason: String) -> Failure {
    Failure {
        fault: Fault::Task,
        reason,
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The child side, between fork and exec: raw system calls only (async-signal-safe, no
/// allocation), on data `ChildPlan` prepared. Returns only on failure: (step, errno).
fn become_worker(p: &ChildPlan) -> (u32, i32) {
    // SAFETY (whole function): each call is a plain system call on this process, with
    // pointers into `p`, which outlives the calls; nothing here allocates or locks.
    unsafe {
        // Ignored or blocked signals survive exec: give the worker default dispositions
        // (the Rust runtime ignores SIGPIPE; this supervisor blocks SIGTERM and SIGCHLD).
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        for sig in 1..libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        // A session of its own, as upstream starts workers (`start_new_session=True`).
        if libc::setsid() < 0 {
            return (0, errno());
        }
        for (fd, to) in [(p.stdin.as_raw_fd(), 0), (p.stdout, 1), (p.stderr, 2)] {
            if libc::dup2(fd, to) < 0 {
                return (1, errno());
            }
        }
        // dup2 onto itself would keep close-on-exec: then clear it instead.
        if let Some(fd) = p.said {
            let failed = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0) < 0
            } else {
                libc::dup2(fd, 3) < 0
            };
            if failed {
                return (1, errno());
            }
        }
        // Nothing else crosses the exec: not a descriptor whoever started us left open
        // without close-on-exec (a CLI's terminal or its parent's pipes). Marked, not closed:
        // the error pipe must stay open until the exec.
        let first = if p.said.is_some() { 4u32 } else { 3 };
        if libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            super::upstream::CLOSE_RANGE_CLOEXEC,
        ) < 0
        {
            return (STEP_CLOSE_RANGE, errno());
        }
        if libc::setgroups(p.groups.len(), p.groups.as_ptr()) < 0 {
            return (2, errno());
        }
        if libc::setresgid(p.gid, p.gid, p.gid) < 0 {
            return (3, errno());
        }
        // Still root here: empty the bounding set so nothing exec'd later can regain a
        // capability (EINVAL past the kernel's last capability ends the loop).
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 {
                if errno() == libc::EINVAL {
                    break;
                }
                return (4, errno());
            }
        }
        // Then leave root for good.
        if libc::setresuid(p.uid, p.uid, p.uid) < 0 {
            return (5, errno());
        }
        // Leaving uid 0 emptied the permitted, effective and ambient sets; the inheritable
        // set survives a uid change, so clear all of them (and the ambient set) explicitly.
        #[repr(C)]
        struct CapHeader {
            version: u32,
            pid: i32,
        }
        let header = CapHeader {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        let data = [0u32; 6]; // two __user_cap_data_struct {effective, permitted, inheritable}
        if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) < 0
            || libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ) < 0
        {
            return (6, errno());
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
            return (7, errno());
        }
        // The workspace is reached only now, as the worker: a link in the board's tree
        // leads nowhere the worker could not go anyway, and one it may not enter fails.
        for dir in &p.mkdirs {
            // The host's own condition (a full or read-only file system, an I/O error) is
            // said as such; anything else (it exists, a worker made its path unusable) is
            // found at the chdir below.
            if libc::mkdir(dir.as_ptr(), 0o777) < 0 {
                let e = errno();
                if matches!(
                    e,
                    libc::ENOSPC | libc::EDQUOT | libc::EROFS | libc::EIO | libc::ENOMEM
                ) {
                    return (STEP_MKDIR, e);
                }
            }
        }
        if libc::chdir(p.cwd.as_ptr()) < 0 {
            return (STEP_CHDIR, errno());
        }
        libc::execve(p.path.as_ptr(), p.argv_ptrs.as_ptr(), p.envp_ptrs.as_ptr());
        (STEP_EXEC, errno())
    }
}

fn write_status(spec: &WorkerSpec, status: &ExitRecord) -> std::io::Result<()> {
    let dir = spec.status_file.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir)?;
    let tmp = spec.status_file.with_extension("json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec(status).map_err(std::io::Error::other)?,
    )?;
    // rename: a reader sees no status or a whole one, never half of one.
    std::fs::rename(&tmp, &spec.status_file)
}

/// The run's private `TMPDIR`: a new directory with an unguessable name in `tmp_root`,
/// made by this process (`mkdir` fails on anything already there, so nobody can hand us
/// theirs), mode 0700, then given to the worker through the descriptor just opened on it.
/// In a sticky `/tmp` nobody but its owner can rename or remove the entry afterwards.
fn make_tmpdir(spec: &WorkerSpec) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
    for _ in 0..16 {
        let mut r = [0u8; 12];
        // SAFETY: getrandom writes at most `r.len()` bytes into `r`.
        let n = unsafe { libc::getrandom(r.as_mut_ptr().cast(), r.len(), 0) };
        if n != r.len() as isize {
            return Err(std::io::Error::last_os_error());
        }
        let name: String = r.iter().map(|b| format!("{b:02x}")).collect();
        let dir = spec.tmp_root.join(format!("hermes-run.{name}"));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(&dir)?;
        let m = fd.metadata()?;
        if !m.is_dir() || m.uid() != nix::unistd::geteuid().as_raw() {
            return Err(std::io::Error::other(format!(
                "{} was replaced while it was made",
                dir.display()
            )));
        }
        std::os::unix::fs::fchown(&fd, Some(spec.uid), Some(spec.gid))?;
        return Ok(dir);
    }
    Err(std::io::Error::other(format!(
        "no free name for a run directory in {}",
        spec.tmp_root.display()
    )))
}

/// Entry point of `hermes-mgr supervise`. Returns the process exit code: the worker's own
/// (128 + signal when killed), 127 when it could not be started.
pub fn main() -> u8 {
    // Started as `/proc/self/fd/N` (spawn::program), the kernel names us `N`: `ps`, `top`
    // and the scope's status show this instead.
    let _ = nix::sys::prctl::set_name(c"hermes-mgr-sup");
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    if stdin.read_line(&mut line).is_err() || line.is_empty() {
        eprintln!(
            "hermes-mgr supervise: no worker spec on stdin (this command is started by hermes-mgr)"
        );
        return 2;
    }
    let spec: WorkerSpec = match serde_json::from_str(&line) {
        Ok(s) => s,
        Err(e) => {
            report(&Report::Failed {
                reason: format!("bad worker spec: {e}"),
                fault: Fault::Infrastructure,
            });
            return 2;
        }
    };
    // Held: do nothing until the dispatcher says this process is in its scope.
    let mut go = [0u8; 1];
    if !matches!(stdin.read(&mut go), Ok(1)) || go[0] != b'G' {
        return 2;
    }
    drop(stdin);
    // Our own diagnostics go to the unit's journal, as the worker's lines do; the stderr we
    // were started with is our launcher's (the dispatcher's journal stream, or a terminal)
    // and is not held for the run's life.
    let journal = Journal::new(&spec.identifier, &spec.unit, &spec.task, spec.run_id);
    let (identifier, unit, task, run_id) = (
        spec.identifier.clone(),
        spec.unit.clone(),
        spec.task.clone(),
        spec.run_id,
    );
    std::panic::set_hook(Box::new(move |info| {
        Journal::new(&identifier, &unit, &task, run_id).send(
            2,
            format!("hermes-mgr supervise: {unit}: {info}").as_bytes(),
        );
    }));
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 onto fd 2 of a descriptor this process owns.
        unsafe { libc::dup2(null.as_raw_fd(), 2) };
    }
    match run(&spec, &journal) {
        Ok(code) => code,
        Err(Failure { fault, reason }) => {
            say(&journal, &spec, &reason);
            report(&Report::Failed { reason, fault });
            127
        }
    }
}

/// One diagnostic line of the supervisor's own, at `err` priority.
fn say(journal: &Journal, spec: &WorkerSpec, what: &str) {
    journal.send(
        3,
        format!("hermes-mgr supervise: {}: {what}", spec.unit).as_bytes(),
    );
}

fn run(spec: &WorkerSpec, journal: &Journal) -> Result<u8, Failure> {
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| infra(format!("become child subreaper: {e}")))?;
    let tmpdir = make_tmpdir(spec)
        .map_err(|e| infra(format!("create TMPDIR in {}: {e}", spec.tmp_root.display())))?;
    let result = supervise(spec, &tmpdir, journal);
    // The worker has ended (or never started): its TMPDIR goes. remove_dir_all opens each
    // level without following links, so what the worker left there cannot redirect it.
    let _ = std::fs::remove_dir_all(&tmpdir);
    result
}

/// Start the worker, relay its output, wait for it and record how it ended.
fn supervise(spec: &WorkerSpec, tmpdir: &Path, journal: &Journal) -> Result<u8, Failure> {
    // SIGTERM (a stop of the scope) must not end the supervisor before the worker, which
    // gets the same SIGTERM from systemd; SIGKILL still ends everything.
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        mask.add(s);
    }
    mask.thread_block()
        .map_err(|e| infra(format!("block signals: {e}")))?;
    let sfd = SignalFd::with_flags(
        &mask,
        nix::sys::signalfd::SfdFlags::SFD_NONBLOCK | nix::sys::signalfd::SfdFlags::SFD_CLOEXEC,
    )
    .map_err(|e| infra(format!("signalfd: {e}")))?;

    let devnull =
        std::fs::File::open("/dev/null").map_err(|e| infra(format!("open /dev/null: {e}")))?;
    // The worker writes into pipes; we copy its lines to the journal (and the log file).
    // The log is a convenience: one that cannot be opened (a worker may have planted a
    // FIFO or a link there) is reported and left out; the run goes on.
    let log = spec.log_file.as_ref().and_then(|path| {
        open_log(path, &spec.log_owner)
            .map_err(|e| say(journal, spec, &format!("worker log not kept: {e}")))
            .ok()
    });
    let pipes = Pipes::new().map_err(|e| infra(format!("pipe: {e}")))?;
    let (child_out, child_err) = (pipes.out_w.as_raw_fd(), pipes.err_w.as_raw_fd());
    // With a prelude, the process first runs upstream's code (`upstream::PRELUDE`), which
    // then execs the worker's own argv.
    let said = match &spec.prelude {
        Some(_) => Some(
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| infra(format!("pipe: {e}")))?,
        ),
        None => None,
    };
    let exec_argv: Vec<String> = match &spec.prelude {
        Some(p) => {
            let plan = serde_json::json!({
                "argv": spec.argv,
                "toolsets_home": p.toolsets_home,
                "toolsets_at": p.toolsets_at,
                "run": p.run,
                "worktree": p.worktree,
                "fingerprint": p.fingerprint,
                "toolsets_timeout": super::upstream::TOOLSETS_TIMEOUT.as_secs(),
                "worktree_timeout": super::upstream::WORKTREE_TIMEOUT.as_secs(),
            });
            vec![
                p.python.to_string_lossy().into_owned(),
                "-I".into(),
                "-c".into(),
                super::upstream::PRELUDE.into(),
                plan.to_string(),
            ]
        }
        None => spec.argv.clone(),
    };
    let argv: Vec<CString> = exec_argv
        .iter()
        .map(|a| cstr(a, "an argument"))
        .collect::<Result<_, _>>()?;
    let envp: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .chain(["TMPDIR", "TMUX_TMPDIR"].map(|k| (k, tmpdir.to_string_lossy().into_owned())))
        .map(|(k, v)| cstr(&format!("{k}={v}"), "the environment"))
        .collect::<Result<_, _>>()?;
    let pointers = |v: &[CString]| {
        v.iter()
            .map(|c| c.as_ptr())
            .chain([std::ptr::null()])
            .collect::<Vec<_>>()
    };
    let plan = ChildPlan {
        path: cstr(&exec_argv[0], "worker path")?,
        argv_ptrs: pointers(&argv),
        envp_ptrs: pointers(&envp),
        _argv: argv,
        _envp: envp,
        cwd: cstr(&spec.cwd.to_string_lossy(), "the workspace path")?,
        mkdirs: if spec.make_cwd {
            let mut v: Vec<&Path> = spec.cwd.ancestors().collect();
            v.reverse();
            v.into_iter()
                .map(|d| cstr(&d.to_string_lossy(), "the workspace path"))
                .collect::<Result<_, _>>()?
        } else {
            Vec::new()
        },
        uid: spec.uid,
        gid: spec.gid,
        groups: spec.groups.clone(),
        stdin: devnull.into(),
        stdout: child_out,
        stderr: child_err,
        said: said.as_ref().map(|(_, w)| w.as_raw_fd()),
    };
    // Exec failures travel back on a close-on-exec pipe: EOF means exec succeeded.
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| infra(format!("pipe: {e}")))?;
    let started_at = now();
    // SAFETY: this process is single-threaded (the supervisor never starts a thread), and
    // the child makes only raw system calls on what `plan` allocated before the fork.
    let worker = match unsafe { nix::unistd::fork() }.map_err(|e| infra(format!("fork: {e}")))? {
        ForkResult::Child => {
            drop(err_r);
            let (step, e) = become_worker(&plan);
            let mut msg = [0u8; 8];
            msg[..4].copy_from_slice(&step.to_ne_bytes());
            msg[4..].copy_from_slice(&e.to_ne_bytes());
            // SAFETY: write(2) of a stack buffer to a pipe this process owns.
            unsafe { libc::write(err_w.as_raw_fd(), msg.as_ptr().cast(), msg.len()) };
            // SAFETY: leave without running the parent's atexit handlers or destructors.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => child,
    };
    drop(err_w);
    drop(plan);
    let said = said.map(|(r, _w)| r);
    let mut failure = Vec::new();
    let _ = std::fs::File::from(err_r).read_to_end(&mut failure);
    if failure.len() >= 8 {
        // The child never became the worker; reap it and say why.
        let _ = waitpid(worker, None);
        let step = u32::from_ne_bytes(failure[..4].try_into().unwrap_or_default());
        let e = std::io::Error::from_raw_os_error(i32::from_ne_bytes(
            failure[4..8].try_into().unwrap_or_default(),
        ));
        let what = STEPS.get(step as usize).copied().unwrap_or("?");
        let enter = || {
            format!(
                "cannot enter the workspace {} as uid {}: {e}",
                spec.cwd.display(),
                spec.uid
            )
        };
        let start = || format!("cannot start {}: {what}: {e}", exec_argv[0]);
        return Err(match step {
            // A workspace is the task's: a `dir:` one it names, a scratch one in the Hermes
            // tree its worker writes (a worker can make its own unenterable). Counting it
            // trips the breaker on that task alone; as ours it would stop every pass. A host
            // that cannot make one (full, read-only) is ours: `_` below.
            STEP_CHDIR => task(enter()),
            // The binary is the dispatcher's configuration; an argv or environment too big
            // for exec comes from the task's data.
            STEP_EXEC if e.raw_os_error() == Some(libc::E2BIG) => task(start()),
            _ => infra(start()),
        });
    }
    report(&Report::Started {
        pid: worker.as_raw() as u32,
    });
    let mut relay = pipes.into_relay(journal, log, said);
    if spec.output_tail {
        relay.tail = Some(std::collections::VecDeque::with_capacity(
            super::spec::OUTPUT_TAIL,
        ));
    }

    let mut sigterm = false;
    let status = loop {
        if wait_readable(&sfd, &relay)? {
            match sfd.read_signal() {
                Ok(Some(info)) if info.ssi_signo == libc::SIGTERM as u32 => sigterm = true,
                Ok(_) => {}
                Err(nix::Error::EINTR | nix::Error::EAGAIN) => {}
                Err(e) => return Err(infra(format!("read signalfd: {e}"))),
            }
        }
        relay.pump();
        if let Some(st) = reap(worker) {
            break st;
        }
    };
    // What the worker wrote just before it ended is in the pipes by now.
    relay.pump();
    let (exit_code, signal) = match status {
        WaitStatus::Exited(_, c) => (Some(c), None),
        WaitStatus::Signaled(_, s, _) => (None, Some(s as i32)),
        _ => (None, None),
    };
    let cgroup = own_cgroup();
    let rs = ExitRecord {
        task: spec.task.clone(),
        run_id: spec.run_id,
        unit: spec.unit.clone(),
        worker_pid: worker.as_raw() as u32,
        started_at,
        ended_at: now(),
        exit_code,
        signal,
        sigterm_received: sigterm,
        // Read here, in the scope, once the worker is reaped: the kernel has counted an OOM
        // kill by then, and a SIGTERM that followed it (systemd stopping the scope) is not
        // the whole story.
        memory: cgroup.as_deref().and_then(crate::liveness::memory_facts),
        usage: cgroup.as_deref().and_then(crate::liveness::usage),
        not_started: spec
            .prelude
            .as_ref()
            .and_then(|_| super::upstream::prelude_verdict(&relay.said(), exit_code, signal)),
        output_tail: relay.tail(),
    };
    if let Err(e) = write_status(spec, &rs) {
        say(
            journal,
            spec,
            &format!(
                "cannot record the exit status in {}: {e}",
                spec.status_file.display()
            ),
        );
    }
    // Copy what descendants still write until they close the pipes (a stop of the scope
    // ends them); the exit status is already on record.
    while !relay.done() {
        if wait_readable(&sfd, &relay)? {
            let _ = sfd.read_signal();
        }
        relay.pump();
        let _ = reap(worker);
    }
    Ok(match (exit_code, signal) {
        (Some(c), _) => c.clamp(0, 255) as u8,
        (None, Some(s)) => (128 + s).clamp(0, 255) as u8,
        _ => 1,
    })
}

/// This process's cgroup directory (the run's scope), from `/proc/self/cgroup`.
fn own_cgroup() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(PathBuf::from(format!("/sys/fs/cgroup{}", path.trim())))
}

/// Reap every child that has ended (orphans re-parented to us included); the worker's
/// status once it is among them.
fn reap(worker: Pid) -> Option<WaitStatus> {
    let mut found = None;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return found,
            Ok(st) => {
                if st.pid() == Some(worker)
                    && matches!(st, WaitStatus::Exited(..) | WaitStatus::Signaled(..))
                {
                    found = Some(st);
                }
            }
        }
    }
}

/// Upstream's rotation at spawn: a log over 2 MiB becomes `<task>.log.1` (one kept).
fn rotate_log(path: &Path) {
    const ROTATE_BYTES: u64 = 2 * 1024 * 1024;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file() && m.len() > ROTATE_BYTES) {
        let mut old = path.as_os_str().to_owned();
        old.push(".1");
        let _ = std::fs::rename(path, PathBuf::from(old));
    }
}

/// Open the worker log as the board's owner (`safe_fs`), rotated first: the logs directory
/// is in the tree workers write, and what is created there is the owner's, as upstream's is.
fn open_log(path: &Path, owner: &Owner) -> Result<std::fs::File, String> {
    safe_fs::as_user(owner, || -> std::io::Result<std::fs::File> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        rotate_log(path);
        safe_fs::open_regular(path, Access::AppendCreate)
    })
    .and_then(|r| r)
    .map_err(|e| format!("open {}: {e}", path.display()))
}

/// The worker's stdout and stderr pipes, before the fork.
struct Pipes {
    out_r: OwnedFd,
    out_w: OwnedFd,
    err_r: OwnedFd,
    err_w: OwnedFd,
}

impl Pipes {
    fn new() -> nix::Result<Pipes> {
        let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        Ok(Pipes {
            out_r,
            out_w,
            err_r,
            err_w,
        })
    }

    /// After the fork: keep only the read ends (EOF comes when the last writer is gone).
    fn into_relay(
        self,
        journal: &Journal,
        log: Option<std::fs::File>,
        said: Option<OwnedFd>,
    ) -> Relay<'_> {
        drop(self.out_w);
        drop(self.err_w);
        for fd in [Some(&self.out_r), Some(&self.err_r), said.as_ref()]
            .into_iter()
            .flatten()
        {
            // SAFETY: fcntl on fds we own.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        }
        Relay {
            // stdout at `info`, stderr at `err`, as journald's streams for a unit.
            streams: vec![
                (Some(self.out_r), 6, Lines::default()),
                (Some(self.err_r), 3, Lines::default()),
            ],
            journal,
            log,
            said,
            said_bytes: Vec::new(),
            tail: None,
        }
    }
}

/// Copies the worker's stdout and stderr, line by line, into the journal, and as they came
/// into the log file.
struct Relay<'a> {
    streams: Vec<(Option<OwnedFd>, u8, Lines)>,
    journal: &'a Journal,
    log: Option<std::fs::File>,
    /// The prelude's pipe and what came through it, kept up to `SAID_MAX` (it is read as
    /// it comes, so nothing the prelude runs can block on a full pipe).
    said: Option<OwnedFd>,
    said_bytes: Vec<u8>,
    /// The last `OUTPUT_TAIL` bytes of output, when kept.
    tail: Option<std::collections::VecDeque<u8>>,
}

const SAID_MAX: usize = 4096;

impl Relay<'_> {
    fn done(&self) -> bool {
        self.streams.iter().all(|(r, _, _)| r.is_none())
    }

    fn fds(&self) -> Vec<RawFd> {
        self.streams
            .iter()
            .filter_map(|(r, _, _)| r.as_ref().map(|f| f.as_raw_fd()))
            .chain(self.said.as_ref().map(|f| f.as_raw_fd()))
            .collect()
    }

    /// The last output kept, as text (a character cut at its start is replaced).
    fn tail(&self) -> Option<String> {
        let t = self.tail.as_ref()?;
        let (a, b) = t.as_slices();
        Some(String::from_utf8_lossy(&[a, b].concat()).into_owned())
    }

    /// Everything the prelude said (what is still in its pipe included).
    fn said(&mut self) -> Vec<u8> {
        self.pump_said();
        self.said_bytes.clone()
    }

    fn pump_said(&mut self) {
        let mut buf = [0u8; 1024];
        while let Some(fd) = self.said.as_ref() {
            match nix::unistd::read(fd, &mut buf) {
                Ok(0) => self.said = None,
                Ok(n) => {
                    let room = SAID_MAX.saturating_sub(self.said_bytes.len());
                    self.said_bytes.extend_from_slice(&buf[..n.min(room)]);
                }
                Err(nix::Error::EINTR) => {}
                Err(nix::Error::EAGAIN) => break,
                Err(_) => self.said = None,
            }
        }
    }

    /// Copy whatever is readable now, without blocking.
    fn pump(&mut self) {
        // What came before the prelude's `exec` (its own stderr: upstream's imports warn
        // there) is not the worker's output; it is in the pipes by the time `exec` is said.
        let before = self.said_exec();
        self.pump_said();
        let execed = !before && self.said_exec();
        // Small on purpose: the stack pages a supervisor touches stay its own for the run.
        let mut buf = [0u8; 8192];
        let journal = self.journal;
        for (r, priority, lines) in self.streams.iter_mut() {
            while let Some(fd) = r.as_ref() {
                match nix::unistd::read(fd, &mut buf) {
                    Ok(0) => {
                        lines.finish(|l| journal.send(*priority, l));
                        *r = None;
                    }
                    Ok(n) => {
                        lines.feed(&buf[..n], |l| journal.send(*priority, l));
                        if let Some(t) = self.tail.as_mut() {
                            let keep = &buf[n.saturating_sub(super::spec::OUTPUT_TAIL)..n];
                            t.extend(keep);
                            let over = t.len().saturating_sub(super::spec::OUTPUT_TAIL);
                            t.drain(..over);
                        }
                        if let Some(log) = self.log.as_mut() {
                            let _ = log.write_all(&buf[..n]);
                        }
                    }
                    Err(nix::Error::EINTR) => {}
                    Err(nix::Error::EAGAIN) => break,
                    Err(_) => {
                        lines.finish(|l| journal.send(*priority, l));
                        *r = None;
                    }
                }
            }
        }
        if let Some(t) = self.tail.as_mut().filter(|_| execed) {
            t.clear();
        }
    }

    /// The prelude has said `exec`: what follows is the worker's.
    fn said_exec(&self) -> bool {
        self.said_bytes.ends_with(b"exec\n")
    }
}

/// poll(2) on the signalfd and the relay's pipes; true when the signalfd is readable.
fn wait_readable(sfd: &SignalFd, relay: &Relay) -> Result<bool, Failure> {
    use std::os::fd::AsFd;
    let mut fds = vec![libc::pollfd {
        fd: sfd.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    fds.extend(relay.fds().into_iter().map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }));
    loop {
        // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n >= 0 {
            return Ok(fds[0].revents != 0);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(infra(format!("poll: {e}")));
        }
    }
}
