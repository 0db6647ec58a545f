//! The boards the daemon serves: every non-archived board of the Hermes root, as upstream's
//! gateway (or the one board `--db`/`--board` pins). Boards come and go while it runs (a
//! `boards/` or `board.json` event); one that cannot be opened is reported and skipped
//! until its file changes or five minutes pass (upstream's quarantine), the others go on.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::Daemon;
use crate::board::{Board, BoardError, BoardPaths, OpenMode};

/// Upstream's `CORRUPT_BOARD_RETRY_AFTER_SECONDS`.
const BROKEN_RETRY: Duration = Duration::from_secs(300);

/// One board the daemon serves.
pub(super) struct Slot {
    pub paths: BoardPaths,
    /// `None` until opened, and while the file cannot be opened (`broken` says why).
    pub board: Option<Board>,
    pub broken: Option<Broken>,
    /// Listed (not archived, not removed): passes run on it. A board no longer listed is
    /// kept while runs of it live (they are booked on it), then dropped.
    pub listed: bool,
    pub data_version: i64,
    /// The newest board event we have looked at (`Daemon::check_touched_runs`); `None`
    /// until the first full check, and again once the board is reopened.
    pub events_seen: Option<i64>,
    /// Something changed that a pass over this board should see.
    pub dirty: bool,
    /// Its last pass left ready tasks for a host-wide cap (0.22's `max_in_progress`): a
    /// worker ending on any board is a change it must see.
    pub host_capped: bool,
    /// After a failed pass: none before this instant (doubling, at most a minute).
    pub backoff: Option<(Instant, Duration)>,
    /// Why the last pass failed on our side; `None` once one succeeds.
    pub failing: Option<String>,
    /// Runs could not be booked for want of space on the board's filesystem (the error);
    /// `None` once a booking succeeds. Said in the service status until then.
    pub full: Option<String>,
    /// When a write to the board last failed for want of space (a booking, a pass): a worker
    /// that failed within `FULL_WINDOW` of it most likely failed writing its verdict, even
    /// if room came back before its run was booked.
    pub full_seen: Option<Instant>,
    /// When a booking last found the board locked (it waited `busy_timeout` for it): the
    /// board's other bookings wait for the retry instead of each waiting as long again on
    /// the loop's thread (`Slot::recently_locked`).
    pub locked_seen: Option<Instant>,
    /// Runs in a row booked as our failure to start them, found in the scope after the pass
    /// (Hermes' own code could not be started): the passes that start them succeed, so this,
    /// not the pass, keeps the backoff growing. Reset by any other end.
    pub start_failures: u32,
    /// `(device, inode)` of the board file while it is open: two boards that are one file
    /// (a hard link) would be served through two WALs.
    pub file_id: Option<(u64, u64)>,
}

/// How long after a write to a board failed for want of space a worker's failure is taken
/// for the disk's (`Slot::recently_full`): the worker's own write and ours race for the
/// room that comes back.
pub(super) const FULL_WINDOW: Duration = Duration::from_secs(10);

/// How long after a booking found a board locked its other bookings are left to the retry
/// (once a second): one wait for the lock per board and retry, not one per run — a worker
/// can hold its board's lock, and the loop must not pay for it per run it has to book. The
/// same after a booking could not ask systemd a unit's state (the bus gone or slow).
pub(super) const LOCKED_WINDOW: Duration = Duration::from_millis(900);

/// Why a board cannot be served, and the file as it was then.
#[derive(Debug, Clone)]
pub(super) struct Broken {
    pub why: String,
    fingerprint: Option<(i64, i64, u64)>,
    since: Instant,
    /// Tried again only once `BROKEN_RETRY` has passed, changed or not: a check that ran out
    /// of time costs the loop its budget on every try, and the board's writers change the
    /// file at will.
    patient: bool,
}

/// `(mtime, mtime_nsec, size)` of the board file: a change is worth another try. Not
/// through a link (the name is in a tree others write).
fn fingerprint(paths: &BoardPaths) -> Option<(i64, i64, u64)> {
    std::fs::symlink_metadata(&paths.db)
        .ok()
        .map(|m| (m.mtime(), m.mtime_nsec(), m.size()))
}

