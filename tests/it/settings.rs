//! Hermes' own `kanban:` settings in its `config.yaml` govern hermes-dispatcher, with
//! upstream's meaning, re-read when the file changes; a key set in both files keeps the operator's value, and
//! nothing in the file keeps the dispatcher down.

use std::time::Duration;

use crate::harness::wait_for;
use crate::rig::{journal, systemctl_show, Dispatcher, SERVICE};
use crate::systemd_test;

fn write_hermes_config(d: &Dispatcher, yaml: &str) {
    let path = d.rig.dir.join("config.yaml");
    let tmp = d.rig.dir.join("config.yaml.tmp");
    std::fs::write(&tmp, yaml).unwrap();
    std::os::unix::fs::chown(&tmp, Some(d.rig.uid), None).unwrap();
    // As Hermes' `save_config` writes it: a new file renamed over the old one.
    std::fs::rename(&tmp, &path).unwrap();
}

systemd_test!(
    hermes_config_yaml_caps_and_breaker_apply_and_a_change_needs_no_restart,
    {
        let d = Dispatcher::new("tick_seconds = 3600");
        write_hermes_config(
            &d,
            "model:\n  default: x\nkanban:\n  max_in_progress_per_profile: 1\n  failure_limit: 1\n",
        );
        // Both exist before the first pass: it sees them together.
        let a = d.rig.add("first of the profile");
        let b = d.rig.add("second of the profile");
        d.install();
        d.start();
        // kanban.max_in_progress_per_profile: 1 holds the second back. The service status
        // is written after each pass: this one is over, and left one task ready.
        let after_pass = |what: &str| {
            wait_for(what, Duration::from_secs(20), || {
                systemctl_show(SERVICE, "StatusText")
                    .contains("1 running (1 in scopes), 1 ready")
                    .then_some(())
            })
        };
        after_pass("one running, one held back");
        let ra = d.task(&a).current_run_id.unwrap();
        assert_eq!(d.task(&b).status.as_str(), "ready");
        // kanban.failure_limit: 1 — one crash blocks.
        d.command(&a, ra, "exit 1");
        d.wait_task("blocked at once", |t| t.status.as_str() == "blocked", &a);
        let rb = d.wait_running(&b, 0);
        let c = d.rig.add("third of the profile");
        after_pass("the third held back");
        assert_eq!(d.task(&c).status.as_str(), "ready");
        // Lifting the cap in config.yaml takes effect without a restart.
        write_hermes_config(&d, "kanban:\n  failure_limit: 1\n");
        d.wait_running(&c, 0);
        d.command(&b, rb, "complete");
        d.wait_task("done", |t| t.status.as_str() == "done", &b);
    }
);

systemd_test!(a_setting_in_both_files_keeps_the_operators_and_says_so, {
    let d = Dispatcher::new("failure_limit = 3");
    write_hermes_config(&d, "kanban:\n  failure_limit: 4\n");
    d.install();
    d.start();
    let toml = d.rig.config.display().to_string();
    let yaml = d.rig.dir.join("config.yaml").display().to_string();
    wait_for(
        "the warning in the journal",
        Duration::from_secs(10),
        || {
            let log = journal(SERVICE);
            (log.contains("failure_limit is set in both")
                && log.contains(&toml)
                && log.contains(&yaml))
            .then_some(())
        },
    );
    // doctor says the same, and which value is used.
    let doc = d.rig.mgr(&["doctor", "--json"]);
    assert!(
        doc.stdout.contains("failure_limit is set in both")
            && doc.stdout.contains("failure_limit=3"),
        "{}",
        doc.stdout
    );
});

