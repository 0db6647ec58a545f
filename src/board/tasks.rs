//! Task verbs, as upstream's `kanban_db` performs them: create, complete, block,
//! unblock, requeue, and parent gating (`recompute_ready`).

use rusqlite::{params, OptionalExtension};
use serde_json::{json, Value};

use super::rows::*;
use super::*;
use crate::transitions;

/// `t_` + 8 hex digits from the kernel's CSPRNG, as upstream's `secrets.token_hex(4)`.
pub(super) fn new_task_id() -> std::io::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 4];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(format!(
        "t_{:02x}{:02x}{:02x}{:02x}",
        b[0], b[1], b[2], b[3]
    ))
}

/// Upstream's `_SCRATCH_TIP_SENTINEL_NAME` and `_SCRATCH_TIP_MESSAGE`.
const SCRATCH_TIP_SENTINEL: &str = ".scratch_tip_shown";
const SCRATCH_TIP: &str = "scratch workspaces are ephemeral — they're deleted when the task completes. Use --workspace worktree: (git worktree) or --workspace dir:/abs/path (existing dir) to preserve worker output.";

impl Board {
    /// `create_task`: a new id, `ready` when every parent is done, else `todo`, and a
    /// `created` event. Unknown parents are refused. An `idempotency_key` that a live task
    /// already carries returns that task's id instead.
    pub fn create(&self, t: &NewTask) -> Result<String> {
        let title = t.title.trim();
        if title.is_empty() {
            return Err(BoardError::Invalid("a task needs a non-empty title".into()));
        }
        let assignee = t
            .assignee
            .as_deref()
            .map(|a| a.trim().to_lowercase())
            .filter(|a| !a.is_empty());
        if let Some(r) = t.max_retries {
            if r < 1 {
                return Err(BoardError::Invalid(format!(
                    "--max-retries must be at least 1, got {r}"
                )));
            }
        }
        if let Some(r) = t.max_runtime_seconds {
            if r < 1 {
                return Err(BoardError::Invalid(format!(
                    "--max-runtime must be at least 1 second, got {r}"
                )));
            }
        }
        let mut parents: Vec<&str> = Vec::new();
        for p in t.parents.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
            if !parents.contains(&p) {
                parents.push(p);
            }
        }
        if let Some(key) = &t.idempotency_key {
            let existing: Option<String> = self
                .conn
                .row(
                    "SELECT id FROM tasks WHERE idempotency_key = ?1 AND status != 'archived'
                     ORDER BY created_at DESC LIMIT 1",
                    [key],
                    |r| r.get(0),
                )
                .optional()
                .map_err(|e| self.err("idempotency lookup", e))?;
            if let Some(id) = existing {
                return Ok(id);
            }
        }
        // Two attempts, as upstream: a fresh id colliding twice means something else is wrong.
        for attempt in 0..2 {
            let id = new_task_id().map_err(|source| BoardError::Io {
                path: "/dev/urandom".into(),
                op: "read",
                source,
            })?;
            let res = self.write("create task", |c| {
                let mut status = "ready";
                for p in &parents {
                    let st: Option<String> = c
                        .row("SELECT status FROM tasks WHERE id = ?1", [p], |r| r.get(0))
                        .optional()
                        .map_err(|e| self.err("read parent", e))?;
                    match st.as_deref() {
                        None => return Err(BoardError::Invalid(format!("unknown parent task {p:?}"))),
                        Some("done") => {}
                        Some(_) => status = "todo",
                    }
                }
                c.exec(
                    "INSERT INTO tasks (id, title, body, assignee, status, priority, created_by, created_at,
                        workspace_kind, tenant, idempotency_key, max_runtime_seconds, max_retries, goal_mode)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'scratch', ?9, ?10, ?11, ?12, 0)",
                    params![
                        id, title, t.body, assignee, status, t.priority, t.created_by, now(), t.tenant,
                        t.idempotency_key, t.max_runtime_seconds, t.max_retries
                    ],
                )
                .map_err(|e| self.err("insert task", e))?;
                for p in &parents {
                    c.exec("INSERT OR IGNORE INTO task_links (parent_id, child_id) VALUES (?1, ?2)", params![p, id])
                        .map_err(|e| self.err("link parent", e))?;
                }
                let payload = json!({
                    "assignee": assignee, "status": status, "parents": parents, "tenant": t.tenant,
                    "branch_name": null, "skills": null, "goal_mode": null,
                });
                append_event(c, &id, "created", &payload, None).map_err(|e| self.err("append event", e))?;
                Ok(id.clone())
            });
            match res {
                Err(BoardError::Sqlite {
                    source: rusqlite::Error::SqliteFailure(f, _),
                    ..
                }) if f.code == rusqlite::ErrorCode::ConstraintViolation && attempt == 0 => {
                    continue
                }
                other => return other,
            }
        }
        Err(BoardError::Invalid(
            "could not allocate a unique task id".into(),
        ))
    }

    /// `complete_task`: `running|ready|blocked → done`, the open run closed `completed` (or a
    /// zero-length run synthesized when there was none and there is something to record), a
    /// `completed` event, the failure counter reset, and children promoted (parent gating
    /// with `failure_limit`, in the same transaction). With `expected_run` the write only
    /// lands while that run is still the current one.
    pub fn complete(
        &self,
        id: &str,
        result: Option<&str>,
        summary: Option<&str>,
        metadata: Option<&Value>,
        expected_run: Option<i64>,
        failure_limit: i64,
    ) -> Result<bool> {
        let now = now();
        let summary = summary.or(result);
        let done = self.write("complete", |c| {
            let n = c
                .exec(
                    "UPDATE tasks SET status='done', result=?1, completed_at=?2, claim_lock=NULL,
                        claim_expires=NULL, worker_pid=NULL, block_kind=NULL, block_recurrences=0,
                        consecutive_failures=0, last_failure_error=NULL
                     WHERE id=?3 AND status IN ('running','ready','blocked')
                       AND (?4 IS NULL OR current_run_id = ?4)",
                    params![result, now, id, expected_run],
                )
                .map_err(|e| self.err("complete", e))?;
            if n != 1 {
                return Ok(false);
            }
            let meta = metadata.filter(|m| !m.is_null());
            let mut run_id =
                close_current_run(c, id, "done", "completed", summary, None, meta, now)
                    .map_err(|e| self.err("close run", e))?;
            if run_id.is_none() && (summary.is_some() || meta.is_some() || result.is_some()) {
                run_id = Some(
                    synthesize_run(c, id, "completed", summary, None, meta, now)
                        .map_err(|e| self.err("close run", e))?,
                );
            }
            let payload = transitions::completed_payload(result, summary);
            append_event(c, id, "completed", &payload, run_id)
                .map_err(|e| self.err("append event", e))?;
            // Its children see it `done` in the same transaction: none is left in `todo`
            // by a crash between the two, and a blocked one is held by the configured limit.
            self.promote_ready(c, failure_limit)?;
            Ok(true)
        })?;
        Ok(done)
    }

    /// `block_task`: `running|ready → blocked`, routed as upstream routes it: kind
    /// `dependency` goes to `todo` (parent gating frees it), a re-block for the same cause
    /// `BLOCK_RECURRENCE_LIMIT` times goes to `triage`. Returns the status the task landed
    /// in, or `None` when it was not blockable.
    pub fn block(
        &self,
        id: &str,
        reason: Option<&str>,
        kind: Option<&str>,
        expected_run: Option<i64>,
    ) -> Result<Option<String>> {
        if let Some(k) = kind {
            if !BLOCK_KINDS.contains(&k) {
                return Err(BoardError::Invalid(format!(
                    "block kind must be one of {}, got {k:?}",
                    BLOCK_KINDS.join(", ")
                )));
            }
        }
        let now = now();
        self.write("block", |c| {
            let cur: Option<(Option<String>, i64)> = c
                .row("SELECT block_kind, block_recurrences FROM tasks WHERE id=?1", [id], |r| {
                    Ok((r.get(0)?, r.get::<_, Option<i64>>(1)?.unwrap_or(0)))
                })
                .optional()
                .map_err(|e| self.err("block", e))?;
            let Some((prev_kind, prev_rec)) = cur else { return Ok(None) };
            let route = transitions::block_route(kind, prev_kind.as_deref(), prev_rec);
            let (to, recurrences) = (route.to, route.recurrences);
            let n = c
                .exec(
                    "UPDATE tasks SET status=?1, claim_lock=NULL, claim_expires=NULL, worker_pid=NULL,
                        block_kind=?2, block_recurrences=?3
                     WHERE id=?4 AND status IN ('running','ready') AND (?5 IS NULL OR current_run_id=?5)",
                    params![to, kind, recurrences, id, expected_run],
                )
                .map_err(|e| self.err("block", e))?;
            if n != 1 {
                return Ok(None);
            }
            let mut run_id =
                close_current_run(c, id, "blocked", "blocked", reason, None, None, now).map_err(|e| self.err("close run", e))?;
            if run_id.is_none() && reason.is_some() {
                run_id = Some(synthesize_run(c, id, "blocked", reason, None, None, now).map_err(|e| self.err("close run", e))?);
            }
            let payload = transitions::block_payload(&route, reason, kind);
            append_event(c, id, route.event, &payload, run_id).map_err(|e| self.err("append event", e))?;
            Ok(Some(to.to_string()))
        })
    }

    /// `unblock_task`: `blocked|scheduled → ready` (or `todo` while a parent is open), the
    /// failure counter reset, an `unblocked` event.
    pub fn unblock(&self, id: &str) -> Result<Option<String>> {
        let now = now();
        self.write("unblock", |c| {
            let stale: Option<i64> = c
                .row("SELECT current_run_id FROM tasks WHERE id=?1 AND status IN ('blocked','scheduled')", [id], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(|e| self.err("unblock", e))?
                .flatten();
            if let Some(run) = stale {
                recover_dangling_run(c, run, "unblock", now).map_err(|e| self.err("unblock", e))?;
            }
            let open_parent: bool = c
                .row(
                    "SELECT 1 FROM task_links l JOIN tasks p ON p.id=l.parent_id
                     WHERE l.child_id=?1 AND p.status != 'done' LIMIT 1",
                    [id],
                    |_| Ok(true),
                )
                .optional()
                .map_err(|e| self.err("unblock", e))?
                .unwrap_or(false);
            let to = if open_parent { "todo" } else { "ready" };
            let n = c
                .exec(
                    "UPDATE tasks SET status=?1, current_run_id=NULL, consecutive_failures=0, last_failure_error=NULL
                     WHERE id=?2 AND status IN ('blocked','scheduled')",
                    params![to, id],
                )
                .map_err(|e| self.err("unblock", e))?;
            if n != 1 {
                return Ok(None);
            }
            let payload = if to == "ready" { Value::Null } else { json!({"status": to}) };
            append_event(c, id, "unblocked", &payload, None).map_err(|e| self.err("append event", e))?;
            Ok(Some(to.to_string()))
        })
    }

    /// `reclaim_task` (hermes-mgr's `requeue`): release a claimed task back to `ready`,
    /// closing its run `reclaimed`; not counted as a failure, and the counter is reset as
    /// upstream does for an operator's reclaim. Stopping a live worker is the caller's job
    /// (its scope), and happens before this.
    pub fn requeue(&self, id: &str, reason: Option<&str>) -> Result<bool> {
        let now = now();
        self.write("requeue", |c| {
            let row: Option<(String, Option<String>, Option<i64>)> = c
                .row("SELECT status, claim_lock, worker_pid FROM tasks WHERE id=?1", [id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()
                .map_err(|e| self.err("requeue", e))?;
            let Some((status, prev_lock, prev_pid)) = row else { return Ok(false) };
            if status != "running" && prev_lock.is_none() {
                return Ok(false);
            }
            let n = c
                .exec(
                    "UPDATE tasks SET status='ready', claim_lock=NULL, claim_expires=NULL, worker_pid=NULL,
                        consecutive_failures=0, last_failure_error=NULL
                     WHERE id=?1 AND status IN ('running','ready','blocked') AND claim_lock IS ?2",
                    params![id, prev_lock],
                )
                .map_err(|e| self.err("requeue", e))?;
            if n != 1 {
                return Ok(false);
            }
            let error = match reason {
                Some(r) => format!("manual_reclaim: {r}"),
                None => format!("manual_reclaim lock={}", prev_lock.as_deref().unwrap_or("None")),
            };
            let termination = json!({"prev_pid": prev_pid, "host_local": false, "termination_attempted": false,
                                     "terminated": false, "sigkill": false});
            let run_id = close_current_run(c, id, "reclaimed", "reclaimed", None, Some(&error), Some(&termination), now)
                .map_err(|e| self.err("close run", e))?;
            let mut payload = json!({"manual": true, "reason": reason, "prev_lock": prev_lock});
            merge(&mut payload, &termination);
            append_event(c, id, "reclaimed", &payload, run_id).map_err(|e| self.err("append event", e))?;
            Ok(true)
        })
    }

    /// Upstream's `respawn_guarded` event (`{"reason": …}`), unless the task's newest event
    /// already says the same: a pass runs on every change here, not once a minute.
    /// Upstream's first-use tip (`_maybe_emit_scratch_tip`): once per Hermes root, on the
    /// first scratch task a dispatcher starts, a `tip_scratch_workspace` event; the root's
    /// `.scratch_tip_shown` says it was given, by upstream's dispatcher or ours. The file is
    /// made as the tree's owner, never through a link. Best effort, as upstream's.
    pub fn scratch_tip(&self, id: &str) {
        let sentinel = self.paths.root.join(SCRATCH_TIP_SENTINEL);
        if std::fs::symlink_metadata(&sentinel).is_ok() {
            return;
        }
        let said = self.write("scratch tip", |c| {
            append_event(
                c,
                id,
                "tip_scratch_workspace",
                &json!({"message": SCRATCH_TIP}),
                None,
            )
            .map_err(|e| self.err("scratch tip", e))
        });
        let made = safe_fs::as_user(&self.owner, || {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&sentinel)
        });
        if let Err(e) = said {
            tracing::warn!(hermes_kanban_task = %id, "the scratch workspace tip: {e}");
        }
        match made.and_then(|r| r) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => tracing::warn!("{}: {e}", sentinel.display()),
        }
    }

    pub fn note_respawn_guarded(&self, id: &str, reason: &str) -> Result<()> {
        let said = |c: &rusqlite::Connection| -> Result<bool> {
            let last: Option<(String, Option<String>)> = c
                .row(
                    "SELECT kind, payload FROM task_events WHERE task_id=?1 ORDER BY id DESC LIMIT 1",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1).ok().flatten())),
                )
                .optional()
                .map_err(|e| self.err("respawn_guarded", e))?;
            Ok(last.is_some_and(|(kind, payload)| {
                kind == "respawn_guarded"
                    && payload
                        .and_then(|p| serde_json::from_str::<serde_json::Value>(&p).ok())
                        .is_some_and(|p| p["reason"] == reason)
            }))
        };
        // A guarded task is looked at on every pass: no write lock unless there is news.
        if said(&self.conn)? {
            return Ok(());
        }
        self.write("respawn_guarded", |c| {
            if !said(c)? {
                append_event(
                    c,
                    id,
                    "respawn_guarded",
                    &serde_json::json!({"reason": reason}),
                    None,
                )
                .map_err(|e| self.err("append event", e))?;
            }
            Ok(())
        })
    }

    /// An operator's pause or resume of a task (`paused`, `resumed`), as an event Hermes'
    /// own tools show; the task's status is not changed (a frozen run stays `running`).
    pub fn note_pause(
        &self,
        id: &str,
        kind: &str,
        payload: &Value,
        run: Option<i64>,
    ) -> Result<()> {
        debug_assert!(matches!(kind, "paused" | "resumed"));
        self.write("pause", |c| {
            append_event(c, id, kind, payload, run).map_err(|e| self.err("append event", e))
        })
    }

    /// `recompute_ready`: promote `todo` (and non-sticky, under-the-limit `blocked`) tasks
    /// whose parents are all done or archived. Returns how many were promoted.
    pub fn recompute_ready(&self, failure_limit: i64) -> Result<usize> {
        self.write("recompute ready", |c| self.promote_ready(c, failure_limit))
    }

    /// `recompute_ready` inside a write transaction already open on `c`.
    fn promote_ready(&self, c: &rusqlite::Connection, failure_limit: i64) -> Result<usize> {
        let err = |e| self.err("recompute ready", e);
        // Every pass runs this: a blocked task that stays blocked whatever its events say (at
        // its breaker's limit) or by its last block event (an explicit block) is left out in
        // the query itself, so a board's pile of blocked tasks costs no statement each (the
        // soak saw the daemon's CPU per task grow tenfold with it). The rest get
        // `stays_blocked`'s whole rule below, as before.
        let mut st = c
            .prepare_cached(
                "SELECT t.id, t.status, t.consecutive_failures, t.max_retries FROM tasks t
                 WHERE (t.status = 'todo'
                        OR (t.status = 'blocked'
                            AND coalesce(t.consecutive_failures, 0) < coalesce(t.max_retries, ?1)
                            AND coalesce((SELECT e.kind FROM task_events e
                                          WHERE e.task_id = t.id AND e.kind IN ('blocked','unblocked')
                                          ORDER BY e.id DESC LIMIT 1), '') != 'blocked'))
                   AND NOT EXISTS (SELECT 1 FROM task_links l JOIN tasks p ON p.id=l.parent_id
                                   WHERE l.child_id=t.id AND p.status NOT IN ('done','archived'))",
            )
            .map_err(err)?;
        let rows: Vec<(String, String, i64, Option<i64>)> = st
            .query_map([failure_limit], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get::<_, Option<i64>>(2)?.unwrap_or(0),
                    r.get(3)?,
                ))
            })
            .and_then(|r| r.collect())
            .map_err(err)?;
        drop(st);
        let mut promoted = 0;
        for (id, status, failures, max_retries) in rows {
            if status == "blocked" {
                let last: Option<String> = c
                    .row(
                        "SELECT kind FROM task_events WHERE task_id=?1 AND kind IN ('blocked','unblocked')
                         ORDER BY id DESC LIMIT 1",
                        [&id],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(err)?;
                let mut sticky_err = None;
                let sticky = || match sticky_gave_up(c, &id) {
                    Ok(s) => s,
                    Err(e) => {
                        sticky_err = Some(e);
                        true
                    }
                };
                let stays = transitions::stays_blocked(
                    last.as_deref(),
                    failures,
                    max_retries,
                    failure_limit,
                    sticky,
                );
                if let Some(e) = sticky_err {
                    return Err(err(e));
                }
                if stays.is_some() {
                    continue;
                }
            }
            let n = c
                .exec(
                    "UPDATE tasks SET status='ready' WHERE id=?1 AND status=?2",
                    params![id, status],
                )
                .map_err(err)?;
            if n == 1 {
                append_event(c, &id, "promoted", &Value::Null, None)
                    .map_err(|e| self.err("append event", e))?;
                promoted += 1;
            }
        }
        Ok(promoted)
    }
}
