//! A board owned by an unprivileged worker user, a stub worker and a config, inside the
//! systemd sandbox; shared by the worker and daemon tests.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hermes_mgr::board::{Board, BoardPaths, NewTask, OpenMode, Task};
use serde_json::Value;

use crate::harness::{hermes_bin, mgr_bin, wait_for, Ran};

pub const WORKER_USER: &str = "hermesw";
pub const EXTRA_GROUP: &str = "hermesx";

/// A board owned by the worker user, a stub worker, and a config, inside the sandbox.
pub struct Rig {
    pub dir: PathBuf,
    pub db: PathBuf,
    pub config: PathBuf,
    pub uid: u32,
}

/// `program` run as the worker user, with that user's groups (`setpriv`).
pub fn as_worker(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        &format!("--reuid={WORKER_USER}"),
        &format!("--regid={WORKER_USER}"),
        "--init-groups",
    ])
    .arg(program);
    c
}

/// A git repository of the worker user's at `path`, with one empty commit.
pub fn git_repo(path: &Path, home: &Path) {
    let ok = as_worker("sh")
        .args([
            "-c",
            "git init -q \"$0\" && git -C \"$0\" -c user.email=t@example.org -c user.name=t commit -q --allow-empty -m init",
        ])
        .arg(path)
        .env("HOME", home)
        .status()
        .unwrap();
    assert!(ok.success(), "git init {}", path.display());
}

/// The real `hermes` behind a Python shim run by the venv's interpreter: a worker binary
/// whose `#!` line lets hermes-mgr ask Hermes' own code; argv[1:] and the environment pass.
pub fn hermes_python_shim() -> String {
    hermes_python_shim_of(&crate::harness::venv(), &hermes_bin())
}

/// The same for the Hermes of the venv at `venv`, whose script is `bin`.
pub fn hermes_python_shim_of(venv: &Path, bin: &Path) -> String {
    let real = bin.display().to_string();
    format!(
        "#!{}\nimport os, sys\nos.execv({real:?}, [{real:?}] + sys.argv[1:])\n",
        venv.join("bin/python3").display()
    )
}

