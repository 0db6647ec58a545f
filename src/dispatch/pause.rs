//! Pause and resume (`hermes-mgr pause` / `resume`): a task's run frozen whole by the
//! kernel's cgroup freezer (`FreezeUnit`: every process of its scope, tools and their
//! children in other sessions included) and the task held, so nothing starts it again until
//! it is resumed; or a board (or every board) held from new starts, its running workers
//! frozen too with `--freeze`. The holds are the operator's, kept in `holds_file` across
//! restarts and reboots (`holds`); each task's pause and resume is also a task event on
//! the board, which Hermes' own tools show.

use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::json;

use crate::board::lock::FileLock;
use crate::board::{Board, Status};
use crate::config::Config;
use crate::holds::{self, Hold, TaskHold};
use crate::names;
use crate::systemd::Systemd;

/// What a pause or resume did to one task.
#[derive(Debug, Serialize)]
pub struct TaskPaused {
    pub task_id: String,
    pub board: String,
    /// The run whose scope was frozen or thawed; `None`: nothing was running.
    pub run_id: Option<i64>,
    pub unit: Option<String>,
    /// The task was already in the state asked for: nothing changed.
    pub already: bool,
}

/// What a board pause or resume did.
#[derive(Debug, Serialize)]
pub struct BoardsPaused {
    /// The boards held or released (every board: `all`).
    pub boards: Vec<String>,
    pub all: bool,
    /// Runs frozen or thawed with the boards.
    pub runs: Vec<TaskPaused>,
}

impl TaskPaused {
    /// Run `run` of task `task` on `board`, frozen or thawed with its board.
    fn run(board: &Board, task: &str, run: i64, unit: String) -> TaskPaused {
        TaskPaused {
            task_id: task.to_string(),
            board: board.paths().slug.clone(),
            run_id: Some(run),
            unit: Some(unit),
            already: false,
        }
    }
}

impl BoardsPaused {
    fn of(boards: &[Board], all: bool, runs: Vec<TaskPaused>) -> BoardsPaused {
        BoardsPaused {
            boards: boards.iter().map(|b| b.paths().slug.clone()).collect(),
            all,
            runs,
        }
    }
}

fn db_key(board: &Board) -> String {
    holds::board_key(&board.paths().db)
}

/// The run of `task` whose scope is live, if one is: `(run, unit)`.
async fn live_run(
    board: &Board,
    sd: &Systemd,
    task: &crate::board::Task,
) -> anyhow::Result<Option<(i64, String)>> {
    let (Status::Running, Some(run)) = (&task.status, task.current_run_id) else {
        return Ok(None);
    };
    let unit = names::worker_scope(&board.paths().slug, &task.id, run);
    let state = sd
        .active_state(&unit)
        .await
        .with_context(|| format!("task {}: look up {unit}", task.id))?;
    Ok(state.filter(|s| s.is_live()).map(|_| (run, unit)))
}

/// Keep the run's paused time beside its exit record (`record::Paused`) — before a freeze
/// (`begin`), before a thaw (`!begin`) — so its supervisor, which keeps the runtime limit,
/// does not charge it: frozen, the supervisor cannot look, and once thawed it reads this.
pub(crate) fn note_paused_time(
    board: &Board,
    cfg: &Config,
    task: &str,
    run: i64,
    begin: bool,
) -> anyhow::Result<()> {
    let path = crate::state_dir::paused_path(&cfg.state_dir, &board.paths().slug, task, run);
    let now = crate::host::now();
    crate::state_dir::update_paused(&path, |p| if begin { p.begin(now) } else { p.end(now) })
        .with_context(|| format!("task {task}: keep its paused time in {}", path.display()))
}

