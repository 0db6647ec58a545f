//! The `sd_notify(3)` protocol: datagrams to `$NOTIFY_SOCKET`. A no-op outside systemd.

use std::cell::Cell;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

pub struct Notifier {
    sock: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    /// systemd watches this process (`watchdog_interval`), read once: how often to ping.
    watchdog: Option<Duration>,
    /// The last `WATCHDOG=1` sent: `alive` pings again only a quarter of the period later.
    pinged: Cell<Option<Instant>>,
}

/// How often the status line may change at most: each `STATUS=` costs PID 1 a datagram, a
/// lookup of its sender and a `PropertiesChanged` to every subscriber of the bus — once per
/// pass, it was a tenth of what systemd spent per run (BENCHMARKS.md, 14).
pub const STATUS_EVERY: Duration = Duration::from_secs(1);

/// When the status line goes out: at once if the last one is `STATUS_EVERY` old, else owed
/// and sent when that is past (`due`), with what is true then. Pure: the daemon keeps it.
#[derive(Debug, Default)]
pub struct StatusLine {
    sent: Option<Instant>,
    owed: bool,
}

impl StatusLine {
    /// A new status line wanted at `now`: `true` when it goes out now (`sent` is then
    /// `now`); otherwise it is owed.
    pub fn may_send(&mut self, now: Instant) -> bool {
        if self.sent.is_some_and(|t| now < t + STATUS_EVERY) {
            self.owed = true;
            return false;
        }
        self.sent = Some(now);
        self.owed = false;
        true
    }

    /// When an owed line is due.
    pub fn due(&self) -> Option<Instant> {
        self.owed
            .then(|| self.sent.map_or_else(Instant::now, |t| t + STATUS_EVERY))
    }
}

impl Notifier {
    /// Read `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
    pub fn from_env() -> Notifier {
        use std::os::linux::net::SocketAddrExt;
        let sock = std::env::var("NOTIFY_SOCKET").ok().and_then(|p| {
            let addr = match p.strip_prefix('@') {
                Some(abs) => {
                    std::os::unix::net::SocketAddr::from_abstract_name(abs.as_bytes()).ok()?
                }
                None => std::os::unix::net::SocketAddr::from_pathname(&p).ok()?,
            };
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        Notifier {
            sock,
            watchdog: watchdog_interval(),
            pinged: Cell::new(None),
        }
    }

    /// `WATCHDOG=1`, when systemd watches this process, and the last was a quarter of the
    /// ping period ago (each is a datagram PID 1 handles; the timer pings anyway).
    pub fn alive(&self) {
        let Some(every) = self.watchdog else { return };
        if self.pinged.get().is_none_or(|t| t.elapsed() >= every / 4) {
            self.send("WATCHDOG=1");
        }
    }

    pub fn send(&self, state: &str) {
        if state.starts_with("WATCHDOG=1") {
            self.pinged.set(Some(Instant::now()));
        }
        if let Some((s, addr)) = &self.sock {
            if let Err(e) = s.send_to_addr(state.as_bytes(), addr) {
                tracing::warn!("sd_notify {state:?} failed: {e}, ignoring");
            }
        }
    }

    pub fn status(&self, text: &str) {
        // One line: STATUS= ends at the newline.
        self.send(&format!("STATUS={}", text.replace('\n', " ")));
    }
}

/// `$WATCHDOG_USEC` for this process (`$WATCHDOG_PID` unset or ours): ping at half of it.
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    {
        if pid != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_goes_out_at_most_once_a_second_and_what_is_owed_is_sent_after() {
        let t0 = Instant::now();
        let mut s = StatusLine::default();
        assert!(s.may_send(t0), "the first goes out at once");
        assert_eq!(s.due(), None);
        assert!(
            !s.may_send(t0 + Duration::from_millis(10)),
            "too soon: owed"
        );
        assert!(!s.may_send(t0 + Duration::from_millis(900)));
        assert_eq!(
            s.due(),
            Some(t0 + STATUS_EVERY),
            "owed, due a second after the last"
        );
        assert!(s.may_send(t0 + STATUS_EVERY), "due: goes out");
        assert_eq!(s.due(), None, "nothing owed after");
        assert!(
            s.may_send(t0 + STATUS_EVERY * 3),
            "a quiet while later: at once"
        );
    }
}
