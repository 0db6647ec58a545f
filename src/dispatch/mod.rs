//! Dispatch: one pass over the board (`dispatch --once`), and stopping a task's worker.

pub mod caps;
pub mod pause;
pub mod pools;
pub mod stop;

use serde::Serialize;

use crate::board::lock::FileLock;
use crate::board::{claimer_id, Board, Claim};
use crate::config::Config;
use crate::guard;
use crate::names;
use crate::outcome::{self, Fault};
use crate::spawn::{self, Started};
use crate::systemd::Systemd;

/// The booking rules for `cfg`: its breaker limit, and the Hermes its workers run.
pub fn rules(cfg: &Config) -> outcome::Rules {
    outcome::Rules {
        failure_limit: cfg.failure_limit,
        hermes: spawn::hermes_generation(cfg),
    }
}

#[derive(Debug, Default, Serialize)]
pub struct SpawnedWorker {
    pub task_id: String,
    pub run_id: i64,
    pub unit: String,
    pub pid: u32,
    pub workspace: String,
    /// From the claim to the worker running in its scope (the daemon's metrics).
    #[serde(skip)]
    pub start_seconds: f64,
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
    /// Ready tasks whose assignee already runs `max_in_progress_per_profile` workers.
    pub skipped_per_profile_capped: Vec<String>,
    /// Ready tasks held back by upstream's rate-limit cooldown (their last run exited 75).
    pub cooling_down: Vec<String>,
    /// Ready tasks held back by one of upstream's respawn guards: (task, reason).
    pub respawn_guarded: Vec<(String, String)>,
    /// Spawn failures that could not be recorded yet (board locked).
    pub unbooked: Vec<Unbooked>,
    /// Hermes' emergency stop held the pass (nothing was claimed after it was seen): its file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estop: Option<std::path::PathBuf>,
    /// An operator's hold (`hermes-mgr pause --board`/`--all`) held the pass: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paused: Option<String>,
    /// Admission by pressure held the pass (nothing was claimed): why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pressure: Option<String>,
    /// Capacity pools that kept tasks waiting in this pass, and why.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub pools: std::collections::BTreeMap<String, pools::Held>,
    /// Ready tasks held back by their own pause (`hermes-mgr pause ID`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paused_tasks: Vec<String>,
    /// Ready tasks whose last run's scope systemd has not removed yet: their next run
    /// waits for that (never two scopes for one task).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ending: Vec<String>,
    /// The pass stopped at its batch size with ready tasks left.
    #[serde(skip)]
    pub batch_full: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Unbooked {
    pub task_id: String,
    pub run_id: i64,
    pub error: String,
    pub fault: Fault,
    pub why: String,
}

/// How much one pass may start: at most `starts` workers, and none after `time` (each start
/// waits for PID 1, which slows down as it holds more units: a pass must never starve the
/// daemon's watchdog).
#[derive(Debug, Clone, Copy)]
pub struct Batch {
    pub starts: usize,
    pub time: std::time::Duration,
}

/// Whether the host can take a worker now (`admission`), from the kernel's figures for the
/// workers' slice and the host; `None` at once when no threshold is set (nothing is read).
pub fn pressure_hold(cfg: &Config) -> Option<String> {
    let limits = cfg.admission();
    if limits.none() {
        return None;
    }
    let slice = crate::liveness::unit_cgroup(&cfg.slice, "");
    let slice = std::path::Path::new("/sys/fs/cgroup").join(slice.trim_matches('/'));
    let facts = crate::admission::Facts {
        pressure: crate::liveness::pressure(&slice)
            .into_iter()
            .map(|(scope, resource, some_avg10)| crate::admission::Pressure {
                scope,
                resource,
                some_avg10,
            })
            .collect(),
        memory_available: crate::liveness::memory_available(),
    };
    crate::admission::hold(&limits, &facts)
}

/// One dispatch pass: promote what parent gating allows, then claim ready tasks in
/// priority order up to the cap and start each in its scope. Holds upstream's per-board
/// `kanban.db.dispatch.lock` for the pass; a pass that finds it taken does nothing.
/// `batch` bounds the workers started in this pass (the daemon's loop keeps its turns
/// short); `batch_full` in the report says it stopped there with work left. Nothing starts
/// in a pool of `pool_faults` (its limits are not on its slice: `pools::apply`).
pub async fn once(
    board: &Board,
    sd: &Systemd,
    cfg: &Config,
    max: Option<usize>,
    batch: Option<Batch>,
    pool_faults: &std::collections::BTreeMap<String, String>,
    ending: &std::collections::HashSet<String>,
) -> anyhow::Result<(PassReport, Vec<Started>)> {
    let mut report = PassReport::default();
    let lock_path = board.paths().sibling("dispatch.lock");
    let Some(_lock) = FileLock::try_acquire(&lock_path, board.owner())? else {
        report.skipped_locked = true;
        return Ok((report, Vec::new()));
    };
    let mut pass = Pass {
        board,
        sd,
        cfg,
        t0: std::time::Instant::now(),
        batch,
        estop_dirs: crate::hermes_config::estop_dirs(&board.paths().root),
        holds: crate::holds::View::new(&cfg.holds_file),
        db: crate::holds::board_key(&board.paths().db),
        ending,
        report,
        started: Vec::new(),
        flight: Flight::default(),
        slots: 0,
        per_profile: Default::default(),
        pools: pools::InPass::new(cfg, pool_faults),
        stopped: false,
        lock: claimer_id(),
    };
    // A state directory with no room for an exit record holds new workers as pressure does:
    // each would end with its record kept by its supervisor, its scope living on.
    pass.report.pressure = crate::state_dir::full(&cfg.state_dir)
        .map(|free| {
            format!(
                "the state directory {} is FULL ({free} bytes free): no exit record can be written",
                cfg.state_dir.display()
            )
        })
        .or_else(|| pressure_hold(cfg));
    if pass.held() {
        return Ok((pass.report, Vec::new()));
    }
    pass.report.promoted = board.recompute_ready(cfg.failure_limit)?;
    // Upstream's caps: `max_spawn` (and, up to 0.20, `max_in_progress`) count the board's
    // running tasks (none set: no cap), `max_in_progress_per_profile` those of each
    // assignee; a host-wide cap (0.22's `max_in_progress`) is the caller's `max`.
    let cap = max
        .unwrap_or(usize::MAX)
        .min(caps::of(cfg).board.unwrap_or(usize::MAX));
    let live = usize::try_from(board.count("running")?).unwrap_or(0);
    pass.slots = cap.saturating_sub(live);
    if cfg.max_in_progress_per_profile.is_some() {
        pass.per_profile = board.running_per_assignee()?;
    }
    if let Err(e) = crate::state_dir::note_claimer(&cfg.state_dir) {
        tracing::warn!("cannot note this dispatcher as a claimer ({}: {e}); should it die between a claim and its worker's start, that run waits for its claim TTL",
                       crate::state_dir::claimers_path(&cfg.state_dir).display());
    }
    pass.lane(LaneKind::Ready).await?;
    // Upstream's review lane: `review` tasks, claimed back to `running`, counted against
    // the same cap.
    pass.lane(LaneKind::Review).await?;
    // What is still starting finishes, whatever stopped the pass.
    while let Some(done) = pass.flight.next().await {
        settle(board, cfg, done, &mut pass.report, &mut pass.started);
    }
    Ok((pass.report, pass.started))
}

/// The two lanes a pass claims from, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LaneKind {
    /// `ready` tasks: upstream's respawn guards, its default assignee and its per-profile
    /// cap apply.
    Ready,
    /// `review` tasks, claimed back to `running`: none of those applies there.
    Review,
}

