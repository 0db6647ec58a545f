//! Passes: each dirty board's dispatch pass (held by Hermes' emergency stop or an
//! operator's pause, capped for the host when the Hermes served counts so), and the status
//! line the service shows.

use super::*;
use tracing::debug;

impl Daemon {
    /// Look at Hermes' emergency stop again; `true` while it holds. Its coming and going are
    /// said once each, in the journal and the service status.
    pub(super) fn check_estop(&mut self) -> bool {
        let dirs: Vec<&Path> = self.estop_dirs.iter().map(PathBuf::as_path).collect();
        let now = crate::hermes_config::estop(&dirs);
        if now != self.estop {
            match &now {
                Some(p) => warn!(estop = %p.display(), "{}", crate::hermes_config::estop_text(p)),
                None => {
                    info!("emergency stop lifted: dispatching again");
                    self.mark_all_dirty();
                }
            }
            self.estop = now;
            self.update_status();
        }
        self.estop.is_some()
    }

    pub(super) fn status_text(&self) -> String {
        let count = |st: &str| -> i64 {
            self.slots
                .values()
                .filter_map(|s| s.board.as_ref())
                .map(|b| b.count(st).unwrap_or(0))
                .sum()
        };
        let mut line = format!(
            "{} running ({} in scopes), {} ready, {} blocked, {} todo",
            count("running"),
            self.live.len(),
            count("ready"),
            count("blocked"),
            count("todo")
        );
        let listed = self.slots.values().filter(|s| s.listed).count();
        if listed != 1 {
            line.push_str(&format!(" on {listed} boards"));
        }
        if self.boards_over > 0 {
            line.push_str(&format!(
                "; {} boards not served (max_boards = {})",
                self.boards_over, self.cfg.max_boards
            ));
        }
        for (slug, s) in &self.slots {
            if let Some(b) = &s.broken {
                line.push_str(&format!(
                    "; board {slug} skipped: {}",
                    crate::text::clean(&b.why)
                ));
            }
        }
        let failing: Vec<String> = self
            .slots
            .iter()
            .filter_map(|(slug, s)| s.failing.as_ref().map(|w| (slug, w)))
            .map(|(slug, why)| {
                if self.slots.len() == 1 {
                    why.clone()
                } else {
                    format!("board {slug}: {why}")
                }
            })
            .collect();
        let line = if failing.is_empty() {
            line
        } else {
            format!("FAILING to start workers ({}); {line}", failing.join("; "))
        };
        let line = match crate::state_dir::full(&self.cfg.state_dir) {
            Some(free) => format!(
                "FAILING to record exits, the state directory {} is FULL ({free} bytes free; ended runs stay open until there is room); {line}",
                self.cfg.state_dir.display()
            ),
            None => line,
        };
        let full: Vec<String> = self
            .slots
            .iter()
            .filter_map(|(slug, s)| s.full.as_ref().map(|w| format!("board {slug}: {w}")))
            .collect();
        let line = if full.is_empty() {
            line
        } else {
            format!(
                "FAILING to book runs, the board's filesystem is FULL ({}; ended runs are kept until there is room); {line}",
                full.join("; ")
            )
        };
        let line = match self.paused_text() {
            Some(p) => format!("{p}; {line}"),
            None => line,
        };
        let waits = self.pool_waits();
        let line = if waits.is_empty() {
            line
        } else {
            let w: Vec<String> = waits.values().map(|w| crate::text::clean(w)).collect();
            format!("WAITING for pools: {}; {line}", w.join("; "))
        };
        let line = match &self.pressure {
            Some((why, _)) => format!("HOLDING new workers: {}; {line}", crate::text::clean(why)),
            None => line,
        };
        match &self.estop {
            Some(p) => format!("{}; {line}", crate::hermes_config::estop_text(p)),
            None => line,
        }
    }

