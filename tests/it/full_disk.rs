//! Full disks: the board's filesystem and the state directory's filled up (small tmpfs
//! mounts made for the test, then filled) while workers end.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::harness::{mgr_bin, wait_for};
use crate::rig::{journal, sh, Dispatcher, SERVICE};
use crate::systemd_test;

/// A tmpfs of `size` mounted on `dir` with what `dir` held copied in; unmounted on drop.
pub(crate) struct SmallFs {
    dir: PathBuf,
    filler: PathBuf,
}

impl SmallFs {
    pub(crate) fn over(dir: &Path, size: &str, owner: Option<u32>) -> SmallFs {
        let aside = PathBuf::from(format!("{}.aside", dir.display()));
        sh(&format!(
            "rm -rf {a} && cp -a {d} {a} && mount -t tmpfs -o size={size},mode=0755 tmpfs {d} && cp -a {a}/. {d}/ && rm -rf {a}",
            a = aside.display(),
            d = dir.display()
        ));
        if let Some(uid) = owner {
            std::os::unix::fs::chown(dir, Some(uid), Some(uid)).unwrap();
        }
        SmallFs {
            dir: dir.to_path_buf(),
            filler: dir.join(".filler"),
        }
    }

    /// Fill it to the last byte (root's file: the worker user cannot free it).
    pub(crate) fn fill(&self) {
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=64k", "status=none"])
            .arg(format!("of={}", self.filler.display()))
            .status();
        // And the last partial block.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "head -c 65536 /dev/zero >> {} 2>/dev/null",
                self.filler.display()
            ))
            .status();
    }

    pub(crate) fn free(&self) {
        let _ = std::fs::remove_file(&self.filler);
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// A worker that waits for `go` beside the board, then does what its task's body says:
/// `complete` (the board's own command books its verdict) or `exit N`.
pub(crate) fn gated_stub() -> String {
    format!(
        r#"#!/bin/sh
m={m}
echo "$TMPDIR" > tmpdir
while [ ! -e "$(dirname "$HERMES_KANBAN_DB")/go" ]; do sleep 0.05; done
kind=$($m --db "$HERMES_KANBAN_DB" show "$HERMES_KANBAN_TASK" | sed -n 's/^  do: //p')
case "$kind" in
  complete) exec $m --db "$HERMES_KANBAN_DB" complete "$HERMES_KANBAN_TASK" --summary gated ;;
  complete-or-wait) $m --db "$HERMES_KANBAN_DB" complete "$HERMES_KANBAN_TASK" --summary gated && exit 0
    : > verdict-failed
    while [ ! -e "$(dirname "$HERMES_KANBAN_DB")/go2" ]; do sleep 0.05; done; exit 1 ;;
  exit*) exit ${{kind#exit }} ;;
esac
exit 9
"#,
        m = mgr_bin().display()
    )
}

pub(crate) fn add(d: &Dispatcher, title: &str, what: &str) -> String {
    d.rig
        .board()
        .create(&hermes_mgr::board::NewTask {
            title: title.into(),
            body: Some(format!("do: {what}")),
            assignee: Some("default".into()),
            ..Default::default()
        })
        .unwrap()
}

/// The board's WAL emptied (checkpointed and truncated): SQLite reuses a WAL's frames once
/// checkpointed, so a write could still fit in it; from an empty one, every write needs new
/// blocks. Its path.
fn empty_wal(d: &Dispatcher) -> PathBuf {
    let c = rusqlite::Connection::open(&d.rig.db).unwrap();
    let wal = PathBuf::from(format!("{}-wal", d.rig.db.display()));
    wait_for("the WAL emptied", Duration::from_secs(10), || {
        let busy: i64 = c
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .unwrap();
        (busy == 0 && std::fs::metadata(&wal).is_ok_and(|m| m.len() == 0)).then_some(())
    });
    wal
}

fn status_text() -> String {
    crate::rig::systemctl_show(SERVICE, "StatusText")
}

/// Outcomes and errors of a task's runs, in order.
pub(crate) fn runs(d: &Dispatcher, id: &str) -> Vec<(String, String)> {
    d.rig
        .board()
        .runs(id)
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.outcome.clone().unwrap_or_default(),
                r.error.clone().unwrap_or_default(),
            )
        })
        .collect()
}

