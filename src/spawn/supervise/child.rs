//! The worker's side of the fork: everything it needs allocated before (`ChildPlan`), raw
//! system calls only after (`become_worker`), and why it did not become the worker read
//! back from memory the two share until its exec (`start`).

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::wait::waitpid;
use nix::unistd::Pid;

use super::{infra, task, Failure};
use crate::spawn::spec::WorkerSpec;

fn cstr(s: &str, what: &str) -> Result<CString, Failure> {
    CString::new(s).map_err(|_| task(format!("{what} contains a NUL byte")))
}

/// Everything the forked child needs, allocated before the fork.
pub(super) struct ChildPlan {
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
    /// The worker's sandbox, when it has one.
    sandbox: Option<super::sandbox::Prepared>,
}

impl ChildPlan {
    /// The plan for `spec`'s worker, exec'ing `exec_argv` with the run's `tmpdir`; `out`
    /// are the write ends of its stdout and stderr pipes, `said` the prelude's.
    pub(super) fn new(
        spec: &WorkerSpec,
        exec_argv: &[String],
        tmpdir: &Path,
        stdin: OwnedFd,
        out: (RawFd, RawFd),
        said: Option<RawFd>,
    ) -> Result<ChildPlan, Failure> {
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
        Ok(ChildPlan {
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
            stdin,
            stdout: out.0,
            stderr: out.1,
            said,
            sandbox: spec
                .sandbox
                .as_ref()
                .map(|s| super::sandbox::Prepared::new(s, tmpdir))
                .transpose()?,
        })
    }
}

/// The child's stack while it shares our memory (`start`): what `become_worker` and the
/// sandbox's steps need, with room to spare; below it a page that faults.
const CHILD_STACK: usize = 256 * 1024;

/// What the child shares with us until its exec: the plan, and where it writes why it did
/// not become the worker.
struct Shared<'a> {
    plan: &'a ChildPlan,
    /// (step, errno); `NOT_FAILED` until the child writes it.
    failed: (u32, i32),
}

const NOT_FAILED: u32 = u32::MAX;

/// The child's entry (`clone`): become the worker, or say why not and end.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Shared` that `start` keeps alive, and suspended, until this
    // process has exec'd or ended (CLONE_VFORK).
    let shared = unsafe { &mut *arg.cast::<Shared>() };
    let failed = become_worker(shared.plan);
    // SAFETY: a plain store into the parent's memory, read once it resumes; then leave
    // without running any of its atexit handlers or destructors.
    unsafe {
        std::ptr::write_volatile(&mut shared.failed, failed);
        libc::_exit(127)
    }
}

/// A stack for the child: mapped anew, its lowest page a guard.
struct Stack {
    base: *mut libc::c_void,
    len: usize,
}

