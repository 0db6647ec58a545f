//! The checks of live runs that no exit wakes: claims kept alive, silent runs stopped
//! (`stale`), runs closed by someone else (a worker's own verdict, a reclaim) whose worker
//! still runs, and scopes systemd calls live with nothing left in them (`husk`).

use super::*;
use crate::liveness;

impl Daemon {
    /// A scope systemd calls live while the kernel says its cgroup is empty (see
    /// `liveness::cgroup_populated`: the daemon died while starting that worker). It is
    /// stopped so systemd lets go of the name, and counts as gone. Without a verdict from
    /// the kernel (no such cgroup, unreadable) the unit state stands.
    pub(super) async fn husk(&self, unit: &str, profile: &str) -> bool {
        let cgroup = self.cfg.worker_cgroup(Some(profile), unit);
        if liveness::cgroup_populated(&cgroup) != Some(false) {
            return false;
        }
        warn!(unit = %unit, object_systemd_unit = %unit,
              "systemd reports the scope live but its cgroup {cgroup} is empty; stopping it");
        if let Err(e) = self.sd.stop(unit).await {
            warn!(unit = %unit, "stop: {e}");
        }
        true
    }

    /// Keep our workers' claims alive so upstream's stale-claim sweep never reclaims a
    /// live worker. The lock stays the one the worker was given.
    pub(super) fn extend_claims(&mut self) {
        // One transaction per board. A claim no longer ours was closed by someone else:
        // check_closed_runs deals with it.
        let mut by_board: HashMap<&str, Vec<(&str, &str)>> = HashMap::new();
        for (
            RunKey {
                board: slug, task, ..
            },
            live,
        ) in self.live.iter()
        {
            by_board
                .entry(slug.as_str())
                .or_default()
                .push((task.as_str(), live.lock.as_str()));
        }
        for (slug, claims) in by_board {
            let Some(board) = self.board(slug) else {
                continue;
            };
            if let Err(e) = board.extend_claims(&claims, self.cfg.claim_ttl_seconds) {
                warn!(board = %slug, claims = claims.len(), "extend claims: {e}; retrying later");
            }
        }
    }

    /// Upstream's stale detection (`kanban.dispatch_stale_timeout_seconds`, 0 = off): a
    /// run going for that long with no heartbeat for an hour has its scope stopped, and is
    /// booked `stale` (requeued, not counted) when it is gone. On the safety-net tick.
    pub(super) async fn check_stale(&mut self) {
        let timeout = self.cfg.stale_timeout_seconds;
        if timeout <= 0 {
            return;
        }
        let now = crate::board::now();
        let mut found = Vec::new();
        for (slug, s) in &self.slots {
            let Some(b) = &s.board else { continue };
            let Ok(running) = b.running_claims() else {
                continue;
            };
            for t in running {
                let Some(run) = t.current_run_id else {
                    continue;
                };
                let key = RunKey::new(slug, &t.id, run);
                if self.live.get(&key).is_none_or(|l| l.stale.is_some()) {
                    continue;
                }
                // A run starts no earlier than its task first did.
                if t.started_at.is_some_and(|s| now - s < timeout) {
                    continue;
                }
                // A frozen run cannot beat (`hermes-mgr pause`); and the time it was
                // paused is not charged after it resumes: the rule is asked on a clock that
                // stood still while it was frozen.
                if self.holds.look().frozen(&s.db_key(), &t.id, run) {
                    continue;
                }
                let Ok(Some(r)) = b.run(run) else { continue };
                let paused = crate::state_dir::read_paused(&crate::state_dir::paused_path(
                    &self.cfg.state_dir,
                    slug,
                    &t.id,
                    run,
                ))
                .total(now);
                if let Some(st) = outcome::stale(
                    r.started_at,
                    t.last_heartbeat_at,
                    now - paused as i64,
                    timeout,
                    t.worker_pid,
                ) {
                    found.push((key, st));
                }
            }
        }
        for (key, st) in found {
            let Some(live) = self.live.get_mut(&key) else {
                continue;
            };
            warn!(board = %key.board, hermes_kanban_task = %key.task, hermes_kanban_run_id = key.run, unit = %live.unit,
                  elapsed = st.elapsed_seconds, "no heartbeat from the worker (dispatch_stale_timeout_seconds); stopping it, the task is requeued");
            live.stale = Some(st);
            let unit = live.unit.clone();
            if let Err(e) = self.sd.stop(&unit).await {
                warn!(unit = %unit, "stop: {e}");
            }
        }
    }

