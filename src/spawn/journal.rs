//! The supervisor's way into the journal: one datagram per line on journald's native socket.
//!
//! Not `stdout` streams (`/run/systemd/journal/stdout`, what `StandardOutput=journal` uses):
//! journald serves at most 4,096 of them at once on systemd 252 and refuses the rest with
//! a closed connection, so two per run stopped at ~2,000 live workers and the next worker's
//! first write died of SIGPIPE. Datagrams hold no connection in journald, and the socket is
//! PID 1's (socket-activated), so a journald restart loses nothing either.
//!
//! journald attributes a datagram to the sender's unit by reading its cgroup when the line
//! arrives, which a supervisor that has just exited no longer has. Each entry therefore also
//! names its unit itself in `OBJECT_SYSTEMD_UNIT=`, which `journalctl -u` matches for
//! senders with uid 0 (`systemd.journal-fields(7)`): the supervisor is root.

use std::os::unix::net::UnixDatagram;

/// journald's native protocol socket (`systemd-journald.service(8)`).
pub const SOCKET: &str = "/run/systemd/journal/socket";

/// journald's default `LineMax=` for streams: longer lines are cut there, as journald
/// would have cut them.
pub const LINE_MAX: usize = 48 * 1024;

/// Where one run's lines go.
pub struct Journal {
    sock: Option<UnixDatagram>,
    /// The fields every entry carries, already encoded.
    common: Vec<u8>,
}

/// Append one field in the native protocol's binary-safe form (name, newline, 64-bit LE
/// length, value, newline): values come from the worker and from task data, and may hold
/// newlines.
fn field(buf: &mut Vec<u8>, name: &str, value: &[u8]) {
    buf.extend_from_slice(name.as_bytes());
    buf.push(b'\n');
    buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    buf.extend_from_slice(value);
    buf.push(b'\n');
}

impl Journal {
    /// A journal for `unit`'s lines. A journald that cannot be reached costs the lines,
    /// never the run: the socket is opened once, and a failed send is dropped.
    pub fn new(identifier: &str, unit: &str, task: &str, run_id: i64) -> Journal {
        let mut common = Vec::new();
        field(&mut common, "SYSLOG_IDENTIFIER", identifier.as_bytes());
        field(&mut common, "OBJECT_SYSTEMD_UNIT", unit.as_bytes());
        field(&mut common, "HERMES_KANBAN_TASK", task.as_bytes());
        field(
            &mut common,
            "HERMES_KANBAN_RUN_ID",
            run_id.to_string().as_bytes(),
        );
        let sock = UnixDatagram::unbound()
            .and_then(|s| s.connect(SOCKET).map(|()| s))
            .ok();
        Journal { sock, common }
    }

    /// Send one entry (`line` without its newline) at syslog `priority`.
    pub fn send(&self, priority: u8, line: &[u8]) {
        let Some(sock) = &self.sock else { return };
        let mut msg = Vec::with_capacity(self.common.len() + line.len() + 48);
        msg.extend_from_slice(&self.common);
        field(&mut msg, "PRIORITY", &[b'0' + priority.min(7)]);
        field(&mut msg, "MESSAGE", line);
        // Blocks while journald's queue is full: the worker's output waits, as it would
        // behind a full stream.
        let _ = sock.send(&msg);
    }
}

/// Splits a byte stream into lines as journald does for a stream: at `\n`, and at
/// `LINE_MAX` for longer ones; what is left at the end is a line of its own.
#[derive(Default)]
pub struct Lines {
    pending: Vec<u8>,
}

impl Lines {
    /// Feed `data`; `emit` gets each whole line (without its newline).
    pub fn feed(&mut self, mut data: &[u8], mut emit: impl FnMut(&[u8])) {
        while !data.is_empty() {
            let room = LINE_MAX - self.pending.len();
            let window = &data[..data.len().min(room)];
            match window.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.pending.extend_from_slice(&window[..i]);
                    emit(&self.pending);
                    self.pending.clear();
                    data = &data[i + 1..];
                }
                None if window.len() == room => {
                    self.pending.extend_from_slice(window);
                    emit(&self.pending);
                    self.pending.clear();
                    data = &data[room..];
                }
                None => {
                    self.pending.extend_from_slice(window);
                    data = &[];
                }
            }
        }
        // A long line's buffer is not kept for the rest of a run that will not need it.
        if self.pending.is_empty() && self.pending.capacity() > 4096 {
            self.pending = Vec::new();
        }
    }

    /// The stream ended: a last line without its newline.
    pub fn finish(&mut self, emit: impl FnOnce(&[u8])) {
        if !self.pending.is_empty() {
            emit(&self.pending);
            self.pending = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Case<'a> = (Vec<&'a [u8]>, Vec<Vec<u8>>);

    fn split(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut l = Lines::default();
        let mut out = Vec::new();
        for c in chunks {
            l.feed(c, |line| out.push(line.to_vec()));
        }
        l.finish(|line| out.push(line.to_vec()));
        out
    }

    #[test]
    fn lines_split_as_journald_splits_a_stream() {
        let long = vec![b'x'; LINE_MAX + 10];
        let cases: Vec<Case> = vec![
            (vec![b"a\nb\n"], vec![b"a".to_vec(), b"b".to_vec()]),
            (vec![b"par", b"tial\n"], vec![b"partial".to_vec()]),
            (vec![b"no newline"], vec![b"no newline".to_vec()]),
            (vec![b"\n\n"], vec![vec![], vec![]]),
            (vec![b""], vec![]),
            (
                vec![&long, b"\n"],
                vec![vec![b'x'; LINE_MAX], vec![b'x'; 10]],
            ),
        ];
        for (chunks, want) in cases {
            assert_eq!(split(&chunks), want, "{chunks:?}");
        }
    }

    #[test]
    fn fields_are_binary_safe() {
        let mut b = Vec::new();
        field(&mut b, "MESSAGE", b"two\nlines");
        let mut want = b"MESSAGE\n".to_vec();
        want.extend_from_slice(&9u64.to_le_bytes());
        want.extend_from_slice(b"two\nlines\n");
        assert_eq!(b, want);
    }
}