impl Stack {
    fn new() -> std::io::Result<Stack> {
        let page = 4096;
        let len = CHILD_STACK + page;
        // SAFETY: a fresh private anonymous mapping, then its first page made inaccessible.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            let stack = Stack { base, len };
            if libc::mprotect(base, page, libc::PROT_NONE) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(stack)
        }
    }

    /// Its top, 16-byte aligned, where a stack that grows down starts.
    fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the mapping's end, which is page-aligned.
        unsafe { self.base.cast::<u8>().add(self.len).cast() }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer used (the child has exec'd or ended).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// Start the worker from `plan` (`program` names it in errors): its PID once it has exec'd,
/// or why it did not become the worker, and whose fault that is.
///
/// As `posix_spawn` does: the child shares this process's memory, and this process waits
/// until the child has exec'd or ended (`CLONE_VM | CLONE_VFORK`): no copy of the address
/// space to make, fault in and tear down again at the exec, per run. With every signal
/// blocked meanwhile, no handler of ours can run on the shared memory in the child; the
/// child sets every disposition to the default before it unblocks any.
pub(super) fn start(plan: ChildPlan, spec: &WorkerSpec, program: &str) -> Result<Pid, Failure> {
    let stack = Stack::new().map_err(|e| infra(format!("map the worker's start stack: {e}")))?;
    let mut shared = Shared {
        plan: &plan,
        failed: (NOT_FAILED, 0),
    };
    // SAFETY: sigset operations on local values; the mask is this (only) thread's.
    let (all, mut before) = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        (all, std::mem::zeroed::<libc::sigset_t>())
    };
    // SAFETY: blocking signals in this single-threaded process; restored below.
    unsafe { libc::sigprocmask(libc::SIG_SETMASK, &all, &mut before) };
    // SAFETY: `child_main` makes only raw system calls on what `plan` allocated before,
    // on its own stack, and this process is suspended until it has exec'd or ended; the
    // supervisor is single-threaded (it never starts a thread).
    let pid = unsafe {
        libc::clone(
            child_main,
            stack.top(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&mut shared as *mut Shared).cast(),
        )
    };
    let cloned = std::io::Error::last_os_error();
    // SAFETY: the mask saved above, back.
    unsafe { libc::sigprocmask(libc::SIG_SETMASK, &before, std::ptr::null_mut()) };
    if pid < 0 {
        return Err(infra(format!("clone: {cloned}")));
    }
    let worker = Pid::from_raw(pid);
    drop(stack);
    // SAFETY: the child wrote it, if at all, before it ended; it no longer runs on it.
    let (step, e) = unsafe { std::ptr::read_volatile(&shared.failed) };
    let sandboxed = plan.sandbox.as_ref().map(|s| s.paths.clone());
    drop(plan);
    if step == NOT_FAILED {
        return Ok(worker);
    }
    // The child never became the worker; reap it and say why.
    let _ = waitpid(worker, None);
    let e = std::io::Error::from_raw_os_error(e);
    if let Some(paths) = step.checked_sub(STEP_SANDBOX).and(sandboxed.as_ref()) {
        return Err(sandbox_failure(step - STEP_SANDBOX, e, paths, spec));
    }
    let what = STEPS.get(step as usize).copied().unwrap_or("?");
    let enter = || {
        format!(
            "cannot enter the workspace {} as uid {}: {e}",
            spec.cwd.display(),
            spec.uid
        )
    };
    let start = || format!("cannot start {program}: {what}: {e}");
    Err(match step {
        // A workspace is the task's: a `dir:` one it names, a scratch one in the Hermes
        // tree its worker writes (a worker can make its own unenterable). Counting it
        // trips the breaker on that task alone; as ours it would stop every pass. A host
        // that cannot make one (full, read-only) is ours: `_` below.
        STEP_CHDIR => task(enter()),
        // The binary is the dispatcher's configuration; an argv or environment too big
        // for exec comes from the task's data.
        STEP_EXEC if e.raw_os_error() == Some(libc::E2BIG) => task(start()),
        _ => infra(start()),
    })
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
/// Steps of the sandbox (`sandbox::STEP_*`), on which item: `STEP_SANDBOX + step << 16 + item`.
const STEP_SANDBOX: u32 = 0x1000_0000;
const STEP_CHDIR: u32 = 8;
const STEP_EXEC: u32 = 9;
const STEP_MKDIR: u32 = 10;
const STEP_CLOSE_RANGE: u32 = 11;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Why the sandbox could not be built: the workspace's own condition (not there, not a
/// directory, a link) is the task's, as entering it is; anything else is the dispatcher's —
/// never a worker started without the sandbox it was configured with.
fn sandbox_failure(
    code: u32,
    e: std::io::Error,
    paths: &[std::path::PathBuf],
    spec: &WorkerSpec,
) -> Failure {
    let (step, item) = ((code >> 16) as usize, (code & 0xffff) as usize);
    let what = super::sandbox::STEPS.get(step).copied().unwrap_or("?");
    let path = paths.get(item);
    let said = match path {
        Some(p) => format!("cannot build the sandbox: {what} {}: {e}", p.display()),
        None => format!("cannot build the sandbox: {what}: {e}"),
    };
    let workspace = path.is_some_and(|p| *p == spec.cwd);
    if workspace && step as u16 == super::sandbox::STEP_OPEN {
        task(format!(
            "cannot enter the workspace {} as uid {}: {said}",
            spec.cwd.display(),
            spec.uid
        ))
    } else {
        infra(said)
    }
}

/// `sandbox::Failed` as the child reports it.
fn sandbox_code(f: super::sandbox::Failed) -> (u32, i32) {
    (
        STEP_SANDBOX + ((f.step as u32) << 16) + f.item as u32,
        f.errno,
    )
}

/// The sandbox's mount namespace, when the run has one (as root). The scratch workspace is
/// made first (it is mounted into the sandbox), with the worker's file-system identity: a
/// path in its tree gets nothing of root's.
///
/// SAFETY: raw system calls on what `p` prepared before the fork.
unsafe fn sandbox(
    p: &ChildPlan,
    mounts: &mut [i32; super::sandbox::MAX_ITEMS],
) -> Result<(), (u32, i32)> {
    let Some(sb) = &p.sandbox else {
        return Ok(());
    };
    if !p.mkdirs.is_empty() {
        libc::setfsgid(p.gid);
        libc::setfsuid(p.uid);
        let made = make_workspace(p);
        libc::setfsuid(0);
        libc::setfsgid(0);
        made.map_err(|e| (STEP_MKDIR, e))?;
    }
    super::sandbox::enter(sb, mounts).map_err(sandbox_code)
}

/// `mkdir -p` of the scratch workspace, with this process's file-system identity. The host's
/// own condition (a full or read-only file system, an I/O error) is said as such; anything
/// else (it exists, a worker made its path unusable) is found when it is entered.
///
/// SAFETY: raw system calls on strings `p` prepared before the fork.
unsafe fn make_workspace(p: &ChildPlan) -> Result<(), i32> {
    // Most often its parent is there (and often itself): one call then, not one a level.
    if let Some(dir) = p.mkdirs.last() {
        if libc::mkdir(dir.as_ptr(), 0o777) == 0 || errno() == libc::EEXIST {
            return Ok(());
        }
    }
    for dir in &p.mkdirs {
        if libc::mkdir(dir.as_ptr(), 0o777) < 0 {
            let e = errno();
            if matches!(
                e,
                libc::ENOSPC | libc::EDQUOT | libc::EROFS | libc::EIO | libc::ENOMEM
            ) {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Ignored or blocked signals survive exec: give the worker default dispositions (the
/// supervisor ignores SIGPIPE, and blocks SIGTERM and SIGCHLD). Dispositions first, then
/// the mask: while this process shares the supervisor's memory (`start`), no handler of
/// the supervisor's may run here.
///
/// SAFETY: raw system calls on this process's signal state only.
unsafe fn default_signals() {
    for sig in 1..libc::SIGRTMAX() {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    let mut none: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut none);
    libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
}

/// The child side, between fork and exec: raw system calls only (async-signal-safe, no
/// allocation), on data `ChildPlan` prepared. Returns only on failure: (step, errno).
fn become_worker(p: &ChildPlan) -> (u32, i32) {
    // SAFETY (whole function): each call is a plain system call on this process, with
    // pointers into `p`, which outlives the calls; nothing here allocates or locks.
    unsafe {
        default_signals();
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
            crate::spawn::upstream::CLOSE_RANGE_CLOEXEC,
        ) < 0
        {
            return (STEP_CLOSE_RANGE, errno());
        }
        let mut mounts = [-1i32; super::sandbox::MAX_ITEMS];
        if let Err(e) = sandbox(p, &mut mounts) {
            return e;
        }
        // The system calls themselves, not libc's wrappers: those may signal every thread
        // of what they take for a threaded process to change its ids too.
        if libc::syscall(libc::SYS_setgroups, p.groups.len(), p.groups.as_ptr()) < 0 {
            return (2, errno());
        }
        if libc::syscall(libc::SYS_setresgid, p.gid, p.gid, p.gid) < 0 {
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
        if libc::syscall(libc::SYS_setresuid, p.uid, p.uid, p.uid) < 0 {
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
        match &p.sandbox {
            Some(sb) => {
                if let Err(f) = super::sandbox::landlock(sb, &mounts) {
                    return sandbox_code(f);
                }
            }
            // The workspace is reached only now, as the worker: a link in the board's tree
            // leads nowhere the worker could not go anyway, and one it may not enter fails.
            None => {
                if let Err(e) = make_workspace(p) {
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