/// One pass in progress.
struct Pass<'a> {
    board: &'a Board,
    sd: &'a Systemd,
    cfg: &'a Config,
    t0: std::time::Instant,
    batch: Option<Batch>,
    estop_dirs: Vec<std::path::PathBuf>,
    /// The operators' holds, looked at before each claim as the emergency stop is.
    holds: crate::holds::View,
    /// The board's key in the holds.
    db: String,
    /// Tasks whose last run's scope systemd has not removed yet: not claimed.
    ending: &'a std::collections::HashSet<String>,
    report: PassReport,
    started: Vec<Started>,
    flight: Flight<'a>,
    /// Starts the caps still allow (a slot is taken at the claim, given back if the start
    /// fails).
    slots: usize,
    /// Running workers per assignee, when `max_in_progress_per_profile` is set.
    per_profile: std::collections::HashMap<String, usize>,
    /// The capacity pools, as this pass counts them.
    pools: pools::InPass<'a>,
    /// A spawn failure stopped the pass (the board refuses writes, systemd fails us).
    stopped: bool,
    /// This dispatcher's claim lock.
    lock: String,
}

impl<'a> Pass<'a> {
    /// Hermes' emergency stop (`hermes pause`) or an operator's hold of the board
    /// (`hermes-mgr pause`): nothing is claimed while either holds, looked at again before
    /// every claim, so no start follows the command's return by more than the one in hand
    /// (and `hermes-mgr pause` waits for that one: it takes the board's dispatch lock).
    fn held(&mut self) -> bool {
        let dirs: Vec<&std::path::Path> = self.estop_dirs.iter().map(|d| d.as_path()).collect();
        self.report.estop = self
            .report
            .estop
            .take()
            .or_else(|| crate::hermes_config::estop(&dirs));
        if self.report.paused.is_none() {
            self.report.paused = self.holds.board_held(&self.db);
        }
        self.report.estop.is_some()
            || self.report.paused.is_some()
            || self.report.pressure.is_some()
    }