pub fn sh(cmd: &str) -> String {
    let o = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(
        o.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

impl Rig {
    /// `stub` is the worker program (a script with its #! line); `extra` more config lines.
    pub fn new(stub: &str, extra: &str) -> Rig {
        assert!(
            crate::harness::inside(),
            "worker tests run inside the systemd sandbox"
        );
        // Users made here live in the sandbox's overlay /etc only.
        sh(&format!(
            "getent group {EXTRA_GROUP} >/dev/null || groupadd --system {EXTRA_GROUP}; \
             id -u {WORKER_USER} >/dev/null 2>&1 || useradd --system --user-group --no-create-home \
               --home-dir /nonexistent --shell /usr/sbin/nologin -G {EXTRA_GROUP} {WORKER_USER}"
        ));
        let uid: u32 = sh(&format!("id -u {WORKER_USER}")).trim().parse().unwrap();
        let gid: u32 = sh(&format!("id -g {WORKER_USER}")).trim().parse().unwrap();
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = PathBuf::from(format!(
            "/var/tmp/hermes-mgr-rig/{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        for d in [Path::new("/var/tmp/hermes-mgr-rig"), &dir] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        let stub_path = dir.join("worker");
        std::fs::write(&stub_path, stub).unwrap();
        std::fs::set_permissions(&stub_path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let config = dir.join("config.toml");
        // The operators' holds: root's, outside the tree the worker user writes, one file
        // per rig.
        let holds = Path::new("/var/tmp/hermes-mgr-holds")
            .join(dir.file_name().unwrap())
            .join("holds.json");
        std::fs::write(
            &config,
            format!(
                "hermes_bin = {stub_path:?}\nworker_user = \"{WORKER_USER}\"\nstop_timeout_seconds = 5\nstate_dir = \"/run/hermes-mgr-test\"\nholds_file = {holds:?}\n{extra}\n"
            ),
        )
        .unwrap();
        let db = dir.join("kanban.db");
        Rig {
            dir,
            db,
            config,
            uid,
        }
    }

    pub fn board(&self) -> Board {
        Board::open(&BoardPaths::for_db(&self.db), OpenMode::CreateIfMissing).unwrap()
    }

    pub fn add(&self, title: &str) -> String {
        self.board()
            .create(&NewTask {
                title: title.into(),
                assignee: Some("default".into()),
                ..Default::default()
            })
            .unwrap()
    }

    /// A ready task for `assignee` (one that is no profile here is never dispatched).
    pub fn add_with_assignee(&self, title: &str, assignee: &str) -> String {
        self.board()
            .create(&NewTask {
                title: title.into(),
                assignee: Some(assignee.into()),
                ..Default::default()
            })
            .unwrap()
    }

    pub fn mgr_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(crate::harness::mgr_bin());
        c.arg("--db")
            .arg(&self.db)
            .arg("--config")
            .arg(&self.config)
            .args(args);
        // The Hermes root (profiles, workspaces) of this board, as `hermes` would be told.
        c.env("HERMES_KANBAN_HOME", &self.dir);
        // …and Hermes' home, whose `config.yaml` holds its kanban settings.
        c.env("HERMES_HOME", &self.dir);
        c
    }

    /// `hermes-mgr --db … --config …` with the rig's Hermes root, as one shell command line
    /// (the rig's paths need no quoting), for `prefix` (`prlimit …`) and `args` to wrap.
    pub fn mgr_shell(&self, prefix: &str, args: &str) -> String {
        format!(
            "HERMES_KANBAN_HOME={dir} HERMES_HOME={dir} {prefix} {bin} --db {db} --config {cfg} {args}",
            dir = self.dir.display(),
            bin = crate::harness::mgr_bin().display(),
            db = self.db.display(),
            cfg = self.config.display()
        )
    }

    pub fn mgr(&self, args: &[&str]) -> Ran {
        crate::harness::run(self.mgr_cmd(args))
    }

    pub fn dispatch(&self) -> Value {
        self.mgr(&["dispatch", "--once", "--json"]).ok().json()
    }

    /// Wait for a file the stub writes into its workspace.
    pub fn wait_file(&self, path: &Path) -> String {
        wait_for(
            &format!("{}", path.display()),
            Duration::from_secs(20),
            || {
                std::fs::read_to_string(path)
                    .ok()
                    .filter(|s| s.ends_with("END\n"))
            },
        )
    }
}

/// `systemctl list-units` of the worker scopes, one per line: the active ones, or with
/// `all` every loaded one (failed and inactive too).
pub fn worker_units(all: bool) -> String {
    let state = if all { "--all" } else { "--state=active" };
    let o = Command::new("systemctl")
        .args([
            "list-units",
            state,
            "--plain",
            "--no-legend",
            "hermes-worker-kanban-*",
        ])
        .output()
        .expect("systemctl list-units");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn systemctl_show(unit: &str, props: &str) -> String {
    let o = Command::new("systemctl")
        .args(["show", unit, "-p", props])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A child that has exited and is not reaped yet: a PID that exists but can never join a
/// cgroup (the kernel skips exiting tasks when it migrates). Reap it with `wait()`.
pub fn zombie() -> std::process::Child {
    let child = Command::new("true").spawn().expect("spawn true");
    let pid = child.id() as i32;
    wait_for("a zombie", Duration::from_secs(10), || {
        procfs::process::Process::new(pid)
            .and_then(|p| p.stat())
            .is_ok_and(|s| s.state == 'Z')
            .then_some(())
    });
    child
}

pub fn alive(pid: u32) -> bool {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .map(|s| s.state != 'Z' && s.state != 'X')
        .unwrap_or(false)
}

pub const SERVICE: &str = "hermes-dispatcher.service";

/// A worker the test drives: it announces itself (`ready-<run>` in its workspace) and then
/// does what the test writes into its FIFO: `exit N`, `complete`, or `block`.
pub fn driven_stub() -> String {
    format!(
        r#"#!/bin/sh
# `hermes kanban …` that is not a worker (the dispatcher's triage decompositions) is the real one.
[ "$1" = kanban ] && exec {hermes} "$@"
rm -f cmd; mkfifo cmd
echo "pid=$$" > "ready-$HERMES_KANBAN_RUN_ID.tmp"; echo END >> "ready-$HERMES_KANBAN_RUN_ID.tmp"
mv "ready-$HERMES_KANBAN_RUN_ID.tmp" "ready-$HERMES_KANBAN_RUN_ID"
read what arg < cmd
echo "worker $HERMES_KANBAN_TASK run $HERMES_KANBAN_RUN_ID: $what $arg"
case "$what" in
  exit) exit "$arg" ;;
  leave) setsid sleep 3600 </dev/null >/dev/null 2>&1 &
         printf 'pid=%s\nEND\n' "$!" > "left-$HERMES_KANBAN_RUN_ID"; exit "$arg" ;;
  complete) exec {hermes} kanban complete "$HERMES_KANBAN_TASK" --summary "done by the stub" ;;
  block) exec {hermes} kanban block "$HERMES_KANBAN_TASK" "stub needs a human" ;;
esac
exit 9
"#,
        hermes = hermes_bin().display()
    )
}

/// `driven_stub`, run by `venv`'s interpreter: the Hermes its workers run, and so the contract
/// hermes-mgr follows, is that venv's.
pub fn driven_stub_of(venv: &Path) -> String {
    format!(
        "#!{}\nimport os, sys\nos.execv('/bin/sh', ['sh', '-c', {:?}, 'sh'] + sys.argv[1:])\n",
        venv.join("bin/python3").display(),
        driven_stub()
    )
}

pub struct Dispatcher {
    pub rig: Rig,
}

impl Dispatcher {
    pub fn new(extra_config: &str) -> Dispatcher {
        Dispatcher::with_stub(&driven_stub(), extra_config)
    }

    /// A dispatcher whose workers are `stub` (a script with its `#!` line).
    pub fn with_stub(stub: &str, extra_config: &str) -> Dispatcher {
        Dispatcher {
            rig: Rig::new(stub, extra_config),
        }
    }

    /// Install the project's own unit (`units/hermes-dispatcher.service`, hardening and all)
    /// with a drop-in pointing it at this build and this board.
    pub fn install(&self) {
        // Our own debug lines; zbus's would cost milliseconds per call to journald.
        self.install_logging("hermes_mgr=debug,info");
    }

    /// `install`, the daemon serving every board of the rig's Hermes root (no `--db`), as
    /// the shipped unit does.
    pub fn install_all_boards(&self) {
        self.install_with("hermes_mgr=debug,info", false);
    }

    /// `install` with `HERMES_MGR_LOG=filter` (benchmarks: `info`, as in production).
    pub fn install_logging(&self, filter: &str) {
        self.install_with(filter, true);
    }

    fn install_with(&self, filter: &str, pinned: bool) {
        std::fs::create_dir_all("/run/systemd/system/hermes-dispatcher.service.d").unwrap();
        std::fs::copy(
            crate::harness::repo().join("units/hermes-dispatcher.service"),
            format!("/run/systemd/system/{SERVICE}"),
        )
        .unwrap();
        let dropin = format!(
            "[Service]\nExecStart=\nExecStart={bin} dispatcher {db} --config {cfg}\nEnvironment=HERMES_KANBAN_HOME={dir}\nEnvironment=HERMES_HOME={dir}\n\
             Environment=HERMES_MGR_LOG={filter}\nWatchdogSec=10s\nRestart=no\nTimeoutStopSec=5s\n",
            bin = mgr_bin().display(),
            db = if pinned {
                format!("--db {}", self.rig.db.display())
            } else {
                String::new()
            },
            cfg = self.rig.config.display(),
            dir = self.rig.dir.display()
        );
        std::fs::write(
            "/run/systemd/system/hermes-dispatcher.service.d/50-test.conf",
            dropin,
        )
        .unwrap();
        sh("systemctl daemon-reload");
    }

    pub fn start(&self) {
        let o = Command::new("systemctl")
            .args(["start", SERVICE])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "start failed: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            journal(SERVICE)
        );
    }

    pub fn stop(&self) {
        sh(&format!("systemctl stop {SERVICE}"));
    }

    pub fn task(&self, id: &str) -> Task {
        self.rig.board().require_task(id).unwrap()
    }

    /// Wait until `id` runs run number > `after`, and return that run id.
    pub fn wait_running(&self, id: &str, after: i64) -> i64 {
        wait_for(
            &format!("{id} running after run {after}"),
            Duration::from_secs(20),
            || {
                let t = self.task(id);
                (t.status.as_str() == "running")
                    .then_some(t.current_run_id)
                    .flatten()
                    .filter(|r| *r > after)
            },
        )
    }

    /// Tell the worker of `id`'s run `run` what to do.
    pub fn command(&self, id: &str, run: i64, what: &str) {
        let ws = self.rig.dir.join("kanban/workspaces").join(id);
        self.rig.wait_file(&ws.join(format!("ready-{run}")));
        std::fs::write(ws.join("cmd"), format!("{what}\n")).unwrap();
    }

    pub fn wait_task(&self, what: &str, cond: impl Fn(&Task) -> bool, id: &str) -> Task {
        wait_for(what, Duration::from_secs(30), || {
            Some(self.task(id)).filter(|t| cond(t))
        })
    }
}

pub fn journal(unit: &str) -> String {
    let o = Command::new("journalctl")
        .args(["-u", unit, "--no-pager", "-n", "400", "-o", "cat"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A child process killed and reaped when this goes out of scope.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
