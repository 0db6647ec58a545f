//! A board owned by an unprivileged worker user, a stub worker and a config, inside the
//! systemd sandbox; shared by the worker and daemon tests.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hermes_mgr::board::{Board, BoardPaths, NewTask, OpenMode};
use serde_json::Value;

use crate::harness::{wait_for, Ran};

pub const WORKER_USER: &str = "hermesw";
pub const EXTRA_GROUP: &str = "hermesx";

/// A board owned by the worker user, a stub worker, and a config, inside the sandbox.
pub struct Rig {
    pub dir: PathBuf,
    pub db: PathBuf,
    pub config: PathBuf,
    pub uid: u32,
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
        std::fs::write(
            &config,
            format!(
                "hermes_bin = {stub_path:?}\nworker_user = \"{WORKER_USER}\"\nstop_timeout_seconds = 5\nstate_dir = \"/run/hermes-mgr-test\"\n{extra}\n"
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

    pub fn mgr_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(crate::harness::mgr_bin());
        c.arg("--db")
            .arg(&self.db)
            .arg("--config")
            .arg(&self.config)
            .args(args);
        // The Hermes root (profiles, workspaces) of this board, as `hermes` would be told.
        c.env("HERMES_KANBAN_HOME", &self.dir);
        c
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

pub fn systemctl_show(unit: &str, props: &str) -> String {
    let o = Command::new("systemctl")
        .args(["show", unit, "-p", props])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn alive(pid: u32) -> bool {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .map(|s| s.state != 'Z' && s.state != 'X')
        .unwrap_or(false)
}
