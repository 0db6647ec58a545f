//! Which supervisor program this process starts, fixed once: every run of one dispatcher
//! gets the supervisor that dispatcher was built with, whatever a package upgrade puts on
//! disk while it runs (the two speak a private protocol on the supervisor's stdin/stdout).
//!
//! The program is `hermes-mgr-supervise` beside this binary (a cargo build) or in
//! `../libexec/hermes-mgr/` (the packages), held as an `O_PATH` descriptor and started as
//! `/proc/self/fd/N`; without it, this very binary (`/proc/self/exe supervise`), which
//! does the same but costs each run ~300 kB more (see `src/bin/hermes-mgr-supervise.rs`).
//!
//! The daemon starts that program once more, as its fork server (`serve_forks`,
//! `supervise::forks`): each held supervisor is then forked from it, not exec'd anew; the
//! one-shot CLI, or a daemon whose server is gone, starts the program anew for each.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::net::unix::pipe;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

pub const NAME: &str = "hermes-mgr-supervise";

pub struct Program {
    /// The separate supervisor, held open; `None`: this binary.
    fd: Option<OwnedFd>,
    /// Where it was found, for the journal.
    pub path: PathBuf,
}

impl Program {
    /// What to execute: `/proc/self/fd/N` in the child is the held file (the descriptor is
    /// close-on-exec, and an ELF file is loaded before it closes).
    pub fn command(&self) -> std::process::Command {
        use std::os::unix::process::CommandExt;
        let mut c = match &self.fd {
            Some(fd) => std::process::Command::new(format!("/proc/self/fd/{}", fd.as_raw_fd())),
            None => std::process::Command::new("/proc/self/exe"),
        };
        // The same command line either way: `ps` and `pgrep` see `hermes-mgr supervise`.
        c.arg0("hermes-mgr").arg("supervise");
        c
    }
}

/// A supervisor started and held: blocked reading its spec from `stdin`. It is this
/// process's child either way (started here, or forked by the fork server with
/// `CLONE_PARENT`): `HeldSupervisor` kills and reaps it by PID until it is released.
pub struct Held {
    pub pid: u32,
    pub stdin: pipe::Sender,
    pub stdout: pipe::Receiver,
}

/// Start a held supervisor: forked by the fork server when this process runs one
/// (`serve_forks`), else the program started anew (the one-shot CLI; the server gone, or
/// its fork failed). `timeout`: how long a fork may take before the server is given up.
pub async fn start_held(timeout: Duration) -> std::io::Result<Held> {
    if let Some(held) = forked(timeout).await {
        return Ok(held);
    }
    let mut child = supervisor()
        .command()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let pid = child.id();
    let pipes = match (child.stdin.take(), child.stdout.take()) {
        (Some(i), Some(o)) => pipe::Sender::from_owned_fd(OwnedFd::from(i))
            .and_then(|i| Ok((i, pipe::Receiver::from_owned_fd(OwnedFd::from(o))?))),
        _ => Err(std::io::Error::other("supervisor pipes missing")),
    };
    match pipes {
        Ok((stdin, stdout)) => Ok(Held { pid, stdin, stdout }),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

/// The fork server of this process (`supervise::forks`), when it serves one.
struct ForkServer {
    /// This end of its socket (its stdin is the other): closed, the server ends.
    socket: OwnedFd,
    pid: u32,
    /// Its pidfd, to kill it without naming a PID that may be someone else's by then (the
    /// daemon reaps any child of its own that exits). `None` before Linux 5.3.
    pidfd: Option<OwnedFd>,
}

struct Forks {
    /// Whether this process forks its supervisors (the daemon does; the CLI does not).
    on: bool,
    server: Option<ForkServer>,
    /// When a server was last started: one that keeps dying is started again at most
    /// once per `RESTART`, the program started anew for each run meanwhile.
    started: Option<Instant>,
}

static FORKS: Mutex<Forks> = Mutex::new(Forks {
    on: false,
    server: None,
    started: None,
});

const RESTART: Duration = Duration::from_secs(1);

/// From now on this process's supervisors are forked by a fork server, started now:
/// saves each run the program's start (its `execve`, ELF load and libc start-up). The
/// daemon calls it at its start, after `supervisor()`. Its children are this process's
/// children: it must reap them (the daemon does, on SIGCHLD) — and the server itself,
/// should it die.
pub fn serve_forks() -> std::io::Result<u32> {
    let mut forks = FORKS.lock().unwrap_or_else(|e| e.into_inner());
    forks.on = true;
    forks.started = Some(Instant::now());
    let server = start_server()?;
    let pid = server.pid;
    forks.server = Some(server);
    Ok(pid)
}

fn start_server() -> std::io::Result<ForkServer> {
    let (ours, theirs) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )?;
    let child = supervisor()
        .command()
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let pid = child.id();
    // SAFETY: pidfd_open of our own child, not reaped yet; the result is a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a descriptor pidfd_open just returned is ours alone.
    let pidfd = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) });
    Ok(ForkServer {
        socket: ours,
        pid,
        pidfd,
    })
}

