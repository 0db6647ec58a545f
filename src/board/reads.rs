//! Reads: tasks, runs, events, counts. Nothing here writes.

use rusqlite::{params, OptionalExtension};

use super::*;

impl Board {
    /// The newest run of a task.
    pub fn last_run(&self, id: &str) -> Result<Option<Run>> {
        self.conn
            .query_row(
                "SELECT * FROM task_runs WHERE task_id=?1 ORDER BY id DESC LIMIT 1",
                [id],
                Run::from_row,
            )
            .optional()
            .map_err(|e| self.err("read run", e))
    }

    pub fn task(&self, id: &str) -> Result<Option<Task>> {
        self.conn
            .query_row("SELECT * FROM tasks WHERE id = ?1", [id], Task::from_row)
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
            .prepare(
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
            .prepare("SELECT status, count(*) FROM tasks GROUP BY status")
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
            .prepare(&format!("SELECT {} FROM tasks WHERE status = ?1 ORDER BY priority DESC, created_at ASC, id ASC LIMIT ?2", self.hot))
            .map_err(|e| self.err("list tasks", e))?;
        let v = st
            .query_map(params![status, limit as i64], Task::from_row)
            .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err("list tasks", e))?;
        Ok(v)
    }

    /// How many tasks have `status` (an index lookup; no row is read).
    pub fn count(&self, status: &str) -> Result<i64> {
        self.conn
            .query_row(
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
            .prepare("SELECT assignee, count(*) FROM tasks WHERE status='running' AND assignee IS NOT NULL GROUP BY assignee")
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
            .prepare("SELECT id, current_run_id FROM tasks WHERE status='running' AND current_run_id IS NOT NULL")
            .map_err(|e| self.err("running runs", e))?;
        let v = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .and_then(|r| r.collect::<rusqlite::Result<_>>())
            .map_err(|e| self.err("running runs", e))?;
        Ok(v)
    }

    /// The running tasks, read for the dispatcher (`hot_projection`: no body or result).
    pub fn running_tasks(&self) -> Result<Vec<Task>> {
        let mut st = self
            .conn
            .prepare(&format!(
                "SELECT {} FROM tasks WHERE status='running' ORDER BY id",
                self.hot
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
        let mut st = self
            .conn
            .prepare(&format!(
                "SELECT {} FROM tasks WHERE status='ready' AND claim_lock IS NULL
                 ORDER BY priority DESC, created_at ASC LIMIT ?1",
                self.hot
            ))
            .map_err(|e| self.err("ready tasks", e))?;
        let v = st
            .query_map([limit as i64], Task::from_row)
            .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err("ready tasks", e))?;
        Ok(v)
    }

    /// Number of runs of a task.
    pub fn run_count(&self, id: &str) -> Result<i64> {
        self.conn
            .query_row(
                "SELECT count(*) FROM task_runs WHERE task_id = ?1",
                [id],
                |r| r.get(0),
            )
            .map_err(|e| self.err("count runs", e))
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
            .prepare(sql)
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
            .prepare("SELECT * FROM task_runs WHERE task_id = ?1 ORDER BY id")
            .map_err(|e| self.err("read runs", e))?;
        let v = st
            .query_map([id], Run::from_row)
            .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err("read runs", e))?;
        Ok(v)
    }

    pub fn run(&self, run_id: i64) -> Result<Option<Run>> {
        self.conn
            .query_row(
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
            .prepare("SELECT * FROM task_events WHERE task_id = ?1 ORDER BY id")
            .map_err(|e| self.err("read events", e))?;
        let v = st
            .query_map([id], Event::from_row)
            .and_then(|r| r.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err("read events", e))?;
        Ok(v)
    }
}
