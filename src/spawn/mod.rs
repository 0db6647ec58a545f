//! Start one claimed task's worker in its own transient scope, race-free.
//!
//! fork a held supervisor → `StartTransientUnit(scope, PIDs=[supervisor])` → job `done` →
//! confirm from `/proc/<pid>/cgroup` → release ("G") → the supervisor, now in the scope,
//! connects the journal, drops privileges and execs the worker. No worker process ever runs
//! outside its scope: until released, the only process is our own supervisor, blocked in
//! `read(2)`. Any failure kills and reaps it and leaves no scope behind.

pub mod installed;
mod journal;
mod prepare;
pub mod program;
pub mod sandbox;
pub mod spec;
pub mod supervise;
mod upstream;

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::pipe;

use crate::board::{Board, Claim};
use crate::config::Config;
use crate::liveness;
use crate::names;
use crate::outcome::Fault;
use crate::systemd::{ScopeSpec, Systemd, SystemdError};
use spec::Report;

pub(crate) use prepare::{absolute, passed_through, worker_identity};
pub use prepare::{after_complete, hermes_generation, prepare, resolve_binary};

/// Why a worker did not start, and whose side that is on: a `Fault::Task` failure is
/// counted against the task (a broken task trips the breaker instead of looping); a
/// `Fault::Infrastructure` one — the dispatcher's configuration or machinery — never is. Every site says which; there is no default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnError {
    pub reason: String,
    pub fault: Fault,
}

impl SpawnError {
    fn task(reason: impl Into<String>) -> SpawnError {
        SpawnError {
            reason: reason.into(),
            fault: Fault::Task,
        }
    }

    fn infra(reason: impl Into<String>) -> SpawnError {
        SpawnError {
            reason: reason.into(),
            fault: Fault::Infrastructure,
        }
    }
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// A worker that is running in its scope.
#[derive(Debug)]
pub struct Started {
    pub task: String,
    pub run_id: i64,
    pub unit: String,
    pub worker_pid: u32,
    /// `None` for a worktree, which upstream's code resolves in the scope and records itself.
    pub workspace: Option<PathBuf>,
    /// The supervisor's PID. It is our child: the daemon reaps it on SIGCHLD; a one-shot
    /// CLI lets it go. No descriptor of it is kept (tokio's `Child` would hold a pidfd for
    /// the worker's whole life: one per live worker).
    pub supervisor_pid: u32,
    /// Its scope's cgroup (`/a.slice/b.scope`), read back from the kernel once the
    /// supervisor was put there.
    pub cgroup: String,
    /// The claim the worker was given, and its task's runtime limit.
    pub lock: String,
    pub max_runtime: Option<i64>,
    /// The Hermes profile it runs as (its task's assignee, or the default assignee).
    pub profile: String,
    /// The run's TMPDIR and the worker user owning it (`Report::Started`).
    pub tmpdir: Option<(PathBuf, crate::safe_fs::Owner)>,
}

/// Task data as a unit property shows it: control characters blanked, invisible and
/// bidi-reordering ones escaped, at most `n` characters.
fn clean(s: &str, n: usize) -> String {
    let blanked: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(n)
        .collect();
    crate::text::clean(&blanked)
}

/// A scope of `cfg`'s (design §3.2): `unit` in its slice, with the configured limits and
/// `max_runtime` as systemd's `RuntimeMaxSec` (for upstream's code after a completion; a
/// worker's runtime is its supervisor's to enforce).
pub fn scope_spec(
    cfg: &Config,
    unit: &str,
    profile: Option<&str>,
    description: String,
    max_runtime: Option<i64>,
) -> ScopeSpec {
    ScopeSpec {
        description,
        slice: cfg.worker_slice(profile, unit),
        stop_timeout_us: cfg.stop_timeout_seconds.saturating_mul(1_000_000),
        runtime_max_us: max_runtime
            .filter(|r| *r > 0)
            .map(|rt| (rt as u64).saturating_mul(1_000_000)),
        memory_max: cfg.memory_max_bytes,
        tasks_max: cfg.tasks_max,
        cpu_quota_per_sec_us: cfg.cpu_quota_percent.map(|q| q.saturating_mul(10_000)),
    }
}

/// `Description=`: names task, run and title; task data is untrusted, so control
/// characters are blanked, invisible and bidi-reordering ones escaped (`systemctl status`
/// and every journal line of the unit show it), and the length bounded.
pub fn description(task: &str, run: i64, title: &str) -> String {
    format!(
        "Hermes kanban worker: task {} run {run}: {}",
        clean(task, 80),
        clean(title, 160)
    )
}

/// Our held supervisor, until the worker runs: dropped before `release`, it is killed and
/// reaped (SIGKILL: it dies at once, so the wait is short). Released, it is the daemon's
/// child, reaped on SIGCHLD (a one-shot CLI lets it go). Until then nothing else reaps it
/// (the daemon reaps only from its loop, which waits for this start), so its PID is
/// still its own.
struct HeldSupervisor(Option<u32>);

impl HeldSupervisor {
    fn release(mut self) {
        self.0 = None;
    }
}

impl Drop for HeldSupervisor {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
        }
    }
}

