//! The attack suite: what a worker (or anyone who may write the board's tree) tries in
//! order to reach root, read what only root may read, or hang the dispatcher. Each test
//! stages the attack as the worker user would, in the systemd sandbox, through the same
//! code paths the service uses (`dispatch --once` runs the daemon's spawn), and asserts that
//! nothing crossed the boundary and nothing was lost or misbooked.
//!
//! Every attack here was reproduced against the code before the fix (issue 10).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::wait_for;
use crate::rig::{sh, Rig, WORKER_USER};
use crate::systemd_test;

/// Run `script` as the worker user: what a worker's LLM-chosen shell command could do.
fn as_worker(script: &str) {
    sh(&format!(
        "setpriv --reuid={WORKER_USER} --regid={WORKER_USER} --init-groups sh -c '{}'",
        script.replace('\'', "'\\''")
    ));
}

/// The tasks a `dispatch --once --json` report says it started.
fn spawned_ids(out: &serde_json::Value) -> Vec<&str> {
    out["spawned"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["task_id"].as_str().unwrap())
        .collect()
}

/// Owner, group and mode of a path (not following a final symlink).
fn stat(p: &str) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{p}: {e}"));
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

/// Give a task an id of the attacker's choosing (every column of the board is writable by
/// the worker user; foreign keys are off on a plain connection, as in a worker's sqlite3).
fn rename_task(db: &Path, from: &str, to: &str) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.execute("UPDATE tasks SET id=?2 WHERE id=?1", [from, to])
        .unwrap();
    c.execute(
        "UPDATE task_events SET task_id=?2 WHERE task_id=?1",
        [from, to],
    )
    .unwrap();
}

/// Run a command that must finish: a FIFO planted by a worker must never hang root.
fn run_bounded(mut cmd: Command, limit: Duration) -> std::process::Output {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let start = Instant::now();
    let watchdog = std::thread::spawn(move || {
        while start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(50));
            if !crate::rig::alive(pid) {
                return false;
            }
        }
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        true
    });
    let out = child.wait_with_output().unwrap();
    assert!(
        !watchdog.join().unwrap(),
        "still running after {limit:?}: it hung"
    );
    out
}

systemd_test!(a_workspaces_link_to_slash_does_not_give_root_away, {
    // The worker replaces kanban/workspaces with a link to / and names a task `root`: the
    // old dispatcher followed it, accepted /root as the scratch workspace and chowned it.
    let rig = Rig::new("#!/bin/sh\necho pwned > .bashrc\n", "");
    sh("chown 0:0 /root && chmod 0700 /root");
    let before = stat("/root");
    let id = rig.add("innocent");
    as_worker(&format!(
        "mkdir -p {d}/kanban && rm -rf {d}/kanban/workspaces && ln -s / {d}/kanban/workspaces",
        d = rig.dir.display()
    ));
    rename_task(&rig.db, &id, "root");
    let out = rig.dispatch();
    let failed = &out["spawn_failed"][0];
    assert_eq!(failed["task_id"], json!("root"), "{out}");
    let err = failed["error"].as_str().unwrap();
    assert!(
        err.contains("cannot enter the workspace") && err.contains("Permission denied"),
        "{err}"
    );
    assert_eq!(stat("/root"), before, "/root changed hands");
    assert!(
        !std::fs::read_to_string("/root/.bashrc").is_ok_and(|s| s.contains("pwned")),
        "the worker wrote /root/.bashrc"
    );
    // The same through a root `dispatch` of a link to a directory root owns by name.
    let id = rig.add("second");
    rename_task(&rig.db, &id, "etc");
    let before = stat("/etc");
    rig.dispatch();
    assert_eq!(stat("/etc"), before, "/etc changed hands");
});

systemd_test!(a_dir_workspace_is_entered_as_the_worker_never_as_root, {
    // The old supervisor entered the workspace before dropping root: a worker could then
    // read files behind a 0700 directory it may not traverse.
    let leak = PathBuf::from("/var/tmp/hermes-mgr-attack-leak");
    let _ = std::fs::remove_file(&leak);
    let rig = Rig::new(
        &format!("#!/bin/sh\ncat secret.txt > {}\n", leak.display()),
        "",
    );
    sh("mkdir -p /root/secretproj && echo topsecret > /root/secretproj/secret.txt \
        && chown 0:0 /root && chmod 0700 /root && chmod 0755 /root/secretproj && chmod 0644 /root/secretproj/secret.txt");
    let id = rig.add("read a secret");
    rig.board()
        .connection()
        .execute(
            "UPDATE tasks SET workspace_kind='dir', workspace_path='/root/secretproj' WHERE id=?1",
            [&id],
        )
        .unwrap();
    let out = rig.dispatch();
    let err = out["spawn_failed"][0]["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        err.contains("cannot enter the workspace /root/secretproj")
            && err.contains("Permission denied"),
        "{err}"
    );
    assert!(
        !leak.exists(),
        "the worker read /root/secretproj/secret.txt"
    );
    let run = &rig.board().runs(&id).unwrap()[0];
    assert_eq!(run.outcome.as_deref(), Some("spawn_failed"));
});

/// Writes a marker into its workspace, says hello, exits.
const HELLO: &str =
    "#!/bin/sh\necho \"hello from $HERMES_KANBAN_TASK\"\nprintf 'ran\\nEND\\n' > marker\n";

systemd_test!(a_planted_worker_log_is_neither_followed_nor_blocking, {
    // worker_log_file = true: the old supervisor opened kanban/logs/<task>.log as root,
    // following links (root's ~/.profile became the worker's), and a FIFO there hung it.
    let rig = Rig::new(HELLO, "worker_log_file = true");
    sh("printf 'original\\n' > /root/.profile && chown 0:0 /root/.profile && chmod 0644 /root/.profile");
    let linked = rig.add("log through a link");
    let fifo = rig.add("log into a fifo");
    let logs = rig.dir.join("kanban/logs");
    as_worker(&format!(
        "mkdir -p {l} && ln -s /root/.profile {l}/{linked}.log && mkfifo {l}/{fifo}.log",
        l = logs.display()
    ));
    let out = run_bounded(
        rig.mgr_cmd(&["dispatch", "--once", "--json"]),
        Duration::from_secs(60),
    );
    let out: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let spawned = spawned_ids(&out);
    assert!(
        spawned.contains(&linked.as_str()) && spawned.contains(&fifo.as_str()),
        "both workers run without their log file: {out}"
    );
    for id in [&linked, &fifo] {
        rig.wait_file(&rig.dir.join("kanban/workspaces").join(id).join("marker"));
    }
    assert_eq!(
        std::fs::read_to_string("/root/.profile").unwrap(),
        "original\n"
    );
    assert_eq!(stat("/root/.profile").0, 0, "/root/.profile changed hands");
    // The operator learns why the log file was not kept, in the run's journal.
    let unit = out["spawned"][0]["unit"].as_str().unwrap().to_string();
    wait_for(
        "the supervisor's word on the log",
        Duration::from_secs(20),
        || {
            crate::rig::journal(&unit)
                .contains("worker log not kept")
                .then_some(())
        },
    );
});