    fn full(&self) -> bool {
        let starts = self.started.len() + self.flight.len();
        self.batch
            .is_some_and(|b| starts >= b.starts || self.t0.elapsed() >= b.time)
    }

    /// Claim and start the lane's tasks until it, the caps or the batch run out.
    async fn lane(&mut self, kind: LaneKind) -> anyhow::Result<()> {
        let (board, cfg) = (self.board, self.cfg);
        let (read, status): (fn(&Board, usize) -> _, _) = match kind {
            LaneKind::Ready => (Board::ready_tasks, "ready"),
            LaneKind::Review => (Board::review_tasks, "review"),
        };
        let mut lane = Lane::new(read, self.slots);
        while let Some(task) = lane.next(board)? {
            if self.stopped {
                break;
            }
            if self.full() {
                self.report.batch_full = true;
                break;
            }
            if self.slots == 0 {
                self.report.skipped_capped += 1 + lane.unseen(board, status)?;
                break;
            }
            let Some((assignee, pool)) = self.admit(&task, kind)? else {
                continue;
            };
            if self.held() {
                break;
            }
            let claimed = match kind {
                LaneKind::Ready => board.claim(&task.id, &self.lock, cfg.claim_ttl_seconds)?,
                LaneKind::Review => {
                    board.claim_review(&task.id, &self.lock, cfg.claim_ttl_seconds)?
                }
            };
            let Some(claim) = claimed else {
                continue;
            };
            lane.claimed += 1;
            if claim.task.workspace_kind == "scratch" {
                board.scratch_tip(&task.id);
            }
            self.slots -= 1;
            let counted = (kind == LaneKind::Ready).then_some(assignee);
            if let Some(a) = &counted {
                *self.per_profile.entry(a.clone()).or_default() += 1;
            }
            if let Some(p) = &pool {
                self.pools.started(p);
            }
            self.flight.push(board, self.sd, cfg, claim, counted, pool);
            while self.flight.len() >= IN_FLIGHT || (self.stopped && self.flight.len() > 0) {
                let Some(done) = self.flight.next().await else {
                    break;
                };
                let counted = done.assignee.clone();
                let pool = done.pool.clone();
                match settle(board, cfg, done, &mut self.report, &mut self.started) {
                    Start::Started => {}
                    Start::NotStarted => {
                        self.slots += 1;
                        if let Some(n) = counted.and_then(|a| self.per_profile.get_mut(&a)) {
                            *n = n.saturating_sub(1);
                        }
                        if let Some(p) = pool {
                            self.pools.not_started(&p);
                        }
                    }
                    Start::StopPass => self.stopped = true,
                }
            }
        }
        Ok(())
    }