/// Why a start failed, and whether the scope of the run's name is ours to remove: it may
/// exist because of our own call (a start job that failed or timed out, then ran); one
/// that already existed under this name (`UnitExists`) is someone else's and is left alone.
struct Failed {
    error: SpawnError,
    scope_is_ours: bool,
}

fn failed(error: SpawnError, scope_is_ours: bool) -> Failed {
    Failed {
        error,
        scope_is_ours,
    }
}

/// Start the worker of `claim` in its scope. `Err` carries the reason for the run's
/// `spawn_failed` record; nothing is left running then.
pub async fn start_worker(
    board: &Board,
    sd: &Systemd,
    cfg: &Config,
    claim: &Claim,
) -> Result<Started, SpawnError> {
    let task = &claim.task;
    let unit = names::worker_scope(&board.paths().slug, &task.id, claim.run_id);
    // Everything prepare checks is the task's or its configuration's.
    let spec = prepare(board, cfg, claim, &unit)?;
    let runs_dir = cfg.state_dir.join("runs");
    std::fs::create_dir_all(&runs_dir)
        .map_err(|e| SpawnError::infra(format!("create {}: {e}", runs_dir.display())))?;
    let spec_line =
        serde_json::to_string(&spec).map_err(|e| SpawnError::infra(e.to_string()))? + "\n";

    // The supervisor this dispatcher started with, even if upgraded on disk meanwhile.
    // Not tokio's child: tokio would keep a pidfd open until it is reaped.
    let timeout = Duration::from_secs(cfg.start_timeout_seconds);
    let program::Held { pid, stdin, stdout } = program::start_held(timeout)
        .await
        .map_err(|e| SpawnError::infra(format!("start the supervisor: {e}")))?;
    let held = HeldSupervisor(Some(pid));
    match launch(sd, cfg, claim, &unit, &spec_line, (pid, stdin, stdout)).await {
        Ok(Launched {
            worker_pid,
            tmpdir,
            cgroup,
        }) => {
            let supervisor_pid = pid;
            held.release();
            Ok(Started {
                task: task.id.clone(),
                run_id: claim.run_id,
                unit,
                worker_pid,
                workspace: spec
                    .prelude
                    .as_ref()
                    .is_none_or(|p| !p.worktree)
                    .then_some(spec.cwd),
                supervisor_pid,
                cgroup,
                lock: claim.lock.clone(),
                max_runtime: task.max_runtime_seconds,
                profile: names::profile_of(
                    task.assignee.as_deref(),
                    cfg.default_assignee.as_deref(),
                ),
                tmpdir: tmpdir.map(|t| (t, crate::safe_fs::Owner::new(spec.uid, spec.gid))),
            })
        }
        Err(Failed {
            error,
            scope_is_ours,
        }) => {
            // The supervisor first (the scope's only process), then its scope, so the
            // name is free.
            drop(held);
            if scope_is_ours {
                let _ = sd.stop_and_wait(&unit, Duration::from_secs(10)).await;
                let _ = sd.reset_failed(&unit).await;
            }
            Err(error)
        }
    }
}