impl Slot {
    /// This board's key in the operators' holds.
    pub fn db_key(&self) -> String {
        crate::holds::board_key(&self.paths.db)
    }

    pub fn new(paths: BoardPaths) -> Slot {
        Slot {
            paths,
            board: None,
            broken: None,
            listed: true,
            data_version: 0,
            events_seen: None,
            dirty: true,
            host_capped: false,
            backoff: None,
            failing: None,
            full: None,
            full_seen: None,
            locked_seen: None,
            start_failures: 0,
            file_id: None,
        }
    }

    /// A write to the board failed for want of space within `FULL_WINDOW`.
    pub fn recently_full(&self) -> bool {
        self.full_seen.is_some_and(|t| t.elapsed() < FULL_WINDOW)
    }

    /// A booking found the board locked within `LOCKED_WINDOW`: the next is tried then.
    pub fn recently_locked(&self) -> bool {
        self.locked_seen
            .is_some_and(|t| t.elapsed() < LOCKED_WINDOW)
    }

    pub fn may_pass(&self) -> bool {
        self.listed
            && self.dirty
            && self
                .backoff
                .is_none_or(|(until, _)| Instant::now() >= until)
    }

    /// A failed pass: wait before the next, and say so until one succeeds.
    pub fn back_off(&mut self, why: &str) {
        let streak = Duration::from_secs(1 << self.start_failures.saturating_sub(1).min(6));
        let delay = self
            .backoff
            .map(|(_, d)| d * 2)
            .unwrap_or(Duration::from_secs(1))
            .max(streak)
            .min(Duration::from_secs(60));
        self.backoff = Some((Instant::now() + delay, delay));
        self.failing = Some(why.chars().take(200).collect());
        self.dirty = true;
    }
}

/// What opening a board came to.
pub(super) enum Opened {
    Now,
    Already,
    /// Locked by another writer, or quarantined: try again later.
    NotYet,
}

impl Daemon {
    /// The board set as the disk has it now; `true` when it changed (the watches follow).
    pub(super) fn refresh_boards(&mut self) -> bool {
        let mut listed = self.resolver.served_boards();
        // The default board first, then by name (`served_boards`' order): the cap keeps
        // the same boards from one look to the next.
        let over = listed.len().saturating_sub(self.cfg.max_boards);
        listed.truncate(self.cfg.max_boards);
        if over != self.boards_over {
            if over > 0 {
                warn!(max_boards = self.cfg.max_boards, over,
                      "{over} more boards in the Hermes root than max_boards = {} allows: not served (raise max_boards, or archive boards)",
                      self.cfg.max_boards);
            }
            self.boards_over = over;
        }
        let names: BTreeSet<String> = listed.iter().map(|p| p.slug.clone()).collect();
        let mut changed = false;
        for p in listed {
            match self.slots.get_mut(&p.slug) {
                Some(s) if !s.listed => {
                    info!(board = %p.slug, "board listed again; dispatching it");
                    s.listed = true;
                    s.dirty = true;
                    changed = true;
                }
                Some(_) => {}
                None => {
                    if !self.slots.is_empty() {
                        info!(board = %p.slug, db = %p.db.display(), "new board; dispatching it");
                    }
                    self.slots.insert(p.slug.clone(), Slot::new(p));
                    changed = true;
                }
            }
        }
        for (slug, s) in self.slots.iter_mut() {
            if s.listed && !names.contains(slug) {
                info!(board = %slug, "board archived or removed; no longer dispatched (its live runs are still booked)");
                s.listed = false;
                changed = true;
            }
        }
        let live = &self.live;
        let pending = &self.pending;
        self.slots.retain(|slug, s| {
            s.listed
                || live.keys().any(|k| k.board == *slug)
                || pending.keys().any(|k| k.board == *slug)
        });
        if changed && self.reconciled_once {
            self.update_status();
        }
        changed
    }

