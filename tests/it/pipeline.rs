//! The life of a run through the daemon's loop: reconcile's rules one by one, runs closed on
//! the board under a live worker, and the bus going away in the middle of it all. The
//! service runs with `tick_seconds = 3600`: whatever these tests see happened because an
//! event was handled, never because the safety net came round.

use std::time::Duration;

use crate::harness::wait_for;
use crate::rig::{alive, journal, sh, systemctl_show, Dispatcher, SERVICE};
use crate::systemd_test;

fn worker_pid(d: &Dispatcher, id: &str, run: i64) -> u32 {
    let ws = d.rig.dir.join("kanban/workspaces").join(id);
    let ready = d.rig.wait_file(&ws.join(format!("ready-{run}")));
    ready
        .lines()
        .find_map(|l| l.strip_prefix("pid="))
        .unwrap()
        .parse()
        .unwrap()
}

fn kill_daemon(d: &Dispatcher) {
    sh(&format!("systemctl kill --signal=KILL {SERVICE}"));
    wait_for("the daemon dead", Duration::from_secs(10), || {
        systemctl_show(SERVICE, "ActiveState")
            .contains("=failed")
            .then_some(())
    });
    sh(&format!("systemctl reset-failed {SERVICE}"));
    let _ = &d.rig;
}

systemd_test!(
    a_crash_while_the_bus_is_gone_and_the_next_task_are_both_booked,
    {
        // The old daemon booked the crash in its reconnect reconcile, started the new task's
        // worker in the pass inside that booking, then dropped it from its tracking: its crash
        // a second later stayed `running` until the safety-net tick (an hour here).
        let d = Dispatcher::new("tick_seconds = 3600");
        d.install();
        d.start();
        let first = d.rig.add("crashes while the bus is down");
        let r1 = d.wait_running(&first, 0);
        worker_pid(&d, &first, r1);
        sh("systemctl stop dbus.socket dbus.service");
        d.command(&first, r1, "exit 1");
        wait_for("the exit record", Duration::from_secs(20), || {
            hermes_mgr::state_dir::read_record(
                std::path::Path::new("/run/hermes-mgr-test"),
                "default",
                &first,
                r1,
            )
            .unwrap()
        });
        let second = d.rig.add("created while the bus is down");
        sh("systemctl start dbus.socket dbus.service");
        // The crash is booked, and the new task gets its worker.
        d.wait_task("the crash booked", |t| t.consecutive_failures == 1, &first);
        let r2 = d.wait_running(&second, 0);
        worker_pid(&d, &second, r2);
        // And that worker is watched: its crash is booked at once, not at the next tick.
        d.command(&second, r2, "exit 1");
        let t = d.wait_task(
            "the second crash booked",
            |t| t.consecutive_failures == 1,
            &second,
        );
        assert_eq!(
            d.rig.board().run(r2).unwrap().unwrap().outcome.as_deref(),
            Some("crashed"),
            "{t:?}"
        );
    }
);

systemd_test!(reconcile_leaves_a_run_claimed_on_another_host_alone, {
    // Rule 4: a running row whose claim names another host is that host's business.
    let d = Dispatcher::new("tick_seconds = 3600");
    d.install();
    let id = d.rig.add("claimed elsewhere");
    let claim = d
        .rig
        .board()
        .claim(&id, "some-other-host:4242", 900)
        .unwrap()
        .unwrap();
    d.start();
    wait_for("the start-up reconcile", Duration::from_secs(20), || {
        journal(SERVICE)
            .contains("reconciled with systemd")
            .then_some(())
    });
    let t = d.task(&id);
    assert_eq!(
        (t.status.as_str(), t.current_run_id, t.claim_lock.as_deref()),
        ("running", Some(claim.run_id), Some("some-other-host:4242"))
    );
    assert_eq!(d.rig.board().runs(&id).unwrap().len(), 1);
    assert!(
        crate::rig::worker_units(false).is_empty(),
        "a worker was started for another host's run"
    );
});

