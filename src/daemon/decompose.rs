//! Triage auto-decompose, as upstream's gateway runs it (`kanban.auto_decompose`, at most
//! `kanban.auto_decompose_per_tick` at a time, the toggle read afresh): each decomposition
//! is upstream's own entry point, `hermes kanban decompose <id>` (its prompt, its LLM, its
//! writes), run as its own transient service under the worker user. A job that ends with
//! its task still in triage failed (no auxiliary model configured, an LLM error, a bad
//! answer; its journal says which): it is retried after a minute, doubling up to an hour
//! (0.19.0 retries every tick, a minute by default; newer Hermes backs off too). Dispatch
//! never waits for it: systemd runs the job, the daemon starts it and hears it end.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::Daemon;
use crate::names;
use crate::systemd::Command;

const RETRY_FIRST: Duration = Duration::from_secs(60);
const RETRY_MAX: Duration = Duration::from_secs(3600);
/// The decomposer's LLM call times out at 180 s; retries and start-up fit in this.
const JOB_RUNTIME_MAX: Duration = Duration::from_secs(600);

/// (board, task).
pub(super) type TaskKey = (String, String);

#[derive(Debug, Default)]
pub(super) struct Decompositions {
    /// Jobs running, by task: their unit.
    running: HashMap<TaskKey, String>,
    /// Tasks whose last job failed: not before `.0`; `.1` is the delay that led there.
    retry: HashMap<TaskKey, (Instant, Duration)>,
}

/// The triage tasks to start now, in the board's order: not running, not waiting for a
/// retry, at most `room`. Pure.
pub(super) fn pick(
    triage: &[String],
    running: impl Fn(&str) -> bool,
    waiting: impl Fn(&str) -> bool,
    room: usize,
) -> Vec<String> {
    triage
        .iter()
        .filter(|t| !running(t) && !waiting(t))
        .take(room)
        .cloned()
        .collect()
}

impl Decompositions {
    /// When the next retry falls due (only those still ahead: a due one is picked up by
    /// the board's next pass).
    pub fn next_retry(&self) -> Option<Instant> {
        let now = Instant::now();
        self.retry
            .values()
            .map(|(at, _)| *at)
            .filter(|at| *at > now)
            .min()
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }
}

impl Daemon {
    /// Start decompositions of board `slug`'s triage tasks, as far as the toggle and the
    /// per-tick cap allow (the cap counts every board's running jobs, as upstream's tick).
    pub(super) async fn decompose(&mut self, slug: &str) {
        if !self.cfg.auto_decompose {
            return;
        }
        let room = self
            .cfg
            .auto_decompose_per_tick
            .saturating_sub(self.decomp.running());
        if room == 0 {
            return;
        }
        self.holds.look();
        let Some(board) = self.board(slug) else {
            return;
        };
        let db = crate::holds::board_key(&board.paths().db);
        let holds = self.holds.current();
        let triage: Vec<String> = match board.in_status("triage", 1000) {
            // A task paused on its own is not decomposed either.
            Ok(t) => t
                .into_iter()
                .map(|t| t.id)
                .filter(|id| holds.task(&db, id).is_none())
                .collect(),
            Err(e) => {
                warn!(board = %slug, "read the triage tasks: {e}");
                return;
            }
        };
        let now = Instant::now();
        let key = |t: &str| (slug.to_string(), t.to_string());
        // A task that left triage by other means needs no retry.
        self.decomp
            .retry
            .retain(|k, _| k.0 != slug || triage.contains(&k.1));
        let start = pick(
            &triage,
            |t| self.decomp.running.contains_key(&key(t)),
            |t| {
                self.decomp
                    .retry
                    .get(&key(t))
                    .is_some_and(|(at, _)| *at > now)
            },
            room,
        );
        for task in start {
            let unit = names::decompose_service(slug, &task);
            let Some(cmd) = self.decompose_command(slug, &task, &unit) else {
                return;
            };
            let timeout = Duration::from_secs(self.cfg.start_timeout_seconds);
            match self.sd.run_command(&unit, &cmd, timeout).await {
                Ok(()) => {
                    info!(board = %slug, hermes_kanban_task = %task, unit = %unit, object_systemd_unit = %unit,
                          "decomposing a triage task");
                    self.decomp.running.insert(key(&task), unit);
                }
                Err(e) => {
                    self.forget_env_file(&unit);
                    warn!(board = %slug, hermes_kanban_task = %task, unit = %unit, "cannot start the decomposition: {e}; will retry");
                    self.decomposition_failed(key(&task));
                    return;
                }
            }
        }
    }

