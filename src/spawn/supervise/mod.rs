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

use std::io::{BufRead, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::journal::Journal;
use super::spec::{Report, WorkerSpec};
use crate::board::now;
use crate::outcome::Fault;
use crate::record::{ExitRecord, TmpdirNote};

mod child;
mod forks;
mod limit;
mod relay;
mod sandbox;

use child::ChildPlan;
use relay::{open_log, wait_readable, Pipes, Relay};

fn report(r: &Report) {
    // Best effort: a dispatcher that died no longer listens, and that must not stop the run.
    if let Ok(line) = serde_json::to_string(r) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

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

fn write_status(spec: &WorkerSpec, status: &ExitRecord) -> std::io::Result<()> {
    let dir = spec.status_file.parent().unwrap_or(Path::new("/"));
    let tmp = spec.status_file.with_extension("json.tmp");
    let bytes = serde_json::to_vec(status).map_err(std::io::Error::other)?;
    // The directory is made when it is missing, not looked for every time.
    let written = match std::fs::write(&tmp, &bytes) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&tmp, &bytes))
        }
        w => w,
    }
    // rename: a reader sees no status or a whole one, never half of one.
    .and_then(|()| std::fs::rename(&tmp, &spec.status_file));
    if written.is_err() {
        // What a full filesystem let us write of it is given back.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Write the exit record: `false` when it must be written again (no space yet), said.
fn record(spec: &WorkerSpec, rs: &ExitRecord, journal: &Journal) -> bool {
    let Err(e) = write_status(spec, rs) else {
        return true;
    };
    // Not kept once the scope is being stopped (`retry_record`).
    let keep = for_want_of_space(&e) && !rs.sigterm_received;
    let then = if keep {
        "; kept, and written once there is room (the run stays open until then)"
    } else {
        ""
    };
    say(
        journal,
        spec,
        &format!(
            "cannot record the exit status in {}: {e}{then}",
            spec.status_file.display()
        ),
    );
    !keep
}

/// Another try at a kept record: `true` once it is written, or given up — on another
/// error, or once the scope is being stopped (`stopping`): whoever stops it books the run
/// without the record, and the supervisor must end before the stop's SIGKILL would end it
/// with the run's TMPDIR left behind.
fn retry_record(spec: &WorkerSpec, rs: &ExitRecord, journal: &Journal, stopping: bool) -> bool {
    let why = match write_status(spec, rs) {
        Ok(()) => {
            say(journal, spec, "the exit status is recorded after all");
            return true;
        }
        Err(e) if for_want_of_space(&e) && !stopping => return false,
        Err(e) if stopping => format!("{e}; the scope is being stopped: not recorded"),
        Err(e) => e.to_string(),
    };
    say(
        journal,
        spec,
        &format!("cannot record the exit status: {why}"),
    );
    true
}

/// A record that could not be written for want of space is kept, and written again this
/// often, until it is: the scope lives on meanwhile, so the dispatcher books the run from
/// the record — the worker's own exit — once there is room, never a guess without it.
const RECORD_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// The write failed for want of space (or of memory for the tmpfs): worth trying again.
fn for_want_of_space(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC | libc::EDQUOT | libc::ENOMEM)
    )
}

