//! Booking: a supervisor reaped or a scope removed, the facts of the run gathered, its end
//! decided (`outcome`) and written (`Board::end_run`), once; what could not be written yet
//! retried.

use super::*;

/// A run's scope as the kernel shows it (`Daemon::scope_from_kernel`).
enum Kernel {
    Says(Scope),
    /// Nothing in it but what ends by itself (its supervisor), and systemd has not
    /// removed it yet: the run is over, its task's next run waits for the removal.
    Ending,
    Unknown,
}

/// A run's TMPDIR, kept until its scope is gone: removed then if its supervisor could not.
pub(super) struct RunTmpdir {
    pub dir: PathBuf,
    pub owner: crate::safe_fs::Owner,
    /// Its supervisor's note of it (`record::TmpdirNote`), removed with it.
    pub note: PathBuf,
}

impl Daemon {
    /// Track a worker that we started. Its supervisor is our child: `reap` collects it.
    pub(super) fn track_started(&mut self, board: &str, s: Started) {
        let key = RunKey::new(board, &s.task, s.run_id);
        if let Some((dir, owner)) = s.tmpdir {
            let note =
                crate::state_dir::tmpdir_note_path(&self.cfg.state_dir, board, &s.task, s.run_id);
            self.tmpdirs
                .insert(s.unit.clone(), RunTmpdir { dir, owner, note });
        }
        info!(board = %board, hermes_kanban_task = %s.task, hermes_kanban_run_id = s.run_id, unit = %s.unit, object_systemd_unit = %s.unit,
              pid = s.worker_pid, "worker started");
        self.supervisors.insert(s.supervisor_pid, key.clone());
        self.live.insert(
            key,
            Live {
                unit: s.unit,
                lock: s.lock,
                max_runtime: s.max_runtime,
                closed_since: None,
                watched: true,
                stale: None,
                profile: s.profile,
                board_full: false,
                spawned: Some(Spawned {
                    supervisor: s.supervisor_pid,
                    cgroup: s.cgroup,
                }),
            },
        );
    }