    /// Whether `task` may be claimed now, for whom and in which capacity pool: the report
    /// says why not.
    fn admit(
        &mut self,
        task: &crate::board::Task,
        kind: LaneKind,
    ) -> anyhow::Result<Option<(String, Option<String>)>> {
        let (board, cfg, report) = (self.board, self.cfg, &mut self.report);
        // The holds as this pass last looked (before its last claim): a task paused since
        // waits for the pass's end (`pause` takes the dispatch lock) and freezes what it started.
        if self.holds.current().task(&self.db, &task.id).is_some() {
            report.paused_tasks.push(task.id.clone());
            return Ok(None);
        }
        if self.ending.contains(&task.id) {
            report.ending.push(task.id.clone());
            return Ok(None);
        }
        let default = match kind {
            LaneKind::Ready => cfg.default_assignee.as_deref(),
            LaneKind::Review => None,
        };
        // Its pool first: the answer is the pass's (one read of the kernel per pool), and
        // the many tasks of a pool that waits cost no guard's query each.
        let profile = task.assignee.as_deref().or(default);
        let profile = profile.map(|a| names::profile_of(Some(a), None));
        let Ok(pool) = self
            .pools
            .admit_or_wait(profile, &task.id, &mut report.pools)
        else {
            return Ok(None);
        };
        if kind == LaneKind::Ready {
            // Upstream's respawn guards (`guard.rs`), with its `respawn_guarded` event —
            // written once per reason, not on every pass (passes follow events here, not a
            // minute's tick).
            let now = crate::board::now();
            let facts = board.guard_facts(&task.id, now)?;
            if let Some(reason) = guard::respawn_guard(&facts, now, cfg.rate_limit_cooldown_seconds)
            {
                if reason == "rate_limit_cooldown" {
                    report.cooling_down.push(task.id.clone());
                }
                report
                    .respawn_guarded
                    .push((task.id.clone(), reason.to_string()));
                if let Err(e) = board.note_respawn_guarded(&task.id, reason) {
                    tracing::warn!(hermes_kanban_task = %task.id, "respawn_guarded event not written: {e}");
                }
                return Ok(None);
            }
        }
        let Some(assignee) = task.assignee.clone().or(default.map(str::to_string)) else {
            report.skipped_unassigned.push(task.id.clone());
            return Ok(None);
        };
        if !spawnable(board, &assignee) {
            report.skipped_nonspawnable.push(task.id.clone());
            return Ok(None);
        }
        if let (LaneKind::Ready, Some(per)) = (kind, cfg.max_in_progress_per_profile) {
            if self.per_profile.get(&assignee).copied().unwrap_or(0) >= per {
                report.skipped_per_profile_capped.push(task.id.clone());
                return Ok(None);
            }
        }
        Ok(Some((assignee, pool)))
    }
}

/// One lane's unclaimed tasks in upstream's order, read a page at a time: a pass that has a
/// few free slots reads a few rows, not the whole lane (10,000 ready tasks behind a full
/// cap were read on every pass, and a pass follows every worker's end). A page that runs
/// out (tasks skipped by a guard, or not this host's) is read again twice as long; what the
/// pass already saw is not handed out twice.
struct Lane {
    read: fn(&Board, usize) -> crate::board::Result<Vec<crate::board::Task>>,
    page: Vec<crate::board::Task>,
    seen: std::collections::HashSet<String>,
    limit: usize,
    exhausted: bool,
    /// Tasks of this lane the pass claimed.
    claimed: usize,
}

impl Lane {
    fn new(
        read: fn(&Board, usize) -> crate::board::Result<Vec<crate::board::Task>>,
        slots: usize,
    ) -> Lane {
        Lane {
            read,
            page: Vec::new(),
            seen: Default::default(),
            limit: slots.saturating_mul(2).clamp(32, 10_000),
            exhausted: false,
            claimed: 0,
        }
    }

