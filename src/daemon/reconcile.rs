//! Start-up (and reconnect, and safety-net) reconciliation: the board's `running` rows
//! against the worker scopes systemd has. It decides which runs are ours to track; how a
//! run ended is always `Daemon::book`'s (`outcome::decide`), and it never runs a pass. The
//! rules:
//!
//! 1. A running row whose scope lives → adopt it (no second worker, no requeue).
//! 2. A running row whose scope is gone but whose supervisor left an exit record → the run
//!    ended while we were away: book it with its real exit status.
//! 3. A running row claimed on this host with neither scope nor record → booked as found
//!    after the fact: lost (a reboot, a vanished unit), requeued, not counted — unless its
//!    worker PID is alive outside any scope of ours, which means someone else (Hermes' own
//!    dispatcher) runs it, or it has no worker, no scope of that name, an unexpired claim
//!    made since this boot by no hermes-mgr process (`spec::claimers_path`): someone
//!    claimed it by hand (`hermes kanban claim`, a terminal lane). Both are left alone; a hand claim that expires is
//!    requeued then, as upstream's `release_stale_claims` does.
//! 4. A running row claimed on another host → not ours.
//! 5. A worker scope of one of this board's runs that is not the task's current run →
//!    stopped. Scopes that match no run of this board (another board's) are left alone.
//!
//! Each board is reconciled when it is opened (before its first pass), and all of them on
//! start-up, after a reconnect and on the safety-net tick.
//! 6. A run we track whose row is no longer running on it (it ended while the bus was
//!    away) → booked; if its scope still lives it stays tracked (`check_closed_runs`).

use std::collections::{HashMap, HashSet};

use tracing::{debug, info, warn};

use super::{unit_of, Daemon, Live, RunKey};
use crate::board::claimer_id;
use crate::liveness;
use crate::names::{
    record_of, record_prefix, run_of_worker_scope, run_record, worker_scopes_of, WORKER_SCOPE_GLOB,
};
use crate::state_dir::read_record;
use crate::systemd::UnitState;

/// This host's claims, as reconcile tells them apart: the claimers of this boot, and the
/// prefix of this host's claim locks.
struct Here {
    ours: HashSet<String>,
    host_prefix: String,
}

/// What reconcile knows about one `running` row and its current run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RowFacts {
    /// systemd has the run's scope live, and its cgroup is not empty.
    scope_live: bool,
    /// The run's supervisor left an exit record.
    record: bool,
    /// The claim is this host's (or has no claimer).
    local: bool,
    /// The row's worker PID lives, outside any worker scope of ours.
    foreign_worker: bool,
    /// No worker, an unexpired claim since this boot, by no claimer of ours.
    by_hand: bool,
}

/// What reconcile does with a row (the numbered rules above).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// 1: track it (and book it at once if its record is already there).
    Adopt,
    /// 2: book it from its record.
    EndedWhileAway,
    /// 4: another host's claim.
    NotOurs,
    /// 3, the exception: Hermes' own dispatcher runs it.
    SomeoneElsesWorker,
    /// 3, the other exception: claimed by hand, its claim still good.
    ClaimedByHand,
    /// 3: neither scope nor record: book it as found (`outcome::decide`).
    Gone,
}

/// What a reconcile found, over the boards it went through.
#[derive(Default)]
struct Counts {
    adopted: usize,
    ended: usize,
    lost: usize,
    /// The units of every running row seen.
    current_units: HashSet<String>,
}

fn rule(f: &RowFacts) -> Rule {
    if f.scope_live {
        Rule::Adopt
    } else if f.record {
        Rule::EndedWhileAway
    } else if !f.local {
        Rule::NotOurs
    } else if f.foreign_worker {
        Rule::SomeoneElsesWorker
    } else if f.by_hand {
        Rule::ClaimedByHand
    } else {
        Rule::Gone
    }
}

/// Exit records looked up on their boards per reconcile (`forget_ended_records`).
const RECORDS_LOOKED: usize = 1000;

