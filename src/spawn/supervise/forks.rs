//! The fork server: one supervisor program the daemon starts once, which forks a held
//! supervisor for each run on request instead of the daemon starting the program anew
//! (an `execve`, the ELF load and glibc's start, every run: ~0.2 ms of CPU a run,
//! BENCHMARKS.md 14).
//!
//! It is started as a held supervisor is (`hermes-mgr supervise`, the program the
//! dispatcher fixed at its start), with a `SOCK_SEQPACKET` socket to the daemon as its
//! stdin instead of a pipe: that is how it knows what it is. Each request is one byte `F`
//! with two descriptors (`SCM_RIGHTS`): the read end of the new supervisor's stdin pipe and
//! the write end of its stdout pipe. The server forks with `CLONE_PARENT` — the child is the
//! *daemon's* child, as a supervisor it started itself would be: the daemon reaps it, and
//! no process of ours stands between them — and writes the child's PID (a native-endian
//! `i32`; `-errno` when the fork failed) into that stdout pipe before closing its copies.
//! The daemon reads those 4 bytes before it writes anything to the child, and the child
//! writes nothing before it has read the spec: the PID is always first. From there on the
//! protocol is the held supervisor's, unchanged.
//!
//! Forking without an exec is sound here because this process has one thread (nothing can
//! hold a lock at the fork) and holds nothing a run must not get: the daemon's environment
//! and limits as it started it, which a supervisor it started itself would inherit as
//! well, and descriptors the child closes at once (all but the two it was sent, made its
//! stdin and stdout, and stderr). It reads nothing but the daemon's socket. When the
//! daemon goes (its end closes), it ends.

use std::os::fd::RawFd;

/// The server's end of the socket: its stdin.
const SOCKET: RawFd = 0;

/// Whether this process was started as the fork server: its stdin is a socket (a held
/// supervisor's is a pipe).
pub(super) fn is_server() -> bool {
    // SAFETY: fstat fills the struct it is given.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    (unsafe { libc::fstat(SOCKET, &mut st) } == 0) && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
}

/// Serve until the daemon's end closes: `Some(code)` to exit with. `None` in a child
/// forked for a run, with its stdin and stdout in place: it goes on as a held supervisor.
pub(super) fn serve() -> Option<u8> {
    let _ = nix::sys::prctl::set_name(c"hermes-mgr-fork");
    loop {
        let fds = match receive(SOCKET) {
            Received::Request(fds) => fds,
            Received::Nothing => continue,
            Received::End => return Some(0),
            Received::Failed(errno) => {
                eprintln!(
                    "hermes-mgr supervise: fork server: {}",
                    std::io::Error::from_raw_os_error(errno)
                );
                return Some(1);
            }
        };
        let [stdin, stdout] = fds;
        // SAFETY: a raw clone without CLONE_VM is a fork; this process has one thread.
        // glibc's wrapper cannot pass CLONE_PARENT. The child's copy of glibc's thread
        // block keeps this process's TID, which nothing the supervisor calls reads:
        // glibc (≥ 2.34) asks the kernel for it where it matters (`raise`, `pthread_kill`),
        // and Rust's locks key on their own thread ids.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone,
                (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong,
                0usize,
                0usize,
                0usize,
                0usize,
            )
        };
        if pid == 0 {
            // SAFETY: this child owns both descriptors; after the dup2s it keeps only
            // stdin, stdout and stderr.
            unsafe {
                if libc::dup2(stdin, 0) != 0 || libc::dup2(stdout, 1) != 1 {
                    libc::_exit(2);
                }
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            }
            return None;
        }
        let reply: i32 = if pid > 0 {
            pid as i32
        } else {
            -std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        };
        // SAFETY: writing 4 bytes of a local, then closing the two descriptors received.
        unsafe {
            libc::write(stdout, reply.to_ne_bytes().as_ptr().cast(), 4);
            libc::close(stdin);
            libc::close(stdout);
        }
    }
}

enum Received {
    /// The new supervisor's stdin (read end) and stdout (write end).
    Request([RawFd; 2]),
    /// Not a request (closed, whatever came).
    Nothing,
    /// The daemon's end closed.
    End,
    Failed(i32),
}

/// One request from `socket`, its descriptors close-on-exec.
fn receive(socket: RawFd) -> Received {
    const ROOM: usize = 4;
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // Room for more descriptors than a request has, so that a message with more is not
    // cut (`MSG_CTRUNC`) and every one of them is closed.
    let mut control = [0u64; 8];
    // SAFETY: a zeroed msghdr pointing at the buffers above, which outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: recvmsg into the buffers described by `msg`.
    let n = unsafe { libc::recvmsg(socket, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        let errno = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        return if errno == libc::EINTR {
            Received::Nothing
        } else {
            Received::Failed(errno)
        };
    }
    let mut fds = Vec::with_capacity(ROOM);
    // SAFETY: walking the control messages the kernel wrote, within `msg_controllen`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(data.add(i).read_unaligned());
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if n == 0 && fds.is_empty() {
        return Received::End;
    }
    if n == 1 && byte[0] == b'F' && fds.len() == 2 {
        return Received::Request([fds[0], fds[1]]);
    }
    for fd in fds {
        // SAFETY: closing descriptors this process was just given.
        unsafe { libc::close(fd) };
    }
    Received::Nothing
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, OwnedFd};

    fn pair() -> (OwnedFd, OwnedFd) {
        nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    fn send(to: &OwnedFd, byte: u8, fds: &[RawFd]) {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let iov = [std::io::IoSlice::new(std::slice::from_ref(&byte))];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        sendmsg::<()>(to.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).unwrap();
    }

    fn is_open(fd: RawFd) -> bool {
        // SAFETY: F_GETFD on a descriptor number; no memory involved.
        unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
    }

    #[test]
    fn a_request_is_an_f_with_two_descriptors_and_anything_else_is_closed_and_skipped() {
        let (ours, theirs) = pair();
        let (a, b) = nix::unistd::pipe().unwrap();
        send(&ours, b'F', &[a.as_raw_fd(), b.as_raw_fd()]);
        match receive(theirs.as_raw_fd()) {
            Received::Request([i, o]) => {
                assert!(is_open(i) && is_open(o));
                // Close-on-exec, as received.
                // SAFETY: as above.
                assert!(unsafe { libc::fcntl(i, libc::F_GETFD) } & libc::FD_CLOEXEC != 0);
                // SAFETY: closing the two descriptors just received.
                unsafe {
                    libc::close(i);
                    libc::close(o);
                }
            }
            _ => panic!("not a request"),
        }
        // Three descriptors, one, or the wrong byte: none of them is kept open — once
        // every copy of a pipe's write end is closed, its read end reads end-of-file.
        for (byte, copies) in [(b'F', 3), (b'F', 1), (b'X', 2)] {
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
            send(&ours, byte, &vec![w.as_raw_fd(); copies]);
            drop(w);
            assert!(matches!(receive(theirs.as_raw_fd()), Received::Nothing));
            assert_eq!(nix::unistd::read(&r, &mut [0u8; 1]), Ok(0));
        }
        send(&ours, b'F', &[]);
        assert!(matches!(receive(theirs.as_raw_fd()), Received::Nothing));
        drop(ours);
        assert!(matches!(receive(theirs.as_raw_fd()), Received::End));
    }
}