    /// Admission by pressure said `why` new workers wait (`Some`), or let a pass run
    /// (`None`). Its coming and going are said once each; while it holds, the boards are
    /// looked at again every `PRESSURE_LOOK` (PSI's averages move continuously: a start waits
    /// at most that long after they fall below the threshold).
    pub(super) fn on_pressure(&mut self, why: Option<String>) {
        match (why, &self.pressure) {
            (Some(why), was) => {
                let changed = was.as_ref().is_none_or(|(w, _)| *w != why);
                if was.is_none() {
                    warn!("holding new workers: {why}");
                }
                self.pressure = Some((why, Instant::now() + PRESSURE_LOOK));
                if changed {
                    self.update_status();
                }
            }
            (None, Some(_)) => {
                info!("pressure below the thresholds: starting workers again");
                self.pressure = None;
                self.update_status();
            }
            (None, None) => {}
        }
    }

    /// What the operators' holds keep back, for the service status: every board, some
    /// boards, some tasks.
    fn paused_text(&self) -> Option<String> {
        if let Some(e) = &self.holds.broken {
            return Some(format!(
                "PAUSED: the holds cannot be read ({e}): nothing is started"
            ));
        }
        let h = self.holds.current();
        if let Some(all) = h.all {
            return Some(crate::holds::describe(&crate::holds::BoardHeld::All(all)));
        }
        let boards = self
            .slots
            .values()
            .filter(|s| h.board(&s.db_key()).is_some())
            .count();
        let tasks: usize = h.tasks.values().map(|t| t.len()).sum();
        (boards + tasks > 0).then(|| {
            format!("PAUSED: {boards} board(s) and {tasks} task(s) held (hermes-mgr status shows which)")
        })
    }

    /// The status line, at once or once `notify::STATUS_EVERY` has passed since the last
    /// (`status_due`): counted and sent with what is true when it goes out.
    pub(super) fn update_status(&mut self) {
        if self.status.may_send(Instant::now()) {
            self.notifier.status(&self.status_text());
        }
    }

