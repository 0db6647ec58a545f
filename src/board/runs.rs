//! A run's life on the board: claimed, kept alive, told its worker's pid and workspace,
//! stopped by an operator, ended with the booking `outcome::booking` made.

use std::path::Path;

use rusqlite::{params, OptionalExtension};
use serde_json::{json, Value};

use super::rows::*;
use super::*;

impl Board {
    /// `claim_task`: `ready → running` with `claim_lock = lock`, a `running` run row,
    /// `current_run_id` and a `claimed` event. `None` when someone else got there first or
    /// the task is not ready; a task whose parents reopened is demoted to `todo`.
    pub fn claim(&self, id: &str, lock: &str, ttl: i64) -> Result<Option<Claim>> {
        let now = now();
        let expires = now + ttl;
        self.write("claim", |c| {
            let open_parent: bool = c
                .row(
                    "SELECT 1 FROM task_links l JOIN tasks p ON p.id = l.parent_id
                     WHERE l.child_id = ?1 AND p.status NOT IN ('done','archived') LIMIT 1",
                    [id],
                    |_| Ok(true),
                )
                .optional()
                .map_err(|e| self.err("claim", e))?
                .unwrap_or(false);
            if open_parent {
                let n = c
                    .exec(
                        "UPDATE tasks SET status='todo' WHERE id=?1 AND status='ready'",
                        [id],
                    )
                    .map_err(|e| self.err("claim", e))?;
                if n == 1 {
                    append_event(
                        c,
                        id,
                        "claim_rejected",
                        &json!({"reason": "parents_not_done"}),
                        None,
                    )
                    .map_err(|e| self.err("append event", e))?;
                }
                return Ok(None);
            }
            // A dangling run pointer on a ready task is closed before the new run opens.
            let stale: Option<i64> = c
                .row(
                    "SELECT current_run_id FROM tasks WHERE id=?1 AND status='ready'",
                    [id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(|e| self.err("claim", e))?
                .flatten();
            if let Some(run) = stale {
                recover_dangling_run(c, run, "re-claim", now).map_err(|e| self.err("claim", e))?;
            }
            let n = c
                .exec(
                    "UPDATE tasks SET status='running', claim_lock=?1, claim_expires=?2,
                        started_at=COALESCE(started_at, ?3)
                     WHERE id=?4 AND status='ready' AND claim_lock IS NULL",
                    params![lock, expires, now, id],
                )
                .map_err(|e| self.err("claim", e))?;
            if n != 1 {
                return Ok(None);
            }
            self.open_run(c, id, lock, expires, now, json!({}))
                .map(Some)
        })
    }

    /// `claim_review_task`: `review` → `running` on a new run, for upstream's review lane
    /// (no parent gate: the task passed it on its way to `review`). The worker is started
    /// with the `sdlc-review` skill (`Claim::review`).
    pub fn claim_review(&self, id: &str, lock: &str, ttl: i64) -> Result<Option<Claim>> {
        let now = now();
        let expires = now + ttl;
        self.write("claim review", |c| {
            let n = c
                .exec(
                    "UPDATE tasks SET status='running', claim_lock=?1, claim_expires=?2,
                        started_at=COALESCE(started_at, ?3)
                     WHERE id=?4 AND status='review' AND claim_lock IS NULL",
                    params![lock, expires, now, id],
                )
                .map_err(|e| self.err("claim review", e))?;
            if n != 1 {
                return Ok(None);
            }
            let mut claim = self.open_run(
                c,
                id,
                lock,
                expires,
                now,
                json!({"source_status": "review"}),
            )?;
            claim.review = true;
            Ok(Some(claim))
        })
    }

    /// The run of a task just moved to `running`: its row, the task's pointer, the `claimed`
    /// event (`extra` joins upstream's payload).
    fn open_run(
        &self,
        c: &rusqlite::Connection,
        id: &str,
        lock: &str,
        expires: i64,
        now: i64,
        extra: serde_json::Value,
    ) -> Result<Claim> {
        c.exec(
            "INSERT INTO task_runs (task_id, profile, step_key, status, claim_lock, claim_expires,
                max_runtime_seconds, started_at)
             SELECT id, assignee, current_step_key, 'running', ?2, ?3, max_runtime_seconds, ?4
             FROM tasks WHERE id=?1",
            params![id, lock, expires, now],
        )
        .map_err(|e| self.err("open run", e))?;
        let run_id = c.last_insert_rowid();
        c.exec(
            "UPDATE tasks SET current_run_id=?1 WHERE id=?2",
            params![run_id, id],
        )
        .map_err(|e| self.err("claim", e))?;
        let mut payload = json!({"lock": lock, "expires": expires, "run_id": run_id});
        if let (Some(p), serde_json::Value::Object(x)) = (payload.as_object_mut(), extra) {
            p.extend(x);
        }
        append_event(c, id, "claimed", &payload, Some(run_id))
            .map_err(|e| self.err("append event", e))?;
        let task = c
            .row("SELECT * FROM tasks WHERE id=?1", [id], Task::from_row)
            .map_err(|e| self.err("claim", e))?;
        Ok(Claim {
            task,
            run_id,
            lock: lock.to_string(),
            expires,
            review: false,
        })
    }

    /// `heartbeat_claim`: push `claim_expires` out by `ttl` while `lock` still owns the task,
    /// so upstream's stale-claim sweep never reclaims a live worker. `false` = not ours any more.
    pub fn extend_claim(&self, id: &str, lock: &str, ttl: i64) -> Result<bool> {
        Ok(self.extend_claims(&[(id, lock)], ttl)? == 1)
    }

    /// `extend_claim` for many tasks in one transaction (a dispatcher with 10,000 live
    /// workers would otherwise take the write lock 10,000 times per round). Returns how
    /// many claims were still ours and were extended.
    pub fn extend_claims(&self, claims: &[(&str, &str)], ttl: i64) -> Result<usize> {
        let expires = now() + ttl;
        self.write("extend claim", |c| {
            let mut task = c
                .prepare_cached(
                    "UPDATE tasks SET claim_expires=?1 WHERE id=?2 AND status='running' AND claim_lock=?3",
                )
                .map_err(|e| self.err("extend claim", e))?;
            let mut run = c
                .prepare_cached(
                    "UPDATE task_runs SET claim_expires=?1
                     WHERE id=(SELECT current_run_id FROM tasks WHERE id=?2)",
                )
                .map_err(|e| self.err("extend claim", e))?;
            let mut extended = 0;
            for (id, lock) in claims {
                let n = task
                    .execute(params![expires, id, lock])
                    .map_err(|e| self.err("extend claim", e))?;
                if n == 1 {
                    run.execute(params![expires, id])
                        .map_err(|e| self.err("extend claim", e))?;
                    extended += 1;
                }
            }
            Ok(extended)
        })
    }

    /// A started run, in one transaction: the workspace it uses (as upstream's
    /// `resolve_workspace` persists it; `None` for a worktree, which upstream's own code
    /// recorded) and the worker's PID on task and run, with upstream's `spawned {pid}`
    /// event (and, as ~0.22 writes it, the worker's fingerprint as its `started_at`).
    /// Guarded by the run id so a late write cannot land on a newer run.
    pub fn record_start(
        &self,
        id: &str,
        run_id: i64,
        workspace: Option<&Path>,
        pid: i64,
        started_at: Option<&str>,
    ) -> Result<bool> {
        let ws = workspace.map(|p| p.to_string_lossy());
        self.write("record the start", |c| {
            let n = c
                .exec(
                    "UPDATE tasks SET worker_pid=?1, workspace_path=COALESCE(?4, workspace_path)
                     WHERE id=?2 AND current_run_id=?3 AND status='running'",
                    params![pid, id, run_id, ws],
                )
                .map_err(|e| self.err("record the start", e))?;
            if n == 1 {
                c.exec(
                    "UPDATE task_runs SET worker_pid=?1 WHERE id=?2",
                    params![pid, run_id],
                )
                .map_err(|e| self.err("record the start", e))?;
                let payload = match started_at {
                    Some(f) => json!({"pid": pid, "started_at": f}),
                    None => json!({"pid": pid}),
                };
                append_event(c, id, "spawned", &payload, Some(run_id))
                    .map_err(|e| self.err("append event", e))?;
            }
            Ok(n == 1)
        })
    }

    /// An operator stops run `run_id`: `running → blocked` (sticky, like an explicit block:
    /// the task does not start again until unblocked), the run closed `stopped`. Done before
    /// the worker is signalled, so nothing — not a dispatcher seeing the worker exit — can
    /// requeue the task in between. `false` when the task is not running on that run.
    pub fn stop_run(&self, id: &str, run_id: i64, reason: &str) -> Result<bool> {
        let now = now();
        self.write("stop run", |c| {
            let n = c
                .exec(
                    "UPDATE tasks SET status='blocked', claim_lock=NULL, claim_expires=NULL, worker_pid=NULL,
                        current_run_id=NULL, block_kind=NULL
                     WHERE id=?1 AND status='running' AND current_run_id=?2",
                    params![id, run_id],
                )
                .map_err(|e| self.err("stop run", e))?;
            if n != 1 {
                return Ok(false);
            }
            close_run(c, run_id, "stopped", "stopped", None, Some(reason), None, now).map_err(|e| self.err("close run", e))?;
            let payload = json!({"reason": reason, "kind": null, "stopped_by_operator": true});
            append_event(c, id, "blocked", &payload, Some(run_id)).map_err(|e| self.err("append event", e))?;
            Ok(true)
        })
    }

    /// Replace a closed run's error text (the stop's final word on how the worker ended).
    pub fn annotate_run(&self, run_id: i64, error: &str) -> Result<()> {
        self.write("annotate run", |c| {
            c.exec(
                "UPDATE task_runs SET error=?1 WHERE id=?2",
                params![error, run_id],
            )
            .map_err(|e| self.err("annotate run", e))?;
            Ok(())
        })
    }

    /// Close run `run_id` of a `running` task that its worker did not end itself: read the
    /// task's counters and apply `outcome::booking` (the policy lives there) in one
    /// transaction. Nothing happens — `Ok(None)` — unless the task is still `running` on
    /// that very run, so a late or duplicate report is harmless.
    pub fn end_run(
        &self,
        id: &str,
        run_id: i64,
        end: &RunEnd,
        rules: outcome::Rules,
    ) -> Result<Option<EndResult>> {
        self.end_run_costed(id, run_id, end, rules, None)
    }

    /// `end_run`, recording in the same transaction what the run cost (`resources`, a JSON
    /// object) in its metadata — also when the worker had closed the run itself. Metadata
    /// that is not a JSON object (task data: anyone may have written it) is left as it is.
    pub fn end_run_costed(
        &self,
        id: &str,
        run_id: i64,
        end: &RunEnd,
        rules: outcome::Rules,
        resources: Option<&Value>,
    ) -> Result<Option<EndResult>> {
        let now = now();
        // After the run's own metadata is written (closing it writes its details there). An
        // annotation: were it refused, the booking still stands.
        let record_cost = |c: &rusqlite::Connection| -> Result<()> {
            if let Some(r) = resources {
                if let Err(e) = c.exec(
                    "UPDATE task_runs SET metadata = json_set(coalesce(metadata, '{}'), '$.resources', json(?2))
                     WHERE id=?1 AND (metadata IS NULL OR (json_valid(metadata) AND json_type(metadata)='object'))",
                    params![run_id, r.to_string()],
                ) {
                    tracing::warn!(hermes_kanban_run_id = run_id, "run cost not recorded: {e}");
                }
            }
            Ok(())
        };
        self.write("end run", |c| {
            let row: Option<(i64, Option<i64>, Option<String>)> = c
                .row(
                    "SELECT consecutive_failures, max_retries, claim_lock FROM tasks
                     WHERE id=?1 AND status='running' AND current_run_id=?2",
                    params![id, run_id],
                    |r| Ok((r.get::<_, Option<i64>>(0)?.unwrap_or(0), r.get(1)?, r.get(2)?)),
                )
                .optional()
                .map_err(|e| self.err("end run", e))?;
            let Some((failures, max_retries, claimer)) = row else {
                record_cost(c)?;
                return Ok(None);
            };
            let violation_streak = if matches!(end, RunEnd::ProtocolViolation { .. }) {
                protocol_violation_streak(c, id).map_err(|e| self.err("end run", e))?
            } else {
                0
            };
            // A run the review lane claimed goes back to review (0.20 on: `_retry_status_for_run`).
            let retry_status = if rules.hermes.retry_status() && claimed_for_review(c, id, run_id).map_err(|e| self.err("end run", e))? {
                "review"
            } else {
                "ready"
            };
            let counters = outcome::Counters { failures, max_retries, violation_streak, claimer, retry_status };
            let b = outcome::booking(end, &counters, rules);
            c.exec(
                "UPDATE tasks SET status=?3, claim_lock=NULL, claim_expires=NULL, worker_pid=NULL, current_run_id=NULL
                 WHERE id=?1 AND status='running' AND current_run_id=?2",
                params![id, run_id, b.status()],
            )
            .map_err(|e| self.err("end run", e))?;
            close_run(c, run_id, b.run_outcome, b.run_outcome, None, Some(&b.error), Some(&b.run_metadata), now)
                .map_err(|e| self.err("close run", e))?;
            if b.stamp_error {
                c.exec(
                    "UPDATE tasks SET consecutive_failures=?1, last_failure_error=?2 WHERE id=?3",
                    params![b.failures, b.error, id],
                )
                .map_err(|e| self.err("end run", e))?;
            }
            if b.clear_heartbeat {
                c.exec("UPDATE tasks SET last_heartbeat_at=NULL WHERE id=?1", params![id])
                    .map_err(|e| self.err("end run", e))?;
            }
            if let Some((kind, payload)) = &b.event {
                append_event(c, id, kind, payload, Some(run_id)).map_err(|e| self.err("append event", e))?;
            }
            if let Some(payload) = &b.gave_up {
                append_event(c, id, "gave_up", payload, b.gave_up_on_run.then_some(run_id))
                    .map_err(|e| self.err("append event", e))?;
            }
            record_cost(c)?;
            Ok(Some(EndResult { run_id: Some(run_id), outcome: b.run_outcome.to_string(), status: b.status().to_string(), failures: b.failures, gave_up: b.gave_up.is_some() }))
        })
    }
}
