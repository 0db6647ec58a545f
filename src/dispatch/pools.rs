//! Capacity pools (`[pools.NAME]`): each pool's slice carries its limits (`apply`, through
//! systemd), and in a pass a start in a pool waits while `admission::pool_wait` says so —
//! read from the kernel (the slice's scopes and pressure) once per pool per pass, so every
//! board and every dispatcher counts the same workers, then kept up to date by the pass's
//! own starts.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use serde::Serialize;

use crate::admission::{PoolFacts, PoolLimits, PoolWait, Pressure};
use crate::config::{Config, Pool};
use crate::systemd::{SliceLimits, Systemd};

/// The slice limits pool `p` asks for.
pub fn slice_limits(p: &Pool) -> SliceLimits {
    SliceLimits {
        memory_max: p.memory_max_bytes,
        cpu_quota_per_sec_us: p.cpu_quota_percent.map(|q| q.saturating_mul(10_000)),
        cpu_weight: p.cpu_weight,
        tasks_max: p.tasks_max,
    }
}

/// Set every pool's limits on its slice; the pools whose limits could not be set, with why
/// (their workers wait: a pool without its limits is not what the operator configured).
pub async fn apply(sd: &Systemd, cfg: &Config) -> BTreeMap<String, String> {
    let mut faults = BTreeMap::new();
    for (name, pool) in &cfg.pools {
        let slice = cfg.pool_slice(name);
        if let Err(e) = sd.set_slice_limits(&slice, &slice_limits(pool)).await {
            faults.insert(name.clone(), format!("its limits are not on {slice}: {e}"));
        }
    }
    faults
}

/// The cgroup directory of pool `name`'s slice.
pub fn slice_dir(cfg: &Config, name: &str) -> PathBuf {
    let cg = crate::liveness::unit_cgroup(&cfg.pool_slice(name), "");
    PathBuf::from("/sys/fs/cgroup").join(cg.trim_matches('/'))
}

/// What the kernel says of pool `name` now. Each worker's memory is read only for a pool
/// with a reservation (whose workers are bounded by it: `memory_max_bytes` over
/// `memory_per_worker_bytes`); others' scopes are only counted.
pub fn facts(cfg: &Config, name: &str) -> PoolFacts {
    let dir = slice_dir(cfg, name);
    let reserves = cfg
        .pools
        .get(name)
        .is_some_and(|p| p.memory_per_worker_bytes.is_some());
    PoolFacts {
        workers: crate::liveness::scopes_memory(&dir, reserves),
        pressure: crate::liveness::cgroup_pressure(&dir)
            .into_iter()
            .map(|(resource, some_avg10)| Pressure {
                scope: "pool",
                resource,
                some_avg10,
            })
            .collect(),
    }
}

/// A pool's limits on one more start.
pub fn limits(p: &Pool) -> PoolLimits {
    PoolLimits {
        max_workers: p.max_workers,
        memory_max: p.memory_max_bytes,
        memory_per_worker: p.memory_per_worker_bytes,
        pressure: p.admission(),
    }
}

/// Why a pool held tasks in a pass (`PassReport::pools`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Held {
    pub why: String,
    /// At its `max_workers` (a worker's end makes room); else its memory, its pressure or
    /// its limits not set (looked at again while it lasts).
    pub capped: bool,
    pub tasks: Vec<String>,
}

/// The pools as one pass sees them.
pub(super) struct InPass<'a> {
    cfg: &'a Config,
    /// Pools whose limits are not on their slice (`apply`): nothing starts in them.
    faults: &'a BTreeMap<String, String>,
    seen: HashMap<String, PoolFacts>,
}

