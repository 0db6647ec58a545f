//! Row helpers the verbs share: events, closing and synthesising runs, the protocol-
//! violation streak. SQL only, no policy.

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{Map, Value};

use super::*;

/// A connection's statements compiled once and kept (`prepare_cached`): the dispatch path
/// runs the same few statements for every run, and compiling them again each time was a
/// quarter of the daemon's CPU per run (BENCHMARKS.md, 14).
pub(super) trait Cached {
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
    fn row<T, P: rusqlite::Params, F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>>(
        &self,
        sql: &str,
        params: P,
        f: F,
    ) -> rusqlite::Result<T>;
}

impl Cached for Connection {
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    fn row<T, P: rusqlite::Params, F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>>(
        &self,
        sql: &str,
        params: P,
        f: F,
    ) -> rusqlite::Result<T> {
        self.prepare_cached(sql)?.query_row(params, f)
    }
}

pub(super) fn payload_text(v: &Value) -> Option<String> {
    // Upstream stores NULL for an empty payload (`json.dumps(payload) if payload else None`).
    match v {
        Value::Null => None,
        Value::Object(m) if m.is_empty() => None,
        other => Some(other.to_string()),
    }
}

pub(super) fn merge(into: &mut Value, from: &Value) {
    if let (Value::Object(a), Value::Object(b)) = (into, from) {
        for (k, v) in b {
            a.insert(k.clone(), v.clone());
        }
    }
}

pub(super) fn append_event(
    c: &Connection,
    task: &str,
    kind: &str,
    payload: &Value,
    run_id: Option<i64>,
) -> rusqlite::Result<()> {
    c.exec(
        "INSERT INTO task_events (task_id, run_id, kind, payload, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![task, run_id, kind, payload_text(payload), now()],
    )?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn close_run(
    c: &Connection,
    run_id: i64,
    status: &str,
    outcome: &str,
    summary: Option<&str>,
    error: Option<&str>,
    metadata: Option<&Value>,
    now: i64,
) -> rusqlite::Result<()> {
    c.exec(
        "UPDATE task_runs SET status=?1, outcome=?2, summary=?3, error=?4, metadata=?5, ended_at=?6,
            claim_lock=NULL, claim_expires=NULL, worker_pid=NULL
         WHERE id=?7 AND ended_at IS NULL",
        params![status, outcome, summary, error, metadata.and_then(payload_text), now, run_id],
    )?;
    Ok(())
}

/// `_end_run`: close the task's current run and clear the pointer; `None` if there was none.
#[allow(clippy::too_many_arguments)]
pub(super) fn close_current_run(
    c: &Connection,
    task: &str,
    status: &str,
    outcome: &str,
    summary: Option<&str>,
    error: Option<&str>,
    metadata: Option<&Value>,
    now: i64,
) -> rusqlite::Result<Option<i64>> {
    let run: Option<i64> = c
        .row(
            "SELECT current_run_id FROM tasks WHERE id=?1",
            [task],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    let Some(run) = run else { return Ok(None) };
    close_run(c, run, status, outcome, summary, error, metadata, now)?;
    c.exec("UPDATE tasks SET current_run_id=NULL WHERE id=?1", [task])?;
    Ok(Some(run))
}

/// `_synthesize_ended_run`: a zero-length, already-closed run for a verdict on a task that
/// was never claimed, so the summary is not lost.
pub(super) fn synthesize_run(
    c: &Connection,
    task: &str,
    outcome: &str,
    summary: Option<&str>,
    error: Option<&str>,
    metadata: Option<&Value>,
    now: i64,
) -> rusqlite::Result<i64> {
    c.exec(
        "INSERT INTO task_runs (task_id, profile, step_key, status, outcome, summary, error, metadata, started_at, ended_at)
         SELECT id, assignee, current_step_key, ?2, ?2, ?3, ?4, ?5, ?6, ?6 FROM tasks WHERE id=?1",
        params![task, outcome, summary, error, metadata.and_then(payload_text), now],
    )?;
    Ok(c.last_insert_rowid())
}

/// The task's trailing run of clean-exit protocol violations (rate-limited runs are neutral).
pub(super) fn protocol_violation_streak(c: &Connection, task: &str) -> rusqlite::Result<i64> {
    let mut st = c.prepare_cached(
        "SELECT outcome, metadata FROM task_runs WHERE task_id=?1 AND ended_at IS NOT NULL ORDER BY id DESC LIMIT 50",
    )?;
    let rows: Vec<(Option<String>, Option<String>)> = st
        .query_map([task], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut streak = 0;
    for (outcome, meta) in rows {
        match outcome.as_deref() {
            Some("rate_limited") => continue,
            Some("crashed") => {
                let v: Option<Map<String, Value>> =
                    meta.and_then(|m| serde_json::from_str(&m).ok());
                if v.and_then(|m| m.get("protocol_violation").and_then(Value::as_bool))
                    .unwrap_or(false)
                {
                    streak += 1;
                    continue;
                }
                break;
            }
            _ => break,
        }
    }
    Ok(streak)
}

/// Whether run `run` of `task` was claimed by the review lane (its `claimed` event says
/// `source_status: review`, as upstream's and ours do).
pub(super) fn claimed_for_review(c: &Connection, task: &str, run: i64) -> rusqlite::Result<bool> {
    c.row(
        "SELECT json_extract(payload, '$.source_status') = 'review' FROM task_events
         WHERE task_id=?1 AND run_id=?2 AND kind='claimed' AND json_valid(payload)
         ORDER BY id DESC LIMIT 1",
        params![task, run],
        |r| r.get::<_, Option<bool>>(0),
    )
    .optional()
    .map(|v| v.flatten().unwrap_or(false))
}

/// Invariant recovery (upstream's): a run a task still points at while its status says no
/// run is open (`ready`, `blocked`, `scheduled`) is closed `reclaimed` before the task moves
/// on; `on` names the verb that found it (`re-claim`, `unblock`).
pub(super) fn recover_dangling_run(
    c: &Connection,
    run: i64,
    on: &str,
    now: i64,
) -> rusqlite::Result<()> {
    c.exec(
        "UPDATE task_runs SET status='reclaimed', outcome='reclaimed',
            summary=COALESCE(summary, ?3), ended_at=?1,
            claim_lock=NULL, claim_expires=NULL, worker_pid=NULL
         WHERE id=?2 AND ended_at IS NULL",
        params![now, run, format!("invariant recovery on {on}")],
    )?;
    Ok(())
}

/// A `gave_up` since the task's last `unblocked` that ~0.22 marked sticky (`"sticky": 1`).
pub(super) fn sticky_gave_up(c: &Connection, task: &str) -> rusqlite::Result<bool> {
    Ok(c.row(
        "SELECT coalesce(json_extract(payload, '$.sticky'), 0) FROM task_events
             WHERE task_id=?1 AND kind='gave_up' AND json_valid(payload) AND id > coalesce(
               (SELECT max(id) FROM task_events WHERE task_id=?1 AND kind='unblocked'), 0)
             ORDER BY id DESC LIMIT 1",
        [task],
        |r| r.get::<_, Option<i64>>(0),
    )
    .optional()?
    .flatten()
    .is_some_and(|v| v != 0))
}
