//! Workers in their scopes, against a real systemd (inside the sandbox): `dispatch --once`,
//! the worker's process, journald, `stop`, spawn failures, hostile task data.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hermes_mgr::liveness;
use serde_json::{json, Value};

use crate::harness::{hermes_bin, wait_for};
use crate::rig::{alive, sh, systemctl_show, Rig, EXTRA_GROUP, WORKER_USER};
use crate::systemd_test;

fn status_field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(str::trim)
        .unwrap_or_else(|| panic!("{key} missing"))
}

/// Reports its process facts into its workspace, forks a child at once, logs a line to
/// stdout and one to stderr, then waits to be stopped.
const INSPECT: &str = r#"#!/bin/sh
sleep 1000 &
child=$!
{
  echo "child=$child"
  echo "pid=$$"
  echo "cwd=$(pwd)"
  echo "argv=$*"
  echo "--status"; cat /proc/self/status
  echo "--env"; env
  echo "END"
} > report.tmp && mv report.tmp report
echo "hello-stdout from $HERMES_KANBAN_TASK"
echo "hello-stderr from $HERMES_KANBAN_TASK" >&2
wait
"#;

systemd_test!(
    a_worker_runs_in_its_scope_as_the_worker_user_with_the_contract,
    {
        let rig = Rig::new(
            INSPECT,
            "memory_max_bytes = 268435456\ntasks_max = 64\ncpu_quota_percent = 50",
        );
        let id = rig.add("Inspect yourself");
        let mut cmd = rig.mgr_cmd(&["dispatch", "--once", "--json"]);
        // A dispatcher running as a service has these; no worker may inherit them.
        cmd.env("NOTIFY_SOCKET", "/run/systemd/notify")
            .env("WATCHDOG_USEC", "30000000")
            .env("WATCHDOG_PID", "1")
            .env("INVOCATION_ID", "0123456789abcdef")
            .env("JOURNAL_STREAM", "8:12345")
            .env("LISTEN_FDS", "1")
            .env("LISTEN_PID", "1");
        let out = crate::harness::run(cmd).ok().json();
        let spawned = &out["spawned"][0];
        assert_eq!(spawned["task_id"], json!(id), "{out}");
        let unit = spawned["unit"].as_str().unwrap().to_string();
        assert_eq!(unit, format!("hermes-worker-kanban-{id}-run-1.scope"));
        let ws = PathBuf::from(spawned["workspace"].as_str().unwrap());
        let report = rig.wait_file(&ws.join("report"));
        let get = |k: &str| {
            report
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("{k}"))
                .to_string()
        };
        let (pid, child): (u32, u32) = (get("pid").parse().unwrap(), get("child").parse().unwrap());
        assert_eq!(
            spawned["pid"],
            json!(pid),
            "the board's worker pid is the worker's"
        );

        // Every process of the task is in the scope, also the child forked at once.
        let cg = hermes_mgr::config::Config::default().worker_cgroup(None, &unit);
        let procs = std::fs::read_to_string(format!("/sys/fs/cgroup{cg}/cgroup.procs")).unwrap();
        for p in [pid, child] {
            assert!(
                procs.lines().any(|l| l == p.to_string()),
                "{p} not in {cg}: {procs}"
            );
            assert_eq!(
                liveness::cgroup_of(p).unwrap().as_deref(),
                Some(cg.as_str())
            );
        }

        // Identity and privileges.
        let status = report
            .split("--status\n")
            .nth(1)
            .unwrap()
            .split("--env\n")
            .next()
            .unwrap();
        let uid = rig.uid.to_string();
        assert!(
            status_field(status, "Uid")
                .split_whitespace()
                .all(|u| u == uid),
            "{status}"
        );
        let gid = sh(&format!("id -g {WORKER_USER}")).trim().to_string();
        assert!(status_field(status, "Gid")
            .split_whitespace()
            .all(|g| g == gid));
        let extra = sh(&format!("getent group {EXTRA_GROUP} | cut -d: -f3"))
            .trim()
            .to_string();
        let groups: Vec<&str> = status_field(status, "Groups").split_whitespace().collect();
        assert!(
            groups.contains(&extra.as_str()) && groups.contains(&gid.as_str()),
            "groups {groups:?}"
        );
        for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(status_field(status, cap), "0000000000000000", "{cap}");
        }
        assert_eq!(status_field(status, "NoNewPrivs"), "1");

        // The environment contract, and nothing of the dispatcher's service.
        let env: Vec<&str> = report.split("--env\n").nth(1).unwrap().lines().collect();
        let var = |k: &str| {
            env.iter()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(str::to_string)
        };
        assert_eq!(var("HERMES_KANBAN_TASK").as_deref(), Some(id.as_str()));
        assert_eq!(var("HERMES_KANBAN_RUN_ID").as_deref(), Some("1"));
        assert!(var("HERMES_KANBAN_CLAIM_LOCK").unwrap().contains(':'));
        assert_eq!(
            var("HERMES_KANBAN_DB").map(PathBuf::from),
            Some(std::fs::canonicalize(&rig.db).unwrap())
        );
        assert_eq!(var("HERMES_KANBAN_BOARD").as_deref(), Some("default"));
        assert_eq!(
            var("HERMES_KANBAN_WORKSPACE").as_deref(),
            Some(ws.to_str().unwrap())
        );
        assert_eq!(var("TERMINAL_CWD").as_deref(), Some(ws.to_str().unwrap()));
        assert_eq!(var("HERMES_PROFILE").as_deref(), Some("default"));
        assert_eq!(
            var("HERMES_HOME").map(PathBuf::from),
            Some(std::fs::canonicalize(&rig.dir).unwrap())
        );
        assert!(var("HERMES_KANBAN_WORKSPACES_ROOT").is_some());
        assert_eq!(var("USER").as_deref(), Some(WORKER_USER));
        let tmp = var("TMPDIR").expect("TMPDIR");
        assert_eq!(var("TMUX_TMPDIR").as_deref(), Some(tmp.as_str()));
        assert!(
            Path::new(&tmp).is_dir(),
            "per-run TMPDIR exists while the run lives"
        );
        for k in [
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "INVOCATION_ID",
            "LISTEN_FDS",
            "LISTEN_PID",
        ] {
            assert_eq!(var(k), None, "{k} leaked into the worker");
        }
        assert_ne!(
            var("JOURNAL_STREAM").as_deref(),
            Some("8:12345"),
            "the dispatcher's JOURNAL_STREAM leaked"
        );
        assert_eq!(get("cwd"), ws.to_str().unwrap());
        assert_eq!(
            get("argv"),
            format!("-p default --cli --accept-hooks chat -q work kanban task {id}")
        );

        // Output reaches journald, attributed to the scope.
        let journal = wait_for(
            "worker lines in the journal",
            Duration::from_secs(20),
            || {
                let o = Command::new("journalctl")
                    .args(["-u", &unit, "-o", "json", "--no-pager"])
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&o.stdout).into_owned();
                (text.contains("hello-stdout") && text.contains("hello-stderr")).then_some(text)
            },
        );
        for line in journal.lines().filter(|l| l.contains("hello-")) {
            let v: Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["_SYSTEMD_UNIT"], json!(unit), "{line}");
            // Named by the supervisor too (found by `journalctl -u` after it is gone), with
            // the task it belongs to.
            assert_eq!(v["OBJECT_SYSTEMD_UNIT"], json!(unit), "{line}");
            assert_eq!(v["HERMES_KANBAN_TASK"], json!(id), "{line}");
            assert_eq!(v["_UID"], json!("0"), "{line}");
            let want_prio = if line.contains("hello-stderr") {
                "3"
            } else {
                "6"
            };
            assert_eq!(v["PRIORITY"], json!(want_prio), "{line}");
        }

        // The unit carries the properties it was made with (read back over D-Bus).
        let props = systemctl_show(&unit, "Slice,KillMode,KillSignal,SendSIGKILL,TimeoutStopUSec,CollectMode,MemoryMax,TasksMax,CPUQuotaPerSecUSec,Description");
        let slice = format!(
            "Slice={}",
            hermes_mgr::names::worker_slice("hermes-workers.slice", &unit)
        );
        for want in [
            slice.as_str(),
            "KillMode=control-group",
            "KillSignal=15",
            "SendSIGKILL=yes",
            "TimeoutStopUSec=5s",
            "CollectMode=inactive-or-failed",
            "MemoryMax=268435456",
            "TasksMax=64",
            "CPUQuotaPerSecUSec=500ms",
            &format!("Description=Hermes kanban worker: task {id} run 1: Inspect yourself"),
        ] {
            assert!(props.lines().any(|l| l == want), "{want} not in\n{props}");
        }
        let controllers =
            std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
        if controllers.split_whitespace().any(|c| c == "memory") {
            let max = std::fs::read_to_string(format!("/sys/fs/cgroup{cg}/memory.max")).unwrap();
            assert_eq!(max.trim(), "268435456");
        } else {
            println!("SKIP enforcement of MemoryMax/TasksMax/CPUQuota: no cgroup controllers in this sandbox (cgroup.controllers = {controllers:?})");
        }

        let stop = rig.mgr(&["stop", &id, "--json"]).ok().json();
        assert_eq!(stop["how"], json!("exited_after_sigterm"), "{stop}");
        assert_eq!(stop["task_status"], json!("blocked"));
        assert!(
            !alive(pid) && !alive(child),
            "a process of the task survived"
        );
        assert!(
            !Path::new(&tmp).exists(),
            "the run's TMPDIR was not removed"
        );
        let runs = rig.board().runs(&id).unwrap();
        assert_eq!(runs[0].outcome.as_deref(), Some("stopped"));
    }
);