impl Daemon {
    /// Reconcile every open board with the worker scopes systemd has.
    pub(super) async fn reconcile(&mut self) -> anyhow::Result<()> {
        let units = self.worker_units().await?;
        let records = crate::state_dir::records_present(&self.cfg.state_dir);
        let slugs: Vec<String> = self
            .slots
            .iter()
            .filter(|(_, s)| s.board.is_some())
            .map(|(slug, _)| slug.clone())
            .collect();
        let mut counts = Counts::default();
        for slug in &slugs {
            if let Err(e) = self
                .reconcile_with(slug, &units, records.as_ref(), &mut counts)
                .await
            {
                warn!(board = %slug, "reconcile: {e:#}");
            }
        }
        // Runs we tracked whose rows are no longer running (ended while the bus was away).
        let stale: Vec<RunKey> = self
            .live
            .keys()
            .filter(|k| {
                !counts
                    .current_units
                    .contains(&unit_of(&k.board, &k.task, k.run))
            })
            .filter(|k| slugs.contains(&k.board))
            .cloned()
            .collect();
        for key in stale {
            // Booked if it is over; a worker still running after its row was closed stays
            // tracked until `check_closed_runs` stops it.
            self.book(&key).await;
        }
        if let Some(records) = &records {
            self.forget_ended_records(records);
        }
        // A scope whose removal we did not hear of (the bus was away): its task may run again.
        let removed: Vec<String> = self
            .ending
            .values()
            .filter(|u| !units.get(*u).is_some_and(UnitState::is_live))
            .cloned()
            .collect();
        for unit in removed {
            self.scope_removed(&unit);
        }
        // A scope whose removal we did not hear of (the bus was away): its TMPDIR too.
        let gone: Vec<String> = self
            .tmpdirs
            .keys()
            .filter(|u| !units.contains_key(*u))
            .cloned()
            .collect();
        for unit in gone {
            self.tmpdir_gone_with(&unit).await;
        }
        // The safety-net tick reconciles too: say so only when it found something.
        if counts.adopted + counts.ended + counts.lost > 0 || !self.reconciled_once {
            info!(
                adopted = counts.adopted,
                ended_while_away = counts.ended,
                lost = counts.lost,
                live = self.live.len(),
                boards = slugs.len(),
                "reconciled with systemd"
            );
        } else {
            debug!(live = self.live.len(), "reconciled with systemd");
        }
        self.reconciled_once = true;
        Ok(())
    }

    /// Exit records of runs their board has closed: a worker that booked its own verdict and
    /// ended while no dispatcher ran leaves one that no booking reads, and so none removes.
    /// Only a record whose name is exactly one of an open board's runs (`names::record_of`),
    /// that run ended on that board and not tracked; at most `RECORDS_LOOKED` looked up per
    /// reconcile, in name order from where the last one stopped (`records_after`), so each is
    /// looked at within a few reconciles however many there are.
    fn forget_ended_records(&mut self, records: &HashSet<String>) {
        let mut names: Vec<&String> = records.iter().filter(|n| n.ends_with(".json")).collect();
        names.sort_unstable();
        let from = names.partition_point(|n| **n <= self.records_after);
        let (mut looked, mut removed) = (0, 0);
        let mut last = String::new();
        // Each open board's record prefix, made once (the default board's is empty).
        let boards: Vec<(&String, String, &crate::board::Board)> = self
            .slots
            .iter()
            .filter_map(|(slug, s)| Some((slug, record_prefix(slug), s.board.as_ref()?)))
            .collect();
        for name in names[from..].iter().chain(&names[..from]) {
            last.clone_from(name);
            for (slug, prefix, board) in &boards {
                if !name.starts_with(prefix.as_str()) {
                    continue;
                }
                let Some((task, run)) = record_of(slug, name) else {
                    continue;
                };
                if self.live.contains_key(&RunKey::new(slug, &task, run)) {
                    break;
                }
                looked += 1;
                if let Ok(Some(r)) = board.run(run) {
                    if r.task_id == task && r.ended_at.is_some() {
                        debug!(board = %slug, hermes_kanban_task = %task, hermes_kanban_run_id = run,
                               "removed the exit record of a run its board had closed");
                        crate::state_dir::forget_run(&self.cfg.state_dir, slug, &task, run);
                        removed += 1;
                    }
                }
                break;
            }
            if looked >= RECORDS_LOOKED {
                break;
            }
        }
        self.records_after = last;
        if removed > 0 {
            info!(
                removed,
                looked,
                records = records.len(),
                "removed exit records of runs their boards had closed"
            );
        }
    }

    /// Reconcile one board just opened (before anything is dispatched on it).
    pub(super) async fn reconcile_board(&mut self, slug: &str) -> anyhow::Result<()> {
        let units = self.worker_units().await?;
        let records = crate::state_dir::records_present(&self.cfg.state_dir);
        let mut counts = Counts::default();
        self.reconcile_with(slug, &units, records.as_ref(), &mut counts)
            .await?;
        if counts.adopted + counts.ended + counts.lost > 0 {
            info!(board = %slug, adopted = counts.adopted, ended_while_away = counts.ended, lost = counts.lost,
                  "reconciled the board with systemd");
        }
        Ok(())
    }