/// The run's private `TMPDIR`: a new directory with an unguessable name in `tmp_root`,
/// made by this process (`mkdir` fails on anything already there, so nobody can hand us
/// theirs), mode 0700, then given to the worker through the descriptor just opened on it.
/// In a sticky `/tmp` nobody but its owner can rename or remove the entry afterwards.
fn make_tmpdir(spec: &WorkerSpec) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
    for _ in 0..16 {
        let name = format!(
            "{:016x}{:08x}",
            crate::host::random_u64()?,
            crate::host::random_u64()? as u32
        );
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
    // Started as the fork server (its stdin a socket), it serves until the daemon goes;
    // each child it forks goes on from here as a held supervisor.
    if forks::is_server() {
        if let Some(code) = forks::serve() {
            return code;
        }
    }
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
    let spec: WorkerSpec = match serde_json::from_str::<WorkerSpec>(&line) {
        Ok(mut s) => {
            let groups = std::mem::take(&mut s.log_owner_groups);
            s.log_owner =
                crate::safe_fs::Owner::with_groups(s.log_owner.uid, s.log_owner.gid, groups);
            s
        }
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
    // Noted before the worker can write there: should this process be killed before it
    // removes the directory, a dispatcher restarted since still knows to (no room for the
    // note: the one that started us heard of the directory in our report).
    let noted = TmpdirNote {
        dir: tmpdir.clone(),
        uid: spec.uid,
        gid: spec.gid,
    };
    if let (Some(note), Ok(b)) = (&spec.tmpdir_note, serde_json::to_vec(&noted)) {
        let _ = note.parent().map(std::fs::create_dir_all);
        let _ = std::fs::write(note, b);
    }
    let result = supervise(spec, &tmpdir, journal);
    // The worker has ended (or never started): its TMPDIR goes. remove_dir_all opens each
    // level without following links, so what the worker left there cannot redirect it.
    let _ = std::fs::remove_dir_all(&tmpdir);
    if let Some(note) = &spec.tmpdir_note {
        let _ = std::fs::remove_file(note);
    }
    // In the sandbox the scratch workspace was a mount point: Hermes' own completion emptied
    // it but could not remove it. Removed here when empty (as the board's owner; `rmdir`
    // follows no link and removes nothing else): what Hermes meant, and a later run makes it
    // again.
    if spec.sandbox.is_some() && spec.make_cwd {
        let _ = crate::safe_fs::as_user(&spec.log_owner, || std::fs::remove_dir(&spec.cwd));
    }
    result
}

/// Start the worker, relay its output, wait for it and record how it ended.
fn supervise(spec: &WorkerSpec, tmpdir: &Path, journal: &Journal) -> Result<u8, Failure> {
    let sfd = block_signals()?;
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
    // With a prelude, the process first runs upstream's code (`upstream::PRELUDE`), which
    // then execs the worker's own argv.
    let said = match &spec.prelude {
        Some(_) => Some(
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| infra(format!("pipe: {e}")))?,
        ),
        None => None,
    };
    let exec_argv = exec_argv(spec);
    let plan = ChildPlan::new(
        spec,
        &exec_argv,
        tmpdir,
        devnull.into(),
        (pipes.out_w.as_raw_fd(), pipes.err_w.as_raw_fd()),
        said.as_ref().map(|(_, w)| w.as_raw_fd()),
    )?;
    let started_at = now();
    let mut limit = limit::Limit::new(spec, std::time::Instant::now());
    let worker = child::start(plan, spec, &exec_argv[0])?;
    if spec.sandbox.is_some() {
        // The child's layers are this kernel's (it says nothing once it has exec'd).
        let layers = match crate::liveness::sandbox_layers().1 {
            Some(abi) => format!("a mount namespace, then Landlock (ABI {abi})"),
            None => "a mount namespace (no Landlock on this kernel)".into(),
        };
        journal.send(
            6,
            format!(
                "hermes-mgr supervise: {}: the worker runs in its sandbox: {layers}",
                spec.unit
            )
            .as_bytes(),
        );
    }
    let said = said.map(|(r, _w)| r);
    report(&Report::Started {
        pid: worker.as_raw() as u32,
        tmpdir: Some(tmpdir.to_path_buf()),
    });
    let around = Around::look(spec);
    let mut relay = pipes.into_relay(journal, log, said);
    if spec.output_tail {
        relay.tail = Some(std::collections::VecDeque::with_capacity(
            super::spec::OUTPUT_TAIL,
        ));
    }
    let (status, sigterm) = wait_worker(&sfd, &mut relay, worker, &mut limit, journal, spec)?;
    // What the worker wrote just before it ended is in the pipes by now.
    relay.pump();
    let mut rs = exit_record(
        spec, &around, worker, started_at, status, sigterm, &mut relay,
    );
    rs.timed_out = limit.timed_out();
    rs.paused_seconds = limit.paused_seconds();
    let mut unrecorded = !record(spec, &rs, journal);
    if !unrecorded {
        // The rename woke the dispatcher to book the run, and the scheduler queued it on
        // this CPU (the waker's) about half the time, behind this process's clean-up and
        // exit: ~0.25 ms of the booking's latency (BENCHMARKS.md 14, fourth pass). Nothing
        // left here is urgent: the dispatcher goes first.
        let _ = nix::sched::sched_yield();
    }
    // Copy what descendants still write until they close the pipes (a stop of the scope
    // ends them), and after a timeout until none is left (its SIGKILL is due); the exit
    // status is already on record, or kept until it can be.
    while !relay.done() || limit.leftovers() || unrecorded {
        let look = limit.wait().or(limit.timed_out().then_some(LEFTOVER_LOOK));
        let look = match (unrecorded, look) {
            (true, Some(l)) => Some(l.min(RECORD_RETRY)),
            (true, None) => Some(RECORD_RETRY),
            (false, l) => l,
        };
        let stopping = wait_readable(&sfd, &relay, look)?
            && matches!(sfd.read_signal(), Ok(Some(i)) if i.ssi_signo == libc::SIGTERM as u32);
        if let Some(why) = limit.check() {
            say(journal, spec, &why);
        }
        relay.pump();
        let _ = reap(worker);
        if unrecorded {
            unrecorded = !retry_record(spec, &rs, journal, stopping);
        }
    }
    Ok(match (rs.exit_code, rs.signal) {
        (Some(c), _) => c.clamp(0, 255) as u8,
        (None, Some(s)) => (128 + s).clamp(0, 255) as u8,
        _ => 1,
    })
}