/// The seed's bug: a non-daemon thread blocked forever, and a SIGTERM handler that flushes
/// and hard-exits (hermes-agent PR #34045).
const COOPERATIVE: &str = r#"#!/usr/bin/python3
import os, signal, sys, threading
def on_term(signum, frame):
    print("got SIGTERM, exiting", flush=True)
    sys.stdout.flush()
    os._exit(0)
signal.signal(signal.SIGTERM, on_term)
threading.Thread(target=threading.Event().wait).start()   # non-daemon, blocked forever
with open("ready.tmp", "w") as f:
    f.write(f"pid={os.getpid()}\nEND\n")
os.rename("ready.tmp", "ready")
threading.Event().wait()
"#;

/// Ignores SIGTERM, and leaves a grandchild in a session of its own (setsid, double fork)
/// that ignores it too: only the whole-cgroup SIGKILL reaches both.
const STUBBORN: &str = r#"#!/usr/bin/python3
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.write(w, str(os.getpid()).encode())
        os.close(w)
        while True:
            time.sleep(1)
    os._exit(0)
os.close(w)
grandchild = int(os.read(r, 32))
with open("ready.tmp", "w") as f:
    f.write(f"pid={os.getpid()}\ngrandchild={grandchild}\nEND\n")
os.rename("ready.tmp", "ready")
while True:
    time.sleep(1)
