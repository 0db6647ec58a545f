//! Reads: tasks, runs, events, counts. Nothing here writes.

use rusqlite::{params, OptionalExtension};

use super::model::Cols;
use super::*;

/// A text column as text whatever someone stored there (a blob, bad UTF-8): any column is
/// writable by whoever writes the board, and a guard must not fail a pass over it.
fn lossy(r: &rusqlite::Row<'_>, i: usize) -> Option<String> {
    use rusqlite::types::ValueRef;
    match r.get_ref(i).ok()? {
        ValueRef::Text(b) | ValueRef::Blob(b) => Some(String::from_utf8_lossy(b).into_owned()),
        ValueRef::Integer(n) => Some(n.to_string()),
        ValueRef::Real(x) => Some(x.to_string()),
        ValueRef::Null => None,
    }
}

impl Board {
    /// What upstream's respawn guards look at for task `id` (`guard::Facts`). Comments are
    /// cut at `HOT_COLUMN_MAX` each, at most 200 of them.
    pub fn guard_facts(&self, id: &str, now: i64) -> Result<crate::guard::Facts> {
        let e = |e| self.err("read respawn guard facts", e);
        let latest_ended = self
            .conn
            .row(
                "SELECT outcome, ended_at FROM task_runs WHERE task_id=?1 AND ended_at IS NOT NULL
                 ORDER BY ended_at DESC LIMIT 1",
                [id],
                |r| Ok((lossy(r, 0), r.get::<_, i64>(1).unwrap_or(0))),
            )
            .optional()
            .map_err(e)?;
        let last_failure_error: Option<String> = self
            .conn
            .row(
                &format!(
                    "SELECT substr(last_failure_error, 1, {}) FROM tasks WHERE id=?1",
                    open::HOT_COLUMN_MAX
                ),
                [id],
                |r| Ok(lossy(r, 0)),
            )
            .optional()
            .map_err(e)?
            .flatten();
        let recent_completion: Option<i64> = self
            .conn
            .row(
                "SELECT ended_at FROM task_runs WHERE task_id=?1 AND outcome='completed' AND ended_at >= ?2
                 ORDER BY ended_at DESC LIMIT 1",
                params![id, now - crate::guard::SUCCESS_WINDOW],
                |r| r.get(0),
            )
            .optional()
            .map_err(e)?;
        let requeued_since = match recent_completion {
            Some(at) => self
                .conn
                .row(
                    "SELECT 1 FROM task_events WHERE task_id=?1 AND created_at >= ?2
                     AND kind IN ('status', 'promoted', 'unblocked', 'reclaimed') LIMIT 1",
                    params![id, at],
                    |_| Ok(()),
                )
                .optional()
                .map_err(e)?
                .is_some(),
            None => false,
        };
        let mut st = self
            .conn
            .prepare_cached(&format!(
                "SELECT substr(body, 1, {}) FROM task_comments WHERE task_id=?1 AND created_at >= ?2
                 ORDER BY created_at DESC LIMIT 200",
                open::HOT_COLUMN_MAX
            ))
            .map_err(e)?;
        let recent_comments = st
            .query_map(params![id, now - crate::guard::PR_WINDOW], |r| {
                Ok(lossy(r, 0))
            })
            .map_err(e)?
            .filter_map(|r| r.ok().flatten())
            .collect();
        Ok(crate::guard::Facts {
            latest_ended,
            last_failure_error,
            recent_completion,
            requeued_since,
            recent_comments,
        })
    }

    /// The newest run of a task.
    pub fn last_run(&self, id: &str) -> Result<Option<Run>> {
        self.conn
            .row(
                "SELECT * FROM task_runs WHERE task_id=?1 ORDER BY id DESC LIMIT 1",
                [id],
                Run::from_row,
            )
            .optional()
            .map_err(|e| self.err("read run", e))
    }

    pub fn task(&self, id: &str) -> Result<Option<Task>> {
        self.conn
            .row("SELECT * FROM tasks WHERE id = ?1", [id], Task::from_row)
            .optional()
            .map_err(|e| self.err("read task", e))
    }