/// Ask the fork server for a held supervisor: `None` when this process has none, or it
/// failed (then it is stopped, and started again later).
async fn forked(timeout: Duration) -> Option<Held> {
    use tokio::io::AsyncReadExt;
    let (server, stdin_w, stdout_r) = {
        let mut forks = FORKS.lock().unwrap_or_else(|e| e.into_inner());
        if !forks.on {
            return None;
        }
        if forks.server.is_none() && forks.started.is_none_or(|t| t.elapsed() >= RESTART) {
            forks.started = Some(Instant::now());
            match start_server() {
                Ok(s) => {
                    tracing::info!(pid = s.pid, "supervisor fork server started again");
                    forks.server = Some(s);
                }
                Err(e) => tracing::warn!("cannot start the supervisor fork server: {e}"),
            }
        }
        let server = forks.server.as_ref()?;
        let (stdin_r, stdin_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).ok()?;
        let (stdout_r, stdout_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).ok()?;
        // Our copies of the child's ends (`stdin_r`, `stdout_w`) close at the end of this
        // block, once sent: the child then holds the only ones.
        match send(&server.socket, &stdin_r, &stdout_w) {
            Ok(()) => {}
            // Its socket is full (requests it has not read yet): this one is started anew.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
            Err(e) => {
                let pid = server.pid;
                lost(&mut forks, pid, &format!("cannot reach it: {e}"));
                return None;
            }
        }
        (server.pid, stdin_w, stdout_r)
    };
    let mut stdout = pipe::Receiver::from_owned_fd(stdout_r).ok()?;
    let mut word = [0u8; 4];
    let why = match tokio::time::timeout(timeout, stdout.read_exact(&mut word)).await {
        Ok(Ok(_)) => match i32::from_ne_bytes(word) {
            pid if pid > 0 => {
                return Some(Held {
                    pid: pid as u32,
                    stdin: pipe::Sender::from_owned_fd(stdin_w).ok()?,
                    stdout,
                })
            }
            // It could not fork (a limit): the program is started instead, the server kept.
            errno => {
                tracing::warn!(
                    "the supervisor fork server could not fork: {}",
                    std::io::Error::from_raw_os_error(-errno)
                );
                return None;
            }
        },
        Ok(Err(e)) => format!("no answer: {e}"),
        Err(_) => format!("no answer within {timeout:?}"),
    };
    let mut forks = FORKS.lock().unwrap_or_else(|e| e.into_inner());
    lost(&mut forks, server, &why);
    None
}

/// The server `pid` failed: forgotten — its socket closed, which ends it, and SIGKILLed
/// should it be stuck (the daemon reaps it as any child of its own).
fn lost(forks: &mut Forks, pid: u32, why: &str) {
    if forks.server.as_ref().is_none_or(|s| s.pid != pid) {
        return;
    }
    tracing::warn!(
        pid,
        "supervisor fork server lost ({why}); supervisors are started anew meanwhile"
    );
    if let Some(fd) = forks.server.take().and_then(|s| s.pidfd) {
        // SAFETY: pidfd_send_signal on a pidfd we own; no siginfo.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }
}

/// One request: the byte `F` and the new supervisor's stdin (read end) and stdout (write
/// end).
fn send(socket: &OwnedFd, stdin: &OwnedFd, stdout: &OwnedFd) -> std::io::Result<()> {
    let fds = [stdin.as_raw_fd(), stdout.as_raw_fd()];
    let mut byte = [b'F'];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = [0u64; 4];
    // SAFETY: one SCM_RIGHTS message of two descriptors written into `control`, which is
    // large enough (CMSG_SPACE(8) = 24 bytes) and aligned for a cmsghdr; the buffers
    // outlive the call.
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of_val(&fds) as u32) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(&fds) as u32) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast::<i32>(), 2);
        libc::sendmsg(
            socket.as_raw_fd(),
            &msg,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if sent == 1 {
        Ok(())
    } else if sent < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Err(std::io::Error::other("short send"))
    }
}

fn candidates(exe: &Path) -> Vec<PathBuf> {
    let Some(dir) = exe.parent() else {
        return Vec::new();
    };
    vec![dir.join(NAME), dir.join("../libexec/hermes-mgr").join(NAME)]
}

/// The program, found and opened at the first call (the daemon calls it at start-up).
pub fn supervisor() -> &'static Program {
    static PROGRAM: OnceLock<Program> = OnceLock::new();
    PROGRAM.get_or_init(|| {
        let exe = std::fs::read_link("/proc/self/exe").unwrap_or_default();
        for path in candidates(&exe) {
            if let Ok(fd) = nix::fcntl::open(&path, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
            {
                let is_file = nix::sys::stat::fstat(&fd)
                    .is_ok_and(|s| s.st_mode & libc::S_IFMT == libc::S_IFREG);
                if is_file {
                    return Program { fd: Some(fd), path };
                }
            }
        }
        Program {
            fd: None,
            path: exe,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_supervisor_is_looked_for_beside_the_binary_then_in_libexec() {
        assert_eq!(
            candidates(Path::new("/usr/bin/hermes-mgr")),
            [
                PathBuf::from("/usr/bin/hermes-mgr-supervise"),
                PathBuf::from("/usr/bin/../libexec/hermes-mgr/hermes-mgr-supervise")
            ]
        );
    }
}