"#;

fn field(report: &str, k: &str) -> u32 {
    report
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{k}=")))
        .unwrap()
        .parse()
        .unwrap()
}

systemd_test!(
    stop_ends_a_cooperative_worker_on_sigterm_and_a_stubborn_one_with_sigkill,
    {
        let coop = Rig::new(COOPERATIVE, "");
        let id = coop.add("cooperative");
        let out = coop.dispatch();
        let ws = PathBuf::from(out["spawned"][0]["workspace"].as_str().unwrap());
        let pid = field(&coop.wait_file(&ws.join("ready")), "pid");
        let stop = coop
            .mgr(&["stop", &id, "--timeout", "3", "--json"])
            .ok()
            .json();
        println!(
            "cooperative worker: stop took {} ms (TimeoutStopSec=3s)",
            stop["elapsed_ms"]
        );
        assert_eq!(stop["how"], json!("exited_after_sigterm"), "{stop}");
        assert_eq!(stop["worker_exit"], json!("exit code 0"));
        assert!(!alive(pid));

        let stubborn = Rig::new(STUBBORN, "");
        let id = stubborn.add("stubborn");
        let out = stubborn.dispatch();
        let unit = out["spawned"][0]["unit"].as_str().unwrap().to_string();
        let ws = PathBuf::from(out["spawned"][0]["workspace"].as_str().unwrap());
        let ready = stubborn.wait_file(&ws.join("ready"));
        let (pid, grandchild) = (field(&ready, "pid"), field(&ready, "grandchild"));
        let cg = hermes_mgr::config::Config::default().worker_cgroup(None, &unit);
        assert_eq!(
            liveness::cgroup_of(grandchild).unwrap().as_deref(),
            Some(cg.as_str()),
            "the setsid grandchild left the scope"
        );
        let text = stubborn.mgr(&["stop", &id, "--timeout", "1"]).ok().stdout;
        println!("{text}");
        assert!(
            text.contains("killed with SIGKILL after the 1s timeout"),
            "{text}"
        );
        assert!(
            !alive(pid) && !alive(grandchild),
            "a process of the task survived the stop"
        );
        assert!(
            !Path::new(&format!("/sys/fs/cgroup{cg}")).exists(),
            "the scope's cgroup is still there"
        );
        let t = stubborn.board().require_task(&id).unwrap();
        assert_eq!(
            (t.status.as_str(), t.consecutive_failures),
            ("blocked", 0),
            "an operator's stop is not the worker's failure"
        );
    }
);