    /// `hermes kanban decompose -- <id>` for the worker user: the dispatcher's Hermes home
    /// (its `config.yaml` names the decomposer's model), the board pinned by
    /// `HERMES_KANBAN_DB`, the environment by the workers' allowlist — whose values (API
    /// keys) go in a root-only environment file, never in a unit property. `--` keeps a task
    /// id that starts with `-` from being read as an option.
    fn decompose_command(&self, slug: &str, task: &str, unit: &str) -> Option<Command> {
        let paths = &self.slots.get(slug)?.paths;
        let bin = match crate::spawn::resolve_binary(&self.cfg.hermes_bin) {
            Ok(b) => b,
            Err(e) => {
                warn!("cannot decompose triage tasks: {e}");
                return None;
            }
        };
        let user = match crate::spawn::worker_identity(&self.cfg) {
            Ok(who) => who.user,
            Err(e) => {
                warn!("cannot decompose triage tasks: {e}");
                return None;
            }
        };
        let hermes_home = crate::hermes_config::Files::from_env()
            .user
            .parent()
            .map(|p| p.to_path_buf())
            .unwrap_or_else(|| paths.root.clone());
        let passed: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| crate::spawn::passed_through(k, &self.cfg))
            .collect();
        let env_file = match write_env_file(&self.env_dir(), unit, &passed) {
            Ok(f) => f,
            Err(e) => {
                warn!(unit = %unit, "cannot decompose triage tasks: write their environment file: {e}");
                return None;
            }
        };
        let abs = |p: &std::path::Path| crate::spawn::absolute(p).to_string_lossy().into_owned();
        let env = Vec::from([
            format!("HOME={}", user.dir.to_string_lossy()),
            format!("USER={}", user.name),
            format!("LOGNAME={}", user.name),
            format!("HERMES_HOME={}", abs(&hermes_home)),
            format!("HERMES_KANBAN_HOME={}", abs(&paths.root)),
            format!("HERMES_KANBAN_DB={}", abs(&paths.db)),
            format!("HERMES_KANBAN_BOARD={}", paths.slug),
        ]);
        Some(Command {
            argv: vec![
                bin.to_string_lossy().into_owned(),
                "kanban".into(),
                "decompose".into(),
                "--author".into(),
                "auto-decomposer".into(),
                "--".into(),
                task.to_string(),
            ],
            user: user.name,
            env,
            env_file: Some(env_file),
            slice: self.cfg.slice.clone(),
            description: format!(
                "Hermes kanban: decompose triage task {} on board {}",
                crate::text::clean(task),
                paths.slug
            ),
            runtime_max: JOB_RUNTIME_MAX,
        })
    }

    /// A unit went away: if it was a decomposition, see what it left. `true` if it was one.
    pub(super) fn on_decompose_unit_removed(&mut self, unit: &str) -> bool {
        let Some(key) = self
            .decomp
            .running
            .iter()
            .find(|(_, u)| u.as_str() == unit)
            .map(|(k, _)| k.clone())
        else {
            return false;
        };
        self.decomp.running.remove(&key);
        self.forget_env_file(unit);
        let status = self
            .board(&key.0)
            .and_then(|b| b.task(&key.1).ok().flatten())
            .map(|t| t.status.as_str().to_string());
        match status.as_deref() {
            Some("triage") => {
                warn!(board = %key.0, hermes_kanban_task = %key.1, unit = %unit,
                      "the decomposition left the task in triage (journalctl -u {unit} says why); will retry");
                self.decomposition_failed(key.clone());
            }
            other => {
                info!(board = %key.0, hermes_kanban_task = %key.1, unit = %unit, status = ?other, "triage task decomposed");
                self.decomp.retry.remove(&key);
            }
        }
        if let Some(s) = self.slots.get_mut(&key.0) {
            s.dirty = true;
        }
        true
    }

    /// Jobs whose end no signal reported (the bus was away): their unit is gone.
    pub(super) async fn check_decompositions(&mut self) {
        let units: Vec<String> = self.decomp.running.values().cloned().collect();
        for unit in units {
            if let Ok(None) = self.sd.active_state(&unit).await {
                self.on_decompose_unit_removed(&unit);
            }
        }
    }

    /// Where the decompositions' environment files live: root's alone (0700).
    fn env_dir(&self) -> std::path::PathBuf {
        self.cfg.state_dir.join("decompose-env")
    }

    fn forget_env_file(&self, unit: &str) {
        let _ = std::fs::remove_file(env_file_path(&self.env_dir(), unit));
    }

    /// At start: the files of jobs a previous daemon left (their units are not ours to
    /// track any more, and PID 1 read each file when it started the unit).
    pub(super) fn clear_env_files(&self) {
        if let Ok(entries) = std::fs::read_dir(self.env_dir()) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    fn decomposition_failed(&mut self, key: TaskKey) {
        let delay = self
            .decomp
            .retry
            .get(&key)
            .map(|(_, d)| (*d * 2).min(RETRY_MAX))
            .unwrap_or(RETRY_FIRST);
        self.decomp
            .retry
            .insert(key, (Instant::now() + delay, delay));
    }

    /// Retries that are due: their boards need a look.
    pub(super) fn decompositions_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .decomp
            .retry
            .iter()
            .filter(|(_, (at, _))| *at <= now)
            .map(|(k, _)| k.0.clone())
            .collect();
        for slug in due {
            if let Some(s) = self.slots.get_mut(&slug) {
                s.dirty = true;
            }
        }
    }
}