systemd_test!(a_run_tmpdir_cannot_be_taken_over_by_another_local_user, {
    // The old TMPDIR was /tmp/hermes-run-<task>-<run>: another user made it first (0777)
    // and read or replaced the worker's files; made as a file, it failed every spawn.
    let rig = Rig::new(
        "#!/bin/sh\n{ echo \"tmp=$TMPDIR\"; stat -c 'mode=%a %U' \"$TMPDIR\"; echo --env; env; echo END; } > report.tmp && mv report.tmp report\n",
        "pass_environment = [\"PASSED_ON\"]",
    );
    let id = rig.add("temp files");
    sh(&format!(
        "setpriv --reuid=nobody --regid=nogroup --clear-groups sh -c 'mkdir -m 0777 /tmp/hermes-run-{id}-1; : > /tmp/hermes-run-{id}-2'"
    ));
    let mut cmd = rig.mgr_cmd(&["dispatch", "--once", "--json"]);
    cmd.env("SECRET_TOKEN", "hunter2")
        .env("RUNTIME_DIRECTORY", "/run/hermes-mgr")
        .env("PASSED_ON", "yes");
    let out = crate::harness::run(cmd).ok().json();
    assert_eq!(out["spawned"][0]["task_id"], json!(id), "{out}");
    let report = rig.wait_file(&rig.dir.join("kanban/workspaces").join(&id).join("report"));
    let tmp = report
        .lines()
        .find_map(|l| l.strip_prefix("tmp="))
        .unwrap()
        .to_string();
    assert!(!tmp.contains(&id), "a guessable TMPDIR: {tmp}");
    assert!(
        report.contains(&format!("mode=700 {WORKER_USER}")),
        "{report}"
    );
    // The dispatcher's environment stays its own; only what the config names passes.
    let env = report.split("--env\n").nth(1).unwrap();
    assert!(env.lines().any(|l| l == "PASSED_ON=yes"), "{env}");
    for leaked in ["SECRET_TOKEN", "RUNTIME_DIRECTORY"] {
        assert!(
            !env.lines().any(|l| l.starts_with(&format!("{leaked}="))),
            "{leaked} reached the worker"
        );
    }
    wait_for("the run's TMPDIR removed", Duration::from_secs(20), || {
        (!Path::new(&tmp).exists()).then_some(())
    });
    assert_eq!(
        stat(&format!("/tmp/hermes-run-{id}-1")).2,
        0o777,
        "the other user's directory is theirs"
    );
});

systemd_test!(
    planted_lock_files_and_fifos_neither_create_files_nor_hang_verbs,
    {
        // Lock files were opened as root following links (the daemon created /run/nologin),
        // and a FIFO as a lock file or as kanban/current hung `status` and every verb.
        let rig = Rig::new("#!/bin/sh\nexit 0\n", "");
        rig.add("a task");
        let k = rig.dir.join("kanban");
        let _ = std::fs::remove_file("/run/nologin");
        as_worker(&format!(
            "mkdir -p {k} && ln -s /run/nologin {k}/.dispatcher.lock",
            k = k.display()
        ));
        let r = rig.mgr(&["dispatch", "--once"]);
        assert_eq!(r.code, Some(1), "{}{}", r.stdout, r.stderr);
        assert!(r.stderr.contains("symlink"), "{}", r.stderr);
        assert!(
            !Path::new("/run/nologin").exists(),
            "root created /run/nologin"
        );

        as_worker(&format!(
        "rm -f {k}/.dispatcher.lock {db}.init.lock && mkfifo {k}/.dispatcher.lock {k}/current {db}.init.lock",
        k = k.display(),
        db = rig.db.display()
    ));
        let out = run_bounded(rig.mgr_cmd(&["status", "--json"]), Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("init.lock") && stderr.contains("not a regular file"),
            "{stderr}"
        );
        as_worker(&format!("rm {}.init.lock", rig.db.display()));
        let out = run_bounded(rig.mgr_cmd(&["status", "--json"]), Duration::from_secs(30));
        assert!(out.status.success(), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["dispatcher"], json!("not running"));
        let out = run_bounded(
            rig.mgr_cmd(&["dispatch", "--once"]),
            Duration::from_secs(30),
        );
        assert!(!out.status.success(), "a FIFO is no lock: {out:?}");
    }
);

