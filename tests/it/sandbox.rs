//! The worker sandbox against a real systemd, attacked from inside: a sandboxed worker (run
//! by the real Hermes venv's interpreter, so its install is what the sandbox shows) tries to
//! write the system, the Hermes install, `config.yaml`, another task's workspace and `/home`,
//! to read another task's workspace and a file in `/home`; writes its workspace, its
//! `TMPDIR`, a private `/tmp` and the Hermes root; and completes its task with the real
//! `hermes kanban complete` — the board written from inside. (Landlock, the second layer,
//! cannot be told apart from the first here: the mount layer stops every write first.)

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::harness::{hermes_bin, venv, wait_for};
use crate::rig::{journal, Dispatcher, SERVICE};
use crate::systemd_test;

/// The attempts, one line each in `results-<task>` in the Hermes root (upstream empties a
/// scratch workspace when its task is done): `NAME yes` (it worked) or
/// `NAME no`.
fn attacker(root: &Path) -> String {
    let venv = venv();
    let script = format!(
        r#"r="{root}/results-$HERMES_KANBAN_TASK"
try() {{ if sh -c "$2" >/dev/null 2>&1; then echo "$1 yes"; else echo "$1 no"; fi >> "$r"; }}
try etc "touch /etc/hermes-sandbox-test"
try usr "touch /usr/hermes-sandbox-test"
try venv "touch {venv}/hermes-sandbox-test"
try config "echo 'kanban: {{max_spawn: 99}}' >> {root}/config.yaml"
try config_replaced "mv {root}/config.yaml {root}/config.old"
try hooks "touch {root}/hooks/run-me-later"
try cron "touch {root}/cron/run-me-later"
try other_profile "echo 'model: {{}}' > {root}/profiles/other/config.yaml"
try other_read "cat {root}/kanban/workspaces/t_other/secret"
try other_write "touch {root}/kanban/workspaces/t_other/x"
try other_board "ls {root}/kanban/boards/ops"
try home_read "cat /home/hermes-sandbox-visible"
try home_write "touch /home/hermes-sandbox-test"
try own "echo ok > $PWD/own"
try tmpdir "touch $TMPDIR/x"
try tmp "touch /tmp/hermes-sandbox-private"
try hermes_root "touch {root}/written-by-worker"
try dev_null "echo x > /dev/null"
exec {hermes} kanban complete "$HERMES_KANBAN_TASK" --summary "sandboxed"
"#,
        venv = venv.display(),
        root = root.display(),
        hermes = hermes_bin().display(),
    );
    format!(
        "#!{}\nimport os, sys\nos.execv('/bin/sh', ['sh', '-c', {script:?}, 'sh'] + sys.argv[1:])\n",
        venv.join("bin/python3").display()
    )
}

