//! How a connection waits for another writer's lock.
//!
//! SQLite's own busy handler (`sqlite3_busy_timeout`) sleeps 1, 2, 5, 10, 15, 20, 25 … ms
//! between tries. A board's lock is mostly held for a commit — a few hundred microseconds,
//! its `fsync` included — so the first sleep alone overshot it severalfold, and the
//! daemon's loop, whose connections these are, slept with it: with 64 workers writing their
//! verdicts, the daemon slept in that handler ~0.4 times a run (`perf record -e
//! syscalls:sys_enter_clock_nanosleep`, BENCHMARKS.md 14), its whole loop stopped each time.
//! This handler tries again after 50 µs, doubling to 1 ms, then every millisecond for the
//! first ~0.1 s, then every 10 ms; it gives up, as SQLite's does, once its sleeps add up to
//! the timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// One connection's timeout, where its busy handler reads it: boxed, so that its address
/// is stable, and kept while the connection lives (`Board` drops it after the connection).
pub(super) struct Wait {
    limit_us: AtomicU64,
}

impl Wait {
    pub(super) fn new(timeout: Duration) -> Box<Wait> {
        Box::new(Wait {
            limit_us: AtomicU64::new(micros(timeout)),
        })
    }

    pub(super) fn set(&self, timeout: Duration) {
        self.limit_us.store(micros(timeout), Ordering::Relaxed);
    }

    /// Make this `conn`'s busy handler. `self` must outlive `conn`.
    pub(super) fn install(&self, conn: &rusqlite::Connection) -> rusqlite::Result<()> {
        // SAFETY: the handle is `conn`'s, open; the data pointer is to `self`, which the
        // caller keeps until the connection is closed.
        let rc = unsafe {
            rusqlite::ffi::sqlite3_busy_handler(
                conn.handle(),
                Some(handler),
                self as *const Wait as *mut std::ffi::c_void,
            )
        };
        if rc == rusqlite::ffi::SQLITE_OK {
            Ok(())
        } else {
            Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rc),
                Some("sqlite3_busy_handler".into()),
            ))
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The sleep before try `n + 1` (the first retry is `n = 0`), in µs.
fn step(n: u64) -> u64 {
    match n {
        0..5 => 50 << n,
        5..105 => 1_000,
        _ => 10_000,
    }
}

/// What the sleeps before try `n` add up to, in µs.
fn slept_before(n: u64) -> u64 {
    match n {
        0..=5 => 50 * ((1 << n) - 1),
        6..=105 => 1_550 + (n - 5) * 1_000,
        _ => 101_550 + (n - 105) * 10_000,
    }
}

/// The sleep before try `n + 1` within `limit` µs of sleeps in all: `None` once they add
/// up to it (the statement then fails with `SQLITE_BUSY`).
fn next_sleep(n: u64, limit: u64) -> Option<u64> {
    let slept = slept_before(n);
    (slept < limit).then(|| step(n).min(limit - slept))
}

extern "C" fn handler(data: *mut std::ffi::c_void, count: std::ffi::c_int) -> std::ffi::c_int {
    // SAFETY: `data` is the `Wait` `install` was given, alive while its connection is.
    let wait = unsafe { &*(data as *const Wait) };
    let limit = wait.limit_us.load(Ordering::Relaxed);
    match next_sleep(u64::try_from(count).unwrap_or(0), limit) {
        Some(us) => {
            std::thread::sleep(Duration::from_micros(us));
            1
        }
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleeps_start_at_50_us_double_to_a_millisecond_then_ten() {
        let steps: Vec<u64> = (0..7).map(step).collect();
        assert_eq!(steps, [50, 100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(step(104), 1_000);
        assert_eq!(step(105), 10_000);
        // The closed form is the sum of the steps.
        let mut sum = 0;
        for n in 0..400 {
            assert_eq!(slept_before(n), sum, "n = {n}");
            sum += step(n);
        }
    }

    #[test]
    fn the_sleeps_add_up_to_the_timeout_and_no_more() {
        for (n, limit, want) in [
            (0, 2_000_000, Some(50)),
            (0, 0, None),
            (0, 30, Some(30)),
            (5, 2_000, Some(450)), // 1,550 slept: what is left of the timeout
            (5, 1_550, None),
            (200, 300_000_000, Some(10_000)),
            (200, 1_000_000, None),
        ] {
            assert_eq!(next_sleep(n, limit), want, "n {n} limit {limit}");
        }
        for limit in [0, 1, 49, 50, 300_000, 2_000_000] {
            let total: u64 = (0..).map_while(|n| next_sleep(n, limit)).sum();
            assert_eq!(total, limit, "limit {limit}");
        }
    }
}