fn env_file_path(dir: &std::path::Path, unit: &str) -> std::path::PathBuf {
    dir.join(format!("{unit}.env"))
}

/// `vars` as systemd's `EnvironmentFile=` reads them (each value double-quoted, with
/// `\`, `"`, `` ` `` and `$` escaped; a newline kept as it is). Pure.
fn env_file_text(vars: &[(String, String)]) -> String {
    let mut out = String::new();
    for (k, v) in vars {
        out.push_str(k);
        out.push_str("=\"");
        for c in v.chars() {
            if matches!(c, '\\' | '"' | '`' | '$') {
                out.push('\\');
            }
            out.push(c);
        }
        out.push_str("\"\n");
    }
    out
}

/// Write `unit`'s environment file in `dir` (made 0700, root's: the daemon's state
/// directory is no one else's), the file 0600 and new.
fn write_env_file(
    dir: &std::path::Path,
    unit: &str,
    vars: &[(String, String)],
) -> std::io::Result<std::path::PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let path = env_file_path(dir, unit);
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)?;
    f.write_all(env_file_text(vars).as_bytes())?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_values_are_quoted_as_systemd_reads_them() {
        let vars = [
            ("A".to_string(), "plain".to_string()),
            ("B".to_string(), r#"q"uo\te $HOME `x`"#.to_string()),
            ("C".to_string(), "two\nlines".to_string()),
        ];
        assert_eq!(
            env_file_text(&vars),
            "A=\"plain\"\nB=\"q\\\"uo\\\\te \\$HOME \\`x\\`\"\nC=\"two\nlines\"\n"
        );
    }

    #[test]
    fn pick_skips_running_and_waiting_and_keeps_the_cap() {
        let ids: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        assert_eq!(pick(&ids, |t| t == "a", |t| t == "c", 5), ["b", "d"]);
        assert_eq!(pick(&ids, |_| false, |_| false, 2), ["a", "b"]);
        assert!(pick(&ids, |_| false, |_| false, 0).is_empty());
    }
}