systemd_test!(
    a_sandboxed_worker_writes_its_workspace_and_the_board_and_nothing_else,
    {
        // The stub is written before the rig knows its root: a placeholder, replaced below.
        let d = Dispatcher::with_stub("#!/bin/sh\nexit 9\n", "sandbox = true");
        let root = d.rig.dir.clone();
        std::fs::write(root.join("worker"), attacker(&root)).unwrap();
        std::fs::set_permissions(root.join("worker"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let chown = |p: &Path| std::os::unix::fs::chown(p, Some(d.rig.uid), None).unwrap();
        // What it must not reach: Hermes' settings, another task's workspace, another
        // board, a world-readable file in /home.
        std::fs::write(root.join("config.yaml"), "kanban:\n  failure_limit: 2\n").unwrap();
        chown(&root.join("config.yaml"));
        let other = root.join("kanban/workspaces/t_other");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("secret"), "not yours").unwrap();
        for p in [
            root.join("kanban"),
            root.join("kanban/workspaces"),
            other.clone(),
        ] {
            chown(&p);
        }
        std::fs::create_dir_all(root.join("kanban/boards/ops")).unwrap();
        // Another profile's home, the worker user's.
        std::fs::create_dir_all(root.join("profiles/other")).unwrap();
        chown(&root.join("profiles"));
        chown(&root.join("profiles/other"));
        std::fs::write("/home/hermes-sandbox-visible", "on the host").unwrap();
        let _ = std::fs::remove_file("/tmp/hermes-sandbox-private");
        // A `dir:` workspace of its own, in a directory the sandbox hides (/var/tmp).
        let dir_ws =
            Path::new("/var/tmp").join(format!("hermes-sandbox-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir_ws).unwrap();
        chown(&dir_ws);
        d.install();
        let id = d.rig.add("attack the host");
        let dir_task = crate::boards::create_with(
            &hermes_bin(),
            &d,
            &[],
            "attack from a dir workspace",
            &["--workspace", &format!("dir:{}", dir_ws.display())],
        );
        d.start();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let t = loop {
            let t = d.task(&id);
            if t.status.as_str() == "done" || t.consecutive_failures > 0 {
                break t;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the task did not end: {t:?}\n{}",
                journal(SERVICE)
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        let worker = crate::rig::sh("journalctl -o cat --no-pager -t hermes-worker | tail -40");
        let runs = d.rig.board().runs(&id).unwrap();
        assert_eq!(
            (t.status.as_str(), runs[0].summary.as_deref()),
            ("done", Some("sandboxed")),
            "{}\n{worker}\n{runs:?}",
            journal(SERVICE),
        );
        let want = [
            "etc no",
            "usr no",
            "venv no",
            "config no",
            "config_replaced no",
            "hooks no",
            "cron no",
            "other_profile no",
            "other_read no",
            "other_write no",
            "other_board no",
            "home_read no",
            "home_write no",
            "own yes",
            "tmpdir yes",
            "tmp yes",
            "hermes_root yes",
            "dev_null yes",
        ];
        for task in [&id, &dir_task] {
            d.wait_task("done", |t| t.status.as_str() == "done", task);
            let results = wait_for("the results", std::time::Duration::from_secs(10), || {
                std::fs::read_to_string(root.join(format!("results-{task}"))).ok()
            });
            assert_eq!(
                results.lines().collect::<Vec<_>>(),
                want,
                "{task}: {results}"
            );
        }
        // The `dir:` workspace was written through, on the host.
        assert_eq!(std::fs::read_to_string(dir_ws.join("own")).unwrap(), "ok\n");
        let _ = std::fs::remove_dir_all(&dir_ws);
        // Nothing crossed to the host, nothing was lost there.
        assert_eq!(
            std::fs::read_to_string(root.join("config.yaml")).unwrap(),
            "kanban:\n  failure_limit: 2\n"
        );
        assert_eq!(
            std::fs::read_to_string(other.join("secret")).unwrap(),
            "not yours"
        );
        assert!(!Path::new("/tmp/hermes-sandbox-private").exists());
        assert!(!Path::new("/home/hermes-sandbox-test").exists());
        assert!(root.join("written-by-worker").exists());
        let doctor = d.rig.mgr(&["doctor"]).stdout;
        assert!(
            doctor.contains("ok   sandbox") && doctor.contains("on: a mount namespace"),
            "{doctor}"
        );
        let _ = std::fs::remove_file("/home/hermes-sandbox-visible");
    }
);

// Real Hermes workers in the sandbox: their agent loop, tools, sessions and kanban writes are
// Hermes' own (`real_worker.rs`); a scratch, a worktree and a `dir:` task complete, their
// terminal tool writing in the workspace, the scratch
// workspace goes, the worktree is made in its repository (and kept: the tool's file is work).
systemd_test!(
    real_019_workers_complete_a_scratch_and_a_worktree_task_in_the_sandbox,
    {
        crate::real_worker::real_workers_complete(&venv(), &hermes_bin(), true, true);
    }
);

systemd_test!(
    real_022_workers_complete_a_scratch_and_a_worktree_task_in_the_sandbox,
    {
        crate::real_worker::real_workers_complete(
            &crate::harness::venv_022(),
            &crate::harness::hermes_022_bin(),
            true,
            true,
        );
    }
);
