//! The worker's output on its way out: its pipes, copied line by line into the journal
//! (and the task's log file, opened as the board's owner), with the prelude's own pipe.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::signalfd::SignalFd;

use super::{infra, Failure};
use crate::safe_fs::{self, Access, Owner};
use crate::spawn::journal::{Journal, Lines};

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
pub(super) fn open_log(path: &Path, owner: &Owner) -> Result<std::fs::File, String> {
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
pub(super) struct Pipes {
    out_r: OwnedFd,
    pub(super) out_w: OwnedFd,
    err_r: OwnedFd,
    pub(super) err_w: OwnedFd,
}

impl Pipes {
    pub(super) fn new() -> nix::Result<Pipes> {
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
    pub(super) fn into_relay(
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
pub(super) struct Relay<'a> {
    streams: Vec<(Option<OwnedFd>, u8, Lines)>,
    journal: &'a Journal,
    log: Option<std::fs::File>,
    /// The prelude's pipe and what came through it, kept up to `SAID_MAX` (it is read as
    /// it comes, so nothing the prelude runs can block on a full pipe).
    said: Option<OwnedFd>,
    said_bytes: Vec<u8>,
    /// The last `OUTPUT_TAIL` bytes of output, when kept.
    pub(super) tail: Option<std::collections::VecDeque<u8>>,
}

const SAID_MAX: usize = 4096;

impl Relay<'_> {
    pub(super) fn done(&self) -> bool {
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
    pub(super) fn tail(&self) -> Option<String> {
        let t = self.tail.as_ref()?;
        let (a, b) = t.as_slices();
        Some(String::from_utf8_lossy(&[a, b].concat()).into_owned())
    }

    /// Everything the prelude said (what is still in its pipe included).
    pub(super) fn said(&mut self) -> Vec<u8> {
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
    pub(super) fn pump(&mut self) {
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
                            let keep = &buf[n.saturating_sub(crate::spawn::spec::OUTPUT_TAIL)..n];
                            t.extend(keep);
                            let over = t.len().saturating_sub(crate::spawn::spec::OUTPUT_TAIL);
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
/// At most `timeout` (`None`: until something is readable).
pub(super) fn wait_readable(
    sfd: &SignalFd,
    relay: &Relay,
    timeout: Option<std::time::Duration>,
) -> Result<bool, Failure> {
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
    // Rounded up: woken at the deadline, never just before it.
    let ms = timeout.map_or(-1, |t| {
        let ms = t.as_millis() + u128::from(t.subsec_nanos() % 1_000_000 != 0);
        ms.min(i32::MAX as u128) as i32
    });
    loop {
        // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n >= 0 {
            return Ok(fds[0].revents != 0);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(infra(format!("poll: {e}")));
        }
    }
}