systemd_test!(
    reconcile_stops_the_scope_of_a_run_that_is_no_longer_current,
    {
        // Rule 5: never two workers for one task. While the daemon is away, someone reclaims
        // the task (upstream's `hermes kanban reclaim`); the old worker still runs.
        let d = Dispatcher::new("tick_seconds = 3600");
        d.install();
        d.start();
        let id = d.rig.add("reclaimed while nobody watched");
        let r1 = d.wait_running(&id, 0);
        let pid = worker_pid(&d, &id, r1);
        kill_daemon(&d);
        d.rig.mgr(&["requeue", &id, "--reason", "reclaimed"]).ok();
        assert!(alive(pid));
        d.start();
        let r2 = d.wait_running(&id, r1);
        wait_for("the old worker stopped", Duration::from_secs(20), || {
            (!alive(pid)).then_some(())
        });
        assert!(
            journal(SERVICE).contains("worker scope of a run that is not current; stopping it"),
            "{}",
            journal(SERVICE)
        );
        // The new worker is the task's only one. The board says `running` at the claim, a few
        // milliseconds before the new scope exists, and the old scope leaves the unit list a
        // moment after its process: wait for the new worker itself, then for the list to settle.
        let new_pid = worker_pid(&d, &id, r2);
        let units = wait_for("one worker scope", Duration::from_secs(20), || {
            let units = crate::rig::worker_units(false);
            (units.lines().count() == 1).then_some(units)
        });
        assert!(units.contains(&format!("-run-{r2}.scope")), "{units}");
        assert!(alive(new_pid));
    }
);

systemd_test!(
    a_worker_whose_run_was_closed_on_the_board_is_stopped_after_its_grace,
    {
        // Someone blocks the task while its worker runs: the worker may finish its sentence
        // for `verdict_grace_seconds`, then its scope is stopped — on time, with no event.
        let d = Dispatcher::new("tick_seconds = 3600\nverdict_grace_seconds = 2");
        d.install();
        d.start();
        let id = d.rig.add("blocked under its worker");
        let r1 = d.wait_running(&id, 0);
        let pid = worker_pid(&d, &id, r1);
        d.rig.mgr(&["block", &id, "an operator says wait"]).ok();
        wait_for("the worker stopped", Duration::from_secs(20), || {
            (!alive(pid)).then_some(())
        });
        assert!(
            journal(SERVICE).contains("the run was closed on the board but its worker still runs")
        );
        assert_eq!(d.task(&id).status.as_str(), "blocked");
    }
);

systemd_test!(a_worker_whose_run_was_superseded_is_stopped_at_once, {
    // A run superseded by a newer one is stopped at once, grace or not: never two workers.
    let d = Dispatcher::new("tick_seconds = 3600\nverdict_grace_seconds = 3600");
    d.install();
    d.start();
    let other = d.rig.add("requeued under its worker");
    let o1 = d.wait_running(&other, 0);
    let opid = worker_pid(&d, &other, o1);
    d.rig.mgr(&["requeue", &other]).ok();
    let o2 = d.wait_running(&other, o1);
    wait_for(
        "the superseded worker stopped",
        Duration::from_secs(20),
        || (!alive(opid)).then_some(()),
    );
    worker_pid(&d, &other, o2);
});