systemd_test!(spawn_failures_leave_no_scope_and_no_process, {
    // The binary is missing: caught before any scope exists.
    let rig = Rig::new("#!/bin/sh\nexit 0\n", "");
    std::fs::remove_file(rig.dir.join("worker")).unwrap();
    let id = rig.add("no binary");
    let out = rig.dispatch();
    assert_eq!(out["spawn_failed"][0]["task_id"], json!(id), "{out}");
    let err = out["spawn_failed"][0]["error"].as_str().unwrap();
    assert!(
        err.contains("does not exist") && err.contains("hermes_bin"),
        "{err}"
    );
    let run = &rig.board().runs(&id).unwrap()[0];
    assert_eq!(
        (run.outcome.as_deref(), run.error.as_deref()),
        (Some("spawn_failed"), Some(err))
    );
    // The binary is the dispatcher's configuration: not the task's failure.
    assert_eq!(
        out["spawn_failed"][0]["infrastructure"],
        json!(true),
        "{out}"
    );
    assert_eq!(
        rig.board().require_task(&id).unwrap().consecutive_failures,
        0
    );

    // The binary exists but cannot be executed: found out inside the scope, which is then
    // removed with everything in it.
    let rig = Rig::new("this is not a program\n", "");
    let id = rig.add("bad binary");
    let out = rig.dispatch();
    let err = out["spawn_failed"][0]["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        err.contains("exec") && err.contains("Exec format error"),
        "{err}"
    );
    assert_eq!(
        out["spawn_failed"][0]["infrastructure"],
        json!(true),
        "{out}"
    );
    assert_eq!(
        rig.board().require_task(&id).unwrap().status.as_str(),
        "ready",
        "one spawn failure requeues"
    );

    // The workspace is not a directory.
    let rig = Rig::new("#!/bin/sh\nexit 0\n", "");
    let id = rig.add("bad workspace");
    rig.board()
        .connection()
        .execute(
            "UPDATE tasks SET workspace_kind='dir', workspace_path='/etc/passwd' WHERE id=?1",
            [&id],
        )
        .unwrap();
    let out = rig.dispatch();
    let err = out["spawn_failed"][0]["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        err.contains("cannot enter the workspace /etc/passwd") && err.contains("Not a directory"),
        "{err}"
    );
    // A `dir:` workspace is the task's own: counted.
    assert_eq!(
        out["spawn_failed"][0]["infrastructure"],
        json!(false),
        "{out}"
    );
    assert_eq!(
        rig.board().require_task(&id).unwrap().consecutive_failures,
        1
    );

    assert!(
        crate::rig::worker_units(true).is_empty(),
        "scopes left behind: {}",
        crate::rig::worker_units(true)
    );
    let supervisors: Vec<i32> = procfs::process::all_processes()
        .unwrap()
        .filter_map(|p| p.ok())
        .filter(|p| {
            p.cmdline()
                .is_ok_and(|c| c.len() == 2 && c[0] == "hermes-mgr" && c[1] == "supervise")
        })
        .map(|p| p.pid)
        .collect();
    assert!(
        supervisors.is_empty(),
        "supervisors left behind: {supervisors:?}"
    );
});