/// Pause task `id`: held (no new run starts), and its running worker, if any, frozen whole.
pub async fn pause_task(
    board: &Board,
    sd: &Systemd,
    cfg: &Config,
    id: &str,
) -> anyhow::Result<TaskPaused> {
    let task = board.require_task(id)?;
    if matches!(task.status, Status::Done | Status::Archived) {
        bail!("task {id} is {}: there is nothing to pause", task.status);
    }
    let db = db_key(board);
    // The hold as it was: the same run paused again changes nothing, and a freeze that
    // fails puts it back.
    let before = holds::read(&cfg.holds_file)?.task(&db, id).cloned();
    let mut live = live_run(board, sd, &task).await?;
    if live.is_none() {
        // Held before it runs: a pass in progress may have claimed it already (each pass
        // looks at the holds before each claim, under the board's dispatch lock). Held
        // first, then the pass waited for: whatever started is found below and frozen.
        let now = crate::host::now();
        holds::update(&cfg.holds_file, |h| {
            let tasks = h.tasks.entry(db.clone()).or_default();
            if !tasks.contains_key(id) {
                tasks.insert(
                    id.to_string(),
                    TaskHold {
                        since: now,
                        run: None,
                    },
                );
            }
        })?;
        let lock = board.paths().sibling("dispatch.lock");
        FileLock::acquire(&lock, board.owner(), PASS_WAIT)
            .with_context(|| format!("wait for the pass in progress on {}", board.paths().slug))?;
        live = live_run(board, sd, &board.require_task(id)?).await?;
    }
    let run = live.as_ref().map(|(r, _)| *r);
    let report = |already| TaskPaused {
        task_id: id.to_string(),
        board: board.paths().slug.clone(),
        run_id: run,
        unit: live.as_ref().map(|(_, u)| u.clone()),
        already,
    };
    let now = crate::host::now();
    // Held first: from here nothing restarts it, whatever happens to the run.
    holds::update(&cfg.holds_file, |h| {
        let tasks = h.tasks.entry(db.clone()).or_default();
        // A pause of the same run again keeps its first `since`.
        if before.as_ref().is_none_or(|b| b.run != run) {
            tasks.insert(id.to_string(), TaskHold { since: now, run });
        }
    })?;
    if let Some((run, unit)) = &live {
        note_paused_time(board, cfg, id, *run, true)?;
        if let Err(e) = sd.freeze(unit).await {
            note_paused_time(board, cfg, id, *run, false)?;
            // Not frozen: the hold goes back to what it was.
            holds::update(&cfg.holds_file, |h| match &before {
                Some(b) => {
                    h.tasks
                        .entry(db.clone())
                        .or_default()
                        .insert(id.to_string(), b.clone());
                }
                None => {
                    h.release_task(&db, id);
                }
            })?;
            return Err(e).with_context(|| format!("task {id}: freeze {unit}"));
        }
    }
    if before.as_ref().is_some_and(|b| b.run == run) {
        return Ok(report(true));
    }
    board.note_pause(
        id,
        "paused",
        &json!({"by": "hermes-mgr", "frozen": live.is_some()}),
        run,
    )?;
    Ok(report(false))
}

/// Resume task `id`: its frozen worker thawed (the same processes go on where they
/// stopped), and the hold lifted.
pub async fn resume_task(
    board: &Board,
    sd: &Systemd,
    cfg: &Config,
    id: &str,
) -> anyhow::Result<TaskPaused> {
    board.require_task(id)?;
    let db = db_key(board);
    let holds = holds::read(&cfg.holds_file)?;
    let Some(hold) = holds.task(&db, id).cloned() else {
        bail!("task {id} is not paused");
    };
    let mut unit = None;
    if let Some(run) = hold.run {
        let u = names::worker_scope(&board.paths().slug, id, run);
        // A run that ended meanwhile (a reboot, a stop) has nothing left to thaw. A board
        // held with `--freeze` keeps its workers frozen until the board is resumed.
        let board_frozen = holds.board(&db).is_some_and(|b| b.hold().freeze);
        if sd.freezer_state(&u).await?.is_some() && !board_frozen {
            note_paused_time(board, cfg, id, run, false)?;
            sd.thaw(&u)
                .await
                .with_context(|| format!("task {id}: thaw {u}"))?;
        }
        unit = Some(u);
    }
    holds::update(&cfg.holds_file, |h| h.release_task(&db, id))?;
    board.note_pause(
        id,
        "resumed",
        &json!({"by": "hermes-mgr", "paused_at": hold.since}),
        hold.run,
    )?;
    Ok(TaskPaused {
        task_id: id.to_string(),
        board: board.paths().slug.clone(),
        run_id: hold.run,
        unit,
        already: false,
    })
}