    pub fn require_task(&self, id: &str) -> Result<Task> {
        self.task(id)?
            .ok_or_else(|| BoardError::NoSuchTask(id.to_string()))
    }

    /// Tasks in upstream's dispatch order (priority high first, then oldest first).
    pub fn list(&self, status: Option<&str>, assignee: Option<&str>) -> Result<Vec<Task>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT * FROM tasks WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR assignee = ?2)
                 ORDER BY priority DESC, created_at ASC, id ASC",
            )
            .map_err(|e| self.err("list tasks", e))?;
        let rows = st
            .query_map(params![status, assignee], Task::from_row)
            .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err("list tasks", e))?;
        Ok(rows)
    }

    /// How many tasks are in each status (one indexed GROUP BY, fast on big boards).
    pub fn counts(&self) -> Result<std::collections::BTreeMap<String, i64>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT status, count(*) FROM tasks GROUP BY status")
            .map_err(|e| self.err("count tasks", e))?;
        let v = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .and_then(|r| r.collect::<rusqlite::Result<_>>())
            .map_err(|e| self.err("count tasks", e))?;
        Ok(v)
    }

    /// Up to `limit` tasks in `status`, in dispatch order (`hot_projection`: for `status`).
    pub fn in_status(&self, status: &str, limit: usize) -> Result<Vec<Task>> {
        let mut st = self
            .conn
            .prepare_cached(&format!("SELECT {} FROM tasks WHERE status = ?1 ORDER BY priority DESC, created_at ASC, id ASC LIMIT ?2", self.hot))
            .map_err(|e| self.err("list tasks", e))?;
        let v = st
            .query_map(params![status, limit as i64], Task::from_row)
            .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err("list tasks", e))?;
        Ok(v)
    }

    /// `in_status`, each task with its number of runs and its newest run: two queries
    /// whatever the number of tasks (`status` shows 10,000 running ones on a big host).
    pub fn in_status_with_runs(&self, status: &str, limit: usize) -> Result<Vec<Listed>> {
        let what = "list tasks with their runs";
        let mut st = self
            .conn
            .prepare_cached(&format!(
                "SELECT {}, (SELECT count(*) FROM task_runs c WHERE c.task_id = tasks.id) AS hm_attempts,
                        (SELECT max(id) FROM task_runs m WHERE m.task_id = tasks.id) AS hm_last_run
                 FROM tasks WHERE status = ?1 ORDER BY priority DESC, created_at ASC, id ASC LIMIT ?2",
                self.hot
            ))
            .map_err(|e| self.err(what, e))?;
        let listed = st
            .query_map(params![status, limit as i64], |row| {
                let c = Cols::of(row);
                Ok((
                    Task::from_row(row)?,
                    c.get::<i64>("hm_attempts")?.unwrap_or(0),
                    c.get::<i64>("hm_last_run")?,
                ))
            })
            .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err(what, e))?;
        let ids: Vec<i64> = listed.iter().filter_map(|l| l.2).collect();
        let mut runs = std::collections::HashMap::new();
        if !ids.is_empty() {
            let mut st = self
                .conn
                .prepare_cached(
                    "SELECT * FROM task_runs WHERE id IN (SELECT value FROM json_each(?1))",
                )
                .map_err(|e| self.err(what, e))?;
            let rows = st
                .query_map(
                    [serde_json::to_string(&ids).unwrap_or_default()],
                    Run::from_row,
                )
                .map_err(|e| self.err(what, e))?;
            for r in rows {
                let r = r.map_err(|e| self.err(what, e))?;
                runs.insert(r.id, r);
            }
        }
        Ok(listed
            .into_iter()
            .map(|(task, attempts, last)| Listed {
                task,
                attempts,
                last_run: last.and_then(|id| runs.remove(&id)),
            })
            .collect())
    }

    /// How many tasks have `status` (an index lookup; no row is read).
    /// When the oldest ready task last changed — its latest event (its promotion, a
    /// requeue), else its creation: how long the board's queue has waited. `None` with no
    /// ready task. One index lookup per ready task.
    pub fn oldest_ready_since(&self) -> Result<Option<i64>> {
        self.conn
            .row(
                "SELECT MIN(coalesce((SELECT max(e.created_at) FROM task_events e WHERE e.task_id = t.id), t.created_at))
                 FROM tasks t WHERE t.status = 'ready'",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.err("oldest ready task", e))
    }

    pub fn count(&self, status: &str) -> Result<i64> {
        self.conn
            .row(
                "SELECT count(*) FROM tasks WHERE status=?1",
                [status],
                |r| r.get(0),
            )
            .map_err(|e| self.err("count tasks", e))
    }

    /// Running tasks per assignee (upstream's `max_in_progress_per_profile` count).
    pub fn running_per_assignee(&self) -> Result<std::collections::HashMap<String, usize>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT assignee, count(*) FROM tasks WHERE status='running' AND assignee IS NOT NULL GROUP BY assignee")
            .map_err(|e| self.err("count running tasks per assignee", e))?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(|e| self.err("count running tasks per assignee", e))?;
        let mut out = std::collections::HashMap::new();
        for row in rows {
            let (a, n) = row.map_err(|e| self.err("count running tasks per assignee", e))?;
            out.insert(a, usize::try_from(n).unwrap_or(0));
        }
        Ok(out)
    }

    /// Every running task's current run (`task id → run id`): one indexed read.
    pub fn running_runs(&self) -> Result<std::collections::HashMap<String, i64>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT id, current_run_id FROM tasks WHERE status='running' AND current_run_id IS NOT NULL")
            .map_err(|e| self.err("running runs", e))?;
        let v = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .and_then(|r| r.collect::<rusqlite::Result<_>>())
            .map_err(|e| self.err("running runs", e))?;
        Ok(v)
    }

    /// The newest event's id (0 for none): where `tasks_touched_since` starts.
    pub fn last_event_id(&self) -> Result<i64> {
        self.conn
            .row("SELECT coalesce(max(id), 0) FROM task_events", [], |r| {
                r.get(0)
            })
            .map_err(|e| self.err("last event", e))
    }

    /// The tasks with an event after `after`, and the newest event's id; `None` when there
    /// are more than `limit` such events (read everything instead). Every transition of a
    /// task writes an event, upstream's and ours alike.
    pub fn tasks_touched_since(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Option<(std::collections::BTreeSet<String>, i64)>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT id, task_id FROM task_events WHERE id > ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(|e| self.err("events since", e))?;
        let rows: Vec<(i64, String)> = st
            .query_map(params![after, limit as i64 + 1], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .and_then(|r| r.collect())
            .map_err(|e| self.err("events since", e))?;
        if rows.len() > limit {
            return Ok(None);
        }
        let last = rows.last().map_or(after, |r| r.0);
        Ok(Some((rows.into_iter().map(|r| r.1).collect(), last)))
    }

    /// A task's current run while it is `running` (`None` otherwise).
    pub fn current_run(&self, task: &str) -> Result<Option<i64>> {
        self.conn
            .prepare_cached(
                "SELECT current_run_id FROM tasks WHERE id=?1 AND status='running' AND current_run_id IS NOT NULL",
            )
            .and_then(|mut st| st.query_row([task], |r| r.get(0)).optional())
            .map_err(|e| self.err("current run", e))
    }

    /// The running tasks, read for the dispatcher (`hot_projection`: no body or result).
    pub fn running_tasks(&self) -> Result<Vec<Task>> {
        self.running(&self.hot)
    }

    /// The running tasks with only their claim read (id, status, current run, claim lock
    /// and expiry, worker PID, runtime limit, start and last heartbeat; every other field
    /// is empty): what reconcile and stale detection need, read every safety-net tick for
    /// every live run.
    pub fn running_claims(&self) -> Result<Vec<Task>> {
        self.running(&self.claims)
    }

    fn running(&self, projection: &str) -> Result<Vec<Task>> {
        let mut st = self
            .conn
            .prepare_cached(&format!(
                "SELECT {projection} FROM tasks WHERE status='running' ORDER BY id"
            ))
            .map_err(|e| self.err("running tasks", e))?;
        let v = st
            .query_map([], Task::from_row)
            .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err("running tasks", e))?;
        Ok(v)
    }

    /// Tasks that `dispatch` may claim, in upstream's order (`hot_projection`).
    pub fn ready_tasks(&self, limit: usize) -> Result<Vec<Task>> {
        self.unclaimed("ready", limit)
    }

    /// Unclaimed `review` tasks, in upstream's order: the review lane.
    pub fn review_tasks(&self, limit: usize) -> Result<Vec<Task>> {
        self.unclaimed("review", limit)
    }

    /// Unclaimed tasks of `status`, highest priority first, then oldest.
    fn unclaimed(&self, status: &'static str, limit: usize) -> Result<Vec<Task>> {
        let what = if status == "review" {
            "review tasks"
        } else {
            "ready tasks"
        };
        let mut st = self
            .conn
            .prepare_cached(&format!(
                "SELECT {} FROM tasks WHERE status=?1 AND claim_lock IS NULL
                 ORDER BY priority DESC, created_at ASC LIMIT ?2",
                self.hot
            ))
            .map_err(|e| self.err(what, e))?;
        let v = st
            .query_map(rusqlite::params![status, limit as i64], Task::from_row)
            .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err(what, e))?;
        Ok(v)
    }

    pub fn parents(&self, id: &str) -> Result<Vec<String>> {
        self.strings(
            "SELECT parent_id FROM task_links WHERE child_id = ?1 ORDER BY parent_id",
            id,
        )
    }

    pub fn children(&self, id: &str) -> Result<Vec<String>> {
        self.strings(
            "SELECT child_id FROM task_links WHERE parent_id = ?1 ORDER BY child_id",
            id,
        )
    }

    pub(super) fn strings(&self, sql: &str, id: &str) -> Result<Vec<String>> {
        let mut st = self
            .conn
            .prepare_cached(sql)
            .map_err(|e| self.err("read links", e))?;
        let v = st
            .query_map([id], |r| r.get(0))
            .and_then(|r| r.collect::<rusqlite::Result<Vec<String>>>())
            .map_err(|e| self.err("read links", e))?;
        Ok(v)
    }

    pub fn runs(&self, id: &str) -> Result<Vec<Run>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT * FROM task_runs WHERE task_id = ?1 ORDER BY id")
            .map_err(|e| self.err("read runs", e))?;
        let v = st
            .query_map([id], Run::from_row)
            .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err("read runs", e))?;
        Ok(v)
    }

    pub fn run(&self, run_id: i64) -> Result<Option<Run>> {
        self.conn
            .row(
                "SELECT * FROM task_runs WHERE id = ?1",
                [run_id],
                Run::from_row,
            )
            .optional()
            .map_err(|e| self.err("read run", e))
    }

    pub fn events(&self, id: &str) -> Result<Vec<Event>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT * FROM task_events WHERE task_id = ?1 ORDER BY id")
            .map_err(|e| self.err("read events", e))?;
        let v = st
            .query_map([id], Event::from_row)
            .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err("read events", e))?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tasks_an_event_names_since_a_point_and_their_current_run() {
        let dir = tempfile::tempdir().unwrap();
        let b = Board::open(
            &BoardPaths::for_db(&dir.path().join("kanban.db")),
            OpenMode::CreateIfMissing,
        )
        .unwrap();
        let new = |t: &str| {
            b.create(&NewTask {
                title: t.into(),
                ..Default::default()
            })
            .unwrap()
        };
        let (x, y) = (new("x"), new("y"));
        let start = b.last_event_id().unwrap();
        assert_eq!(
            b.tasks_touched_since(start, 10).unwrap(),
            Some((Default::default(), start)),
            "nothing new"
        );
        let claim = b.claim(&x, "lock", 60).unwrap().unwrap();
        let (touched, last) = b.tasks_touched_since(start, 10).unwrap().unwrap();
        assert_eq!(touched.into_iter().collect::<Vec<_>>(), vec![x.clone()]);
        assert_eq!(last, b.last_event_id().unwrap());
        assert_eq!(b.current_run(&x).unwrap(), Some(claim.run_id));
        assert_eq!(b.current_run(&y).unwrap(), None, "ready, not running");
        // More events than asked for: read everything instead.
        assert_eq!(b.tasks_touched_since(0, 1).unwrap(), None);
    }
}
