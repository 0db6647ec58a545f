//! Capacity pools in the daemon: their limits set on their slices at start and whenever the
//! configuration changes them (no restart), and what keeps their tasks waiting, said once
//! at each edge — in the journal, the service status and the metrics.

use std::collections::BTreeMap;

use super::*;
use crate::config::Pool;
use crate::dispatch::pools::{self, Held};

/// The pools as the daemon last set and saw them.
#[derive(Default)]
pub(super) struct Pools {
    /// The pools whose limits were last set on their slices; `None`: set them before the
    /// next pass.
    applied: Option<BTreeMap<String, Pool>>,
    /// Pools whose limits could not be set: none of their workers start (tried again on
    /// the safety-net tick).
    pub faults: BTreeMap<String, String>,
    /// What each board's last pass left waiting, by pool.
    waits: BTreeMap<String, BTreeMap<String, Held>>,
    /// While a pool's memory or pressure holds tasks: when its boards are looked at again.
    pub look: Option<Instant>,
}

impl Daemon {
    /// Set the pools' limits on their slices when the configuration changed them (or a
    /// setting failed before).
    pub(super) async fn apply_pools(&mut self) {
        if self.pools.applied.as_ref() == Some(&self.cfg.pools) {
            return;
        }
        let faults = pools::apply(&self.sd, &self.cfg).await;
        for (name, why) in &faults {
            error!(pool = %name, "pool {name}: {why}: none of its tasks is started");
        }
        for (name, p) in &self.cfg.pools {
            if !faults.contains_key(name) {
                info!(pool = %name, slice = %self.cfg.pool_slice(name), max_workers = ?p.max_workers,
                      memory_max_bytes = ?p.memory_max_bytes, memory_per_worker_bytes = ?p.memory_per_worker_bytes,
                      cpu_quota_percent = ?p.cpu_quota_percent, cpu_weight = ?p.cpu_weight, tasks_max = ?p.tasks_max,
                      "pool {name}: limits set on its slice for the profiles {}", p.profiles.join(", "));
            }
        }
        self.pools.faults = faults;
        self.pools.applied = Some(self.cfg.pools.clone());
        // Changed pools change what waits: every board looks again.
        self.mark_all_dirty();
    }

    /// The safety-net tick: pools whose limits could not be set are tried again.
    pub(super) fn retry_pools(&mut self) {
        if !self.pools.faults.is_empty() {
            self.pools.applied = None;
        }
    }

    /// What board `slug`'s pass left waiting for its pools. A pool at its cap waits for a
    /// worker's end on any board (`host_capped`); one held by memory or pressure is looked at
    /// again in `passes::PRESSURE_LOOK`. Each pool's start and end of waiting are said once.
    pub(super) fn on_pool_waits(&mut self, slug: &str, waits: BTreeMap<String, Held>) {
        let before = self.pool_waits();
        if waits.is_empty() {
            self.pools.waits.remove(slug);
        } else {
            self.pools.waits.insert(slug.to_string(), waits);
        }
        let after = self.pool_waits();
        let (capped, held) = self.pools.waits.get(slug).map_or((false, false), |w| {
            (w.values().any(|h| h.capped), w.values().any(|h| !h.capped))
        });
        if let Some(s) = self.slots.get_mut(slug) {
            s.host_capped |= capped;
            s.dirty |= held;
        }
        if held {
            self.pools.look = Some(Instant::now() + passes::PRESSURE_LOOK);
        } else if !self
            .pools
            .waits
            .values()
            .flat_map(|w| w.values())
            .any(|h| !h.capped)
        {
            self.pools.look = None;
        }
        for (pool, why) in &after {
            if before.get(pool) != Some(why) {
                info!(pool = %pool, "{why}: its tasks wait");
            }
        }
        for pool in before.keys().filter(|p| !after.contains_key(*p)) {
            info!(pool = %pool, "pool {pool}: its tasks start again");
        }
        if before != after {
            self.update_status();
        }
    }

    /// Why each pool keeps tasks waiting now (the latest pass of any board), by pool.
    pub(super) fn pool_waits(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        // A board no longer served (archived, removed) has nothing waiting.
        let served = self
            .pools
            .waits
            .iter()
            .filter(|(slug, _)| self.slots.contains_key(*slug));
        for (pool, h) in served.flat_map(|(_, w)| w.iter()) {
            out.entry(pool.clone()).or_insert_with(|| h.why.clone());
        }
        for (pool, f) in &self.pools.faults {
            out.entry(pool.clone())
                .or_insert_with(|| format!("pool {pool}: {f}"));
        }
        out
    }
}