impl<'a> InPass<'a> {
    pub(super) fn new(cfg: &'a Config, faults: &'a BTreeMap<String, String>) -> InPass<'a> {
        InPass {
            cfg,
            faults,
            seen: HashMap::new(),
        }
    }

    /// Whether a worker of `profile` may start now: `Ok` (its pool, if any), or its pool and
    /// why that makes it wait.
    pub(super) fn admit(&mut self, profile: &str) -> Result<Option<String>, (String, PoolWait)> {
        let Some((name, pool)) = self.cfg.pool_of(profile) else {
            return Ok(None);
        };
        if let Some(f) = self.faults.get(name) {
            return Err((name.into(), PoolWait::Held(format!("pool {name}: {f}"))));
        }
        let cfg = self.cfg;
        let facts = self
            .seen
            .entry(name.to_string())
            .or_insert_with(|| facts(cfg, name));
        match crate::admission::pool_wait(name, &limits(pool), facts) {
            Some(w) => Err((name.into(), w)),
            None => Ok(Some(name.to_string())),
        }
    }

    /// `admit` for task `id`, whose worker runs as `profile`: a wait is added to `waits`.
    #[allow(clippy::result_unit_err)]
    pub(super) fn admit_or_wait(
        &mut self,
        profile: Option<String>,
        id: &str,
        waits: &mut BTreeMap<String, Held>,
    ) -> Result<Option<String>, ()> {
        let Some(profile) = profile else {
            return Ok(None);
        };
        self.admit(&profile).map_err(|(name, wait)| {
            let capped = matches!(wait, PoolWait::Capped(_));
            waits
                .entry(name)
                .or_insert_with(|| Held {
                    why: wait.why().to_string(),
                    capped,
                    tasks: Vec::new(),
                })
                .tasks
                .push(id.to_string());
        })
    }

    /// A worker of pool `name` is starting: it counts from now (its scope is not in the
    /// kernel's files yet).
    pub(super) fn started(&mut self, name: &str) {
        if let Some(f) = self.seen.get_mut(name) {
            f.workers.push(0);
        }
    }

    /// A start counted by `started` failed: its room is given back.
    pub(super) fn not_started(&mut self, name: &str) {
        if let Some(f) = self.seen.get_mut(name) {
            if let Some(i) = f.workers.iter().position(|m| *m == 0) {
                f.workers.remove(i);
            }
        }
    }
}

/// A pool as `status`, `doctor` and the metrics show it.
#[derive(Debug, Clone, Serialize)]
pub struct View {
    pub name: String,
    pub slice: String,
    pub profiles: Vec<String>,
    pub workers: usize,
    pub max_workers: Option<usize>,
    /// The slice's `memory.current` and `memory.max` as the kernel has them (`None`: no
    /// memory controller there, or no limit).
    pub memory_current: Option<u64>,
    pub memory_max: Option<u64>,
    pub pressure: Vec<(String, f64)>,
    /// Why its next worker would wait now, if it would.
    pub waiting: Option<String>,
}

/// Every configured pool, read from the kernel now.
pub fn look(cfg: &Config, faults: &BTreeMap<String, String>) -> Vec<View> {
    cfg.pools
        .iter()
        .map(|(name, pool)| {
            let dir = slice_dir(cfg, name);
            let f = facts(cfg, name);
            let read = |file: &str| {
                std::fs::read_to_string(dir.join(file))
                    .ok()
                    .and_then(|t| t.trim().parse::<u64>().ok())
            };
            let waiting = match faults.get(name) {
                Some(e) => Some(format!("pool {name}: {e}")),
                None => {
                    crate::admission::pool_wait(name, &limits(pool), &f).map(|w| w.why().into())
                }
            };
            View {
                name: name.clone(),
                slice: cfg.pool_slice(name),
                profiles: pool.profiles.clone(),
                workers: f.workers.len(),
                max_workers: pool.max_workers,
                memory_current: read("memory.current"),
                memory_max: read("memory.max"),
                pressure: f
                    .pressure
                    .iter()
                    .map(|p| (p.resource.to_string(), p.some_avg10))
                    .collect(),
                waiting,
            }
        })
        .collect()
}