/// How long a board pause waits for a pass in progress (it holds the board's dispatch
/// lock; a pass ends within about a second).
const PASS_WAIT: Duration = Duration::from_secs(30);

/// Hold `boards` (every board when `all`) from new starts — and, with `freeze`, freeze
/// their running workers. Returns once no pass that started before the hold is still
/// running: nothing starts on them after this returns.
pub async fn pause_boards(
    boards: &[Board],
    sd: &Systemd,
    cfg: &Config,
    all: bool,
    freeze: bool,
) -> anyhow::Result<BoardsPaused> {
    let hold = Hold {
        since: crate::host::now(),
        freeze,
    };
    holds::update(&cfg.holds_file, |h| {
        if all {
            h.all = Some(hold);
        } else {
            for b in boards {
                h.boards.insert(db_key(b), hold);
            }
        }
    })?;
    // Every pass looks at the holds before each claim, under the board's dispatch lock:
    // once the lock is ours, a pass that began before the hold has ended.
    for b in boards {
        let lock = b.paths().sibling("dispatch.lock");
        FileLock::acquire(&lock, b.owner(), PASS_WAIT)
            .with_context(|| format!("wait for the pass in progress on {}", b.paths().slug))?;
    }
    let mut runs = Vec::new();
    if freeze {
        for b in boards {
            for t in b.running_tasks()? {
                let Some((run, unit)) = live_run(b, sd, &t).await? else {
                    continue;
                };
                note_paused_time(b, cfg, &t.id, run, true)?;
                sd.freeze(&unit)
                    .await
                    .with_context(|| format!("task {}: freeze {unit}", t.id))?;
                runs.push(TaskPaused::run(b, &t.id, run, unit));
            }
        }
    }
    Ok(BoardsPaused::of(boards, all, runs))
}

/// Undo `pause_boards`: the hold lifted and the workers it froze thawed (a task paused on
/// its own stays frozen).
pub async fn resume_boards(
    boards: &[Board],
    sd: &Systemd,
    cfg: &Config,
    all: bool,
) -> anyhow::Result<BoardsPaused> {
    let before = holds::read(&cfg.holds_file)?;
    let lifted: Vec<Option<Hold>> = if all {
        vec![before.all]
    } else {
        boards
            .iter()
            .map(|b| before.boards.get(&db_key(b)).copied())
            .collect()
    };
    if lifted.iter().all(Option::is_none) {
        bail!(
            "{} not paused (hermes-mgr status shows what is)",
            if all {
                "not every board is"
            } else {
                "the board is"
            }
        );
    }
    let after = holds::update(&cfg.holds_file, |h| {
        if all {
            h.all = None;
        } else {
            for b in boards {
                h.boards.remove(&db_key(b));
            }
        }
        h.clone()
    })?;
    let mut runs = Vec::new();
    if lifted.iter().flatten().any(|h| h.freeze) {
        for b in boards {
            let db = db_key(b);
            for t in b.running_tasks()? {
                let Some(run) = t.current_run_id else {
                    continue;
                };
                if after.frozen(&db, &t.id, run) {
                    continue;
                }
                let unit = names::worker_scope(&b.paths().slug, &t.id, run);
                if sd.freezer_state(&unit).await?.as_deref() == Some("frozen") {
                    note_paused_time(b, cfg, &t.id, run, false)?;
                    sd.thaw(&unit)
                        .await
                        .with_context(|| format!("task {}: thaw {unit}", t.id))?;
                    runs.push(TaskPaused::run(b, &t.id, run, unit));
                }
            }
        }
    }
    Ok(BoardsPaused::of(boards, all, runs))
}
