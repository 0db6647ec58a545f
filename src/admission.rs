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
    for p in &facts.pressure {
        let limit = match p.resource {
            "memory" => limits.memory_pressure,
            "cpu" => limits.cpu_pressure,
            "io" => limits.io_pressure,
            _ => None,
        };
        if let Some(limit) = limit.filter(|l| p.some_avg10 > *l) {
            let scope = if p.scope == "slice" {
                "the workers' slice"
            } else {
                "the host"
            };
            return Some(format!(
                "{} pressure {:.1} % > {limit} % ({scope}, some avg10; admit_{}_pressure_percent)",
                p.resource, p.some_avg10, p.resource
            ));
        }
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
}