/// SIGTERM (a stop of the scope) must not end the supervisor before the worker, which
/// gets the same SIGTERM from systemd; SIGKILL still ends everything. The blocked signals
/// are read from the returned signalfd.
fn block_signals() -> Result<SignalFd, Failure> {
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
    SignalFd::with_flags(
        &mask,
        nix::sys::signalfd::SfdFlags::SFD_NONBLOCK | nix::sys::signalfd::SfdFlags::SFD_CLOEXEC,
    )
    .map_err(|e| infra(format!("signalfd: {e}")))
}

/// What the child execs: the worker's argv, or with a prelude upstream's code in the
/// worker's Python, handed the plan that ends in the worker's argv.
fn exec_argv(spec: &WorkerSpec) -> Vec<String> {
    match &spec.prelude {
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
    }
}

/// How often leftovers of a timed-out run are looked for once their SIGKILL went out
/// (most are our children: their end wakes us anyway).
const LEFTOVER_LOOK: std::time::Duration = std::time::Duration::from_millis(100);

/// Relay until the worker is reaped, ending it at its runtime limit: its wait status, and
/// whether a SIGTERM came first.
fn wait_worker(
    sfd: &SignalFd,
    relay: &mut Relay,
    worker: Pid,
    limit: &mut limit::Limit,
    journal: &Journal,
    spec: &WorkerSpec,
) -> Result<(WaitStatus, bool), Failure> {
    let mut sigterm = false;
    loop {
        let woke = wait_readable(sfd, relay, limit.wait())?;
        if let Some(why) = limit.check() {
            say(journal, spec, &why);
        }
        if woke {
            match sfd.read_signal() {
                Ok(Some(info)) if info.ssi_signo == libc::SIGTERM as u32 => sigterm = true,
                Ok(_) => {}
                Err(nix::Error::EINTR | nix::Error::EAGAIN) => {}
                Err(e) => return Err(infra(format!("read signalfd: {e}"))),
            }
        }
        relay.pump();
        if let Some(st) = reap(worker) {
            return Ok((st, sigterm));
        }
    }
}

/// What the exit record reads besides the worker's status, looked up while the worker
/// runs — neither on the way to its start nor on the way to the record: the scope's cgroup
/// (this process is in it, and stays) and the board's directory.
struct Around {
    cgroup: Option<PathBuf>,
    board_dir: Option<std::os::fd::OwnedFd>,
}

impl Around {
    fn look(spec: &WorkerSpec) -> Around {
        Around {
            cgroup: own_cgroup(),
            board_dir: spec.board_dir.as_deref().and_then(open_dir),
        }
    }
}

/// The exit record of a reaped worker.
fn exit_record(
    spec: &WorkerSpec,
    around: &Around,
    worker: Pid,
    started_at: i64,
    status: WaitStatus,
    sigterm: bool,
    relay: &mut Relay,
) -> ExitRecord {
    let (exit_code, signal) = match status {
        WaitStatus::Exited(_, c) => (Some(c), None),
        WaitStatus::Signaled(_, s, _) => (None, Some(s as i32)),
        _ => (None, None),
    };
    let (memory, usage) = around
        .cgroup
        .as_deref()
        .map_or((None, None), crate::liveness::exit_facts);
    ExitRecord {
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
        memory,
        usage,
        not_started: spec
            .prelude
            .as_ref()
            .and_then(|_| super::upstream::prelude_verdict(&relay.said(), exit_code, signal)),
        output_tail: relay.tail(),
        paused_seconds: 0,
        timed_out: false,
        board_full: around.board_dir.as_ref().is_some_and(no_room),
    }
}

/// Less room than this for an unprivileged writer on a board's filesystem: no SQLite write
/// (a page, its WAL frame) is sure to fit.
const BOARD_ROOM_NEEDED: u64 = 64 * 1024;

/// The board's directory, opened without following a link in its place.
fn open_dir(dir: &Path) -> Option<std::os::fd::OwnedFd> {
    use nix::fcntl::{open, OFlag};
    open(
        dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .ok()
}

/// The filesystem of the board's directory (`open_dir`) has less than `BOARD_ROOM_NEEDED`
/// for an unprivileged writer (`f_bavail`: what root keeps for itself is no room for the
/// worker).
fn no_room(dir: &std::os::fd::OwnedFd) -> bool {
    nix::sys::statvfs::fstatvfs(dir)
        .is_ok_and(|s| s.blocks_available().saturating_mul(s.fragment_size()) < BOARD_ROOM_NEEDED)
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