    fn next(&mut self, board: &Board) -> crate::board::Result<Option<crate::board::Task>> {
        loop {
            if let Some(t) = self.page.pop() {
                return Ok(Some(t));
            }
            if self.exhausted {
                return Ok(None);
            }
            let rows = (self.read)(board, self.limit)?;
            self.exhausted = rows.len() < self.limit;
            self.page = rows
                .into_iter()
                .filter(|t| self.seen.insert(t.id.clone()))
                .collect();
            self.page.reverse();
            self.limit = self.limit.saturating_mul(2);
        }
    }

    /// The lane's tasks after the one in hand, for the report of tasks left waiting for a
    /// slot: the rest of the page, and those in `status` the pass never read (all of them
    /// less those it read and did not claim).
    fn unseen(&self, board: &Board, status: &str) -> crate::board::Result<usize> {
        let waiting = usize::try_from(board.count(status)?).unwrap_or(0);
        Ok((waiting + self.claimed + self.page.len()).saturating_sub(self.seen.len()))
    }
}

/// Workers a pass starts at once: each start waits for PID 1's job (the scope's cgroup and
/// the move of the supervisor into it, ~10 ms, most of it the kernel's RCU grace period on
/// the cgroup move), and starts that overlap share that wait.
const IN_FLIGHT: usize = 8;

/// A claim whose worker is being started.
struct Starting {
    claim: Claim,
    /// The assignee counted against `max_in_progress_per_profile` (the ready lane).
    assignee: Option<String>,
    /// The capacity pool it counts in.
    pool: Option<String>,
    result: Result<Started, spawn::SpawnError>,
    /// Since the claim (made just before the start was pushed).
    took: std::time::Duration,
}

/// The starts in flight in one pass.
#[derive(Default)]
struct Flight<'a> {
    starts: futures_util::stream::FuturesUnordered<
        std::pin::Pin<Box<dyn std::future::Future<Output = Starting> + 'a>>,
    >,
}

impl<'a> Flight<'a> {
    fn push(
        &mut self,
        board: &'a Board,
        sd: &'a Systemd,
        cfg: &'a Config,
        claim: Claim,
        assignee: Option<String>,
        pool: Option<String>,
    ) {
        let t0 = std::time::Instant::now();
        self.starts.push(Box::pin(async move {
            let result = spawn::start_worker(board, sd, cfg, &claim).await;
            Starting {
                claim,
                assignee,
                pool,
                result,
                took: t0.elapsed(),
            }
        }));
    }

    fn len(&self) -> usize {
        self.starts.len()
    }

    async fn next(&mut self) -> Option<Starting> {
        use futures_util::StreamExt;
        self.starts.next().await
    }
}

/// Upstream skips assignees that are not profiles on this host.
fn spawnable(board: &Board, assignee: &str) -> bool {
    names::profile_name(assignee)
        .is_some_and(|p| p == "default" || names::profile_home(&board.paths().root, &p).is_dir())
}

/// What became of a claimed task's start.
enum Start {
    Started,
    NotStarted,
    /// The pass must stop: the board would not record a failure, or the dispatcher's own
    /// side failed (the next start would fail the same way).
    StopPass,
}