/// Records the id it was given, and the title and id go into the unit.
const ECHO_ID: &str = "#!/bin/sh\nprintf '%s' \"$HERMES_KANBAN_TASK\" > id.tmp && echo END >> id.tmp && mv id.tmp id\nsleep 1000\n";

systemd_test!(hostile_task_ids_and_titles_inject_nothing, {
    let rig = Rig::new(ECHO_ID, "max_spawn = 10");
    let long = format!("t_{}", "é".repeat(150));
    let hostile = [
        "../../etc/x",
        "a'b\"c$(touch /pwned)`id`",
        "t\nExecStart=/bin/sh",
        long.as_str(),
        "t_ok-run-9.scope",
    ];
    let b = rig.board();
    for (i, id) in hostile.iter().enumerate() {
        b.connection()
            .execute(
                "INSERT INTO tasks (id, title, assignee, status, created_at) VALUES (?1, ?2, 'default', 'ready', ?3)",
                rusqlite::params![id, format!("title {i}\nDescription=evil\x1b[2J; rm -rf / 'q' \"dq\" ünï"), i as i64],
            )
            .unwrap();
    }
    let out = rig.dispatch();
    assert_eq!(
        out["spawned"].as_array().unwrap().len(),
        hostile.len(),
        "{out}"
    );
    for s in out["spawned"].as_array().unwrap() {
        let id = s["task_id"].as_str().unwrap();
        let unit = s["unit"].as_str().unwrap();
        let tail = format!("-run-{}.scope", s["run_id"]);
        assert!(
            unit.starts_with("hermes-worker-kanban-")
                && unit.ends_with(&tail)
                && !unit.contains('/'),
            "{unit}"
        );
        assert_eq!(
            unit.matches("-run-").count(),
            1,
            "{unit}: the id forged a separator"
        );
        let desc = systemctl_show(unit, "Description");
        assert_eq!(
            desc.lines().count(),
            1,
            "a newline reached the description: {desc:?}"
        );
        assert!(
            desc.contains("Description=evil") && !desc.contains('\x1b'),
            "{desc:?}"
        );
        let ws = PathBuf::from(s["workspace"].as_str().unwrap());
        assert_eq!(
            ws.parent().unwrap(),
            rig.dir.join("kanban/workspaces").canonicalize().unwrap(),
            "{ws:?} escaped the workspaces root"
        );
        let got = rig.wait_file(&ws.join("id"));
        assert_eq!(
            got.strip_suffix("END\n").unwrap(),
            id,
            "the worker got a different id"
        );
        rig.mgr(&["stop", id]).ok();
    }
    assert!(!Path::new("/pwned").exists() && !Path::new("/etc/x").exists());
});

systemd_test!(a_stub_worker_completes_its_task_with_the_real_hermes_cli, {
    let hermes = hermes_bin();
    let stub = format!(
        "#!/bin/sh\nexec {} kanban complete \"$HERMES_KANBAN_TASK\" --summary \"stub did it\"\n",
        hermes.display()
    );
    let rig = Rig::new(&stub, "");
    let id = rig.add("let hermes finish it");
    let out = rig.dispatch();
    let unit = out["spawned"][0]["unit"]
        .as_str()
        .unwrap_or_else(|| panic!("{out}"))
        .to_string();
    let status = PathBuf::from(format!(
        "/run/hermes-mgr-test/runs/{id}-run-{}.json",
        out["spawned"][0]["run_id"]
    ));
    assert!(unit.ends_with(".scope"));
    let st: Value = wait_for(
        "the supervisor's exit record",
        Duration::from_secs(60),
        || {
            std::fs::read(&status)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
        },
    );
    assert_eq!(st["exit_code"], json!(0), "{st}");
    let t = rig.board().require_task(&id).unwrap();
    assert_eq!(t.status.as_str(), "done");
    let run = &rig.board().runs(&id).unwrap()[0];
    assert_eq!(
        (run.outcome.as_deref(), run.summary.as_deref()),
        (Some("completed"), Some("stub did it"))
    );
});