    /// One dispatch pass over each board that needs one (claims and starts, at most
    /// `PASS_BATCH` per board), then the status line. Only the loop calls it, once per
    /// wake-up.
    pub(super) async fn pass(&mut self) {
        self.apply_pools().await;
        if self.check_estop() {
            // Held: the boards are clean until the stop is lifted (which marks them all
            // dirty); the status line says what waits.
            for s in self.slots.values_mut() {
                s.dirty = false;
            }
            self.update_status();
            return;
        }
        let due: Vec<String> = self
            .slots
            .iter()
            .filter(|(_, s)| s.may_pass())
            .map(|(slug, _)| slug.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        for slug in due {
            self.pass_board(&slug).await;
            // Each board's pass is bounded (its batch and time): many boards are progress,
            // each fed to the watchdog as it ends.
            self.notifier.alive();
        }
        self.update_status();
    }

    pub(super) async fn pass_board(&mut self, slug: &str) {
        // Clean before trying: a board that cannot be opened waits for its file to change
        // (or its backoff), it does not spin the loop.
        if let Some(s) = self.slots.get_mut(slug) {
            s.dirty = false;
        }
        match self.open_slot(slug) {
            boards::Opened::Now => {
                if let Err(e) = self.reconcile_board(slug).await {
                    warn!(board = %slug, "reconcile: {e:#}");
                }
            }
            boards::Opened::Already => {}
            boards::Opened::NotYet => return,
        }
        // A host-wide cap (0.22's `max_in_progress`) leaves this board what the others'
        // live workers do not use.
        let room = dispatch::caps::of(&self.cfg)
            .host
            .map(|host| host.saturating_sub(self.live_elsewhere(slug)));
        let ending = self.ending_on(slug);
        let Some(slot) = self.slots.get_mut(slug) else {
            return;
        };
        let Some(board) = slot.board.as_ref() else {
            return;
        };
        // Read before the pass reads the board: a commit by someone else after this point
        // changes data_version again, and its inotify event triggers the next pass. (Read
        // after, it would swallow a task created while this pass ran.)
        slot.data_version = board.data_version().unwrap_or(slot.data_version);
        let result = dispatch::once(
            board,
            &self.sd,
            &self.cfg,
            room,
            Some(PASS_BATCH),
            &self.pools.faults,
            &ending,
        )
        .await;
        match result {
            Ok((report, started)) => {
                self.count_pass(slug, &report);
                let held = report.estop.is_some();
                let infra_failure = spawn_failures(slug, &report);
                // A task that got a new run while an older run's worker still lives (it was
                // reclaimed under it): that older worker goes now, not after its grace.
                let superseded = started
                    .iter()
                    .any(|s| self.runs_of(slug, &s.task).any(|k| k.run != s.run_id));
                if let Some(s) = self.slots.get_mut(slug) {
                    s.host_capped = room.is_some() && report.skipped_capped > 0;
                }
                self.on_pool_waits(slug, report.pools.clone());
                for s in started {
                    self.track_started(slug, s);
                }
                if superseded {
                    self.check_closed_runs().await;
                }
                for u in report.unbooked {
                    warn!(board = %slug, hermes_kanban_task = %u.task_id, hermes_kanban_run_id = u.run_id,
                          "spawn failed ({}) and the board would not take the record ({}); retrying", crate::text::clean(&u.error), u.why);
                    self.pending.insert(
                        RunKey::new(slug, &u.task_id, u.run_id),
                        Some(crate::outcome::spawn_failure(u.fault, &u.error)),
                    );
                }
                if let Some(why) = report.pressure.clone() {
                    // Admission by pressure: the board waits, dirty, for the next look.
                    if let Some(s) = self.slots.get_mut(slug) {
                        s.dirty = true;
                    }
                    self.on_pressure(Some(why));
                    return;
                }
                self.on_pressure(None);
                let Some(slot) = self.slots.get_mut(slug) else {
                    return;
                };
                match infra_failure {
                    Some(why) => slot.back_off(&why),
                    None => {
                        slot.backoff = None;
                        slot.failing = None;
                    }
                }
                // A full batch leaves work: the loop comes back after what else is due.
                slot.dirty |= report.batch_full;
                if held {
                    // An emergency stop the pass saw before the loop did: the board waits,
                    // dirty, for the moment it is lifted, and the loop says why.
                    slot.dirty = true;
                    self.check_estop();
                    return;
                }
                if let Some(why) = &report.paused {
                    // An operator's hold: no decomposition either. Its lifting is a write
                    // of the holds file, which marks every board dirty.
                    debug!(board = %slug, "held, nothing started: {why}");
                    return;
                }
                self.decompose(slug).await;
            }
            Err(e) => {
                warn!(board = %slug, "dispatch pass failed: {e:#}");
                if let Some(slot) = self.slots.get_mut(slug) {
                    slot.back_off(&format!("{e:#}"));
                    let full = e.downcast_ref::<crate::board::BoardError>();
                    if full.is_some_and(|e| e.is_full()) {
                        slot.full_seen = Some(Instant::now());
                    }
                }
            }
        }
    }

    /// Our live workers on boards other than `slug`.
    pub(super) fn live_elsewhere(&self, slug: &str) -> usize {
        let here = self
            .live
            .range(RunKey::new(slug, "", i64::MIN)..)
            .take_while(|(k, _)| k.board == slug)
            .count();
        self.live.len() - here
    }
}

/// Say a pass's spawn failures; the last that was the dispatcher's own, if any.
fn spawn_failures(slug: &str, report: &dispatch::PassReport) -> Option<String> {
    let mut infra_failure = None;
    for f in &report.spawn_failed {
        let error = crate::text::clean(&f.error);
        if f.infrastructure {
            // Ours, not the task's: said loudly, not counted, retried later.
            error!(board = %slug, hermes_kanban_task = %f.task_id, hermes_kanban_run_id = f.run_id,
                   "the dispatcher cannot start workers: {error}; the task is requeued, not charged");
            infra_failure = Some(error);
        } else {
            warn!(board = %slug, hermes_kanban_task = %f.task_id, hermes_kanban_run_id = f.run_id, gave_up = f.gave_up, "spawn failed: {error}");
        }
    }
    infra_failure
}

/// While pressure (the host's or a pool's) or a pool's memory holds new workers, the boards
/// are looked at again this often: PSI's averages move continuously, so a waiting task starts
/// at most this long after they fall below the threshold.
pub(super) const PRESSURE_LOOK: Duration = Duration::from_millis(250);
