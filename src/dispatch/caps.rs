//! Upstream's caps on running workers, counted as the Hermes served counts them: up to 0.20
//! `kanban.max_in_progress` is one more cap per board (the smaller of it and `max_spawn`);
//! from 0.22 on it is a cap for the whole host — running tasks on every board count — and,
//! when unset, one derived from the host's memory (`derive_default_max_in_progress`).

use crate::config::Config;
use crate::contract::Generation;

/// How many tasks may run; `None` = no cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caps {
    /// Running tasks on one board.
    pub board: Option<usize>,
    /// Running tasks on every board of the host.
    pub host: Option<usize>,
}

impl Caps {
    /// The most workers one board may run, whatever the others run.
    pub fn most(&self) -> Option<usize> {
        match (self.board, self.host) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The caps of Hermes `g`'s dispatcher, given the `kanban:` settings and the host's
/// `MemTotal` in KiB (`None`: unknown).
pub fn caps(
    g: Generation,
    max_spawn: Option<usize>,
    max_in_progress: Option<usize>,
    mem_total_kib: Option<u64>,
) -> Caps {
    if g.host_wide_max_in_progress() {
        Caps {
            board: max_spawn,
            host: max_in_progress.or_else(|| mem_total_kib.and_then(derived_max_in_progress)),
        }
    } else {
        Caps {
            board: Caps {
                board: max_spawn,
                host: max_in_progress,
            }
            .most(),
            host: None,
        }
    }
}

/// 0.22's `derive_default_max_in_progress`: a worker per 512 MiB of memory, at least 2 (the
/// smallest VM still progresses) and at most 8 (more fan-out must be asked for); none when
/// the memory is unknown.
pub fn derived_max_in_progress(mem_total_kib: u64) -> Option<usize> {
    (mem_total_kib > 0).then(|| ((mem_total_kib / 1024 / 512) as usize).clamp(2, 8))
}

/// The caps for `cfg`, by the Hermes its workers run (read from its installation) and this
/// host's memory.
pub fn of(cfg: &Config) -> Caps {
    caps(
        crate::spawn::hermes_generation(cfg),
        cfg.max_spawn,
        cfg.max_in_progress,
        mem_total_kib(),
    )
}

/// `MemTotal` of `/proc/meminfo`, in KiB, read once.
fn mem_total_kib() -> Option<u64> {
    static KEPT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *KEPT.get_or_init(read_mem_total_kib)
}

fn read_mem_total_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_in_progress_counts_per_board_until_020_and_for_the_host_from_022() {
        use Generation::*;
        let gib = 1024 * 1024;
        let rows = [
            // (generation, max_spawn, max_in_progress, MemTotal) → (board, host)
            (V019, None, None, Some(24 * gib), (None, None)),
            (V019, Some(4), Some(2), Some(24 * gib), (Some(2), None)),
            (V020, None, Some(3), None, (Some(3), None)),
            (V020, Some(2), None, Some(gib), (Some(2), None)),
            (V022, Some(4), Some(2), Some(24 * gib), (Some(4), Some(2))),
            (V022, None, None, Some(24 * gib), (None, Some(8))),
            (V022, None, None, Some(gib), (None, Some(2))),
            (V022, None, None, Some(3 * gib), (None, Some(6))),
            (V022, Some(1), None, None, (Some(1), None)),
        ];
        for (g, spawn, in_progress, mem, (board, host)) in rows {
            assert_eq!(
                caps(g, spawn, in_progress, mem),
                Caps { board, host },
                "{g:?} {spawn:?} {in_progress:?} {mem:?}"
            );
        }
        assert_eq!(
            Caps {
                board: Some(4),
                host: Some(2)
            }
            .most(),
            Some(2)
        );
        assert_eq!(derived_max_in_progress(0), None);
    }

    #[test]
    fn this_hosts_memory_is_read() {
        assert!(mem_total_kib().is_some_and(|k| k > 0));
    }
}