/// Waits for a line on a FIFO in its workspace, then exits with that code.
const EXIT_ON_COMMAND: &str =
    "#!/bin/sh\nmkfifo cmd && echo END > ready\nread code < cmd\nexit \"$code\"\n";

systemd_test!(
    the_exit_status_outlives_the_process_that_launched_the_worker,
    {
        let rig = Rig::new(EXIT_ON_COMMAND, "");
        let id = rig.add("exit later");
        // `dispatch --once` claims, starts and exits: nobody that launched the worker is left.
        let out = rig.dispatch();
        let run = out["spawned"][0]["run_id"]
            .as_i64()
            .unwrap_or_else(|| panic!("{out}"));
        let ws = PathBuf::from(out["spawned"][0]["workspace"].as_str().unwrap());
        rig.wait_file(&ws.join("ready"));
        std::fs::write(ws.join("cmd"), "3\n").unwrap();
        let st = wait_for("the exit record", Duration::from_secs(20), || {
            hermes_mgr::state_dir::read_record(
                Path::new("/run/hermes-mgr-test"),
                "default",
                &id,
                run,
            )
            .unwrap()
        });
        assert_eq!(
            (st.exit_code, st.signal, st.task.as_str(), st.run_id),
            (Some(3), None, id.as_str(), run)
        );
        // What a dispatcher later makes of it: a counted crash.
        let facts = hermes_mgr::outcome::Facts {
            unit: &st.unit,
            record: Some(&st),
            scope: hermes_mgr::outcome::Scope::Gone,
            watched: false,
            operator_stop: None,
            max_runtime: None,
            stale: None,
            hermes: hermes_mgr::contract::Generation::V019,
            board_full: false,
        };
        let hermes_mgr::outcome::Decision::Ended(end) = hermes_mgr::outcome::decide(&facts) else {
            panic!("a run with an exit record is over")
        };
        let rules = hermes_mgr::outcome::Rules {
            failure_limit: 2,
            hermes: hermes_mgr::contract::Generation::V019,
        };
        let r = rig.board().end_run(&id, run, &end, rules).unwrap().unwrap();
        assert_eq!((r.status.as_str(), r.failures), ("ready", 1));
        assert_eq!(
            rig.board().runs(&id).unwrap()[0].error.as_deref(),
            Some(format!("pid {} exited with code 3", st.worker_pid).as_str())
        );
    }
);