systemd_test!(
    a_config_yaml_hermes_cannot_use_never_keeps_the_dispatcher_down,
    {
        // What a worker (it writes the Hermes root) can leave behind: a `kanban:` that is no
        // mapping, and a 455-byte alias bomb. The dispatcher starts, says why it runs on
        // upstream's defaults, and dispatches.
        let d = Dispatcher::new("tick_seconds = 3600");
        let mut bomb = String::from(
            "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        for (prev, name) in ["a", "b", "c", "d", "e", "f", "g", "h"]
            .iter()
            .zip(["b", "c", "d", "e", "f", "g", "h", "i"])
        {
            bomb.push_str(&format!(
                "{name}: &{name} [{}]\n",
                vec![format!("*{prev}"); 9].join(",")
            ));
        }
        write_hermes_config(&d, "kanban: 3\n");
        d.install();
        d.start();
        let a = d.rig.add("runs on the defaults");
        let ra = d.wait_running(&a, 0);
        wait_for("the warning", Duration::from_secs(10), || {
            journal(SERVICE)
                .contains("is not a mapping: Hermes' kanban settings are at upstream's defaults")
                .then_some(())
        });
        // The bomb, read on the change and again at a restart: the daemon stays up, bounded.
        write_hermes_config(&d, &bomb);
        wait_for("the bomb refused", Duration::from_secs(10), || {
            journal(SERVICE)
                .contains("more than 100000 YAML nodes")
                .then_some(())
        });
        std::process::Command::new("systemctl")
            .args(["restart", SERVICE])
            .status()
            .unwrap();
        assert_eq!(
            systemctl_show(SERVICE, "ActiveState").trim(),
            "ActiveState=active"
        );
        let doc = d.rig.mgr(&["doctor", "--json"]);
        assert!(
            doc.stdout.contains("more than 100000 YAML nodes"),
            "{}",
            doc.stdout
        );
        let st = d.rig.mgr(&["status"]);
        assert_eq!(st.code, Some(0), "{}", st.stderr);
        d.command(&a, ra, "complete");
        d.wait_task("done", |t| t.status.as_str() == "done", &a);
        let b = d.rig.add("after the restart");
        d.wait_running(&b, 0);
    }
);

/// Upstream's own reading of a `config.yaml`: `load_config()` (PyYAML, defaults, the
/// merge) and the gateway's `_resolve_auto_decompose_settings`, in the real Hermes of
/// `venv`; where that Hermes has one (~0.22), its gateway's own `_resolve_dispatcher_settings`
/// for the dispatcher's settings, else the watcher's own expressions, copied.
fn upstream_reading(venv: &std::path::Path, home: &std::path::Path) -> serde_json::Value {
    let script = r#"
import json
from hermes_cli.config import load_config
from gateway.kanban_watchers import _resolve_auto_decompose_settings
k = load_config().get("kanban", {})
enabled, per_tick = _resolve_auto_decompose_settings(load_config)
out = {"auto_decompose": enabled, "auto_decompose_per_tick": per_tick,
       "dispatch_in_gateway": bool(k.get("dispatch_in_gateway", True))}
try:
    from gateway.kanban_watchers_dispatcher import _resolve_dispatcher_settings
    from gateway.kanban_watchers_common import _positive_int_setting
except ImportError:
    # the watcher's own expressions (0.19.0's, 0.20.1's kanban_watchers.py)
    try:
        stale = int(k.get("dispatch_stale_timeout_seconds", 0) or 0)
    except (TypeError, ValueError):
        stale = 0
    out.update({"max_spawn": k.get("max_spawn", None), "stale": stale,
                "default_assignee": (k.get("default_assignee") or "").strip() or None})
else:
    from hermes_cli import kanban_db as kb
    s = _resolve_dispatcher_settings(k, kb)
    out.update({"max_spawn": s.max_spawn, "stale": s.stale_timeout_seconds,
                "default_assignee": s.default_assignee, "failure_limit": s.failure_limit,
                # as configured; unset, 0.22 derives one from memory (dispatch::caps)
                "max_in_progress": _positive_int_setting(k, "max_in_progress"),
                "max_in_progress_per_profile": s.max_in_progress_per_profile})
print(json.dumps(out))
"#;
    let o = std::process::Command::new(venv.join("bin/python"))
        .args(["-c", script])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", home)
        .env("HERMES_HOME", home)
        .env("HERMES_MANAGED_DIR", home.join("no-managed-scope"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Parity with upstream's own code, value by value, over the YAML a user may write. One
/// deliberate difference: a *quoted* "no"/"off"/"false" is a string to PyYAML and
/// `bool("no")` is true there; hermes-mgr reads it as off (the user's evident meaning, and
/// the safe side of a toggle that stops runaway fan-out).
#[test]
fn hermes_config_yaml_is_read_as_upstream_reads_it() {
    config_yaml_read_as(&crate::harness::venv());
}

#[test]
fn hermes_config_yaml_is_read_as_020_reads_it() {
    config_yaml_read_as(&crate::harness::venv_020());
}

#[test]
fn hermes_config_yaml_is_read_as_022_reads_it() {
    config_yaml_read_as(&crate::harness::venv_022());
}

fn config_yaml_read_as(venv: &std::path::Path) {
    let dir = crate::harness::scratch();
    let rows = [
        "kanban:\n  auto_decompose: no\n",
        "kanban:\n  auto_decompose: off\n  auto_decompose_per_tick: 0\n",
        "kanban:\n  auto_decompose: 0\n  auto_decompose_per_tick: -2\n",
        "kanban:\n  auto_decompose: ~\n  auto_decompose_per_tick: 2.7\n",
        "kanban:\n  auto_decompose: yes\n  auto_decompose_per_tick: abc\n",
        "kanban:\n  auto_decompose: []\n  dispatch_in_gateway: false\n",
        "kanban:\n  dispatch_in_gateway: no\n  max_spawn: 4\n  default_assignee: coder\n",
        "kanban:\n  max_spawn: ~\n  default_assignee: ~\n",
        "kanban:\n  dispatch_stale_timeout_seconds: 0\n",
        "kanban:\n  dispatch_stale_timeout_seconds: ~\n",
        "kanban:\n  dispatch_stale_timeout_seconds: abc\n",
        "kanban:\n  dispatch_stale_timeout_seconds: 120\n",
        "kanban:\n  max_in_progress: 3\n  max_in_progress_per_profile: 2\n  failure_limit: 5\n",
        "kanban:\n  max_in_progress: 0\n  max_in_progress_per_profile: -1\n  failure_limit: 0\n",
        "kanban:\n  max_in_progress: abc\n  max_in_progress_per_profile: ~\n  failure_limit: abc\n",
        "kanban:\n  max_in_progress: 2.7\n  max_in_progress_per_profile: '4'\n  failure_limit: '3'\n",
        "model:\n  default: x\n",
        "",
    ];
    for yaml in rows {
        std::fs::write(dir.path().join("config.yaml"), yaml).unwrap();
        let theirs = upstream_reading(venv, dir.path());
        let ours = hermes_mgr::hermes_config::load(&hermes_mgr::hermes_config::Files {
            user: dir.path().join("config.yaml"),
            managed: None,
        })
        .unwrap()
        .kanban;
        let mut ours = serde_json::json!({
            "auto_decompose": ours.auto_decompose,
            "auto_decompose_per_tick": ours.auto_decompose_per_tick,
            "dispatch_in_gateway": ours.dispatch_in_gateway,
            "max_spawn": ours.max_spawn,
            "default_assignee": ours.default_assignee,
            "stale": ours.dispatch_stale_timeout_seconds,
            "failure_limit": ours.failure_limit,
            "max_in_progress": ours.max_in_progress,
            "max_in_progress_per_profile": ours.max_in_progress_per_profile,
        });
        // What this version's code can be asked of (the rest is inline in older gateways).
        ours.as_object_mut()
            .unwrap()
            .retain(|k, _| theirs.get(k).is_some());
        assert_eq!(ours, theirs, "{yaml:?}");
    }
}

systemd_test!(
    a_worker_silent_past_the_stale_timeout_is_stopped_and_requeued_uncounted,
    {
        // kanban.dispatch_stale_timeout_seconds (Hermes' default 14400) at 2 s; the
        // safety-net tick that checks it every second.
        let d = Dispatcher::new("tick_seconds = 1");
        write_hermes_config(&d, "kanban:\n  dispatch_stale_timeout_seconds: 2\n");
        d.install();
        d.start();
        let id = d.rig.add("never sends a heartbeat");
        let r1 = d.wait_running(&id, 0);
        let r2 = d.wait_running(&id, r1);
        let run = d.rig.board().run(r1).unwrap().unwrap();
        assert_eq!(run.outcome.as_deref(), Some("stale"), "{run:?}");
        assert!(
            run.error
                .as_deref()
                .is_some_and(|e| e.starts_with("no heartbeat ever after")),
            "{run:?}"
        );
        assert_eq!(
            d.task(&id).consecutive_failures,
            0,
            "a stale run is not the worker's failure"
        );
        let stale = d
            .rig
            .board()
            .events(&id)
            .unwrap()
            .into_iter()
            .find(|e| e.kind == "stale")
            .unwrap();
        assert_eq!(stale.payload.unwrap()["timeout_seconds"], 2);
        // Upstream's own CLI tells the same story.
        let runs = crate::harness::hermes(&d.rig.db, &["runs", &id]);
        assert!(runs.stdout.contains("stale"), "{}", runs.stdout);
        assert!(r2 > r1);
    }
);

systemd_test!(
    hermes_pause_holds_every_start_and_keeps_booking_and_resume_lets_them_go,
    {
        // Hermes 0.22's emergency stop (`hermes pause`): an `ESTOP` file in the Hermes home,
        // JSON as upstream writes it. Before: a task created after it started within
        // seconds. Every Hermes version gets it: the file is the contract.
        let d = Dispatcher::new("tick_seconds = 3600");
        d.install();
        d.start();
        let a = d.rig.add("running before the stop");
        let ra = d.wait_running(&a, 0);
        let estop = d.rig.dir.join("ESTOP");
        std::fs::write(
            &estop,
            "{\n  \"engaged_at\": \"2026-12-05T00:00:00+00:00\",\n  \"reason\": \"agents burning money\"\n}\n",
        )
        .unwrap();
        std::os::unix::fs::chown(&estop, Some(d.rig.uid), None).unwrap();
        let status = || systemctl_show(SERVICE, "StatusText");
        // The service says the stop holds the one ready task.
        let holding_one = |what: &str| {
            wait_for(what, Duration::from_secs(10), || {
                let s = status();
                (s.contains("EMERGENCY STOP") && s.contains("1 ready")).then_some(())
            })
        };
        wait_for("the stop seen", Duration::from_secs(10), || {
            status().contains("EMERGENCY STOP").then_some(())
        });
        // A task made now is seen and held: the status line counts it, nothing starts it.
        let b = d.rig.add("made during the stop");
        holding_one("the new task seen and held");
        assert_eq!(d.task(&b).status.as_str(), "ready");
        // A running worker is still supervised and booked (upstream's gateway stops booking).
        d.command(&a, ra, "complete");
        wait_for(
            "the run booked during the stop",
            Duration::from_secs(20),
            || {
                let runs = d.rig.board().runs(&a).unwrap();
                runs.iter()
                    .any(|r| r.id == ra && r.ended_at.is_some())
                    .then_some(())
            },
        );
        assert_eq!(d.task(&a).status.as_str(), "done");
        assert_eq!(d.task(&b).status.as_str(), "ready");
        // `status` and `doctor` say so.
        let st = d.rig.mgr(&["status"]);
        assert!(st.stdout.contains("EMERGENCY STOP"), "{}", st.stdout);
        let doc = d.rig.mgr(&["doctor", "--json"]);
        assert!(doc.stdout.contains("emergency stop"), "{}", doc.stdout);
        // With the service stopped, `dispatch --once` refuses too, naming the file; the
        // service started again holds as well.
        crate::rig::sh(&format!("systemctl stop {SERVICE}"));
        let once = d.rig.mgr(&["dispatch", "--once"]);
        assert_eq!(once.code, Some(1), "{}", once.stdout);
        assert!(
            once.stderr.contains("EMERGENCY STOP") && once.stderr.contains("ESTOP"),
            "{}",
            once.stderr
        );
        assert_eq!(d.task(&b).status.as_str(), "ready");
        d.start();
        holding_one("the stop seen after a restart");
        // `hermes resume` removes it: the held task starts at once (inotify, not a tick).
        std::fs::remove_file(&estop).unwrap();
        d.wait_running(&b, 0);
        wait_for(
            "the status without the stop",
            Duration::from_secs(10),
            || (!status().contains("EMERGENCY STOP")).then_some(()),
        );
    }
);

/// ~0.22's cap on running tasks when `kanban.max_in_progress` is unset, derived from the
/// host's memory by its own `derive_default_max_in_progress`, against ours, sample by sample.
#[test]
fn the_default_cap_022_derives_from_memory_is_ours() {
    let samples: [u64; 9] = [
        0,
        1,
        512 * 1024,
        1024 * 1024 - 1,
        1024 * 1024,
        3 * 1024 * 1024,
        3 * 1024 * 1024 + 512 * 1024,
        24 * 1024 * 1024,
        1024 * 1024 * 1024,
    ];
    let script = "import json, sys\nfrom hermes_cli.kanban_db_dispatch import derive_default_max_in_progress as d\nprint(json.dumps([d({'mem_total_kib': int(n)}) for n in sys.argv[1:]]))";
    let home = crate::harness::scratch();
    let o = std::process::Command::new(crate::harness::venv_022().join("bin/python"))
        .args(["-c", script])
        .args(samples.map(|n| n.to_string()))
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", home.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let theirs: Vec<Option<usize>> = serde_json::from_slice(&o.stdout).unwrap();
    let ours: Vec<Option<usize>> = samples
        .iter()
        .map(|n| hermes_mgr::dispatch::caps::derived_max_in_progress(*n))
        .collect();
    assert_eq!(ours, theirs, "{samples:?}");
}

systemd_test!(max_in_progress_caps_the_host_under_022, {
    // `kanban.max_in_progress: 1` and a task on each of two boards: ~0.22 caps the host
    // (one runs; the other starts when it ends)…
    max_in_progress_counts(&crate::harness::venv_022(), true);
});

systemd_test!(max_in_progress_caps_each_board_under_019, {
    // …0.19.0 caps each board (both run).
    max_in_progress_counts(&crate::harness::venv(), false);
});

/// Workers run by `venv`'s interpreter (so the Hermes served is that venv's); `host_wide`:
/// its `max_in_progress` caps every board together.
fn max_in_progress_counts(venv: &std::path::Path, host_wide: bool) {
    let stub = format!(
        "#!{}\nimport time\ntime.sleep(3600)\n",
        venv.join("bin/python3").display()
    );
    let d = Dispatcher::with_stub(&stub, "tick_seconds = 3600");
    write_hermes_config(&d, "kanban:\n  max_in_progress: 1\n");
    let hermes =
        |args: &[&str]| crate::boards::hermes_with(&crate::harness::hermes_bin(), &d, args);
    hermes(&["boards", "create", "ops"]);
    let here = d.rig.add("on the default board");
    let there = hermes(&[
        "--board",
        "ops",
        "create",
        "on the ops board",
        "--assignee",
        "default",
        "--json",
    ])
    .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Both exist before the first pass, which passes every board.
    d.install_all_boards();
    d.start();
    let status = || systemctl_show(SERVICE, "StatusText");
    let wait_status = |what: &str, start: &str| {
        let until = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let s = status();
            if s.trim_start_matches("StatusText=").starts_with(start) {
                return;
            }
            assert!(
                std::time::Instant::now() < until,
                "{what}: the service says {s:?}\n{}\nworkers:\n{}",
                journal(SERVICE),
                journal("hermes-worker-kanban-*")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    if !host_wide {
        wait_status("a worker on each board", "2 running (2 in scopes), 0 ready");
        return;
    }
    wait_status(
        "one worker for the host",
        "1 running (1 in scopes), 1 ready",
    );
    let board_of = |id: &str| if *id == here { "default" } else { "ops" };
    let running = [&here, &there]
        .into_iter()
        .find(|id| {
            crate::boards::board(&d, board_of(id))
                .require_task(id)
                .unwrap()
                .status
                == hermes_mgr::board::Status::Running
        })
        .unwrap()
        .clone();
    let waiting = if running == here { &there } else { &here };
    crate::boards::mgr(&d, &["stop", &running, "--json"]).ok();
    wait_for(
        "the other board's task started",
        Duration::from_secs(30),
        || {
            (crate::boards::board(&d, board_of(waiting))
                .require_task(waiting)
                .unwrap()
                .status
                == hermes_mgr::board::Status::Running)
                .then_some(())
        },
    );
}