systemd_test!(root_cli_reads_no_secret_and_writes_no_other_database, {
    let rig = Rig::new("#!/bin/sh\nexit 0\n", "");
    let id = rig.add("has a run without a journal");
    rig.board().claim(&id, "elsewhere:1", 900).unwrap().unwrap();
    let logs = rig.dir.join("kanban/logs");
    let log = logs.join(format!("{id}.log"));

    // `logs` printed /etc/shadow through a linked log file.
    as_worker(&format!(
        "mkdir -p {l} && ln -s /etc/shadow {f}",
        l = logs.display(),
        f = log.display()
    ));
    let r = rig.mgr(&["logs", &id]);
    assert_eq!(r.code, Some(1), "{}{}", r.stdout, r.stderr);
    assert!(!r.stdout.contains("root:"), "{}", r.stdout);
    assert!(r.stderr.contains("symlink"), "{}", r.stderr);

    // A hard link to a file only root may read (possible where fs.protected_hardlinks is
    // off; made by root here to stand for it) is read with the owner's rights: refused.
    std::fs::remove_file(&log).unwrap();
    std::fs::hard_link("/etc/shadow", &log).unwrap();
    let r = rig.mgr(&["logs", &id]);
    assert_eq!(r.code, Some(1), "{}{}", r.stdout, r.stderr);
    assert!(!r.stdout.contains("root:"), "{}", r.stdout);
    assert!(r.stderr.contains("Permission denied"), "{}", r.stderr);

    // Escape sequences a worker wrote reach the operator's terminal as text, not as codes.
    as_worker(&format!(
        "rm {f} && printf 'title \\033]0;owned\\007 and \\342\\200\\256reversed\\n' > {f}",
        f = log.display()
    ));
    let r = rig.mgr(&["logs", &id]).ok();
    assert!(r.stdout.contains("title "), "{}", r.stdout);
    assert!(
        !r.stdout.contains('\u{1b}') && !r.stdout.contains('\u{202e}'),
        "{:?}",
        r.stdout
    );
    assert!(r.stdout.contains("\\u{1b}]0;owned\\u{7}"), "{:?}", r.stdout);

    // A linked kanban.db made root's `add` convert another database to WAL and add
    // Hermes' tables to it.
    let other = PathBuf::from("/root/other.db");
    let _ = std::fs::remove_file(&other);
    rusqlite::Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE secrets(x); INSERT INTO secrets VALUES ('s');")
        .unwrap();
    let linked = rig.dir.join("linked.db");
    as_worker(&format!("ln -s {} {}", other.display(), linked.display()));
    let r = crate::harness::mgr(&linked, &["add", "sneaky"]);
    assert_eq!(r.code, Some(1), "{}{}", r.stdout, r.stderr);
    let c = rusqlite::Connection::open(&other).unwrap();
    let mode: String = c
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "delete", "the other database was switched to WAL");
    let tables: i64 = c
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name='tasks'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(tables, 0, "Hermes' tables were added to another database");

    // A status written by an attacker is shown, not obeyed, in errors.
    rig.board()
        .connection()
        .execute(
            "UPDATE tasks SET status=?2 WHERE id=?1",
            [id.as_str(), "x\u{1b}[2J\u{202e}"],
        )
        .unwrap();
    let r = rig.mgr(&["unblock", &id]);
    assert_eq!(r.code, Some(1), "{}{}", r.stdout, r.stderr);
    assert!(
        !r.stderr.contains('\u{1b}') && !r.stderr.contains('\u{202e}'),
        "{:?}",
        r.stderr
    );
    assert!(r.stderr.contains("\\u{1b}[2J"), "{:?}", r.stderr);

    // A reader that goes away early ends `list` quietly (it panicked on EPIPE).
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} --db {} list --json | head -c1",
            crate::harness::mgr_bin().display(),
            rig.db.display()
        ))
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
});

systemd_test!(renames_racing_the_spawn_of_many_tasks_win_nothing, {
    // The old check-then-chown of each scratch workspace raced a worker that swapped
    // kanban/workspaces with a link to / (`renameat2(RENAME_EXCHANGE)` in a loop): with
    // tasks named after directories of /, root's own directories changed hands.
    let rig = Rig::new("#!/bin/sh\nexit 0\n", "max_spawn = 16");
    let names = [
        "root", "etc", "usr", "var", "opt", "srv", "home", "boot", "mnt", "media",
    ];
    let before: Vec<_> = names.iter().map(|n| stat(&format!("/{n}"))).collect();
    for n in names {
        let id = rig.add(n);
        rename_task(&rig.db, &id, n);
    }
    let k = rig.dir.join("kanban");
    as_worker(&format!(
        "mkdir -p {k}/workspaces && ln -sfn / {k}/swap",
        k = k.display()
    ));
    let stop = rig.dir.join("stop-swapping");
    let swapper = Command::new("setpriv")
        .args([
            &format!("--reuid={WORKER_USER}"),
            &format!("--regid={WORKER_USER}"),
            "--init-groups",
            "/usr/bin/python3",
            "-c",
            &format!(
                "import ctypes, os\n\
                 libc = ctypes.CDLL(None, use_errno=True)\n\
                 a, b = b'{k}/workspaces', b'{k}/swap'\n\
                 while not os.path.exists('{stop}'):\n    libc.renameat2(-100, a, -100, b, 2)\n",
                k = k.display(),
                stop = stop.display()
            ),
        ])
        .spawn()
        .unwrap();
    for _ in 0..3 {
        rig.mgr(&["dispatch", "--once", "--json"]).ok();
    }
    std::fs::write(&stop, "").unwrap();
    let mut swapper = swapper;
    swapper.wait().unwrap();
    let after: Vec<_> = names.iter().map(|n| stat(&format!("/{n}"))).collect();
    assert_eq!(before, after, "a directory of / changed hands");
});

systemd_test!(huge_task_rows_cost_the_daemon_nothing_it_keeps, {
    // Three 64 MiB bodies took the old daemon from 9 MB to 537 MB: it loaded whole rows
    // to count statuses after every pass.
    let d = crate::rig::Dispatcher::new("tick_seconds = 3600");
    for i in 0..3 {
        let id = d.rig.add(&format!("heavy {i}"));
        // Not a profile here: they stay ready, and every pass reads them again.
        d.rig
            .board()
            .connection()
            .execute(
                "UPDATE tasks SET assignee='nobody-here', body=printf('%.*c', 67108864, 'x') WHERE id=?1",
                [&id],
            )
            .unwrap();
    }
    d.install();
    d.start();
    // A few passes, each woken by another writer's commit.
    for i in 0..5 {
        let id = d.rig.add(&format!("light {i}"));
        let r = d.wait_running(&id, 0);
        d.command(&id, r, "complete");
        d.wait_task("done", |t| t.status.as_str() == "done", &id);
    }
    let pid = crate::rig::systemctl_show(crate::rig::SERVICE, "MainPID")
        .trim()
        .trim_start_matches("MainPID=")
        .to_string();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hwm_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    // One such body read once would be 64 MiB; the old daemon peaked above 500 MiB.
    assert!(
        hwm_kb < 48 * 1024,
        "the daemon's peak RSS is {hwm_kb} kB with three 64 MiB task bodies on the board"
    );
});