    /// Open board `slug` if it is not open yet. A lock is waited out later; anything else
    /// (a corrupt or foreign file) quarantines the board with the board's own message.
    pub(super) fn open_slot(&mut self, slug: &str) -> Opened {
        let busy = Duration::from_millis(self.cfg.busy_timeout_ms);
        let Some(s) = self.slots.get_mut(slug) else {
            return Opened::NotYet;
        };
        if s.board.is_some() {
            return Opened::Already;
        }
        if let Some(b) = &s.broken {
            if (b.patient || b.fingerprint == fingerprint(&s.paths))
                && b.since.elapsed() < BROKEN_RETRY
            {
                return Opened::NotYet;
            }
        }
        // The file, as its owner sees it, before it is opened: another board that is the
        // same file (a hard link) is refused — opened under a second name, SQLite would give
        // the one database a second WAL.
        let file_id = crate::board::Owner::of_tree(&s.paths.owner_dir)
            .ok()
            .and_then(|owner| {
                crate::safe_fs::as_user(&owner, || std::fs::symlink_metadata(&s.paths.db)).ok()
            })
            .and_then(|m| m.ok())
            .map(|m| (m.dev(), m.ino()));
        let twin = file_id.and_then(|id| {
            self.slots
                .iter()
                .find(|(other, o)| {
                    other.as_str() != slug && o.board.is_some() && o.file_id == Some(id)
                })
                .map(|(other, _)| other.clone())
        });
        let Some(s) = self.slots.get_mut(slug) else {
            return Opened::NotYet;
        };
        let opened = match twin {
            Some(other) => Err(BoardError::Invalid(format!(
                "{} is the same file as board {other}'s (a hard link): it is served once, as {other}",
                s.paths.db.display()
            ))),
            None => Board::open_waiting(&s.paths, OpenMode::CreateIfMissing, busy),
        };
        // A board made by this open: its file is known now.
        let file_id = file_id.or_else(|| {
            let b = opened.as_ref().ok()?;
            crate::safe_fs::as_user(b.owner(), || std::fs::symlink_metadata(&b.paths().db))
                .ok()?
                .ok()
                .map(|m| (m.dev(), m.ino()))
        });
        match opened {
            Ok(b) => {
                s.file_id = file_id;
                s.data_version = b.data_version().unwrap_or(0);
                s.events_seen = None;
                if s.broken.take().is_some() {
                    info!(board = %slug, "board can be opened again; dispatching it");
                }
                s.board = Some(b);
                s.dirty = true;
                Opened::Now
            }
            Err(BoardError::Locked { detail, .. }) => {
                warn!(board = %slug, "{} is locked by another writer ({detail}); will retry", s.paths.db.display());
                s.back_off(&format!("board {slug} locked"));
                Opened::NotYet
            }
            Err(e) => {
                let why = format!("{e}");
                let patient = matches!(e, BoardError::Unchecked { .. });
                let until = if patient {
                    "for five minutes"
                } else {
                    "until the file changes"
                };
                error!(board = %slug, "cannot open board {}: {why}; skipping it {until} (other boards go on)",
                       s.paths.db.display());
                s.broken = Some(Broken {
                    why,
                    fingerprint: fingerprint(&s.paths),
                    since: Instant::now(),
                    patient,
                });
                self.update_status();
                Opened::NotYet
            }
        }
    }

    /// Open every board that is not open yet. The caller reconciles them all next, before
    /// any pass (a board opened by a pass is reconciled there).
    pub(super) fn open_boards(&mut self) {
        // The default board first: of two boards that are one file, the first opened is
        // served, and a board's name must not take that from the default one.
        let mut slugs: Vec<String> = self.slots.keys().cloned().collect();
        slugs.sort_by_key(|s| s != crate::board::DEFAULT_BOARD);
        for slug in slugs {
            self.open_slot(&slug);
        }
    }

    /// The board of `slug`, when it is open.
    pub(super) fn board(&self, slug: &str) -> Option<&Board> {
        self.slots.get(slug).and_then(|s| s.board.as_ref())
    }
}
