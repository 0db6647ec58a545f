//! `hermes-mgr pause` / `resume` against a real systemd: a worker frozen whole by the cgroup
//! freezer (its tool's grandchild in another session too) goes on with the same PID and
//! state; a board held from new starts starts nothing after the command returns; every
//! pause survives a restart of the dispatcher; a frozen worker still stops.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{hermes, hermes_bin, wait_for};
use crate::rig::{journal, systemctl_show, Dispatcher, SERVICE};
use crate::systemd_test;

/// A worker that counts in its workspace (`count`), with a grandchild in a session of its
/// own that counts too (`grand`, as a tool's daemonised child would), until a file `done`
/// appears: then it completes its task.
fn counting_stub() -> String {
    format!(
        r#"#!/bin/sh
[ "$1" = kanban ] && exec {hermes} "$@"
setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > grand.tmp; mv grand.tmp grand; sleep 0.05; done' </dev/null >/dev/null 2>&1 &
echo "pid=$$" > "ready-$HERMES_KANBAN_RUN_ID.tmp"; echo END >> "ready-$HERMES_KANBAN_RUN_ID.tmp"
mv "ready-$HERMES_KANBAN_RUN_ID.tmp" "ready-$HERMES_KANBAN_RUN_ID"
i=0
while :; do
  i=$((i+1)); echo $i > count.tmp; mv count.tmp count
  [ -e done ] && exec {hermes} kanban complete "$HERMES_KANBAN_TASK" --summary "counted to $i"
  sleep 0.05
done
"#,
        hermes = hermes_bin().display()
    )
}

fn workspace(d: &Dispatcher, id: &str) -> PathBuf {
    d.rig.dir.join("kanban/workspaces").join(id)
}