systemd_test!(
    doctor_fails_a_root_owned_hermes_root_that_others_may_write,
    {
        // hermes-mgr works in a board's tree as its owner; a root-owned tree that anyone may
        // write leaves it acting as root where others plant links. doctor says so.
        let dir = PathBuf::from(format!(
            "/var/tmp/hermes-mgr-open-root-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let db = dir.join("kanban.db");
        hermes_mgr::board::Board::open(
            &hermes_mgr::board::BoardPaths::for_db(&db),
            hermes_mgr::board::OpenMode::CreateIfMissing,
        )
        .unwrap();
        let r = crate::harness::mgr(&db, &["doctor"]);
        assert_eq!(r.code, Some(1), "{}", r.stdout);
        assert!(
            r.stdout
                .lines()
                .any(|l| l.starts_with("FAIL board tree") && l.contains("belongs to root")),
            "{}",
            r.stdout
        );
    }
);

/// Install plugin `name` (its `__init__.py` is `code`) in the Hermes root `dir` and enable it
/// in its `config.yaml`, as the worker user would (it writes the whole root).
fn enable_plugin(dir: &Path, name: &str, code: &str) -> PathBuf {
    let plugin = dir.join("plugins").join(name);
    std::fs::create_dir_all(&plugin).unwrap();
    std::fs::write(
        plugin.join("plugin.yaml"),
        format!("name: {name}\nversion: 0.1.0\ndescription: x\nkind: standalone\n"),
    )
    .unwrap();
    std::fs::write(plugin.join("__init__.py"), code).unwrap();
    std::fs::write(
        dir.join("config.yaml"),
        format!("plugins:\n  enabled: [{name}]\n"),
    )
    .unwrap();
    sh(&format!(
        "chown -R {WORKER_USER}: {} {}",
        dir.join("plugins").display(),
        dir.join("config.yaml").display()
    ));
    plugin
}

/// A plugin of the worker's, enabled in the `config.yaml` the worker writes: Hermes imports
/// it wherever its code runs. Run by the toolset resolver (`python -c`, the only caller
/// that runs it so), it writes what that process could reach to `report-<pid>.json`.
const SPY_PLUGIN: &str = r#"
import json, os, sys
def register(ctx):
    pass
if sys.argv[0] == "-c":
    r = {"pid": os.getpid(), "sid": os.getsid(0)}
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
        r["tty"] = os.ttyname(fd)
        os.close(fd)
    except OSError as e:
        r["tty"] = None
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("NoNewPrivs", "CapBnd", "CapEff", "CapPrm", "CapAmb", "Uid"):
            r[k] = v.split()[0] if k != "Uid" else v.split()
    fds = {}
    for f in os.listdir("/proc/self/fd"):
        try:
            fds[f] = os.readlink("/proc/self/fd/" + f)
        except OSError:
            pass
    r["fds"] = fds
    r["cgroup"] = open("/proc/self/cgroup").read()
    path = os.path.join(os.path.dirname(__file__), "report-%d.json" % os.getpid())
    with open(path + ".tmp", "w") as out:
        json.dump(r, out)
    os.rename(path + ".tmp", path)
"#;

systemd_test!(
    upstreams_code_run_for_a_root_operator_is_detached_from_their_terminal,
    {
        // The operator runs the documented `dispatch --once` from a root shell on a terminal;
        // the worker has enabled a plugin of its own. Before the fix the plugin ran in the
        // operator's session with its terminal (TIOCSTI into a root shell), the full bounding
        // set and no no_new_privs.
        let shim = crate::rig::hermes_python_shim();
        let rig = Rig::new(&shim, "");
        let plugin = enable_plugin(&rig.dir, "spy", SPY_PLUGIN);
        rig.add("a task whose profile loads the spy");
        let cmd = rig.mgr_shell("", "dispatch --once");
        // `script` gives the command a terminal of its own as its controlling terminal.
        let o = Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
        // Upstream's code runs in the run's scope, after the command returned.
        let reports: Vec<serde_json::Value> =
            wait_for("the plugin's report", Duration::from_secs(60), || {
                let r: Vec<serde_json::Value> = std::fs::read_dir(&plugin)
                    .unwrap()
                    .filter_map(|e| {
                        let p = e.unwrap().path();
                        let n = p.file_name()?.to_str()?.to_string();
                        (n.starts_with("report-") && n.ends_with(".json"))
                            .then(|| serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap())
                    })
                    .collect();
                (!r.is_empty()).then_some(r)
            });
        for r in reports {
            assert_eq!(r["tty"], serde_json::Value::Null, "a terminal reached: {r}");
            assert_eq!(r["sid"], r["pid"], "not its own session: {r}");
            assert_eq!(r["NoNewPrivs"], "1", "{r}");
            for set in ["CapBnd", "CapEff", "CapPrm", "CapAmb"] {
                assert_eq!(r[set], "0000000000000000", "{set}: {r}");
            }
            assert_ne!(r["Uid"][0], "0", "{r}");
            // 0-2, and 3: the prelude's own pipe to its supervisor (what it says; the
            // exec of the worker closes it). Nothing of the dispatcher's or the operator's.
            for (fd, target) in r["fds"].as_object().unwrap() {
                let target = target.as_str().unwrap();
                let fd = fd.parse::<u32>().unwrap();
                assert!(
                    fd <= 2
                        || target.starts_with("/proc/")
                        || (fd == 3 && target.starts_with("pipe:")),
                    "descriptor {fd} ({target}) inherited: {r}"
                );
            }
            // Run in the task's scope, under the workers' slice.
            let cg = r["cgroup"].as_str().unwrap();
            assert!(
                cg.contains("hermes-workers.slice") && cg.contains("hermes-worker-kanban-"),
                "{r}"
            );
        }
    }
);

systemd_test!(
    a_worker_started_from_an_operators_shell_inherits_none_of_its_descriptors,
    {
        // The operator's shell holds descriptors without close-on-exec (here 7 and 9, as a
        // script's redirections leave them); before the fix each crossed the CLI, the
        // supervisor and both execs into upstream's code and the worker.
        let marks = PathBuf::from(format!("/var/tmp/hermes-mgr-fds-{}", std::process::id()));
        std::fs::create_dir_all(&marks).unwrap();
        let stub = format!(
            "#!{}\nimport json, os\nfds = {{}}\nfor f in os.listdir('/proc/self/fd'):\n    try:\n        fds[f] = os.readlink('/proc/self/fd/' + f)\n    except OSError:\n        pass\np = os.path.join({:?}, os.environ['HERMES_KANBAN_TASK'])\nopen(p + '.tmp', 'w').write(json.dumps(fds))\nos.rename(p + '.tmp', p)\n",
            crate::harness::venv().join("bin/python3").display(),
            marks.display().to_string()
        );
        let rig = Rig::new(&stub, "");
        sh(&format!("chown {WORKER_USER}: {}", marks.display()));
        let id = rig.add("lists its descriptors");
        let cmd = rig.mgr_shell("", "dispatch --once");
        sh(&format!(
            "exec 7</dev/null 9>{}/held; {cmd}",
            marks.display()
        ));
        let fds: serde_json::Value = wait_for("the worker's list", Duration::from_secs(60), || {
            serde_json::from_slice(&std::fs::read(marks.join(&id)).ok()?).ok()
        });
        for (fd, target) in fds.as_object().unwrap() {
            let target = target.as_str().unwrap();
            assert!(
                fd.parse::<u32>().unwrap() <= 2 || target.starts_with("/proc/"),
                "descriptor {fd} ({target}) inherited: {fds}"
            );
        }
    }
);

systemd_test!(
    unenterable_workspaces_are_their_tasks_fault_and_stall_no_other_task,
    {
        // Eight tasks whose worker made its own scratch workspace unenterable, then a victim.
        // Before the fix each was the dispatcher's fault: never counted, the pass stopped at
        // the first, the board backed off, and the victim never ran.
        let rig = Rig::new("#!/bin/sh\nexit 0\n", "");
        let hostile: Vec<String> = (0..8).map(|i| rig.add(&format!("hostile {i}"))).collect();
        let victim = rig.add("victim");
        for id in &hostile {
            as_worker(&format!(
                "mkdir -p {d}/kanban/workspaces/{id} && chmod 000 {d}/kanban/workspaces/{id}",
                d = rig.dir.display()
            ));
        }
        let out = rig.dispatch();
        let spawned = spawned_ids(&out);
        assert_eq!(spawned, vec![victim.as_str()], "{out}");
        let failed = out["spawn_failed"].as_array().unwrap();
        assert_eq!(failed.len(), 8, "{out}");
        for f in failed {
            assert_eq!(f["infrastructure"], json!(false), "{out}");
            assert!(
                f["error"]
                    .as_str()
                    .unwrap()
                    .contains("cannot enter the workspace"),
                "{out}"
            );
        }
        for id in &hostile {
            let t = rig.board().require_task(id).unwrap();
            assert_eq!(
                (t.status.as_str(), t.consecutive_failures),
                ("ready", 1),
                "{id}"
            );
        }
    }
);

systemd_test!(a_64_gib_line_in_a_worker_log_costs_logs_bounded_memory, {
    // A silent worker (no journal) whose upstream log is a 64 GiB sparse file: one line of
    // zeros. The old `logs` read a whole line before writing any of it, and aborted at its
    // memory limit. Under a 512 MiB address-space limit it must stream the line.
    let rig = Rig::new("#!/bin/sh\nprintf 'ran\\nEND\\n' > marker\n", "");
    let id = rig.add("silent");
    let out = rig.dispatch();
    assert_eq!(out["spawned"][0]["task_id"], json!(id), "{out}");
    rig.wait_file(&rig.dir.join("kanban/workspaces").join(&id).join("marker"));
    let logs = rig.dir.join("kanban/logs");
    as_worker(&format!(
        "mkdir -p {l} && truncate -s 64G {l}/{id}.log",
        l = logs.display()
    ));
    // A run of its own making (the board is the worker's to write), whose scope never
    // existed: its journal is empty, and `logs` turns to upstream's file.
    let c = rusqlite::Connection::open(&rig.db).unwrap();
    c.execute(
        "INSERT INTO task_runs (id, task_id, status, started_at) VALUES (99, ?1, 'done', 0)",
        [&id],
    )
    .unwrap();
    drop(c);
    let cmd = format!(
        "{} | head -c 8388608; echo \"logs: ${{PIPESTATUS[0]}}\" >&2",
        rig.mgr_shell("prlimit --as=536870912", &format!("logs {id} --run 99"))
    );
    let o = run_bounded(
        {
            let mut c = Command::new("bash");
            c.args(["-c", &cmd]);
            c
        },
        Duration::from_secs(120),
    );
    // 0, or 141: ended by SIGPIPE once `head` had its fill, as any filter ends.
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("logs: 0") || stderr.contains("logs: 141"),
        "logs failed: {stderr}"
    );
    assert_eq!(
        o.stdout.len(),
        8 << 20,
        "{}",
        String::from_utf8_lossy(&o.stdout[..o.stdout.len().min(300)])
    );
});

/// `systemctl restart` of the service succeeds; else the test fails with what the service said.
fn restart_succeeds(after: &str) {
    let restart = Command::new("systemctl")
        .args(["restart", crate::rig::SERVICE])
        .output()
        .unwrap();
    assert!(
        restart.status.success(),
        "after {after}: {}\n{}",
        String::from_utf8_lossy(&restart.stderr),
        crate::rig::journal(crate::rig::SERVICE)
    );
}

systemd_test!(
    a_worker_holding_a_swapped_dispatcher_lock_does_not_keep_the_dispatcher_down,
    {
        // The worker replaces `.dispatcher.lock` with a file of its own and holds it; workers
        // outlive restarts, so before the fix every start after it failed ("another
        // dispatcher holds …") and any upgrade was an outage.
        // Only the first worker swaps it: the one after the restart leaves the dispatcher's
        // new lock alone, so that the test can see it held.
        let stub = "#!/bin/sh\nD=\"$(dirname \"$HERMES_KANBAN_DB\")\"\nL=\"$D/kanban/.dispatcher.lock\"\n[ -e \"$D/swapped\" ] && exec sleep 3600\n: > \"$D/swapped\"\nrm -f \"$L\"\nexec flock \"$L\" sleep 3600\n";
        let d = crate::rig::Dispatcher::with_stub(stub, "tick_seconds = 3600");
        d.install();
        d.start();
        let lock = d.rig.dir.join("kanban/.dispatcher.lock");
        let ours = std::fs::metadata(&lock).unwrap().ino();
        let id = d.rig.add("swaps the lock");
        d.wait_running(&id, 0);
        // Probed without creating the file (a probe run as root once made it root's, in the
        // moment between the worker's `rm` and its `flock`).
        let owner = hermes_mgr::board::Owner::of_tree(&d.rig.dir).unwrap();
        let held = || hermes_mgr::board::lock::held(&lock, &owner);
        wait_for("the worker's lock held", Duration::from_secs(20), || {
            let swapped = std::fs::metadata(&lock).is_ok_and(|m| m.ino() != ours);
            (swapped && held()).then_some(())
        });
        restart_succeeds("a swapped lock");
        assert!(
            crate::rig::journal(crate::rig::SERVICE)
                .contains("the dispatcher lock is held by a worker's process"),
            "{}",
            crate::rig::journal(crate::rig::SERVICE)
        );
        // It dispatches, and holds the root's lock again.
        let next = d.rig.add("after the restart");
        d.wait_running(&next, 0);
        let now = std::fs::metadata(&lock).unwrap().ino();
        assert_ne!(now, ours);
        assert!(held());
    }
);

systemd_test!(
    a_dispatcher_lock_made_unlockable_by_a_worker_does_not_keep_the_dispatcher_down,
    {
        // A worker runs as the tree's owner: it can put in the lock's place a file the owner
        // may not open, a symlink or a FIFO, and hold nothing. Before the fix the next start
        // failed ("open …/.dispatcher.lock: Permission denied"), after every restart.
        let stub = "#!/bin/sh\nD=\"$(dirname \"$HERMES_KANBAN_DB\")\"\nL=\"$D/kanban/.dispatcher.lock\"\nrm -f \"$L\"\ncase \"$(cat \"$D/how\")\" in\n  mode0) : > \"$L\"; chmod 0 \"$L\" ;;\n  symlink) ln -s /etc/shadow \"$L\" ;;\n  fifo) mkfifo \"$L\" ;;\nesac\necho END > \"$D/done.$HERMES_KANBAN_TASK\"\nexec sleep 3600\n";
        let d = crate::rig::Dispatcher::with_stub(stub, "tick_seconds = 3600");
        d.install();
        d.start();
        let lock = d.rig.dir.join("kanban/.dispatcher.lock");
        let owner = hermes_mgr::board::Owner::of_tree(&d.rig.dir).unwrap();
        for how in ["mode0", "symlink", "fifo"] {
            std::fs::write(d.rig.dir.join("how"), how).unwrap();
            let id = d.rig.add(&format!("makes the lock {how}"));
            d.rig.wait_file(&d.rig.dir.join(format!("done.{id}")));
            restart_succeeds(how);
            // A regular file again, the dispatcher's, held; /etc/shadow untouched.
            let m = std::fs::symlink_metadata(&lock).unwrap();
            assert!(m.file_type().is_file(), "{how}: {m:?}");
            assert!(hermes_mgr::board::lock::held(&lock, &owner), "{how}");
            let next = d.rig.add(&format!("after {how}"));
            d.wait_running(&next, 0);
        }
        assert!(std::fs::metadata("/etc/shadow").unwrap().len() > 0);
    }
);

systemd_test!(
    two_thousand_boards_made_by_a_worker_cost_the_daemon_a_bounded_share,
    {
        // Anyone who writes the Hermes root can make boards: 2,000 of them took the daemon
        // from 11 MB to 526 MB, 6,018 descriptors and 2,004 inotify watches (root's, host-wide)
        // before the cap. Now it serves `max_boards` (100), says so, and dispatches.
        let d = crate::rig::Dispatcher::new("tick_seconds = 3600");
        as_worker(&format!(
            "cd {} && mkdir -p kanban/boards && cd kanban/boards && for i in $(seq 1 2000); do mkdir b$i && echo {{}} > b$i/board.json; done && mkdir -p empty1 empty2",
            d.rig.dir.display()
        ));
        d.install_all_boards();
        d.start();
        let status = || crate::rig::systemctl_show(crate::rig::SERVICE, "StatusText");
        wait_for("the cap said", Duration::from_secs(60), || {
            status()
                .contains("1901 boards not served (max_boards = 100)")
                .then_some(())
        });
        assert!(crate::rig::journal(crate::rig::SERVICE)
            .contains("more boards in the Hermes root than max_boards = 100 allows"));
        let id = d.rig.add("on the default board");
        d.wait_running(&id, 0);
        let pid = crate::rig::systemctl_show(crate::rig::SERVICE, "MainPID");
        let pid = pid.trim().strip_prefix("MainPID=").unwrap().to_string();
        let fds: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        // Four per served board (database, WAL, shared memory, and the one kept to grow the
        // file ahead: `board::open::keep_ahead`), and a few of its own.
        assert!(fds.len() < 500, "{} descriptors", fds.len());
        let watches: usize = fds
            .iter()
            .filter(|f| {
                std::fs::read_link(f).is_ok_and(|t| t.to_string_lossy().contains("inotify"))
            })
            .map(|f| {
                let info = format!(
                    "/proc/{pid}/fdinfo/{}",
                    f.file_name().unwrap().to_str().unwrap()
                );
                std::fs::read_to_string(info)
                    .unwrap()
                    .lines()
                    .filter(|l| l.starts_with("inotify wd:"))
                    .count()
            })
            .sum();
        assert!(watches <= 110, "{watches} inotify watches");
    }
);

systemd_test!(
    boards_whose_init_locks_a_worker_holds_cost_the_loop_no_wait,
    {
        // A worker holds `kanban.db.init.lock` of boards it makes. The daemon waited 10 s
        // for each on its loop's thread (the rig's watchdog is 10 s: it was killed, and
        // again after each restart); it now goes around a held init lock at once, as
        // upstream goes around it after its wait.
        let d = crate::rig::Dispatcher::new("tick_seconds = 3600");
        d.install_all_boards();
        d.start();
        let pid = crate::rig::systemctl_show(crate::rig::SERVICE, "MainPID");
        let boards = d.rig.dir.join("kanban/boards");
        let _holders: Vec<crate::rig::Killed> = (1..=3)
            .map(|i| {
                let dir = boards.join(format!("held{i}"));
                let lock = dir.join("kanban.db.init.lock");
                as_worker(&format!(
                    "mkdir -p {} && touch {}",
                    dir.display(),
                    lock.display()
                ));
                let child = Command::new("setpriv")
                    .args([
                        &format!("--reuid={WORKER_USER}"),
                        &format!("--regid={WORKER_USER}"),
                        "--init-groups",
                    ])
                    .args(["flock", lock.to_str().unwrap(), "sleep", "3600"])
                    .spawn()
                    .unwrap();
                wait_for("the init lock held", Duration::from_secs(10), || {
                    (!Command::new("flock")
                        .args(["-n", lock.to_str().unwrap(), "true"])
                        .status()
                        .unwrap()
                        .success())
                    .then_some(())
                });
                crate::rig::Killed(child)
            })
            .collect();
        for i in 1..=3 {
            as_worker(&format!(
                "echo {{}} > {}/held{i}/board.json",
                boards.display()
            ));
        }
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let log = crate::rig::journal(crate::rig::SERVICE);
            if (1..=3)
                .all(|i| log.contains(&format!("held{i}/kanban.db.init.lock not taken within 0 s")))
            {
                break;
            }
            assert!(
                Instant::now() < until,
                "the three boards not opened:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // The same daemon, up, and serving them.
        assert_eq!(
            crate::rig::systemctl_show(crate::rig::SERVICE, "MainPID"),
            pid
        );
        let id = crate::boards::create_on(&d, "held2", "on a board whose init lock is held");
        crate::boards::wait_running(&d, "held2", &id);
        assert_eq!(
            crate::rig::systemctl_show(crate::rig::SERVICE, "MainPID"),
            pid
        );
    }
);

systemd_test!(a_board_hard_linked_to_another_is_served_once, {
    // A board whose kanban.db is a hard link to the default board's: served as a second
    // board, one database went through two WALs (`kanban.db-wal` under each name).
    let d = crate::rig::Dispatcher::new("tick_seconds = 3600");
    let first = d.rig.add("makes the default board");
    // Named to sort before `default`: the default board is still the one served.
    let twin = d.rig.dir.join("kanban/boards/aaa");
    std::fs::create_dir_all(&twin).unwrap();
    std::fs::hard_link(&d.rig.db, twin.join("kanban.db")).unwrap();
    std::fs::write(twin.join("board.json"), "{}").unwrap();
    sh(&format!(
        "chown -R {WORKER_USER}: {}",
        d.rig.dir.join("kanban").display()
    ));
    d.install_all_boards();
    d.start();
    wait_for("the twin refused", Duration::from_secs(20), || {
        crate::rig::systemctl_show(crate::rig::SERVICE, "StatusText")
            .contains("board aaa skipped")
            .then_some(())
    });
    assert!(crate::rig::journal(crate::rig::SERVICE)
        .contains("is the same file as board default's (a hard link)"));
    assert!(
        !twin.join("kanban.db-wal").exists(),
        "a second WAL was made"
    );
    d.wait_running(&first, 0);
});

systemd_test!(
    a_plugin_that_makes_upstream_hang_holds_only_its_own_tasks_in_their_scopes,
    {
        // The worker's plugin never returns wherever Hermes loads it to resolve toolsets;
        // the rig's watchdog is 10 s (and Restart=no). Before the fix the daemon waited on
        // its loop's thread (20 s per start, so its watchdog killed it, and again after each
        // restart), the plugin's processes lived in the dispatcher's cgroup, and the other
        // tasks waited. Now each hangs in its own task's scope; another profile's task runs.
        let marks = PathBuf::from(format!("/var/tmp/hermes-mgr-marks-{}", std::process::id()));
        std::fs::create_dir_all(&marks).unwrap();
        let stub = format!(
            "#!{}\nimport os\nopen(os.path.join({:?}, os.environ['HERMES_KANBAN_TASK']), 'w').close()\n",
            crate::harness::venv().join("bin/python3").display(),
            marks.display().to_string()
        );
        let d = crate::rig::Dispatcher::with_stub(&stub, "tick_seconds = 3600");
        sh(&format!("chown {WORKER_USER}: {}", marks.display()));
        enable_plugin(
            &d.rig.dir,
            "hang",
            "import sys, time\ndef register(ctx):\n    pass\nif sys.argv[0] == '-c':\n    time.sleep(3600)\n",
        );
        let other = d.rig.dir.join("profiles/other");
        std::fs::create_dir_all(&other).unwrap();
        sh(&format!(
            "chown -R {WORKER_USER}: {}",
            d.rig.dir.join("profiles").display()
        ));
        d.install();
        d.start();
        let pid = crate::rig::systemctl_show(crate::rig::SERVICE, "MainPID");
        let hung: Vec<String> = (0..4)
            .map(|i| {
                d.rig
                    .add(&format!("its profile loads the hanging plugin {i}"))
            })
            .collect();
        let victim = d.rig.add_with_assignee("another profile's task", "other");
        wait_for(
            "the other profile's worker ran",
            Duration::from_secs(60),
            || marks.join(&victim).exists().then_some(()),
        );
        // Past the watchdog: the hung ones are still at it, each in its own scope.
        wait_for(
            "the watchdog's period passed",
            Duration::from_secs(60),
            || {
                let t = d.task(&hung[0]);
                let run = d.rig.board().runs(&hung[0]).unwrap();
                (t.status.as_str() == "running"
                    && run
                        .last()
                        .is_some_and(|r| hermes_mgr::board::now() - r.started_at >= 12))
                .then_some(())
            },
        );
        for id in &hung {
            let t = d.task(id);
            assert_eq!(t.status.as_str(), "running", "{id}");
            assert!(
                !marks.join(id).exists(),
                "{id}'s worker ran past the plugin"
            );
            let worker = t.worker_pid.expect("the run's process is recorded");
            let cg = std::fs::read_to_string(format!("/proc/{worker}/cgroup")).unwrap();
            assert!(
                cg.contains(&format!("hermes-worker-kanban-{id}-run-"))
                    && cg.contains("hermes-workers.slice"),
                "{id}: the plugin runs in {cg}"
            );
            let cmdline = std::fs::read(format!("/proc/{worker}/cmdline")).unwrap();
            assert!(
                String::from_utf8_lossy(&cmdline).contains("-I\0-c"),
                "{id}: {}",
                String::from_utf8_lossy(&cmdline)
            );
        }
        assert_eq!(
            crate::rig::systemctl_show(crate::rig::SERVICE, "MainPID"),
            pid
        );
        assert_eq!(
            crate::rig::systemctl_show(crate::rig::SERVICE, "ActiveState").trim(),
            "ActiveState=active"
        );
        // Nothing of the plugin's is in the dispatcher's own cgroup: the daemon, and its
        // supervisors' fork server.
        let own = std::fs::read_to_string(format!(
            "/sys/fs/cgroup/system.slice/{}/cgroup.procs",
            crate::rig::SERVICE
        ))
        .unwrap();
        let main: i32 = pid.trim().trim_start_matches("MainPID=").parse().unwrap();
        // Anything but the daemon and its supervisors' fork server (a process that ended
        // meanwhile counts: its PID is read as nothing).
        let others: Vec<&str> = own
            .lines()
            .filter(|p| {
                let stat = p
                    .parse()
                    .ok()
                    .and_then(|p| procfs::process::Process::new(p).ok()?.stat().ok());
                !stat.is_some_and(|s| {
                    s.pid == main || (s.comm == "hermes-mgr-fork" && s.ppid == main)
                })
            })
            .collect();
        assert!(others.is_empty(), "the dispatcher's cgroup holds {own}");
    }
);

/// A `worktree` task made before the dispatcher starts (it claims a new task at once).
fn worktree_task(d: &crate::rig::Dispatcher, title: &str) -> String {
    let id = d.rig.add(title);
    d.rig
        .board()
        .connection()
        .execute(
            "UPDATE tasks SET workspace_kind='worktree', workspace_path=NULL WHERE id=?1",
            [&id],
        )
        .unwrap();
    id
}

/// The first run of `id`, once it has ended.
fn first_run_ended(d: &crate::rig::Dispatcher, id: &str) -> hermes_mgr::board::Run {
    wait_for(
        &format!("{id}'s first run ended"),
        Duration::from_secs(60),
        || {
            d.rig
                .board()
                .runs(id)
                .unwrap()
                .into_iter()
                .next()
                .filter(|r| r.ended_at.is_some())
        },
    )
}

systemd_test!(
    a_worktree_upstream_refuses_in_the_scope_is_the_tasks_counted_spawn_failure,
    {
        // Upstream's resolver runs in the run's scope now; its refusal (no path, no board
        // default_workdir) comes back through the exit record and is booked as upstream's
        // dispatcher books it: `spawn_failed`, "workspace: …", counted.
        let stub = format!(
            "#!{}\nraise SystemExit('never reached')\n",
            crate::harness::venv().join("bin/python3").display()
        );
        let d = crate::rig::Dispatcher::with_stub(&stub, "tick_seconds = 3600");
        let id = worktree_task(&d, "a worktree with no anchor");
        d.install();
        d.start();
        let run = first_run_ended(&d, &id);
        assert_eq!(run.outcome.as_deref(), Some("spawn_failed"), "{run:?}");
        let error = run.error.clone().unwrap_or_default();
        assert!(
            error.starts_with(&format!(
                "workspace: task {id} has workspace_kind=worktree but no workspace_path"
            )),
            "{run:?}"
        );
        assert!(d.task(&id).consecutive_failures >= 1, "{run:?}");
    }
);

systemd_test!(
    hermes_code_that_cannot_be_started_for_a_worktree_is_the_dispatchers_fault,
    {
        // `hermes_bin` a Python script whose interpreter cannot import Hermes: nobody can ask
        // upstream for the worktree. The dispatcher's configuration: not counted, said loudly,
        // the board backs off.
        let d = crate::rig::Dispatcher::with_stub(
            "#!/usr/bin/python3 -I\nraise SystemExit('never reached')\n",
            "tick_seconds = 3600",
        );
        let id = worktree_task(&d, "a worktree nobody can resolve");
        d.install();
        d.start();
        let run = first_run_ended(&d, &id);
        assert_eq!(run.outcome.as_deref(), Some("spawn_failed"), "{run:?}");
        let error = run.error.clone().unwrap_or_default();
        assert!(
            error.starts_with("Hermes' own code cannot be started: import hermes_cli.kanban_db with /usr/bin/python3"),
            "{run:?}"
        );
        assert_eq!(d.task(&id).consecutive_failures, 0, "{run:?}");
        wait_for("the journal says it", Duration::from_secs(20), || {
            crate::rig::journal(crate::rig::SERVICE)
                .contains("the dispatcher cannot start workers: Hermes' own code cannot be started")
                .then_some(())
        });
    }
);

systemd_test!(
    a_board_whose_index_costs_seconds_a_row_costs_the_daemon_no_watchdog_restart,
    {
        // A worker makes a board with an index whose expression builds 50 MB a row:
        // integrity_check evaluates it for each of 60 rows (~16 s here; the rig's watchdog is
        // 10 s, and Restart=no). Before the budget the daemon, opening the new board on its
        // loop, was killed by its watchdog, and no task of any board ran again.
        let d = crate::rig::Dispatcher::new("tick_seconds = 3600");
        d.install_all_boards();
        d.start();
        let pid = crate::rig::systemctl_show(crate::rig::SERVICE, "MainPID");
        // Made aside (a name that is no slug), then renamed in whole: the daemon must not
        // open it half-made.
        let staging = d.rig.dir.join("kanban/boards/.staging");
        std::fs::create_dir_all(&staging).unwrap();
        let db = staging.join("kanban.db");
        let slow_task = {
            let b = hermes_mgr::board::Board::open(
                &hermes_mgr::board::BoardPaths::for_db(&db),
                hermes_mgr::board::OpenMode::CreateIfMissing,
            )
            .unwrap();
            let c = b.connection();
            for i in 0..60 {
                c.execute(
                    "INSERT INTO tasks(id, title, status, created_at) VALUES (?1, 'filler', 'done', 0)",
                    [format!("f{i}")],
                )
                .unwrap();
            }
            c.execute_batch(
                "CREATE INDEX costly ON tasks(length(printf('%.*c', 50000000, title)))",
            )
            .unwrap();
            b.create(&hermes_mgr::board::NewTask {
                title: "on the slow board".into(),
                assignee: Some("default".into()),
                ..Default::default()
            })
            .unwrap()
        };
        sh(&format!(
            "chown -R --reference={} {}",
            d.rig.dir.display(),
            staging.display()
        ));
        std::fs::rename(&staging, d.rig.dir.join("kanban/boards/slow")).unwrap();
        let victim = d.rig.add("a task of the default board");
        d.wait_running(&victim, 0);
        // The slow board is served too (`quick_check` stood in), read without its check.
        let slow_db = d.rig.dir.join("kanban/boards/slow/kanban.db");
        wait_for("the slow board's task ran", Duration::from_secs(60), || {
            let c = rusqlite::Connection::open(&slow_db).ok()?;
            let status: String = c
                .query_row("SELECT status FROM tasks WHERE id=?1", [&slow_task], |r| {
                    r.get(0)
                })
                .ok()?;
            (status != "ready").then_some(())
        });
        assert!(crate::rig::journal(crate::rig::SERVICE)
            .contains("PRAGMA quick_check stands in for it"));
        assert_eq!(
            crate::rig::systemctl_show(crate::rig::SERVICE, "MainPID"),
            pid
        );
    }
);

systemd_test!(
    a_full_file_system_for_workspaces_is_the_dispatchers_fault,
    {
        // The other side of a workspace being the task's: a host that cannot make one (here a
        // workspaces root with no inode left) must not be booked against the task.
        let rig = Rig::new("#!/bin/sh\nexit 0\n", "");
        let root = rig.dir.join("full");
        std::fs::create_dir_all(&root).unwrap();
        sh(&format!(
            "mount -t tmpfs -o size=1m,nr_inodes=4 tmpfs {r} && chown {WORKER_USER}: {r} && \
         i=0; while touch {r}/f$i 2>/dev/null; do i=$((i+1)); done",
            r = root.display()
        ));
        let id = rig.add("innocent");
        let out = crate::harness::run({
            let mut c = rig.mgr_cmd(&["dispatch", "--once", "--json"]);
            c.env("HERMES_KANBAN_WORKSPACES_ROOT", &root);
            c
        });
        sh(&format!("umount {}", root.display()));
        let out = out.ok().json();
        let f = &out["spawn_failed"][0];
        assert_eq!(f["task_id"], json!(id), "{out}");
        assert_eq!(f["infrastructure"], json!(true), "{out}");
        assert!(
            f["error"].as_str().unwrap().contains("make the workspace")
                && f["error"].as_str().unwrap().contains("No space left"),
            "{out}"
        );
        assert_eq!(
            rig.board().require_task(&id).unwrap().consecutive_failures,
            0
        );
    }
);