    async fn worker_units(&self) -> anyhow::Result<HashMap<String, UnitState>> {
        Ok(self
            .sd
            .list_units(WORKER_SCOPE_GLOB)
            .await?
            .into_iter()
            .collect())
    }

    async fn reconcile_with(
        &mut self,
        slug: &str,
        units: &HashMap<String, UnitState>,
        records: Option<&HashSet<String>>,
        counts: &mut Counts,
    ) -> anyhow::Result<()> {
        let me = claimer_id();
        let ctx = Here {
            ours: crate::state_dir::claimers_of_this_boot(&self.cfg.state_dir),
            host_prefix: format!("{}:", me.split(':').next().unwrap_or("")),
        };
        let Some(board) = self.board(slug) else {
            return Ok(());
        };
        let running = board.running_claims()?;
        let mut mine = HashSet::new();
        for t in running {
            if let Some(run) = t.current_run_id {
                mine.insert(unit_of(slug, &t.id, run));
            }
            self.reconcile_row(slug, &t, units, records, &ctx, counts)
                .await;
        }
        self.stop_strays(slug, units, &mine).await;
        Ok(())
    }

    /// One `running` row: its facts, gathered only as far as the rules need them, and what
    /// its rule says.
    async fn reconcile_row(
        &mut self,
        slug: &str,
        t: &crate::board::Task,
        units: &HashMap<String, UnitState>,
        records: Option<&HashSet<String>>,
        ctx: &Here,
        counts: &mut Counts,
    ) {
        let (ours, host_prefix) = (&ctx.ours, &ctx.host_prefix);
        let Some(run) = t.current_run_id else {
            return;
        };
        let unit = unit_of(slug, &t.id, run);
        let key = RunKey::new(slug, &t.id, run);
        counts.current_units.insert(unit.clone());
        // Read only when listed (a record written since the listing is seen by inotify).
        let listed = records.is_none_or(|r| r.contains(&run_record(slug, &t.id, run)));
        let state = &self.cfg.state_dir;
        let record = listed.then(|| read_record(state, slug, &t.id, run).ok().flatten());
        let record = record.flatten();
        let known = self.live.get(&key);
        let tracked = known.is_some_and(|l| l.watched);
        // The common case on the safety-net tick, 10,000 times with 10,000 live: a run
        // we watch, its scope live, no record. Rule 1 again: nothing to change.
        if tracked && record.is_none() && units.get(&unit).is_some_and(UnitState::is_live) {
            return;
        }
        let live = self.live_of(t, &unit, known);
        // Facts, gathered only as far as the rules need them.
        // A scope we watch had its cgroup seen populated when it started, so it cannot
        // be a husk: only the others cost a read of their `cgroup.events`.
        let scope_live = units.get(&unit).is_some_and(UnitState::is_live)
            && (tracked || !self.husk(&unit, &live.profile).await);
        let local = t
            .claim_lock
            .as_deref()
            .is_none_or(|l| l.starts_with(host_prefix.as_str()));
        let foreign_worker = || {
            t.worker_pid.filter(|p| *p > 0).is_some_and(|pid| {
                let cg = liveness::cgroup_of(pid as u32).unwrap_or(None);
                let in_ours = cg
                    .as_deref()
                    .is_some_and(|c| c.contains("/hermes-worker-kanban-"));
                cg.is_some() && !in_ours && liveness::is_alive(pid as u32)
            })
        };
        let by_hand = || {
            let now = crate::board::now();
            let claimed_at = self
                .board(slug)
                .and_then(|b| b.run(run).ok().flatten())
                .map(|r| r.started_at);
            // A scope of ours by the run's name, even an empty one, says it was ours.
            t.worker_pid.is_none()
                && !units.contains_key(&unit)
                && t.claim_expires.is_some_and(|e| e > now)
                && claimed_at.is_some_and(|c| c >= crate::host::boot_time().unwrap_or(i64::MAX))
                && !t.claim_lock.as_ref().is_some_and(|l| ours.contains(l))
        };
        let unexplained = !scope_live && record.is_none() && local;
        let foreign_worker = unexplained && foreign_worker();
        let facts = RowFacts {
            scope_live,
            record: record.is_some(),
            local,
            foreign_worker,
            by_hand: unexplained && !foreign_worker && !tracked && by_hand(),
        };
        let rule = rule(&facts);
        if matches!(rule, Rule::Adopt | Rule::EndedWhileAway | Rule::Gone) {
            self.learn_tmpdir(&key, &unit);
        }
        match rule {
            Rule::Adopt => {
                if !self.live.contains_key(&key) {
                    info!(board = %slug, hermes_kanban_task = %t.id, hermes_kanban_run_id = run, unit = %unit, object_systemd_unit = %unit, "adopted a running worker");
                    counts.adopted += 1;
                }
                self.live.insert(
                    key.clone(),
                    Live {
                        watched: true,
                        ..live
                    },
                );
                if facts.record {
                    self.book(&key).await;
                }
            }
            Rule::EndedWhileAway => {
                self.live.insert(key.clone(), live);
                counts.ended += 1;
                self.book(&key).await;
            }
            Rule::NotOurs => {}
            Rule::ClaimedByHand => {
                debug!(board = %slug, hermes_kanban_task = %t.id, hermes_kanban_run_id = run,
                       "claimed by hand (no worker, not claimed by hermes-mgr); left to its claim");
            }
            Rule::SomeoneElsesWorker => {
                warn!(board = %slug, hermes_kanban_task = %t.id, hermes_kanban_run_id = run, pid = t.worker_pid,
                      "running worker was not started by hermes-mgr (its PID lives outside any worker scope); leaving it alone");
            }
            Rule::Gone => {
                // Booked from those facts: lost, unless we watched it live and it was
                // killed with its supervisor.
                self.live.insert(key.clone(), live);
                self.book(&key).await;
                if !self.live.contains_key(&key) {
                    counts.lost += 1;
                }
            }
        }
    }

