//! Every board of the Hermes root, as upstream's gateway dispatches them: boards made with
//! the real `hermes kanban boards …` (as the worker user, as a user would), served by one
//! `hermes-dispatcher` started without `--db`; boards created, archived and broken while it
//! runs.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use hermes_mgr::board::{Board, OpenMode, Resolver, Task};

use crate::harness::{hermes_bin, wait_for, Ran};
use crate::rig::{journal, systemctl_show, Dispatcher, SERVICE, WORKER_USER};
use crate::systemd_test;

/// The real `hermes kanban ARGS…`, run as the worker user with the rig's Hermes root.
pub(crate) fn hermes(d: &Dispatcher, args: &[&str]) -> Ran {
    hermes_with(&hermes_bin(), d, args)
}

/// `hermes kanban …` of the Hermes at `bin` (0.19.0's or 0.22's), as `hermes`.
pub(crate) fn hermes_with(bin: &std::path::Path, d: &Dispatcher, args: &[&str]) -> Ran {
    let home = d.rig.dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(d.rig.uid), None).unwrap();
    let mut c = Command::new("setpriv");
    c.args([
        &format!("--reuid={WORKER_USER}"),
        &format!("--regid={WORKER_USER}"),
        "--init-groups",
    ])
    .arg(bin)
    .arg("kanban")
    .args(args)
    .env_clear()
    .env("PATH", "/usr/bin:/bin")
    .env("HOME", &home)
    .env("HERMES_HOME", &d.rig.dir)
    .env("HERMES_KANBAN_HOME", &d.rig.dir)
    .env("LANG", "C.UTF-8");
    let r = crate::harness::run(c);
    // Hermes 0.19's `main()` drops the exit code of a `kanban` verb (`args.func(args)`'s
    // return is ignored): a refusal exits 0 with only its `kanban: …` line on stderr.
    assert!(
        r.code == Some(0) && !r.stderr.lines().any(|l| l.starts_with("kanban:")),
        "hermes kanban {args:?}: exit code {:?}\nstdout: {}\nstderr: {}",
        r.code,
        r.stdout,
        r.stderr
    );
    r
}

pub(crate) fn create_on(d: &Dispatcher, board: &str, title: &str) -> String {
    create_with(&hermes_bin(), d, &["--board", board], title, &[])
}

