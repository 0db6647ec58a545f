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
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid};

use super::spec::{Report, RunStatus, WorkerSpec};
use crate::board::now;

/// journald's stream socket (`systemd.exec(5)`, `sd_journal_stream_fd(3)`).
const JOURNAL_STDOUT: &str = "/run/systemd/journal/stdout";

fn report(r: &Report) {
    // Best effort: a dispatcher that died no longer listens, and that must not stop the run.
    if let Ok(line) = serde_json::to_string(r) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// Connect one journal stream from inside the scope. journald attributes the stream to the
/// unit of the *connecting* process (this one, already in the scope), and, because we are
/// root, honours the unit name in the header should our cgroup be unreadable later.
fn journal_stream(identifier: &str, unit: &str, priority: u8) -> std::io::Result<UnixStream> {
    let s = UnixStream::connect(JOURNAL_STDOUT)?;
    s.shutdown(std::net::Shutdown::Read)?;
    // identifier, unit id, priority, level prefix, forward to syslog, kmsg, console
    let header = format!("{identifier}\n{unit}\n{priority}\n0\n0\n0\n0\n");
    (&s).write_all(header.as_bytes())?;
    Ok(s)
}

fn cstr(s: &str, what: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} contains a NUL byte"))
}

/// Everything the forked child needs, allocated before the fork.
struct ChildPlan {
    path: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: CString,
    uid: nix::unistd::Uid,
    gid: nix::unistd::Gid,
    groups: Vec<nix::unistd::Gid>,
    stdin: OwnedFd,
    stdout: RawFd,
    stderr: RawFd,
}

/// The child side, between fork and exec. Returns only on failure, with the step and errno.
fn become_worker(p: &ChildPlan) -> (&'static str, nix::Error) {
    use nix::unistd::{chdir, setgroups, setresgid, setresuid, setsid};
    // Ignored or blocked signals survive exec: give the worker default dispositions (the
    // Rust runtime ignores SIGPIPE, and this supervisor blocks SIGTERM and SIGCHLD).
    let _ = SigSet::empty().thread_set_mask();
    for sig in Signal::iterator() {
        if sig != Signal::SIGKILL && sig != Signal::SIGSTOP {
            // SAFETY: restoring SIG_DFL installs no handler.
            let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) };
        }
    }
    // A session of its own, as upstream starts workers (`start_new_session=True`).
    if let Err(e) = setsid() {
        return ("setsid", e);
    }
    for (fd, to) in [(p.stdin.as_raw_fd(), 0), (p.stdout, 1), (p.stderr, 2)] {
        // SAFETY: dup2 on fds this process owns; it allocates nothing.
        if unsafe { libc::dup2(fd, to) } < 0 {
            return ("dup2", nix::Error::last());
        }
    }
    if let Err(e) = chdir(p.cwd.as_c_str()) {
        return ("chdir to the workspace", e);
    }
    if let Err(e) = setgroups(&p.groups) {
        return ("setgroups", e);
    }
    if let Err(e) = setresgid(p.gid, p.gid, p.gid) {
        return ("setresgid", e);
    }
    // Still root here: empty the bounding set so nothing exec'd later can regain a
    // capability, then leave root for good.
    if caps::clear(None, caps::CapSet::Bounding).is_err() {
        return ("clear the capability bounding set", nix::Error::EPERM);
    }
    if let Err(e) = setresuid(p.uid, p.uid, p.uid) {
        return ("setresuid", e);
    }
    // Leaving uid 0 emptied the permitted, effective and ambient sets; the inheritable set
    // survives a uid change, so clear it (and the others, to be explicit).
    for set in [
        caps::CapSet::Inheritable,
        caps::CapSet::Ambient,
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
    ] {
        if caps::clear(None, set).is_err() {
            return ("clear capabilities", nix::Error::EPERM);
        }
    }
    if let Err(e) = nix::sys::prctl::set_no_new_privs() {
        return ("set no_new_privs", e);
    }
    match nix::unistd::execve(&p.path, &p.argv, &p.envp) {
        Err(e) => ("exec", e),
        Ok(never) => match never {},
    }
}

fn write_status(spec: &WorkerSpec, status: &RunStatus) -> std::io::Result<()> {
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

fn make_tmpdir(spec: &WorkerSpec) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(&spec.tmpdir) {
        Ok(()) => {}
        // A leftover from an earlier supervisor of this very run: reuse only if it is a
        // real directory (not a symlink planted by someone else).
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if !std::fs::symlink_metadata(&spec.tmpdir)?.is_dir() {
                return Err(e);
            }
        }
        Err(e) => return Err(e),
    }
    std::os::unix::fs::chown(&spec.tmpdir, Some(spec.uid), Some(spec.gid))
}