/// A start that finished: record what upstream records at spawn, or book the failure.
fn settle(
    board: &Board,
    cfg: &Config,
    done: Starting,
    report: &mut PassReport,
    started: &mut Vec<Started>,
) -> Start {
    let claim = &done.claim;
    let task = &claim.task;
    match done.result {
        Ok(s) => {
            // The worker runs now: a board that is locked at this instant must not make
            // us kill it. These are informational for upstream (it records them at spawn).
            // A worktree's path and branch are upstream's answer, recorded by its own code.
            let started_at = spawn::hermes_generation(cfg)
                .fingerprint()
                .then(|| crate::liveness::fingerprint(s.worker_pid))
                .flatten();
            if let Err(e) = board.record_start(
                &s.task,
                s.run_id,
                s.workspace.as_deref(),
                s.worker_pid as i64,
                started_at.as_deref(),
            ) {
                tracing::warn!(hermes_kanban_task = %s.task, hermes_kanban_run_id = s.run_id, unit = %s.unit,
                               "worker started but its pid and workspace could not be recorded: {e}");
            }
            report.spawned.push(SpawnedWorker {
                task_id: s.task.clone(),
                run_id: s.run_id,
                unit: s.unit.clone(),
                pid: s.worker_pid,
                workspace: s
                    .workspace
                    .as_ref()
                    .map(|w| w.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                start_seconds: done.took.as_secs_f64(),
            });
            started.push(s);
            Start::Started
        }
        Err(err) => {
            let infrastructure = err.fault == Fault::Infrastructure;
            let end = outcome::spawn_failure(err.fault, &err.reason);
            let error = err.reason;
            match board.end_run(&task.id, claim.run_id, &end, rules(cfg)) {
                Ok(r) => {
                    crate::state_dir::forget_run(
                        &cfg.state_dir,
                        &board.paths().slug,
                        &task.id,
                        claim.run_id,
                    );
                    report.spawn_failed.push(SpawnFailure {
                        task_id: task.id.clone(),
                        run_id: claim.run_id,
                        gave_up: r.is_some_and(|e| e.gave_up),
                        error,
                        infrastructure,
                    });
                }
                // Claimed, not started, and the board refuses the record (locked): the
                // caller must book it later, or the task would stay `running` forever.
                Err(e) => {
                    report.unbooked.push(Unbooked {
                        task_id: task.id.clone(),
                        run_id: claim.run_id,
                        error,
                        fault: err.fault,
                        why: e.to_string(),
                    });
                    // The board is not taking writes: no point claiming more now.
                    return Start::StopPass;
                }
            }
            if infrastructure {
                // systemd or the bus failed us: the next task would fail the same way.
                Start::StopPass
            } else {
                Start::NotStarted
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::board::{BoardPaths, NewTask, OpenMode};

    fn board_of(n: usize) -> (tempfile::TempDir, Board) {
        let dir = tempfile::tempdir().unwrap();
        let b = Board::open(
            &BoardPaths::for_db(&dir.path().join("kanban.db")),
            OpenMode::CreateIfMissing,
        )
        .unwrap();
        for i in 0..n {
            b.create(&NewTask {
                title: format!("t{i}"),
                priority: (i % 3) as i64,
                ..Default::default()
            })
            .unwrap();
        }
        (dir, b)
    }

    #[test]
    fn a_lane_hands_out_every_task_once_in_upstreams_order_whatever_its_pages() {
        let (_d, b) = board_of(150);
        let all: Vec<String> = b
            .ready_tasks(10_000)
            .unwrap()
            .into_iter()
            .map(|t| t.id)
            .collect();
        // A pass that claims every other task: the pages run out and are read again longer.
        let mut lane = Lane::new(Board::ready_tasks, 1);
        let mut got = Vec::new();
        while let Some(t) = lane.next(&b).unwrap() {
            if got.len() % 2 == 0 {
                b.claim(&t.id, "test", 60).unwrap().unwrap();
                lane.claimed += 1;
            }
            got.push(t.id);
        }
        assert_eq!(got, all);
    }

    #[test]
    fn the_tasks_left_waiting_are_those_after_the_one_in_hand() {
        let (_d, b) = board_of(100);
        let mut lane = Lane::new(Board::ready_tasks, 1);
        // Three read: the first claimed, the second skipped, the third in hand when the
        // slots run out: 97 after it wait (the 98 the old whole-lane loop counted, less it).
        let first = lane.next(&b).unwrap().unwrap();
        b.claim(&first.id, "test", 60).unwrap().unwrap();
        lane.claimed += 1;
        lane.next(&b).unwrap().unwrap();
        lane.next(&b).unwrap().unwrap();
        assert_eq!(lane.unseen(&b, "ready").unwrap(), 97);
    }
}