/// `hermes kanban [BEFORE…] create TITLE --assignee default [AFTER…] --json` of the Hermes at
/// `bin`, as the worker user; the new task's id.
pub(crate) fn create_with(
    bin: &std::path::Path,
    d: &Dispatcher,
    before: &[&str],
    title: &str,
    after: &[&str],
) -> String {
    let mut args = before.to_vec();
    args.extend(["create", title, "--assignee", "default"]);
    args.extend(after);
    args.push("--json");
    hermes_with(bin, d, &args).json()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

pub(crate) fn board(d: &Dispatcher, slug: &str) -> Board {
    let paths = Resolver {
        kanban_home: Some(d.rig.dir.to_string_lossy().into()),
        board_flag: Some(slug.into()),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    Board::open(&paths, OpenMode::Inspect).unwrap()
}

pub(crate) fn workspace(d: &Dispatcher, slug: &str, id: &str) -> PathBuf {
    if slug == "default" {
        d.rig.dir.join("kanban/workspaces").join(id)
    } else {
        d.rig
            .dir
            .join("kanban/boards")
            .join(slug)
            .join("workspaces")
            .join(id)
    }
}

pub(crate) fn wait_running(d: &Dispatcher, slug: &str, id: &str) -> i64 {
    wait_for(
        &format!("{id} running on board {slug}"),
        Duration::from_secs(20),
        || {
            let t = board(d, slug).require_task(id).unwrap();
            (t.status.as_str() == "running")
                .then_some(t.current_run_id)
                .flatten()
        },
    )
}

/// Let the stub of `id`'s run `run` on `slug` complete its task, and wait for `done`.
pub(crate) fn complete(d: &Dispatcher, slug: &str, id: &str, run: i64) -> Task {
    let ws = workspace(d, slug, id);
    d.rig.wait_file(&ws.join(format!("ready-{run}")));
    std::fs::write(ws.join("cmd"), "complete\n").unwrap();
    wait_for(
        &format!("{id} done on board {slug}"),
        Duration::from_secs(30),
        || Some(board(d, slug).require_task(id).unwrap()).filter(|t| t.status.as_str() == "done"),
    )
}

/// `hermes-mgr ARGS…` as an operator types it: no `--db`, the Hermes root from the
/// environment.
pub(crate) fn mgr(d: &Dispatcher, args: &[&str]) -> Ran {
    let mut c = Command::new(crate::harness::mgr_bin());
    c.arg("--config")
        .arg(&d.rig.config)
        .args(args)
        .env_remove("HERMES_KANBAN_DB")
        .env_remove("HERMES_KANBAN_BOARD")
        .env("HERMES_KANBAN_HOME", &d.rig.dir);
    crate::harness::run(c)
}

fn active(unit: &str) -> bool {
    Command::new("systemctl")
        .args(["is-active", "--quiet", unit])
        .status()
        .unwrap()
        .success()
}

systemd_test!(
    every_board_of_the_root_runs_and_boards_come_and_go_while_the_dispatcher_runs,
    {
        // The safety-net pass is an hour away: what happens below comes from events.
        let d = Dispatcher::new("tick_seconds = 3600");
        hermes(&d, &["boards", "create", "ops"]);
        d.install_all_boards();
        d.start();

        let a = d.rig.add("on the default board");
        let b = create_on(&d, "ops", "on the ops board");
        let (ra, rb) = (wait_running(&d, "default", &a), wait_running(&d, "ops", &b));
        // Run ids are per board: each board's run lives in its own scope.
        let unit_b = format!("hermes-worker-kanban-ops-{b}-run-{rb}.scope");
        assert!(active(&unit_b), "{unit_b} is not active");
        assert!(active(&format!("hermes-worker-kanban-{a}-run-{ra}.scope")));
        let status = systemctl_show(SERVICE, "StatusText");
        assert!(status.contains("on 2 boards"), "{status}");
        // The operator's verbs find a task on any board.
        let snap = mgr(&d, &["status", "--json"]).ok().json();
        let running: Vec<(String, String)> = snap["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["status"] == "running")
            .map(|t| {
                (
                    t["board"].as_str().unwrap().into(),
                    t["id"].as_str().unwrap().into(),
                )
            })
            .collect();
        assert!(
            running.contains(&("default".into(), a.clone()))
                && running.contains(&("ops".into(), b.clone())),
            "{snap}"
        );
        assert_eq!(snap["boards"], serde_json::json!(["default", "ops"]));
        let shown = mgr(&d, &["show", &b]).ok().stdout;
        assert!(
            shown.contains("board:      ops") && shown.contains(&unit_b),
            "{shown}"
        );
        let only_ops = mgr(&d, &["--board", "ops", "status", "--json"]).ok().json();
        assert_eq!(only_ops["boards"], serde_json::json!(["ops"]));
        complete(&d, "default", &a, ra);
        let stopped = mgr(&d, &["stop", &b, "--json"]).ok().json();
        assert_eq!(stopped["task_status"], "blocked", "{stopped}");
        assert!(!active(&unit_b));
        assert_eq!(
            board(&d, "ops").runs(&b).unwrap()[0].outcome.as_deref(),
            Some("stopped")
        );

        // A directory under boards/ that is no board yet (no kanban.db, no board.json).
        let bad = d.rig.dir.join("kanban/boards/bad");
        std::fs::create_dir_all(&bad).unwrap();
        std::os::unix::fs::chown(&bad, Some(d.rig.uid), None).unwrap();
        // A board created while the dispatcher runs is dispatched at once.
        hermes(&d, &["boards", "create", "late"]);
        let c = create_on(&d, "late", "on a board made later");
        let rc = wait_running(&d, "late", &c);
        complete(&d, "late", &c, rc);
        assert_eq!(
            board(&d, "late").runs(&c).unwrap()[0].outcome.as_deref(),
            Some("completed")
        );

        // An archived board is no longer dispatched (`boards rm` archives by default).
        hermes(&d, &["boards", "rm", "ops"]);
        wait_for("ops dropped", Duration::from_secs(20), || {
            journal(SERVICE)
                .contains("board archived or removed; no longer dispatched")
                .then_some(())
        });
        wait_for("three boards less one", Duration::from_secs(20), || {
            systemctl_show(SERVICE, "StatusText")
                .contains("on 2 boards")
                .then_some(())
        });

        // The directory made earlier gets a file, long after its own event: it is a board
        // now. A corrupt one: reported and skipped, left as it is; the others go on.
        // Written aside and renamed in, whole: an empty kanban.db would be a new board.
        std::fs::write(bad.join("kanban.db.tmp"), b"definitely not sqlite").unwrap();
        std::fs::rename(bad.join("kanban.db.tmp"), bad.join("kanban.db")).unwrap();
        wait_for(
            "the corrupt board reported",
            Duration::from_secs(20),
            || {
                let status = systemctl_show(SERVICE, "StatusText");
                (status.contains("board bad skipped") && status.contains("not a SQLite database"))
                    .then_some(())
            },
        );
        let e = d.rig.add("still dispatched beside a corrupt board");
        let re = wait_running(&d, "default", &e);
        complete(&d, "default", &e, re);
        assert_eq!(
            std::fs::read(bad.join("kanban.db")).unwrap(),
            b"definitely not sqlite"
        );
        let log = journal(SERVICE);
        assert!(log.contains("cannot open board"), "{log}");
    }
);
