//! Dispatch decisions: one pass over the board (`dispatch --once`), stopping a task's
//! worker, and turning a worker's exit into a run outcome.

pub mod stop;

use serde::Serialize;
use serde_json::json;

use crate::board::lock::FileLock;
use crate::board::{claimer_id, Board, RunEnd};
use crate::config::Config;
use crate::spawn::{self, spec::RunStatus, Started};
use crate::systemd::Systemd;

/// Exit code 75 (`EX_TEMPFAIL`): upstream's worker says "rate limited, try later".
pub const EXIT_RATE_LIMITED: i32 = 75;

/// What a worker's exit means for its run, when the worker did not record a verdict
/// (complete/block) itself. Pure: facts in, upstream's outcome out.
pub fn classify(st: &RunStatus) -> RunEnd {
    let pid = st.worker_pid;
    let details =
        json!({"pid": pid, "exit_code": st.exit_code, "signal": st.signal, "unit": st.unit});
    match (st.exit_code, st.signal) {
        (Some(0), _) => RunEnd::ProtocolViolation {
            error: format!("pid {pid} exited 0 without kanban_complete or kanban_block"),
            details,
        },
        (Some(EXIT_RATE_LIMITED), _) => RunEnd::RateLimited {
            error: format!(
                "pid {pid} exited rate-limited (quota wall) — requeued without counting a failure"
            ),
            details,
        },
        (Some(c), _) => RunEnd::Crashed {
            error: format!("pid {pid} exited with code {c}"),
            details,
        },
        (None, Some(s)) => RunEnd::Crashed {
            error: format!("pid {pid} killed by signal {s}"),
            details,
        },
        (None, None) => RunEnd::Crashed {
            error: format!("pid {pid} ended without an exit status"),
            details,
        },
    }
}

#[derive(Debug, Default, Serialize)]
pub struct SpawnedWorker {
    pub task_id: String,
    pub run_id: i64,
    pub unit: String,
    pub pid: u32,
    pub workspace: String,
}

#[derive(Debug, Default, Serialize)]
pub struct SpawnFailure {
    pub task_id: String,
    pub run_id: i64,
    pub error: String,
    pub gave_up: bool,
    /// systemd or D-Bus failed, not the task: not counted against it.
    pub infrastructure: bool,
}

/// The outcome of a spawn failure.
pub fn spawn_end(error: &str, infrastructure: bool) -> RunEnd {
    if infrastructure {
        RunEnd::Infrastructure {
            error: error.to_string(),
        }
    } else {
        RunEnd::SpawnFailed {
            error: error.to_string(),
        }
    }
}