    /// What tracking the running row `t` (its scope `unit`) means, keeping what we knew.
    fn live_of(&self, t: &crate::board::Task, unit: &str, known: Option<&Live>) -> Live {
        Live {
            unit: unit.to_string(),
            lock: t.claim_lock.clone().unwrap_or_default(),
            max_runtime: t.max_runtime_seconds,
            closed_since: None,
            watched: known.is_some_and(|l| l.watched),
            stale: known.and_then(|l| l.stale.clone()),
            profile: self.profile_of(t.assignee.as_deref()),
            board_full: known.is_some_and(|l| l.board_full),
            spawned: known.and_then(|l| l.spawned.clone()),
        }
    }

    /// Scopes of this board's runs that are not current: never two workers for one task.
    async fn stop_strays(
        &mut self,
        slug: &str,
        units: &HashMap<String, UnitState>,
        mine: &HashSet<String>,
    ) {
        let mut asked = 0u32;
        let of_board = worker_scopes_of(slug);
        for (unit, state) in units {
            if mine.contains(unit) || !state.is_live() || !of_board(unit) {
                continue;
            }
            let Some(run) = run_of_worker_scope(unit) else {
                continue;
            };
            // Thousands of strays (a restart after many ended runs) are progress: each hundred
            // fed to the watchdog.
            asked += 1;
            if asked.is_multiple_of(100) {
                self.notifier.alive();
            }
            let Some(board) = self.board(slug) else { break };
            if let Ok(Some(r)) = board.run(run) {
                if unit_of(slug, &r.task_id, run) == *unit {
                    warn!(board = %slug, hermes_kanban_task = %r.task_id, hermes_kanban_run_id = run, unit = %unit,
                          "worker scope of a run that is not current; stopping it");
                    if let Err(e) = self.sd.stop(unit).await {
                        warn!(unit = %unit, "stop: {e}");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_row_gets_its_numbered_rule() {
        let f = |scope_live, record, local, foreign_worker, by_hand| RowFacts {
            scope_live,
            record,
            local,
            foreign_worker,
            by_hand,
        };
        let rows = [
            (f(true, false, true, false, false), Rule::Adopt),
            (f(true, true, true, false, false), Rule::Adopt),
            (f(true, false, false, false, false), Rule::Adopt),
            (f(false, true, true, false, false), Rule::EndedWhileAway),
            (f(false, true, false, false, false), Rule::EndedWhileAway),
            (f(false, false, false, false, false), Rule::NotOurs),
            (f(false, false, true, true, false), Rule::SomeoneElsesWorker),
            (f(false, false, true, false, true), Rule::ClaimedByHand),
            (f(false, false, true, false, false), Rule::Gone),
        ];
        for (facts, want) in rows {
            assert_eq!(rule(&facts), want, "{facts:?}");
        }
    }
}