/// A supervisor released in its scope, and what it reported.
struct Launched {
    worker_pid: u32,
    tmpdir: Option<PathBuf>,
    /// The scope's cgroup, where the supervisor was found.
    cgroup: String,
}

/// Hand the held supervisor `pid` (blocked on its stdin) the spec, put it into the run's
/// scope, check it is there, release it and read its report: the worker's PID once it runs.
async fn launch(
    sd: &Systemd,
    cfg: &Config,
    claim: &Claim,
    unit: &str,
    spec_line: &str,
    (pid, mut stdin, stdout): (u32, pipe::Sender, pipe::Receiver),
) -> Result<Launched, Failed> {
    let task = &claim.task;
    stdin.write_all(spec_line.as_bytes()).await.map_err(|e| {
        failed(
            SpawnError::infra(format!("hand the spec to the supervisor: {e}")),
            false,
        )
    })?;
    // No `RuntimeMaxSec`: the task's runtime limit is the supervisor's (`spec.max_runtime`),
    // which does not charge the time a pause kept the run frozen — systemd's timer would,
    // and cannot be moved on a running scope.
    let profile = names::profile_of(task.assignee.as_deref(), cfg.default_assignee.as_deref());
    let scope = scope_spec(
        cfg,
        unit,
        Some(&profile),
        description(&task.id, claim.run_id, &task.title),
        None,
    );
    let timeout = Duration::from_secs(cfg.start_timeout_seconds);
    if let Err(e) = sd.start_scope(unit, &scope, pid, timeout).await {
        let ours = matches!(
            e,
            SystemdError::Timeout { .. } | SystemdError::JobFailed { .. }
        );
        return Err(failed(
            SpawnError::infra(format!("create scope {unit}: {e}")),
            ours,
        ));
    }
    // Read back what systemd did (crun does the same): the held process must be in the scope.
    let want = liveness::unit_cgroup(&scope.slice, unit);
    match liveness::cgroup_of(pid) {
        Ok(Some(cg)) if cg == want => {}
        other => {
            return Err(failed(
                SpawnError::infra(format!("supervisor {pid} is in {other:?}, not in {want}")),
                true,
            ))
        }
    }
    stdin.write_all(b"G").await.map_err(|e| {
        failed(
            SpawnError::infra(format!("release the supervisor: {e}")),
            true,
        )
    })?;
    drop(stdin);
    let mut line = String::new();
    let read = tokio::time::timeout(timeout, BufReader::new(stdout).read_line(&mut line)).await;
    let report = match read {
        Ok(Ok(n)) if n > 0 => serde_json::from_str::<Report>(&line)
            .map_err(|e| format!("supervisor report {line:?}: {e}")),
        Ok(Ok(_)) => Err("the supervisor ended without starting the worker".to_string()),
        Ok(Err(e)) => Err(format!("read the supervisor's report: {e}")),
        Err(_) => Err(format!("no word from the supervisor within {timeout:?}")),
    };
    match report {
        Ok(Report::Started { pid, tmpdir }) => Ok(Launched {
            worker_pid: pid,
            tmpdir,
            cgroup: want,
        }),
        Ok(Report::Failed { reason, fault }) => Err(failed(SpawnError { reason, fault }, true)),
        // A silent or garbled supervisor is ours to answer for, not the task's.
        Err(reason) => Err(failed(SpawnError::infra(reason), true)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_description_shows_no_control_invisible_or_reordering_character() {
        let d = description("t_1", 2, "fix\u{202e}gnp.exe\nrm -rf\u{200b} /");
        assert_eq!(
            d,
            "Hermes kanban worker: task t_1 run 2: fix\\u{202e}gnp.exe rm -rf\\u{200b} /"
        );
        assert_eq!(
            description("t", 1, &"x".repeat(500)).len(),
            "Hermes kanban worker: task t run 1: ".len() + 160
        );
    }
}