/// Entry point of `hermes-mgr supervise`. Returns the process exit code: the worker's own
/// (128 + signal when killed), 127 when it could not be started.
pub fn main() -> u8 {
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
    match run(&spec) {
        Ok(code) => code,
        Err(reason) => {
            eprintln!("hermes-mgr supervise: {}: {reason}", spec.unit);
            report(&Report::Failed { reason });
            127
        }
    }
}

fn run(spec: &WorkerSpec) -> Result<u8, String> {
    // Our own diagnostics go to the unit's journal too, from here on.
    let out = journal_stream(&spec.identifier, &spec.unit, 6)
        .map_err(|e| format!("connect to journald ({JOURNAL_STDOUT}): {e}"))?;
    let err = journal_stream(&spec.identifier, &spec.unit, 3)
        .map_err(|e| format!("connect to journald ({JOURNAL_STDOUT}): {e}"))?;
    // SAFETY: dup2 on fds this process owns.
    let _ = unsafe { libc::dup2(err.as_raw_fd(), 2) };
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| format!("become child subreaper: {e}"))?;
    make_tmpdir(spec).map_err(|e| format!("create TMPDIR {}: {e}", spec.tmpdir.display()))?;

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
        .map_err(|e| format!("block signals: {e}"))?;
    let sfd = SignalFd::with_flags(
        &mask,
        nix::sys::signalfd::SfdFlags::SFD_NONBLOCK | nix::sys::signalfd::SfdFlags::SFD_CLOEXEC,
    )
    .map_err(|e| format!("signalfd: {e}"))?;

    let devnull = std::fs::File::open("/dev/null").map_err(|e| format!("open /dev/null: {e}"))?;
    // With a log file, the worker writes into pipes and we copy to the journal and the file;
    // without one, it writes straight into its journal streams.
    let tee = match &spec.log_file {
        Some(path) => Some(Tee::open(path, spec.log_owner)?),
        None => None,
    };
    let (child_out, child_err) = match &tee {
        Some(t) => (t.out_w.as_raw_fd(), t.err_w.as_raw_fd()),
        None => (out.as_raw_fd(), err.as_raw_fd()),
    };
    let plan = ChildPlan {
        path: cstr(&spec.argv[0], "worker path")?,
        argv: spec
            .argv
            .iter()
            .map(|a| cstr(a, "an argument"))
            .collect::<Result<_, _>>()?,
        envp: spec
            .env
            .iter()
            .map(|(k, v)| cstr(&format!("{k}={v}"), "the environment"))
            .collect::<Result<_, _>>()?,
        cwd: cstr(&spec.cwd.to_string_lossy(), "the workspace path")?,
        uid: nix::unistd::Uid::from_raw(spec.uid),
        gid: nix::unistd::Gid::from_raw(spec.gid),
        groups: spec
            .groups
            .iter()
            .map(|g| nix::unistd::Gid::from_raw(*g))
            .collect(),
        stdin: devnull.into(),
        stdout: child_out,
        stderr: child_err,
    };
    // Exec failures travel back on a close-on-exec pipe: EOF means exec succeeded.
    let (err_r, err_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let started_at = now();
    // SAFETY: this process is single-threaded (the supervisor never starts a thread), so
    // the child may run any code; it still only uses what `plan` allocated.
    let worker = match unsafe { nix::unistd::fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop(err_r);
            let (step, e) = become_worker(&plan);
            let msg = format!("{step}: {}", e.desc());
            let _ = nix::unistd::write(&err_w, msg.as_bytes());
            // SAFETY: leave without running the parent's atexit handlers or destructors.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => child,
    };
    drop(err_w);
    drop(plan);
    let mut failure = String::new();
    let _ = std::fs::File::from(err_r).read_to_string(&mut failure);
    if !failure.is_empty() {
        // The child never became the worker; reap it and say why.
        let _ = waitpid(worker, None);
        let _ = std::fs::remove_dir_all(&spec.tmpdir);
        return Err(format!("cannot start {}: {failure}", spec.argv[0]));
    }
    report(&Report::Started {
        pid: worker.as_raw() as u32,
    });
    let mut relay = tee.map(|t| t.into_relay(out, err));

    let mut sigterm = false;
    let status = loop {
        if wait_readable(&sfd, relay.as_ref())? {
            match sfd.read_signal() {
                Ok(Some(info)) if info.ssi_signo == libc::SIGTERM as u32 => sigterm = true,
                Ok(_) => {}
                Err(nix::Error::EINTR | nix::Error::EAGAIN) => {}
                Err(e) => return Err(format!("read signalfd: {e}")),
            }
        }
        if let Some(r) = relay.as_mut() {
            r.pump();
        }
        if let Some(st) = reap(worker) {
            break st;
        }
    };
    let (exit_code, signal) = match status {
        WaitStatus::Exited(_, c) => (Some(c), None),
        WaitStatus::Signaled(_, s, _) => (None, Some(s as i32)),
        _ => (None, None),
    };
    let rs = RunStatus {
        task: spec.task.clone(),
        run_id: spec.run_id,
        unit: spec.unit.clone(),
        worker_pid: worker.as_raw() as u32,
        started_at,
        ended_at: now(),
        exit_code,
        signal,
        sigterm_received: sigterm,
    };
    if let Err(e) = write_status(spec, &rs) {
        eprintln!(
            "hermes-mgr supervise: {}: cannot record the exit status in {}: {e}",
            spec.unit,
            spec.status_file.display()
        );
    }
    let _ = std::fs::remove_dir_all(&spec.tmpdir);
    // Copy what descendants still write until they close the pipes (a stop of the scope
    // ends them); the exit status is already on record.
    if let Some(mut r) = relay {
        while !r.done() {
            if wait_readable(&sfd, Some(&r))? {
                let _ = sfd.read_signal();
            }
            r.pump();
            let _ = reap(worker);
        }
    }
    Ok(match (exit_code, signal) {
        (Some(c), _) => c.clamp(0, 255) as u8,
        (None, Some(s)) => (128 + s).clamp(0, 255) as u8,
        _ => 1,
    })
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

/// The worker's output pipes and the log file, before the fork.
struct Tee {
    out_r: OwnedFd,
    out_w: OwnedFd,
    err_r: OwnedFd,
    err_w: OwnedFd,
    log: std::fs::File,
}

impl Tee {
    fn open(path: &Path, owner: (u32, u32)) -> Result<Tee, String> {
        let (out_r, out_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        let (err_r, err_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("open the worker log {}: {e}", path.display()))?;
        // `hermes kanban log`, run as the board's owner, must be able to read it.
        let _ = std::os::unix::fs::fchown(&log, Some(owner.0), Some(owner.1));
        Ok(Tee {
            out_r,
            out_w,
            err_r,
            err_w,
            log,
        })
    }

    /// After the fork: keep only the read ends (EOF comes when the last writer is gone).
    fn into_relay(self, journal_out: UnixStream, journal_err: UnixStream) -> Relay {
        drop(self.out_w);
        drop(self.err_w);
        for fd in [&self.out_r, &self.err_r] {
            // SAFETY: fcntl on fds we own.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        }
        Relay {
            streams: vec![
                (Some(self.out_r), journal_out),
                (Some(self.err_r), journal_err),
            ],
            log: self.log,
        }
    }
}

/// Copies the worker's stdout and stderr into its journal streams and the log file.
struct Relay {
    streams: Vec<(Option<OwnedFd>, UnixStream)>,
    log: std::fs::File,
}

impl Relay {
    fn done(&self) -> bool {
        self.streams.iter().all(|(r, _)| r.is_none())
    }

    fn fds(&self) -> Vec<RawFd> {
        self.streams
            .iter()
            .filter_map(|(r, _)| r.as_ref().map(|f| f.as_raw_fd()))
            .collect()
    }

    /// Copy whatever is readable now, without blocking.
    fn pump(&mut self) {
        let mut buf = [0u8; 65536];
        for (r, journal) in self.streams.iter_mut() {
            while let Some(fd) = r.as_ref() {
                match nix::unistd::read(fd, &mut buf) {
                    Ok(0) => *r = None,
                    Ok(n) => {
                        let _ = journal.write_all(&buf[..n]);
                        let _ = self.log.write_all(&buf[..n]);
                    }
                    Err(nix::Error::EINTR) => {}
                    Err(nix::Error::EAGAIN) => break,
                    Err(_) => *r = None,
                }
            }
        }
    }
}

/// poll(2) on the signalfd and the relay's pipes; true when the signalfd is readable.
fn wait_readable(sfd: &SignalFd, relay: Option<&Relay>) -> Result<bool, String> {
    use std::os::fd::AsFd;
    let mut fds = vec![libc::pollfd {
        fd: sfd.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    if let Some(r) = relay {
        fds.extend(r.fds().into_iter().map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }));
    }
    loop {
        // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n >= 0 {
            return Ok(fds[0].revents != 0);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("poll: {e}"));
        }
    }
}
