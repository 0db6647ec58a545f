//! The operator's commands against a live system: `status`, `logs`, `doctor`, `stop --all`.

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::harness::wait_for;
use crate::rig::{Dispatcher, SERVICE};
use crate::systemd_test;

systemd_test!(
    status_shows_live_facts_then_the_outcome_and_logs_show_the_output,
    {
        let d = Dispatcher::new("tick_seconds = 3600");
        d.install();
        d.start();
        let id = d.rig.add("watched");
        d.rig
            .board()
            .connection()
            .execute("UPDATE tasks SET max_retries=1 WHERE id=?1", [&id])
            .unwrap();
        let run = d.wait_running(&id, 0);
        let ws = d.rig.dir.join("kanban/workspaces").join(&id);
        d.rig.wait_file(&ws.join(format!("ready-{run}")));
        let pid = wait_for("worker pid", Duration::from_secs(20), || {
            d.task(&id).worker_pid
        });
        let snap = d.rig.mgr(&["status", "--json"]).ok().json();
        assert_eq!(snap["dispatcher"], json!("running"));
        assert_eq!(snap["counts"]["running"], json!(1));
        let row = snap["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == json!(id))
            .cloned()
            .expect("task row");
        assert_eq!(row["status"], json!("running"));
        let live = &row["run"];
        assert_eq!(
            live["unit"],
            json!(format!("hermes-worker-kanban-{id}-run-{run}.scope"))
        );
        assert_eq!(live["pid"], json!(pid));
        assert_eq!(
            live["state"],
            json!("S"),
            "a worker blocked in read(2) sleeps: {live}"
        );
        assert_eq!(live["in_scope"], json!(true));
        let text = d.rig.mgr(&["status"]).ok().stdout;
        assert!(
            text.contains(&id) && text.contains("dispatcher: running") && !text.contains('\x1b'),
            "{text}"
        );

        d.command(&id, run, "exit 3");
        d.wait_task(
            "blocked by the breaker",
            |t| t.status.as_str() == "blocked",
            &id,
        );
        let snap = d.rig.mgr(&["status", "--json"]).ok().json();
        let row = snap["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == json!(id))
            .cloned()
            .unwrap();
        assert_eq!(row["run"], json!(null));
        assert_eq!(row["last_run"]["outcome"], json!("crashed"));
        assert_eq!(row["last_run"]["exit_code"], json!(3));
        assert_eq!(
            row["last_error"],
            json!(format!("pid {pid} exited with code 3"))
        );

        let show = d.rig.mgr(&["show", &id]).ok().stdout;
        assert!(
            show.contains("crashed")
                && show.contains(" exit 3")
                && show.contains(&format!("hermes-worker-kanban-{id}-run-{run}.scope")),
            "{show}"
        );
        let logs = wait_for("the worker's line", Duration::from_secs(20), || {
            let out = d.rig.mgr(&["logs", &id]);
            out.stdout.contains("exit 3").then_some(out.stdout)
        });
        assert!(
            logs.contains(&format!("worker {id} run {run}: exit 3")),
            "{logs}"
        );
    }
);

systemd_test!(
    doctor_passes_inside_a_working_system_and_fails_clearly_without_a_bus,
    {
        let d = Dispatcher::new("");
        d.install();
        d.start();
        let ok = d.rig.mgr(&["doctor"]);
        assert_eq!(ok.code, Some(0), "{}{}", ok.stdout, ok.stderr);
        assert!(!ok.stdout.contains("FAIL"), "{}", ok.stdout);
        for line in [
            "ok   system bus",
            "ok   systemd",
            "ok   cgroup v2",
            "ok   board",
            "ok   dispatcher",
            "ok   worker user",
            "ok   worker binary",
        ] {
            assert!(ok.stdout.contains(line), "{line} missing:\n{}", ok.stdout);
        }
        let mut cmd = d.rig.mgr_cmd(&["doctor"]);
        cmd.env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/run/nonexistent/bus");
        let bad = crate::harness::run(cmd);
        assert_eq!(bad.code, Some(1));
        let line = bad
            .stdout
            .lines()
            .find(|l| l.contains("system bus"))
            .unwrap_or_default()
            .to_string();
        assert!(
            line.starts_with("FAIL") && line.contains("fix:"),
            "{}",
            bad.stdout
        );
    }
);

systemd_test!(stop_all_stops_every_running_worker, {
    let d = Dispatcher::new("tick_seconds = 3600\nmax_spawn = 5");
    d.install();
    d.start();
    let ids: Vec<String> = (0..3).map(|i| d.rig.add(&format!("w{i}"))).collect();
    for id in &ids {
        d.wait_running(id, 0);
    }
    Command::new("systemctl")
        .args(["stop", SERVICE])
        .status()
        .unwrap();
    let out = d.rig.mgr(&["stop", "--all", "--json"]).ok().json();
    assert_eq!(out.as_array().unwrap().len(), 3, "{out}");
    for r in out.as_array().unwrap() {
        assert_eq!(r["how"], json!("exited_after_sigterm"), "{r}");
    }
    assert!(d
        .rig
        .board()
        .list(Some("running"), None)
        .unwrap()
        .is_empty());
});

systemd_test!(the_shipped_unit_is_hardened_and_its_workers_still_work, {
    let d = Dispatcher::new("tick_seconds = 3600");
    d.install();
    d.start();
    let out = Command::new("systemd-analyze")
        .args(["security", "--no-pager", SERVICE])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let verdict = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_default()
        .to_string();
    println!("{verdict}");
    let score: f64 = verdict
        .split(':')
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("a score");
    assert!(score <= 5.0, "exposure {score} is worse than OK:\n{text}");
    // Hardening is inherited by workers, and they still run and finish their task.
    let id = d.rig.add("hardened");
    let run = d.wait_running(&id, 0);
    let ws = d.rig.dir.join("kanban/workspaces").join(&id);
    d.rig.wait_file(&ws.join(format!("ready-{run}")));
    let pid = d.task(&id).worker_pid.unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status.contains("NoNewPrivs:\t1") && status.contains("CapBnd:\t0000000000000000"),
        "{status}"
    );
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    assert!(
        mountinfo
            .lines()
            .any(|l| l.split_whitespace().nth(4) == Some("/usr") && l.contains(" ro,")),
        "/usr is writable for workers"
    );
    d.command(&id, run, "complete");
    d.wait_task("done", |t| t.status.as_str() == "done", &id);
});
