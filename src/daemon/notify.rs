//! The `sd_notify(3)` protocol: datagrams to `$NOTIFY_SOCKET`. A no-op outside systemd.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

pub struct Notifier {
    sock: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    /// systemd watches this process (`watchdog_interval`), read once.
    watchdog: bool,
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
            watchdog: watchdog_interval().is_some(),
        }
    }

    /// `WATCHDOG=1`, when systemd watches this process.
    pub fn alive(&self) {
        if self.watchdog {
            self.send("WATCHDOG=1");
        }
    }

    pub fn send(&self, state: &str) {
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