systemd_test!(the_dispatchers_own_failure_is_never_charged_to_the_task, {
    // The run's TMPDIR cannot be made (tmp_root is missing): the dispatcher's side failed,
    // not the task. The old dispatcher counted it, and the task was blocked `gave_up` after
    // two passes: work a user had to unblock by hand, lost to a fault of ours.
    let rig = crate::rig::Rig::new(
        "#!/bin/sh\nexit 0\n",
        "tmp_root = \"/nonexistent/hermes-tmp\"",
    );
    let id = rig.add("innocent bystander");
    for pass in 0..3 {
        let out = rig.dispatch();
        let f = &out["spawn_failed"][0];
        assert_eq!(f["task_id"], serde_json::json!(id), "pass {pass}: {out}");
        assert_eq!(f["infrastructure"], serde_json::json!(true), "{out}");
        assert!(
            f["error"]
                .as_str()
                .unwrap()
                .contains("create TMPDIR in /nonexistent/hermes-tmp"),
            "{out}"
        );
    }
    let t = rig.board().require_task(&id).unwrap();
    assert_eq!((t.status.as_str(), t.consecutive_failures), ("ready", 0));
    let runs = rig.board().runs(&id).unwrap();
    assert_eq!(runs.len(), 3);
    assert!(runs
        .iter()
        .all(|r| r.outcome.as_deref() == Some("spawn_failed")));
});

systemd_test!(the_daemon_holds_no_descriptor_per_live_worker, {
    // With a descriptor per live worker (tokio's pidfd of each supervisor), a thousand
    // workers ran the old daemon out of files (EMFILE), and every later spawn failed.
    let d = Dispatcher::new("tick_seconds = 3600\nmax_spawn = 40");
    d.install();
    d.start();
    let pid = systemctl_show(SERVICE, "MainPID")
        .trim()
        .trim_start_matches("MainPID=")
        .to_string();
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let first = d.rig.add("the first");
    let r = d.wait_running(&first, 0);
    worker_pid(&d, &first, r);
    let before = fds();
    let ids: Vec<String> = (0..30).map(|i| d.rig.add(&format!("live {i}"))).collect();
    for id in &ids {
        let r = d.wait_running(id, 0);
        worker_pid(&d, id, r);
    }
    let after = fds();
    assert!(
        after < before + 10,
        "the daemon went from {before} to {after} descriptors for 30 more live workers"
    );
    // Its limit was raised as far as it goes, too.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let v: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(v[3], v[4], "soft limit below the hard one: {line}");
});

systemd_test!(a_failing_dispatcher_says_so_and_charges_no_task, {
    // The service's own side fails (its TMPDIR root is missing): every task is requeued
    // uncounted, passes back off, and the operator reads it in `systemctl status` and
    // `hermes-mgr doctor` instead of finding tasks blocked.
    let d = Dispatcher::new("tick_seconds = 3600\ntmp_root = \"/nonexistent/hermes-tmp\"");
    d.install();
    d.start();
    let id = d.rig.add("cannot start here");
    let status = wait_for("the service says it fails", Duration::from_secs(20), || {
        let s = systemctl_show(SERVICE, "StatusText");
        s.contains("FAILING to start workers").then_some(s)
    });
    assert!(status.contains("create TMPDIR"), "{status}");
    let doctor = d.rig.mgr(&["doctor", "--json"]).json();
    let health = doctor
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "dispatcher health")
        .unwrap_or_else(|| panic!("{doctor}"))
        .clone();
    assert_eq!(health["level"], "fail", "{health}");
    let status = d.rig.mgr(&["status", "--json"]).ok().json();
    assert!(
        status["dispatcher_status"]
            .as_str()
            .is_some_and(|s| s.starts_with("FAILING to start workers")),
        "{status}"
    );
    let text = d.rig.mgr(&["status"]).ok().stdout;
    assert!(text.contains("FAILING to start workers"), "{text}");
    // Backed off, not hammered: a handful of attempts in the first seconds, none counted.
    std::thread::sleep(Duration::from_secs(3));
    let t = d.wait_task(
        "requeued between attempts",
        |t| t.status.as_str() == "ready",
        &id,
    );
    assert_eq!(t.consecutive_failures, 0);
    let runs = d.rig.board().runs(&id).unwrap();
    assert!(
        (1..=5).contains(&runs.len()),
        "{} attempts in ~3 s",
        runs.len()
    );
    assert!(runs
        .iter()
        .all(|r| r.outcome.as_deref() == Some("spawn_failed")));
    assert!(journal(SERVICE).contains("the dispatcher cannot start workers"));
});
