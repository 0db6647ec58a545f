//! Admission by pressure: whether the host can take another worker now. The kernel measures
//! what matters — pressure stall information (PSI): the share of the last 10 s in which some
//! task waited for memory, CPU or IO (`some avg10`), for the workers' slice and for the whole
//! host — and `MemAvailable`. Above an operator's threshold, ready tasks wait: never claimed,
//! never counted, never failed. Pure: the facts are read by the caller (`liveness`).

/// The operator's thresholds (`admit_*` in the configuration); `None`: not looked at.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// Percent of the last 10 s (`some avg10`), 0–100.
    pub memory_pressure: Option<f64>,
    pub cpu_pressure: Option<f64>,
    pub io_pressure: Option<f64>,
    /// The host's `MemAvailable` must be at least this many bytes.
    pub memory_available: Option<u64>,
}

impl Limits {
    /// Nothing is looked at: every start is admitted, as without this feature.
    pub fn none(&self) -> bool {
        *self == Limits::default()
    }
}

/// One pressure figure: where (`slice`: the workers' slice; `host`), which resource
/// (`memory`, `cpu`, `io`), and its `some avg10` in percent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pressure {
    pub scope: &'static str,
    pub resource: &'static str,
    pub some_avg10: f64,
}

/// What the kernel said at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Facts {
    pub pressure: Vec<Pressure>,
    /// `MemAvailable` of `/proc/meminfo`, bytes.
    pub memory_available: Option<u64>,
}

/// Whether a worker may start now: `None`, or why not, for the journal, the service status,
/// `status` and `doctor` ("memory pressure 31.0 % > 20 % (the workers' slice, …)").
pub fn hold(limits: &Limits, facts: &Facts) -> Option<String> {
    if let Some(why) = over(limits, &facts.pressure) {
        return Some(why);
    }
    if let Some(floor) = limits.memory_available {
        match facts.memory_available {
            Some(a) if a < floor => {
                return Some(format!(
                    "memory available {} MiB < {} MiB (admit_memory_available_bytes)",
                    a >> 20,
                    floor >> 20
                ))
            }
            // Unreadable: not a reason to stop the host's work.
            _ => {}
        }
    }
    None
}

/// The first pressure figure above its threshold, said.
fn over(limits: &Limits, pressure: &[Pressure]) -> Option<String> {
    pressure.iter().find_map(|p| {
        let limit = match p.resource {
            "memory" => limits.memory_pressure,
            "cpu" => limits.cpu_pressure,
            "io" => limits.io_pressure,
            _ => None,
        }?;
        let scope = match p.scope {
            "slice" => "the workers' slice",
            "pool" => "the pool's slice",
            _ => "the host",
        };
        (p.some_avg10 > limit).then(|| {
            format!(
                "{} pressure {:.1} % > {limit} % ({scope}, some avg10; admit_{}_pressure_percent)",
                p.resource, p.some_avg10, p.resource
            )
        })
    })
}

/// A capacity pool's limits on one more start (`config::Pool`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PoolLimits {
    pub max_workers: Option<usize>,
    pub memory_max: Option<u64>,
    /// Each worker counts at least this much against `memory_max`.
    pub memory_per_worker: Option<u64>,
    /// Thresholds on the pool slice's own pressure.
    pub pressure: Limits,
}

/// The pool as the kernel shows it (its slice), with the starts of the pass in progress.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolFacts {
    /// Each worker scope in the pool's slice: its `memory.current` (a start not yet in the
    /// kernel's files, or an unreadable one, counts 0 — and so at least the reservation).
    pub workers: Vec<u64>,
    /// The slice's pressure (`scope` "pool").
    pub pressure: Vec<Pressure>,
}

/// Why a pool's next worker waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolWait {
    /// At `max_workers`: a worker's end (on any board) makes room.
    Capped(String),
    /// Its memory or its pressure: looked at again while it lasts.
    Held(String),
}

impl PoolWait {
    pub fn why(&self) -> &str {
        match self {
            PoolWait::Capped(w) | PoolWait::Held(w) => w,
        }
    }
}