    /// SIGCHLD: collect every supervisor that exited (no zombie is left), and book its run
    /// (its exit record's inotify event usually came first; booking twice changes nothing).
    pub(super) async fn reap(&mut self) {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(st) => {
                    let Some(pid) = st.pid() else { continue };
                    if let Some(key) = self.supervisors.remove(&(pid.as_raw() as u32)) {
                        self.book(&key).await;
                    }
                }
            }
        }
    }

    pub(super) async fn on_unit_removed(&mut self, unit: &str) {
        if self.on_decompose_unit_removed(unit) {
            return;
        }
        if let Some(key) = self.live.of_unit(unit).cloned() {
            self.book_removed(&key, true).await;
        }
        self.scope_removed(unit);
        self.tmpdir_gone_with(unit).await;
    }

    /// The one place that books a run: gather the facts (the supervisor's exit record, the
    /// scope as systemd and the kernel see it), let `outcome::decide` say how the run
    /// ended, and record that. A verdict the worker wrote itself wins: the board then
    /// refuses the booking (`Ok(None)`). A fact we cannot read (the bus is down) is retried.
    pub(super) async fn book(&mut self, key: &RunKey) {
        self.book_removed(key, false).await
    }

    /// `book`, `removed`: on systemd's word that it removed the run's scope (`UnitRemoved`).
    async fn book_removed(&mut self, key: &RunKey, removed: bool) {
        let (slug, task, run) = (&key.board, &key.task, key.run);
        let Some(live) = self.live.get(key).cloned() else {
            return;
        };
        // A board or a bus that just failed a booking fails the others too: they wait for the
        // retry rather than each paying the wait (the lock's, a call's timeout) on the loop.
        let bus_failing = self
            .bus_failed
            .is_some_and(|t| t.elapsed() < boards::LOCKED_WINDOW);
        if bus_failing || self.slots.get(slug).is_some_and(Slot::recently_locked) {
            self.pending.insert(key.clone(), None);
            return;
        }
        let state = self.cfg.state_dir.clone();
        let read = || match crate::state_dir::read_record(&state, slug, task, run) {
            Ok(s) => s,
            Err(e) => {
                warn!(board = %slug, hermes_kanban_task = %task, hermes_kanban_run_id = run, "cannot read the exit record: {e}");
                None
            }
        };
        let mut record = read();
        // A worker stopped from outside (a stop, a shutdown: `sigterm_received`) is booked
        // with systemd's word on its scope, as it always was; one that ended by itself, from
        // the kernel's.
        let known = match record.as_ref().filter(|r| !r.sigterm_received) {
            Some(_) => self.scope_from_kernel(&live, removed),
            None => Kernel::Unknown,
        };
        let (scope, ending) = match known {
            Kernel::Says(s) => (s, false),
            Kernel::Ending => (Scope::Gone, true),
            Kernel::Unknown => match self.scope_from_systemd(key, &live).await {
                Some(s) => (s, false),
                None => return,
            },
        };
        // The supervisor writes its record before it ends and the scope empties: one seen
        // empty or gone may have it now (the supervisor finished between the two looks).
        if record.is_none() && scope != Scope::Live {
            record = read();
        }
        let facts = outcome::Facts {
            unit: &live.unit,
            record: record.as_ref(),
            scope,
            watched: live.watched,
            operator_stop: None,
            max_runtime: live.max_runtime,
            stale: live.stale.as_ref(),
            hermes: crate::spawn::hermes_generation(&self.cfg),
            board_full: live.board_full
                || self
                    .slots
                    .get(slug.as_str())
                    .is_some_and(|s| s.recently_full()),
        };
        // Still running (a UnitRemoved for a name we reuse, a stray event): nothing to do.
        let Decision::Ended(end) = outcome::decide(&facts) else {
            return;
        };
        let Some(board) = self.board(slug) else {
            warn!(board = %slug, hermes_kanban_task = %task, hermes_kanban_run_id = run, "board not open; will retry booking the run");
            self.pending.insert(key.clone(), None);
            return;
        };
        let cost = record
            .as_ref()
            .and_then(|r| r.usage.as_ref())
            .and_then(|u| serde_json::to_value(u).ok());
        let written = crate::state_dir::record_written(&self.cfg.state_dir, slug, task, run);
        match board.end_run_costed(task, run, &end, dispatch::rules(&self.cfg), cost.as_ref()) {
            Ok(result) => {
                // The worker's own verdict, when it wrote one, is the run's outcome.
                let outcome = match &result {
                    Some(r) => r.outcome.clone(),
                    None => board
                        .run(run)
                        .ok()
                        .flatten()
                        .and_then(|r| r.outcome)
                        .unwrap_or_default(),
                };
                let gave_up = result.as_ref().is_some_and(|r| r.gave_up);
                self.count_booking(key, &outcome, gave_up, record.as_ref(), written);
                match &result {
                    Some(r) => {
                        info!(board = %slug, hermes_kanban_task = %task, hermes_kanban_run_id = run, unit = %live.unit,
                                     object_systemd_unit = %live.unit, status = %r.status, failures = r.failures,
                                     gave_up = r.gave_up, "run ended: {}", crate::text::clean(end.error()))
                    }
                    None => {
                        info!(board = %slug, hermes_kanban_task = %task, hermes_kanban_run_id = run, unit = %live.unit,
                                  object_systemd_unit = %live.unit, "run ended; the worker had recorded its own verdict")
                    }
                }
                self.after_booking(key, &live, scope, &end).await;
                // A scope still there (stopped just now, or over and not yet removed by
                // systemd) holds the task's next run back until systemd removes it.
                if ending || scope == Scope::Live {
                    self.ending
                        .insert((slug.clone(), task.clone()), live.unit.clone());
                }
            }
            Err(BoardError::Locked { .. }) => {
                warn!(board = %slug, hermes_kanban_task = %task, hermes_kanban_run_id = run, "board locked; will retry booking the run");
                self.pending.insert(key.clone(), None);
                if let Some(s) = self.slots.get_mut(slug) {
                    s.locked_seen = Some(Instant::now());
                }
            }
            Err(e) if e.is_full() => self.on_board_full(key, &e),
            Err(e) => {
                warn!(board = %slug, hermes_kanban_task = %task, hermes_kanban_run_id = run, "cannot book the run: {e}; will retry");
                self.pending.insert(key.clone(), None);
            }
        }
    }

    /// What is left in the scope of a run whose exit record is in, asked of the kernel
    /// rather than of systemd (a round trip to PID 1 per run): a cgroup systemd removed is
    /// `Gone`; any process but its supervisor (what the worker left: `after_booking` stops
    /// it) `Live`; nothing, or its supervisor alone (it ends by itself once it has written
    /// the record and cleaned up), `Ending`: over, systemd ends the scope next (`removed`:
    /// it did). `Unknown` when the kernel cannot say: a run this daemon did not start, or
    /// a cgroup that cannot be read.
    fn scope_from_kernel(&self, live: &Live, removed: bool) -> Kernel {
        use crate::liveness::Holds;
        let Some(sp) = live.spawned.as_ref() else {
            return Kernel::Unknown;
        };
        // Reaped, its PID may be anyone's: then every process left is a leftover.
        let ours = if self.supervisors.contains_key(&sp.supervisor) {
            sp.supervisor
        } else {
            0
        };
        match crate::liveness::cgroup_holds(&sp.cgroup, ours) {
            Some(Holds::Removed) => Kernel::Says(Scope::Gone),
            Some(Holds::Nothing) if removed => Kernel::Says(Scope::Gone),
            Some(Holds::Nothing | Holds::Only) => Kernel::Ending,
            Some(Holds::Others) => Kernel::Says(Scope::Live),
            None => Kernel::Unknown,
        }
    }

    /// The run's scope as systemd sees it (and its cgroup, for a husk); `None` when the bus
    /// failed: the run is left pending, and the others wait for the retry.
    async fn scope_from_systemd(&mut self, key: &RunKey, live: &Live) -> Option<Scope> {
        Some(match self.sd.active_state(&live.unit).await {
            Ok(Some(s)) if s.is_live() && self.husk(&live.unit, &live.profile).await => {
                Scope::Empty
            }
            Ok(Some(s)) if s.is_live() => {
                self.bus_failed = None;
                Scope::Live
            }
            Ok(_) => {
                self.bus_failed = None;
                Scope::Gone
            }
            Err(e) => {
                warn!(unit = %live.unit, "unit state unknown ({e}); retrying");
                self.pending.insert(key.clone(), None);
                self.bus_failed = Some(Instant::now());
                return None;
            }
        })
    }

    /// What follows a booking: the run forgotten, its files and leftovers gone, its board
    /// looked at again.
    async fn after_booking(&mut self, key: &RunKey, live: &Live, scope: Scope, end: &RunEnd) {
        let (slug, task, run) = (&key.board, &key.task, key.run);
        self.pending.remove(key);
        self.live.remove(key);
        self.room_again(slug);
        crate::state_dir::forget_run(&self.cfg.state_dir, slug, task, run);
        // Leftovers of the worker (daemonized grandchildren) go with the run.
        if scope == Scope::Live {
            if let Err(e) = self.sd.stop(&live.unit).await {
                warn!(unit = %live.unit, "stop leftovers: {e}");
            }
        }
        if let Some(s) = self.slots.get_mut(slug) {
            s.dirty = true;
            // Found in the scope after the pass (Hermes' own code could not be
            // started): ours, said loudly, and the board backs off as after a pass
            // that failed to start a worker.
            if let crate::outcome::RunEnd::Infrastructure { error: why } = end {
                error!(board = %slug, hermes_kanban_task = %task, hermes_kanban_run_id = run,
                       "the dispatcher cannot start workers: {}; the task is requeued, not charged", crate::text::clean(why));
                s.start_failures = s.start_failures.saturating_add(1);
                s.back_off(why);
            } else {
                s.start_failures = 0;
            }
        }
    }

    /// Systemd removed the scope `unit` (or a reconcile no longer finds it live): a task
    /// whose next run waited for that may have it now, and a pool that counted the scope
    /// (its slice's cgroups are the kernel's count) has room again.
    pub(super) fn scope_removed(&mut self, unit: &str) {
        let Some(k) = self
            .ending
            .iter()
            .find(|(_, u)| *u == unit)
            .map(|(k, _)| k.clone())
        else {
            return;
        };
        self.ending.remove(&k);
        if let Some(s) = self.slots.get_mut(&k.0) {
            s.dirty = true;
        }
        for s in self.slots.values_mut().filter(|s| s.host_capped) {
            s.host_capped = false;
            s.dirty = true;
        }
    }

    /// The tasks of board `slug` whose next run waits for their last scope's removal.
    pub(super) fn ending_on(&self, slug: &str) -> std::collections::HashSet<String> {
        self.ending
            .range((slug.to_string(), String::new())..)
            .take_while(|((b, _), _)| b == slug)
            .map(|((_, t), _)| t.clone())
            .collect()
    }

    /// A run we did not start (adopted, or found ended, after a restart): its TMPDIR, from
    /// its supervisor's note, so that it is removed should the supervisor not have.
    pub(super) fn learn_tmpdir(&mut self, key: &RunKey, unit: &str) {
        if self.tmpdirs.contains_key(unit) {
            return;
        }
        let state = &self.cfg.state_dir;
        let note = crate::state_dir::tmpdir_note_path(state, &key.board, &key.task, key.run);
        if let Some(n) = crate::state_dir::read_tmpdir_note(&note) {
            let owner = crate::safe_fs::Owner::new(n.uid, n.gid);
            let t = RunTmpdir {
                dir: n.dir,
                owner,
                note,
            };
            self.tmpdirs.insert(unit.to_string(), t);
        }
    }

    /// Once the scope `unit` is gone, and with it its supervisor, a TMPDIR it left (it was
    /// killed before it could remove it) is removed, as the worker user whose it is. Only for
    /// a booked run, and only once systemd says the scope is gone: a `UnitRemoved` can be
    /// stray (a name looked up and unloaded while the scope starts). What is in it is the
    /// worker's — any number of files, any depth — so it is removed by a one-shot of its own
    /// (`rm`, in the workers' slice, with its runtime limit), never on the loop's thread.
    pub(super) async fn tmpdir_gone_with(&mut self, unit: &str) {
        let Some(t) = self.tmpdirs.get(unit) else {
            return;
        };
        if self.live.of_unit(unit).is_some() {
            return;
        }
        // The common end: the supervisor removed it. No question to systemd then.
        if std::fs::symlink_metadata(&t.dir).is_err() {
            let _ = std::fs::remove_file(&t.note);
            self.tmpdirs.remove(unit);
            return;
        }
        match self.sd.active_state(unit).await {
            Ok(Some(s)) if s.is_live() => return,
            Err(_) => return,
            _ => {}
        }
        let Some(RunTmpdir { dir, owner, note }) = self.tmpdirs.remove(unit) else {
            return;
        };
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let service = crate::names::tmpdir_service(&name);
        let cmd = crate::systemd::Command {
            // `rm` removes a link in the directory's place, never what it points to, and
            // stays on the directory's filesystem.
            argv: vec![
                "/bin/rm".into(),
                "-rf".into(),
                "--one-file-system".into(),
                "--".into(),
                dir.to_string_lossy().into_owned(),
            ],
            user: owner.uid.to_string(),
            env: Vec::new(),
            env_file: None,
            slice: self.cfg.slice.clone(),
            description: format!("Remove the TMPDIR {unit} left"),
            runtime_max: Duration::from_secs(300),
        };
        let timeout = Duration::from_secs(self.cfg.start_timeout_seconds);
        match self.sd.run_command(&service, &cmd, timeout).await {
            Ok(()) => {
                // The note has served: the one-shot's own fate is systemd's to tell.
                let _ = std::fs::remove_file(&note);
                info!(unit = %unit, object_systemd_unit = %unit, tmpdir = %dir.display(), cleanup = %service,
                      "removing the run's TMPDIR its supervisor left (it was killed first)")
            }
            Err(e) => {
                warn!(unit = %unit, tmpdir = %dir.display(), "cannot remove the run's TMPDIR yet: {e}; tried again at the next reconcile");
                let t = RunTmpdir { dir, owner, note };
                self.tmpdirs.insert(unit.to_string(), t);
            }
        }
    }

    /// A booking failed for want of space: the run is kept (its exit record stays until it
    /// is booked) and retried; said once, loudly, and in the service status until a booking
    /// on that board succeeds.
    fn on_board_full(&mut self, key: &RunKey, e: &BoardError) {
        let (slug, task, run) = (&key.board, &key.task, key.run);
        if let Some(l) = self.live.get_mut(key) {
            l.board_full = true;
        }
        if let Some(s) = self.slots.get_mut(slug) {
            s.full_seen = Some(Instant::now());
            if s.full.is_none() {
                error!(board = %slug, hermes_kanban_task = %task, hermes_kanban_run_id = run,
                       "cannot book runs: the board's filesystem is full ({e}); every ended run is kept and booked once there is room");
                s.full = Some(crate::text::clean(&e.to_string()));
                self.update_status();
            }
        }
        self.pending.insert(key.clone(), None);
    }

    /// A run of `slug` was booked: a host-wide cap has room again (the boards it held see
    /// it now), and so has the board's filesystem, if it was full.
    fn room_again(&mut self, slug: &str) {
        for s in self.slots.values_mut().filter(|s| s.host_capped) {
            s.host_capped = false;
            s.dirty = true;
        }
        if self
            .slots
            .get_mut(slug)
            .and_then(|s| s.full.take())
            .is_some()
        {
            info!(board = %slug, "the board's filesystem has room again: runs are booked");
            self.update_status();
        }
    }

    pub(super) async fn retry_pending(&mut self) {
        for (key, decided) in std::mem::take(&mut self.pending) {
            match decided {
                None => self.book(&key).await,
                Some(end) => {
                    let (slug, task, run) = (&key.board, &key.task, key.run);
                    let booked = self
                        .board(slug)
                        .map(|b| b.end_run(task, run, &end, dispatch::rules(&self.cfg)));
                    match booked {
                        Some(Ok(r)) => {
                            let (outcome, gave_up) =
                                r.map_or((String::new(), false), |r| (r.outcome, r.gave_up));
                            self.count_booking(&key, &outcome, gave_up, None, None);
                            crate::state_dir::forget_run(&self.cfg.state_dir, slug, task, run);
                            info!(board = %slug, hermes_kanban_task = %task, hermes_kanban_run_id = run, "recorded: {}", crate::text::clean(end.error()));
                            if let Some(s) = self.slots.get_mut(slug) {
                                s.dirty = true;
                            }
                        }
                        _ => {
                            self.pending.insert(key, Some(end));
                        }
                    }
                }
            }
        }
    }
}