    /// Runs the board says are over while their scope lives: the worker's own verdict
    /// (it exits by itself soon), or an operator's reclaim. A task already running on a
    /// newer run must not have two workers: the old scope is stopped at once; otherwise
    /// after `verdict_grace_seconds`. Every live run of every board, read in one indexed
    /// read per board: on the safety-net tick, when a grace runs out, after a pass.
    pub(super) async fn check_closed_runs(&mut self) {
        let mut running = HashMap::new();
        for (slug, s) in &mut self.slots {
            let Some(b) = &s.board else { continue };
            // Whatever an event names from here on is looked at again (`check_touched_runs`).
            s.events_seen = b.last_event_id().ok();
            match b.running_runs() {
                Ok(r) => {
                    running.insert(slug.clone(), r);
                }
                Err(e) => warn!(board = %slug, "read the running runs: {e}"),
            }
        }
        self.grace_due = None;
        let keys: Vec<RunKey> = self.live.keys().cloned().collect();
        for key in keys {
            let Some(on_board) = running.get(&key.board) else {
                continue;
            };
            let now_on = on_board.get(&key.task).copied();
            self.check_closed(&key, now_on).await;
        }
    }

    /// `check_closed_runs` for what another writer just changed on board `slug`: only the
    /// live runs of tasks with a new event (each commit of 10,000 workers must not read
    /// 10,000 rows). A write that left no event (a hand `UPDATE`) is seen by the next full
    /// check, on the safety-net tick at the latest.
    pub(super) async fn check_touched_runs(&mut self, slug: &str) {
        let Some(slot) = self.slots.get(slug) else {
            return;
        };
        let Some(board) = slot.board.as_ref() else {
            return;
        };
        let touched = match slot.events_seen {
            Some(after) => board.tasks_touched_since(after, 1000),
            None => Ok(None),
        };
        let (tasks, last) = match touched {
            Ok(Some(t)) => t,
            Ok(None) => return self.check_closed_runs().await,
            Err(e) => {
                warn!(board = %slug, "read the board's new events: {e}; checking every run");
                return self.check_closed_runs().await;
            }
        };
        let mut now = Vec::new();
        for task in &tasks {
            let keys: Vec<RunKey> = self.runs_of(slug, task).cloned().collect();
            if keys.is_empty() {
                continue;
            }
            match board.current_run(task) {
                Ok(on) => now.extend(keys.into_iter().map(|k| (k, on))),
                Err(e) => {
                    warn!(board = %slug, hermes_kanban_task = %task, "read the task's current run: {e}; checking every run");
                    return self.check_closed_runs().await;
                }
            }
        }
        if let Some(s) = self.slots.get_mut(slug) {
            s.events_seen = Some(last);
        }
        for (key, on) in now {
            self.check_closed(&key, on).await;
        }
    }

    /// One live run against the run its task is on now (`None`: not running).
    pub(super) async fn check_closed(&mut self, key: &RunKey, now_on: Option<i64>) {
        let grace = Duration::from_secs(self.cfg.verdict_grace_seconds);
        let Some(live) = self.live.get_mut(key) else {
            return;
        };
        if now_on == Some(key.run) {
            live.closed_since = None;
            return;
        }
        let superseded = now_on.is_some();
        let since = *live.closed_since.get_or_insert_with(Instant::now);
        if superseded || since.elapsed() >= grace {
            let unit = live.unit.clone();
            warn!(board = %key.board, hermes_kanban_task = %key.task, hermes_kanban_run_id = key.run, unit = %unit, superseded,
                  "the run was closed on the board but its worker still runs; stopping it");
            if let Err(e) = self.sd.stop(&unit).await {
                warn!(unit = %unit, "stop: {e}");
            }
        } else {
            // Come back when its grace is over, event or no event.
            let due = since + grace;
            self.grace_due = Some(self.grace_due.map_or(due, |d| d.min(due)));
        }
    }
}