/// Whether pool `name` may start one more worker: `None`, or why it waits. Its memory rule:
/// every worker counts the larger of what it uses and `memory_per_worker`, and the new one
/// `memory_per_worker`; together they stay within `memory_max`. A burst of starts is seen
/// before any of them allocates (what pressure's averages cannot do).
pub fn pool_wait(name: &str, limits: &PoolLimits, facts: &PoolFacts) -> Option<PoolWait> {
    let n = facts.workers.len();
    if let Some(max) = limits.max_workers.filter(|m| n >= *m) {
        return Some(PoolWait::Capped(format!(
            "pool {name}: {n} workers running, max_workers = {max}"
        )));
    }
    if let (Some(per), Some(max)) = (limits.memory_per_worker, limits.memory_max) {
        let counted: u64 = facts.workers.iter().map(|m| (*m).max(per)).sum();
        if counted.saturating_add(per) > max {
            return Some(PoolWait::Held(format!(
                "pool {name}: {n} worker(s) count {} MiB (at least memory_per_worker_bytes = {} MiB each); one more would pass memory_max_bytes = {} MiB",
                counted >> 20,
                per >> 20,
                max >> 20
            )));
        }
    }
    over(&limits.pressure, &facts.pressure).map(|w| PoolWait::Held(format!("pool {name}: {w}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(scope: &'static str, resource: &'static str, some_avg10: f64) -> Pressure {
        Pressure {
            scope,
            resource,
            some_avg10,
        }
    }

    #[test]
    fn a_start_waits_only_while_a_figure_is_above_its_threshold() {
        let limits = Limits {
            memory_pressure: Some(20.0),
            io_pressure: Some(50.0),
            memory_available: Some(1 << 30),
            ..Limits::default()
        };
        let calm = Facts {
            pressure: vec![
                p("slice", "memory", 3.0),
                p("host", "cpu", 99.0),
                p("host", "io", 50.0),
            ],
            memory_available: Some(2 << 30),
        };
        let cases: Vec<(&str, Facts, Option<&str>)> = vec![
            // CPU has no threshold; io at exactly its threshold is not above it.
            ("calm", calm.clone(), None),
            (
                "the slice's memory",
                Facts {
                    pressure: vec![p("slice", "memory", 31.04)],
                    ..calm.clone()
                },
                Some("memory pressure 31.0 % > 20 % (the workers' slice, some avg10; admit_memory_pressure_percent)"),
            ),
            (
                "the host's io",
                Facts {
                    pressure: vec![p("host", "io", 50.5)],
                    ..calm.clone()
                },
                Some("io pressure 50.5 % > 50 % (the host, some avg10; admit_io_pressure_percent)"),
            ),
            (
                "little memory left",
                Facts {
                    memory_available: Some(512 << 20),
                    ..calm.clone()
                },
                Some("memory available 512 MiB < 1024 MiB (admit_memory_available_bytes)"),
            ),
            (
                "nothing readable",
                Facts::default(),
                None,
            ),
        ];
        for (what, facts, want) in cases {
            assert_eq!(hold(&limits, &facts).as_deref(), want, "{what}");
        }
        // Nothing configured: nothing holds, however loaded.
        let loaded = Facts {
            pressure: vec![p("slice", "memory", 100.0)],
            memory_available: Some(0),
        };
        assert!(Limits::default().none());
        assert_eq!(hold(&Limits::default(), &loaded), None);
    }

    #[test]
    fn a_pool_starts_a_worker_only_within_its_cap_its_memory_and_its_pressure() {
        const MIB: u64 = 1 << 20;
        let limits = PoolLimits {
            max_workers: Some(4),
            memory_max: Some(1024 * MIB),
            memory_per_worker: Some(300 * MIB),
            pressure: Limits {
                memory_pressure: Some(20.0),
                ..Limits::default()
            },
        };
        let facts = |workers: Vec<u64>, mem: f64| PoolFacts {
            workers,
            pressure: vec![p("pool", "memory", mem)],
        };
        let held = |s: &str| Some(PoolWait::Held(s.into()));
        let cases: Vec<(&str, PoolLimits, PoolFacts, Option<PoolWait>)> = vec![
            ("empty", limits, facts(vec![], 0.0), None),
            // Two just started (0 bytes yet) count 300 MiB each: 600 + 300 ≤ 1024.
            ("a burst, room for one more", limits, facts(vec![0, 0], 0.0), None),
            (
                "a burst, the fourth would not fit",
                limits,
                facts(vec![0, 0, 0], 0.0),
                held("pool build: 3 worker(s) count 900 MiB (at least memory_per_worker_bytes = 300 MiB each); one more would pass memory_max_bytes = 1024 MiB"),
            ),
            (
                "one worker grew past its reservation",
                limits,
                facts(vec![800 * MIB], 0.0),
                held("pool build: 1 worker(s) count 800 MiB (at least memory_per_worker_bytes = 300 MiB each); one more would pass memory_max_bytes = 1024 MiB"),
            ),
            (
                "at its cap (before memory)",
                PoolLimits {
                    max_workers: Some(2),
                    ..limits
                },
                facts(vec![0, 0], 99.0),
                Some(PoolWait::Capped(
                    "pool build: 2 workers running, max_workers = 2".into(),
                )),
            ),
            (
                "its slice under pressure",
                limits,
                facts(vec![10 * MIB], 25.0),
                held("pool build: memory pressure 25.0 % > 20 % (the pool's slice, some avg10; admit_memory_pressure_percent)"),
            ),
            (
                "no reservation: the memory limit alone is the kernel's",
                PoolLimits {
                    memory_per_worker: None,
                    ..limits
                },
                facts(vec![1000 * MIB], 0.0),
                None,
            ),
            (
                "nothing set",
                PoolLimits::default(),
                facts(vec![0; 100], 100.0),
                None,
            ),
        ];
        for (what, limits, facts, want) in cases {
            assert_eq!(pool_wait("build", &limits, &facts), want, "{what}");
        }
    }
}
