//! Stop a task's worker: SIGTERM to every process of its scope (`KillUnit`), SIGKILL to
//! what is left after the timeout, wait until systemd has removed the scope, and say how
//! the worker ended, from facts: which signal emptied the scope, and the supervisor's
//! record of the worker's own exit.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::board::{Board, RunEnd};
use crate::config::Config;
use crate::names;
use crate::outcome;
use crate::systemd::{Systemd, UnitState};

#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HowItEnded {
    /// The worker ended on SIGTERM (its handler, or the default action) within the timeout.
    ExitedAfterSigterm,
    /// Something in the scope outlived the stop's timeout, and its SIGKILL (ours) ended it.
    KilledAfterTimeout,
    /// The worker had ended before the stop; nothing was running.
    AlreadyEnded,
}

#[derive(Debug, Serialize)]
pub struct StopReport {
    pub task_id: String,
    pub run_id: i64,
    pub unit: String,
    pub how: HowItEnded,
    /// The worker's own exit, as its supervisor recorded it (absent when it was SIGKILLed
    /// together with its supervisor).
    pub worker_exit: Option<String>,
    pub elapsed_ms: u128,
    pub timeout_seconds: u64,
    /// What became of the task on the board.
    pub task_status: String,
}

/// Stop the current run of `task_id`: the run is closed `stopped` and the task blocked
/// (not counted; `hermes-mgr unblock` runs it again), then its scope is emptied.
pub async fn stop(
    board: &Board,
    sd: &Systemd,
    cfg: &Config,
    task_id: &str,
    timeout: Option<u64>,
) -> anyhow::Result<StopReport> {
    let task = board.require_task(task_id)?;
    let Some(run_id) = task.current_run_id else {
        bail!(
            "task {task_id} has no current run (it is {}); there is no worker to stop",
            task.status
        );
    };
    let unit = names::worker_scope(&board.paths().slug, task_id, run_id);
    let timeout = timeout.unwrap_or(cfg.stop_timeout_seconds);
    let before = sd
        .active_state(&unit)
        .await
        .with_context(|| format!("task {task_id}: look up {unit}"))?;
    let live = before.as_ref().is_some_and(UnitState::is_live);
    // Close the run on the board first (blocked, sticky): a dispatcher that sees the worker
    // exit must find nothing left to requeue.
    let marked =
        live && board.stop_run(task_id, run_id, "stopped by operator (hermes-mgr stop)")?;
    let t0 = Instant::now();
    let frozen = matches!(
        sd.freezer_state(&unit).await?.as_deref(),
        Some("frozen" | "freezing")
    );
    if live && frozen {
        // Paused (`hermes-mgr pause`): thawed, so the worker gets its SIGTERM as any
        // stopped worker does (a frozen process only dies of SIGKILL); the stop ends the
        // task's own hold, its block holds it now.
        super::pause::note_paused_time(board, cfg, task_id, run_id, false)?;
        sd.thaw(&unit)
            .await
            .with_context(|| format!("task {task_id}: thaw {unit}"))?;
        let db = crate::holds::board_key(&board.paths().db);
        crate::holds::update(&cfg.holds_file, |h| h.release_task(&db, task_id))?;
    }
    let how = if live {
        // SIGTERM to every process of the scope; what is left after the timeout gets
        // SIGKILL. Our own timer, so the report says exactly which of the two it took.
        let term = sd
            .kill_and_wait_gone(&unit, libc::SIGTERM, Duration::from_secs(timeout))
            .await
            .with_context(|| format!("task {task_id}: SIGTERM to {unit}"))?;
        if term {
            HowItEnded::ExitedAfterSigterm
        } else {
            let gone = sd
                .kill_and_wait_gone(&unit, libc::SIGKILL, Duration::from_secs(10))
                .await
                .with_context(|| format!("task {task_id}: SIGKILL to {unit}"))?;
            if !gone {
                // Unkillable (D state): leave it to the scope's own stop job and say so.
                sd.stop_and_wait(
                    &unit,
                    Duration::from_secs(cfg.stop_timeout_seconds * 2 + 10),
                )
                .await
                .with_context(|| format!("task {task_id}: {unit} survived SIGKILL; stopping it"))?;
            }
            HowItEnded::KilledAfterTimeout
        }
    } else {
        HowItEnded::AlreadyEnded
    };
    let elapsed_ms = t0.elapsed().as_millis();
    let status =
        crate::state_dir::read_record(&cfg.state_dir, &board.paths().slug, task_id, run_id)
            .with_context(|| format!("read the exit status of {unit}"))?;
    let operator_stop = match &how {
        HowItEnded::AlreadyEnded => None,
        HowItEnded::KilledAfterTimeout => Some(format!("SIGKILL after its {timeout}s timeout")),
        HowItEnded::ExitedAfterSigterm => Some(format!("ended on SIGTERM after {elapsed_ms} ms")),
    };
    let facts = outcome::Facts {
        unit: &unit,
        record: status.as_ref(),
        scope: outcome::Scope::Gone,
        watched: false,
        operator_stop: operator_stop.as_deref(),
        max_runtime: task.max_runtime_seconds,
        stale: None,
        hermes: crate::spawn::hermes_generation(cfg),
        // An operator's stop is booked as such, full disk or not.
        board_full: false,
    };
    if let outcome::Decision::Ended(end) = outcome::decide(&facts) {
        match (&end, marked) {
            // The run was closed (blocked, sticky) before the signal: say how it went.
            (RunEnd::Stopped { error }, true) => board.annotate_run(run_id, error)?,
            _ => {
                board.end_run(task_id, run_id, &end, super::rules(cfg))?;
            }
        }
    }
    let task_status = board.require_task(task_id)?.status.to_string();
    Ok(StopReport {
        task_id: task_id.to_string(),
        run_id,
        unit,
        how,
        worker_exit: status.map(|s| s.describe()),
        elapsed_ms,
        timeout_seconds: timeout,
        task_status,
    })
}