fn read_count(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The scope's cgroup directory, as systemd names it.
fn cgroup(unit: &str) -> PathBuf {
    let cg = systemctl_show(unit, "ControlGroup");
    let cg = cg.trim().trim_start_matches("ControlGroup=");
    Path::new("/sys/fs/cgroup").join(cg.trim_start_matches('/'))
}

pub(crate) fn kernel_frozen(unit: &str) -> bool {
    std::fs::read_to_string(cgroup(unit).join("cgroup.events"))
        .unwrap_or_default()
        .lines()
        .any(|l| l == "frozen 1")
}

fn cpu_usec(unit: &str) -> u64 {
    std::fs::read_to_string(cgroup(unit).join("cpu.stat"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Both counters go on (the worker and its grandchild run).
fn wait_counting(ws: &Path) {
    let (c, g) = (read_count(&ws.join("count")), read_count(&ws.join("grand")));
    wait_for("both counters to go on", Duration::from_secs(20), || {
        (read_count(&ws.join("count")) > c && read_count(&ws.join("grand")) > g).then_some(())
    });
}

/// Nothing of the scope moves for `for_`: neither counter, nor the CPU time it is charged.
/// (A counter that runs every 50 ms would have moved several times.)
fn assert_still(ws: &Path, unit: &str, for_: Duration) {
    let before = (
        read_count(&ws.join("count")),
        read_count(&ws.join("grand")),
        cpu_usec(unit),
    );
    let t0 = Instant::now();
    while t0.elapsed() < for_ {
        std::thread::sleep(Duration::from_millis(50));
        let now = (
            read_count(&ws.join("count")),
            read_count(&ws.join("grand")),
            cpu_usec(unit),
        );
        assert_eq!(
            now, before,
            "the frozen run moved (count, grandchild, cpu µs)"
        );
    }
}

fn row(snap: &serde_json::Value, id: &str) -> serde_json::Value {
    snap["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == json!(id))
        .cloned()
        .unwrap_or_else(|| panic!("no row for {id}: {snap}"))
}

fn run_count(d: &Dispatcher) -> i64 {
    d.rig
        .board()
        .connection()
        .query_row("SELECT count(*) FROM task_runs", [], |r| r.get(0))
        .unwrap()
}

/// How many times the daemon has said a pass on the board was held.
fn held_passes() -> usize {
    journal(SERVICE).matches("held, nothing started").count()
}

systemd_test!(
    a_paused_worker_is_frozen_whole_and_resumes_where_it_stopped,
    {
        let d = Dispatcher::with_stub(&counting_stub(), "tick_seconds = 3600");
        d.install();
        d.start();
        let id = d.rig.add("counts");
        let run = d.wait_running(&id, 0);
        let ws = workspace(&d, &id);
        let ready = d.rig.wait_file(&ws.join(format!("ready-{run}")));
        let pid = ready
            .lines()
            .next()
            .unwrap()
            .trim_start_matches("pid=")
            .to_string();
        wait_counting(&ws);
        let unit = format!("hermes-worker-kanban-{id}-run-{run}.scope");

        let out = d.rig.mgr(&["pause", &id]).ok().stdout;
        assert!(out.contains("paused") && out.contains(&unit), "{out}");
        assert!(kernel_frozen(&unit), "cgroup.events says frozen 1");
        assert_still(&ws, &unit, Duration::from_millis(600));
        let t = d.task(&id);
        assert_eq!(
            (t.status.as_str(), t.current_run_id),
            ("running", Some(run)),
            "a paused task keeps its run"
        );
        // What the operator and Hermes' own tools see.
        let snap = d.rig.mgr(&["status", "--json"]).ok().json();
        let r = row(&snap, &id);
        assert_eq!(r["paused"]["frozen"], json!(true), "{r}");
        assert_eq!(r["status"], json!("running"));
        let text = d.rig.mgr(&["status"]).ok().stdout;
        assert!(text.contains("paused") && text.contains("FROZEN"), "{text}");
        let shown = hermes(&d.rig.db, &["show", &id]).ok().stdout;
        assert!(shown.contains("paused"), "hermes kanban show: {shown}");
        // A second pause changes nothing.
        let again = d.rig.mgr(&["pause", &id]).ok().stdout;
        assert!(again.contains("already"), "{again}");

        let out = d.rig.mgr(&["resume", &id]).ok().stdout;
        assert!(out.contains("resumed"), "{out}");
        assert!(!kernel_frozen(&unit));
        wait_counting(&ws);
        assert_eq!(
            d.task(&id).worker_pid.map(|p| p.to_string()),
            Some(pid.clone()),
            "the same worker process goes on"
        );
        assert!(crate::rig::alive(pid.parse().unwrap()));
        let kinds: Vec<String> = d
            .rig
            .board()
            .events(&id)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert!(
            kinds.contains(&"paused".to_string()) && kinds.contains(&"resumed".to_string()),
            "{kinds:?}"
        );
        // It counted on from where it stopped, and finishes its task.
        std::fs::write(ws.join("done"), "").unwrap();
        d.wait_task("done", |t| t.status.as_str() == "done", &id);
        let r = d.rig.board().run(run).unwrap().unwrap();
        assert_eq!(r.outcome.as_deref(), Some("completed"), "{r:?}");
        assert!(
            d.rig.mgr(&["resume", &id]).code == Some(1),
            "resuming a task that is not paused is an error"
        );
    }
);

systemd_test!(
    a_paused_board_starts_nothing_after_the_command_returns_and_resumes,
    {
        let d = Dispatcher::with_stub(&counting_stub(), "tick_seconds = 3600");
        d.install();
        d.start();
        // A pass busy starting workers while the board is paused.
        let first: Vec<String> = (0..12).map(|i| d.rig.add(&format!("busy {i}"))).collect();
        // `--db` (the rig's) names the board.
        d.rig.mgr(&["pause"]).ok();
        let runs_at_pause = run_count(&d);
        let held_before = held_passes();
        let late = d.rig.add("added while paused");
        // The daemon saw the new task and held its pass (said in its journal).
        wait_for("a held pass", Duration::from_secs(20), || {
            (held_passes() > held_before).then_some(())
        });
        assert_eq!(
            run_count(&d),
            runs_at_pause,
            "no run started after `pause` returned"
        );
        assert_eq!(d.task(&late).status.as_str(), "ready");
        let snap = d.rig.mgr(&["status", "--json"]).ok().json();
        assert_eq!(snap["paused"][0]["freeze"], json!(false), "{snap}");
        let text = d.rig.mgr(&["status"]).ok().stdout;
        assert!(text.contains("PAUSED: board"), "{text}");
        let doctor = d.rig.mgr(&["doctor"]).stdout;
        assert!(
            doctor.contains("PAUSED") && doctor.contains("freezer"),
            "{doctor}"
        );

        // A task paused on its own, with nothing running, is held: the board's resume
        // starts a task created after it, not it.
        let out = d.rig.mgr(&["pause", &late]).ok().stdout;
        assert!(out.contains("nothing was running"), "{out}");
        d.rig.mgr(&["resume"]).ok();
        let other = d.rig.add("added after the resume");
        d.wait_running(&other, 0);
        assert_eq!(
            d.task(&late).status.as_str(),
            "ready",
            "a paused task stays held"
        );
        d.rig.mgr(&["resume", &late]).ok();
        d.wait_running(&late, 0);
        for id in &first {
            d.wait_running(id, 0);
        }
    }
);

systemd_test!(pauses_survive_a_restart_and_a_frozen_worker_still_stops, {
    let d = Dispatcher::with_stub(&counting_stub(), "tick_seconds = 3600");
    d.install();
    d.start();
    let id = d.rig.add("frozen across a restart");
    let run = d.wait_running(&id, 0);
    let ws = workspace(&d, &id);
    d.rig.wait_file(&ws.join(format!("ready-{run}")));
    wait_counting(&ws);
    let unit = format!("hermes-worker-kanban-{id}-run-{run}.scope");
    d.rig.mgr(&["pause", &id]).ok();
    d.rig.mgr(&["pause", "--freeze"]).ok();

    d.stop();
    d.start();
    // Adopted, still frozen, still held.
    wait_for("the restarted daemon", Duration::from_secs(20), || {
        journal(SERVICE)
            .contains("adopted a running worker")
            .then_some(())
    });
    assert!(kernel_frozen(&unit));
    assert_still(&ws, &unit, Duration::from_millis(400));
    let held_before = held_passes();
    let late = d.rig.add("added after the restart");
    wait_for("a held pass", Duration::from_secs(20), || {
        (held_passes() > held_before).then_some(())
    });
    assert_eq!(d.task(&late).status.as_str(), "ready");
    assert_eq!(d.task(&id).current_run_id, Some(run));

    // The board's resume leaves the task's own pause frozen.
    d.rig.mgr(&["resume"]).ok();
    d.wait_running(&late, 0);
    assert!(kernel_frozen(&unit), "the task's own pause holds");

    // Ended within the stop timeout: otherwise the report says `killed_after_timeout`.
    let stop = d
        .rig
        .mgr(&["stop", &id, "--timeout", "5", "--json"])
        .ok()
        .json();
    assert_eq!(stop["how"], json!("exited_after_sigterm"), "{stop}");
    assert_eq!(d.task(&id).status.as_str(), "blocked");
    let snap = d.rig.mgr(&["status", "--json"]).ok().json();
    assert_eq!(
        row(&snap, &id)["paused"],
        json!(null),
        "the stop ended the pause"
    );
});

systemd_test!(an_unreadable_holds_file_holds_every_board_and_says_so, {
    let d = Dispatcher::with_stub(&counting_stub(), "tick_seconds = 3600");
    d.install();
    d.start();
    let holds = Path::new("/var/tmp/hermes-mgr-holds")
        .join(d.rig.dir.file_name().unwrap())
        .join("holds.json");
    std::fs::create_dir_all(holds.parent().unwrap()).unwrap();
    std::fs::write(&holds, "{ not json").unwrap();
    let held_before = held_passes();
    let id = d.rig.add("waits for a readable holds file");
    wait_for("a held pass", Duration::from_secs(20), || {
        (held_passes() > held_before).then_some(())
    });
    assert_eq!(d.task(&id).status.as_str(), "ready");
    assert!(
        journal(SERVICE).contains("the holds cannot be read"),
        "the journal says why nothing starts"
    );
    let refused = d.rig.mgr(&["resume", "--all"]);
    assert_eq!(refused.code, Some(1));
    assert!(
        refused.stderr.contains("is not a holds file")
            && refused.stderr.contains(&holds.display().to_string()),
        "{}",
        refused.stderr
    );
    // The operator removes it: work starts again.
    std::fs::remove_file(&holds).unwrap();
    d.wait_running(&id, 0);
});

fn add_limited(d: &Dispatcher, title: &str, secs: i64) -> String {
    d.rig
        .board()
        .create(&hermes_mgr::board::NewTask {
            title: title.into(),
            assignee: Some("default".into()),
            max_runtime_seconds: Some(secs),
            // Blocked by its first timeout: not run again in the same workspace.
            max_retries: Some(1),
            ..Default::default()
        })
        .unwrap()
}

/// The seconds a `timed_out` run's error says it ran (`elapsed Ns > limit Ms`).
fn elapsed_said(error: &str) -> i64 {
    error
        .strip_prefix("elapsed ")
        .and_then(|r| r.split('s').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a timeout's words: {error}"))
}

systemd_test!(
    the_supervisor_ends_a_run_at_its_limit_and_a_pause_is_not_charged,
    {
        let d = Dispatcher::with_stub(&counting_stub(), "tick_seconds = 3600");
        d.install();
        d.start();
        // Without a pause: ended at its limit, the whole scope with it (the grandchild in
        // its own session too), booked as the timeout it was.
        let plain = add_limited(&d, "runs past its limit", 2);
        let run = d.wait_running(&plain, 0);
        let ws = workspace(&d, &plain);
        d.rig.wait_file(&ws.join(format!("ready-{run}")));
        wait_counting(&ws);
        let unit = format!("hermes-worker-kanban-{plain}-run-{run}.scope");
        let t = d.wait_task("timed out", |t| t.status.as_str() != "running", &plain);
        let r = d.rig.board().run(run).unwrap().unwrap();
        assert_eq!(r.outcome.as_deref(), Some("timed_out"), "{r:?} {t:?}");
        assert!(r.error.as_deref().unwrap().ends_with("> limit 2s"), "{r:?}");
        wait_for("the scope gone", Duration::from_secs(20), || {
            (!crate::rig::worker_units(false).contains(&unit)).then_some(())
        });
        let g = read_count(&ws.join("grand"));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            read_count(&ws.join("grand")),
            g,
            "the grandchild went with the run"
        );

        // Paused for longer than its whole limit: resumed, it goes on, and ends at its limit
        // of active time.
        let paused = add_limited(&d, "paused past its limit", 4);
        let run = d.wait_running(&paused, 0);
        let ws = workspace(&d, &paused);
        d.rig.wait_file(&ws.join(format!("ready-{run}")));
        wait_counting(&ws);
        d.rig.mgr(&["pause", &paused]).ok();
        let unit = format!("hermes-worker-kanban-{paused}-run-{run}.scope");
        assert_still(&ws, &unit, Duration::from_secs(6));
        d.rig.mgr(&["resume", &paused]).ok();
        wait_counting(&ws);
        assert_eq!(
            d.task(&paused).current_run_id,
            Some(run),
            "not ended by the pause"
        );
        d.wait_task(
            "timed out after its resume",
            |t| t.status.as_str() != "running",
            &paused,
        );
        let r = d.rig.board().run(run).unwrap().unwrap();
        assert_eq!(r.outcome.as_deref(), Some("timed_out"), "{r:?}");
        let said = elapsed_said(r.error.as_deref().unwrap());
        let wall = r.ended_at.unwrap() - r.started_at;
        assert!(
            said < 6 && wall >= 10,
            "active {said}s of {wall}s: the pause was charged ({r:?})"
        );
    }
);

systemd_test!(
    a_paused_run_is_never_found_stale_and_its_pause_is_not_charged_after,
    {
        // Hermes' stale check at 5 s (a worker that never sends a heartbeat is stopped after
        // it), looked at every second.
        let d = Dispatcher::with_stub(&counting_stub(), "tick_seconds = 1");
        let cfg = d.rig.dir.join("config.yaml");
        std::fs::write(&cfg, "kanban:\n  dispatch_stale_timeout_seconds: 5\n").unwrap();
        std::os::unix::fs::chown(&cfg, Some(d.rig.uid), None).unwrap();
        d.install();
        d.start();
        let id = d.rig.add("never sends a heartbeat");
        let run = d.wait_running(&id, 0);
        let ws = workspace(&d, &id);
        d.rig.wait_file(&ws.join(format!("ready-{run}")));
        d.rig.mgr(&["pause", &id]).ok();
        let unit = format!("hermes-worker-kanban-{id}-run-{run}.scope");
        // Frozen past the stale timeout: left alone.
        assert_still(&ws, &unit, Duration::from_secs(7));
        assert_eq!(d.task(&id).current_run_id, Some(run));
        d.rig.mgr(&["resume", &id]).ok();
        wait_counting(&ws);
        // Stale once silent for the timeout in time it was not frozen.
        d.wait_running(&id, run);
        let r = d.rig.board().run(run).unwrap().unwrap();
        assert_eq!(r.outcome.as_deref(), Some("stale"), "{r:?}");
        let at = |kind: &str| {
            d.rig
                .board()
                .events(&id)
                .unwrap()
                .into_iter()
                .find(|e| e.kind == kind)
                .unwrap_or_else(|| panic!("no {kind} event"))
                .created_at
        };
        let frozen = at("resumed") - at("paused");
        let active = r.ended_at.unwrap() - r.started_at - frozen;
        assert!(
            frozen >= 6 && active >= 4,
            "stopped after {active}s of active time (the timeout is 5 s, ±1 s of rounding), {frozen}s frozen: {r:?}"
        );
    }
);