systemd_test!(
    a_full_board_disk_charges_no_task_and_is_said_until_there_is_room,
    {
        let d = Dispatcher::with_stub(&gated_stub(), "tick_seconds = 1\nmax_spawn = 4");
        let fs = SmallFs::over(&d.rig.dir, "8m", Some(d.rig.uid));
        d.install();
        let ids: Vec<String> = (0..3)
            .map(|i| add(&d, &format!("full {i}"), "complete"))
            .collect();
        d.start();
        let b = d.rig.board();
        // Each worker started and its start written down (its pid), before the disk fills.
        wait_for("three workers recorded", Duration::from_secs(20), || {
            ids.iter()
                .all(|id| b.require_task(id).unwrap().worker_pid.is_some())
                .then_some(())
        });
        let wal = empty_wal(&d);
        fs.fill();
        let wal_len = std::fs::metadata(&wal).unwrap().len();
        assert_eq!(
            wal_len, 0,
            "the board was written between the checkpoint and the fill"
        );
        // No data, only a name: even a full filesystem takes it.
        sh(&format!("touch {}", d.rig.dir.join("go").display()));
        // Each worker's own verdict fails (the board cannot be written), and so does the
        // dispatcher's booking of its exit: said once, loudly, and in the status.
        let said = wait_for(
            "the status says the disk is full",
            Duration::from_secs(20),
            || Some(status_text()).filter(|s| s.contains("FULL")),
        );
        assert!(
            said.contains("FAILING to book runs") && said.contains("kept until there is room"),
            "{said}"
        );
        assert!(
            journal(SERVICE).contains("cannot book runs: the board's filesystem is full"),
            "{}",
            journal(SERVICE)
        );
        // Every worker has ended (its supervisor's exit record is there) before room is made.
        wait_for("three exit records", Duration::from_secs(20), || {
            ids.iter()
                .all(|id| {
                    let run = b.require_task(id).unwrap().current_run_id.unwrap();
                    hermes_mgr::state_dir::record_path(
                        Path::new("/run/hermes-mgr-test"),
                        "default",
                        id,
                        run,
                    )
                    .exists()
                })
                .then_some(())
        });
        // Nothing was booked meanwhile.
        for id in &ids {
            assert_eq!(b.require_task(id).unwrap().status.as_str(), "running");
        }
        fs.free();
        // Room again: each run is booked once, not charged (the disk failed the worker, not
        // its task), the task runs again, and its next worker's verdict is booked.
        for id in &ids {
            let t = d.wait_task("done", |t| t.status.as_str() == "done", id);
            let r = runs(&d, id);
            assert_eq!(r.len(), 2, "{id}: {r:?}");
            assert_eq!(r[0].0, "lost", "{id}: {r:?}");
            assert!(
                r[0].1.contains("board's filesystem was full"),
                "{id}: {r:?}"
            );
            assert_eq!(r[1].0, "completed", "{id}: {r:?}");
            assert_eq!(t.consecutive_failures, 0, "{id} was charged");
        }
        wait_for("the status clear", Duration::from_secs(10), || {
            Some(status_text()).filter(|s| !s.contains("FULL"))
        });
        assert_eq!(b.integrity_check().unwrap(), "ok");
        d.stop();
    }
);

systemd_test!(
    a_full_state_directory_keeps_each_exit_until_it_can_be_recorded,
    {
        let d = Dispatcher::with_stub(&gated_stub(), "tick_seconds = 1\nmax_spawn = 4");
        let state = Path::new("/run/hermes-mgr-test");
        std::fs::create_dir_all(state).unwrap();
        let fs = SmallFs::over(state, "256k", None);
        d.install();
        let limited = add(&d, "rate limited", "exit 75");
        let done = add(&d, "complete", "complete");
        let crashed = add(&d, "crash", "exit 3");
        d.start();
        for id in [&limited, &done, &crashed] {
            d.wait_running(id, 0);
        }
        fs.fill();
        sh(&format!("touch {}", d.rig.dir.join("go").display()));
        // The service says what is full, and what that holds.
        let said = wait_for("the status says so", Duration::from_secs(20), || {
            Some(status_text()).filter(|s| s.contains("FULL"))
        });
        assert!(
            said.contains(
                "FAILING to record exits, the state directory /run/hermes-mgr-test is FULL"
            ),
            "{said}"
        );
        // No new worker while no record could be written: a task made now waits, unclaimed.
        let waiting = add(&d, "made while the state directory is full", "complete");
        let said = wait_for("the status says it holds", Duration::from_secs(20), || {
            Some(status_text()).filter(|s| s.contains("HOLDING new workers"))
        });
        assert!(
            said.contains("the state directory /run/hermes-mgr-test is FULL"),
            "{said}"
        );
        assert_eq!(d.task(&waiting).status.as_str(), "ready");
        // The workers end; their supervisors cannot write the exit records and keep them: the
        // runs stay open (their scopes live), nothing is guessed.
        wait_for("the supervisors said so", Duration::from_secs(20), || {
            let said = sh("journalctl -o cat --no-pager -t hermes-mgr-supervise -t hermes-worker");
            (said.matches("kept, and written once there is room").count() >= 2).then_some(())
        });
        let b = d.rig.board();
        // The worker that booked its own verdict is done whatever the supervisor could write.
        assert_eq!(b.require_task(&limited).unwrap().status.as_str(), "running");
        assert_eq!(b.require_task(&crashed).unwrap().status.as_str(), "running");
        fs.free();
        d.wait_task("requeued", |t| t.status.as_str() != "running", &limited);
        d.wait_task("requeued", |t| t.status.as_str() != "running", &crashed);
        d.wait_task("done", |t| t.status.as_str() == "done", &done);
        // Room again: the waiting task runs.
        d.wait_task("done", |t| t.status.as_str() == "done", &waiting);
        let (l, c) = (runs(&d, &limited), runs(&d, &crashed));
        // As their exit statuses say: rate-limited (not charged), and a crash with its code —
        // not "ended without an exit status".
        assert_eq!(l[0].0, "rate_limited", "{l:?}");
        assert_eq!(c[0].0, "crashed", "{c:?}");
        assert!(c[0].1.contains("exited with code 3"), "{c:?}");
        assert_eq!(b.require_task(&limited).unwrap().consecutive_failures, 0);
        d.stop();
        drop(fs);
    }
);