systemd_test!(
    a_scope_name_already_taken_fails_the_spawn_and_leaves_the_other_scope_alone,
    {
        let rig = Rig::new("#!/bin/sh\nexec sleep 1000\n", "");
        let id = rig.add("collides");
        // Someone else's scope holds the name the next run will get (run ids start at 1).
        let mut squatter = Command::new("systemd-run")
            .args([
                "--scope",
                "--quiet",
                &format!("--unit=hermes-worker-kanban-{id}-run-1"),
                "--",
                "sleep",
                "1000",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let unit = format!("hermes-worker-kanban-{id}-run-1.scope");
        wait_for("the squatting scope", Duration::from_secs(10), || {
            systemctl_show(&unit, "ActiveState")
                .contains("=active")
                .then_some(())
        });
        let out = rig.dispatch();
        let err = out["spawn_failed"][0]["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{out}"));
        assert!(err.contains("already exists"), "{err}");
        assert!(
            systemctl_show(&unit, "ActiveState").contains("ActiveState=active"),
            "the other scope was stopped"
        );
        assert!(alive(squatter.id()));
        let supervisors = procfs::process::all_processes()
            .unwrap()
            .filter_map(|p| p.ok())
            .filter(|p| {
                p.cmdline()
                    .is_ok_and(|c| c.len() == 2 && c[0] == "hermes-mgr" && c[1] == "supervise")
            })
            .count();
        assert_eq!(supervisors, 0, "the held supervisor was not reaped");
        Command::new("systemctl")
            .args(["stop", &unit])
            .status()
            .unwrap();
        squatter.wait().unwrap();
    }
);

systemd_test!(
    with_worker_log_file_output_goes_to_the_journal_and_to_upstreams_log,
    {
        let stub = "#!/bin/sh\necho \"line to stdout $HERMES_KANBAN_TASK\"\necho \"line to stderr $HERMES_KANBAN_TASK\" >&2\nexec sleep 1000\n";
        let rig = Rig::new(stub, "worker_log_file = true");
        let id = rig.add("logs twice");
        let out = rig.dispatch();
        let unit = out["spawned"][0]["unit"]
            .as_str()
            .unwrap_or_else(|| panic!("{out}"))
            .to_string();
        let log = rig.dir.join("kanban/logs").join(format!("{id}.log"));
        let text = wait_for(
            "both lines in the log file",
            Duration::from_secs(20),
            || {
                std::fs::read_to_string(&log)
                    .ok()
                    .filter(|t| t.contains("line to stdout") && t.contains("line to stderr"))
            },
        );
        assert!(text.contains(&id));
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(&log).unwrap().uid(),
            rig.uid,
            "the log is not the board owner's"
        );
        let journal = wait_for("both lines in the journal", Duration::from_secs(20), || {
            let o = Command::new("journalctl")
                .args(["-u", &unit, "-o", "json", "--no-pager"])
                .output()
                .unwrap();
            let t = String::from_utf8_lossy(&o.stdout).into_owned();
            (t.contains("line to stdout") && t.contains("line to stderr")).then_some(t)
        });
        for line in journal.lines().filter(|l| l.contains("line to std")) {
            let v: Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["_SYSTEMD_UNIT"], json!(unit));
        }
        // Upstream's own reader finds it.
        let o = Command::new(hermes_bin())
            .args(["kanban", "log", &id])
            .env("HERMES_KANBAN_DB", &rig.db)
            .env("HERMES_KANBAN_HOME", &rig.dir)
            .env("HOME", &rig.dir)
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&o.stdout);
        assert!(
            shown.contains("line to stdout") && shown.contains("line to stderr"),
            "hermes kanban log: {shown}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        rig.mgr(&["stop", &id]).ok();
    }
);

systemd_test!(a_goal_mode_worker_gets_upstreams_goal_contract, {
    // hermes-agent 0.19.0's `_default_spawn`: goal mode sets HERMES_KANBAN_GOAL_MODE=1, and
    // HERMES_KANBAN_GOAL_MAX_TURNS when the task bounds the loop; argv ends with `-Q`.
    let rig = Rig::new(
        "#!/bin/sh\n{ echo \"argv=$*\"; env; echo END; } > report.tmp && mv report.tmp report\n",
        "",
    );
    let bounded = rig.add("a bounded goal");
    let open = rig.add("an open goal");
    let c = rig.board();
    c.connection()
        .execute(
            "UPDATE tasks SET goal_mode=1, goal_max_turns=7 WHERE id=?1",
            [&bounded],
        )
        .unwrap();
    c.connection()
        .execute(
            "UPDATE tasks SET goal_mode=1, goal_max_turns=0 WHERE id=?1",
            [&open],
        )
        .unwrap();
    rig.dispatch();
    for (id, turns) in [(&bounded, Some("7")), (&open, None)] {
        let report = rig.wait_file(
            &rig.dir
                .join("kanban/workspaces")
                .join(id.as_str())
                .join("report"),
        );
        let var = |k: &str| {
            report
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(str::to_string)
        };
        assert_eq!(var("HERMES_KANBAN_GOAL_MODE").as_deref(), Some("1"));
        assert_eq!(var("HERMES_KANBAN_GOAL_MAX_TURNS").as_deref(), turns);
        assert!(var("argv").unwrap().ends_with(" -Q"), "{report}");
    }
});