/// The result of one pass, shaped like upstream's `hermes kanban dispatch --json`.
#[derive(Debug, Default, Serialize)]
pub struct PassReport {
    pub skipped_locked: bool,
    pub promoted: usize,
    pub spawned: Vec<SpawnedWorker>,
    pub spawn_failed: Vec<SpawnFailure>,
    pub skipped_unassigned: Vec<String>,
    pub skipped_nonspawnable: Vec<String>,
    pub skipped_capped: usize,
    /// Ready tasks held back by upstream's rate-limit cooldown (their last run exited 75).
    pub cooling_down: Vec<String>,
    /// Spawn failures that could not be recorded yet (board locked).
    pub unbooked: Vec<Unbooked>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Unbooked {
    pub task_id: String,
    pub run_id: i64,
    pub error: String,
    pub infrastructure: bool,
    pub why: String,
}

/// One dispatch pass: promote what parent gating allows, then claim ready tasks in
/// priority order up to the cap and start each in its scope. Holds upstream's per-board
/// `kanban.db.dispatch.lock` for the pass; a pass that finds it taken does nothing.
/// `progress` is called after each worker started (the daemon feeds its watchdog there).
pub async fn once(
    board: &Board,
    sd: &Systemd,
    cfg: &Config,
    max: Option<usize>,
    progress: &mut dyn FnMut(),
) -> anyhow::Result<(PassReport, Vec<Started>)> {
    let mut report = PassReport::default();
    let lock_path = board.paths().sibling("dispatch.lock");
    let Some(_lock) = FileLock::try_acquire(&lock_path, board.owner())? else {
        report.skipped_locked = true;
        return Ok((report, Vec::new()));
    };
    report.promoted = board.recompute_ready(cfg.failure_limit)?;
    let cap = max.unwrap_or(cfg.max_spawn).min(cfg.max_spawn);
    let live = usize::try_from(board.count("running")?).unwrap_or(0);
    let mut slots = cap.saturating_sub(live);
    let lock = claimer_id();
    let mut started = Vec::new();
    for task in board.ready_tasks(10_000)? {
        if slots == 0 {
            report.skipped_capped += 1;
            continue;
        }
        // Upstream's respawn guard `rate_limit_cooldown`: a quota wall does not lift at once.
        if let Some(last) = board.last_run(&task.id)? {
            let recent = last
                .ended_at
                .is_some_and(|e| crate::board::now() - e < cfg.rate_limit_cooldown_seconds);
            if last.outcome.as_deref() == Some("rate_limited") && recent {
                report.cooling_down.push(task.id.clone());
                continue;
            }
        }
        let Some(assignee) = task
            .assignee
            .clone()
            .or_else(|| cfg.default_assignee.clone())
        else {
            report.skipped_unassigned.push(task.id.clone());
            continue;
        };
        // Upstream skips assignees that are not profiles on this host.
        let spawnable = spawn::profile_name(&assignee).is_some_and(|p| {
            p == "default" || spawn::profile_home(&board.paths().root, &p).is_dir()
        });
        if !spawnable {
            report.skipped_nonspawnable.push(task.id.clone());
            continue;
        }
        let Some(claim) = board.claim(&task.id, &lock, cfg.claim_ttl_seconds)? else {
            continue;
        };
        match spawn::start_worker(board, sd, cfg, &claim).await {
            Ok(s) => {
                slots -= 1;
                report.spawned.push(SpawnedWorker {
                    task_id: s.task.clone(),
                    run_id: s.run_id,
                    unit: s.unit.clone(),
                    pid: s.worker_pid,
                    workspace: s.workspace.to_string_lossy().into_owned(),
                });
                started.push(s);
                // Each start waits on systemd; the caller may have a watchdog to feed.
                progress();
            }
            Err(err) => {
                let infrastructure = err.infrastructure;
                let error = err.reason;
                let end = spawn_end(&error, infrastructure);
                match board.end_run(&task.id, claim.run_id, &end, cfg.failure_limit) {
                    Ok(r) => report.spawn_failed.push(SpawnFailure {
                        task_id: task.id.clone(),
                        run_id: claim.run_id,
                        gave_up: r.is_some_and(|e| e.gave_up),
                        error,
                        infrastructure,
                    }),
                    // Claimed, not started, and the board refuses the record (locked): the
                    // caller must book it later, or the task would stay `running` forever.
                    Err(e) => {
                        report.unbooked.push(Unbooked {
                            task_id: task.id.clone(),
                            run_id: claim.run_id,
                            error,
                            infrastructure,
                            why: e.to_string(),
                        });
                        // The board is not taking writes: no point claiming more now.
                        break;
                    }
                }
                if infrastructure {
                    // systemd or the bus failed us: the next task would fail the same way.
                    break;
                }
            }
        }
    }
    Ok((report, started))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(code: Option<i32>, sig: Option<i32>) -> RunStatus {
        RunStatus {
            task: "t".into(),
            run_id: 1,
            unit: "u".into(),
            worker_pid: 9,
            started_at: 0,
            ended_at: 1,
            exit_code: code,
            signal: sig,
            sigterm_received: false,
        }
    }

    #[test]
    fn exits_map_to_upstream_outcomes() {
        assert!(matches!(
            classify(&st(Some(0), None)),
            RunEnd::ProtocolViolation { .. }
        ));
        assert!(matches!(
            classify(&st(Some(75), None)),
            RunEnd::RateLimited { .. }
        ));
        assert!(
            matches!(classify(&st(Some(1), None)), RunEnd::Crashed { ref error, .. } if error == "pid 9 exited with code 1")
        );
        assert!(
            matches!(classify(&st(None, Some(9))), RunEnd::Crashed { ref error, .. } if error == "pid 9 killed by signal 9")
        );
    }
}