// Found by the soak (15,000 tasks): a worker whose verdict failed while the board's
// filesystem was full, and that ended only once there was room again, was charged a crash —
// the dispatcher's own booking then succeeded, so nothing said the disk had been full.
systemd_test!(
    a_worker_failing_just_after_the_board_had_room_again_is_not_charged,
    {
        let d = Dispatcher::with_stub(&gated_stub(), "tick_seconds = 1\nmax_spawn = 4");
        let fs = SmallFs::over(&d.rig.dir, "8m", Some(d.rig.uid));
        d.install();
        let first = add(&d, "fails at once", "complete");
        let later = add(&d, "fails once there is room", "complete-or-wait");
        d.start();
        let b = d.rig.board();
        wait_for("both workers recorded", Duration::from_secs(20), || {
            [&first, &later]
                .iter()
                .all(|id| b.require_task(id).unwrap().worker_pid.is_some())
                .then_some(())
        });
        empty_wal(&d);
        fs.fill();
        sh(&format!("touch {}", d.rig.dir.join("go").display()));
        wait_for(
            "the status says the disk is full",
            Duration::from_secs(20),
            || Some(status_text()).filter(|s| s.contains("FULL")),
        );
        // The second worker's verdict failed too before there is room again.
        let ws = d.rig.dir.join("kanban/workspaces").join(&later);
        wait_for("the second verdict failed", Duration::from_secs(20), || {
            ws.join("verdict-failed").exists().then_some(())
        });
        fs.free();
        d.wait_task(
            "the first requeued",
            |t| t.status.as_str() != "running",
            &first,
        );
        // Now the second worker ends, its verdict lost to the full disk a moment ago.
        sh(&format!("touch {}", d.rig.dir.join("go2").display()));
        for id in [&first, &later] {
            d.wait_task("done", |t| t.status.as_str() == "done", id);
            let r = runs(&d, id);
            assert_eq!(r[0].0, "lost", "{id}: {r:?}");
            assert!(!r.iter().any(|(o, _)| o == "crashed"), "{id}: {r:?}");
        }
        d.stop();
    }
);

// Found by the 100,000-task soak: with `/run` full as well, a worker whose verdict failed on
// the full board kept its exit record until `/run` had room — by then the board had room
// too, nothing of ours had failed to write to it, and the run was charged a crash. The
// supervisor now says in the record that the board's filesystem was full when the worker
// ended.
systemd_test!(
    a_worker_failing_on_a_full_board_is_not_charged_when_it_is_booked_after_room_came_back,
    {
        let d = Dispatcher::with_stub(&gated_stub(), "tick_seconds = 3600");
        let board_fs = SmallFs::over(&d.rig.dir, "8m", Some(d.rig.uid));
        let state = Path::new("/run/hermes-mgr-test");
        std::fs::create_dir_all(state).unwrap();
        let state_fs = SmallFs::over(state, "256k", None);
        d.install();
        let id = add(&d, "fails on the full board", "complete");
        d.start();
        let b = d.rig.board();
        wait_for("the worker recorded", Duration::from_secs(20), || {
            b.require_task(&id)
                .unwrap()
                .worker_pid
                .is_some()
                .then_some(())
        });
        empty_wal(&d);
        board_fs.fill();
        state_fs.fill();
        sh(&format!("touch {}", d.rig.dir.join("go").display()));
        wait_for(
            "the supervisor kept the record",
            Duration::from_secs(20),
            || {
                let said =
                    sh("journalctl -o cat --no-pager -t hermes-mgr-supervise -t hermes-worker");
                said.contains("kept, and written once there is room")
                    .then_some(())
            },
        );
        // Room on the board first: the record, and so the booking, come after.
        board_fs.free();
        state_fs.free();
        d.wait_task("done", |t| t.status.as_str() == "done", &id);
        let r = runs(&d, &id);
        assert_eq!(r[0].0, "lost", "{r:?}");
        assert!(r[0].1.contains("filesystem was full"), "{r:?}");
        assert_eq!(r.len(), 2, "{r:?}");
        d.stop();
        drop(state_fs);
        drop(board_fs);
    }
);
