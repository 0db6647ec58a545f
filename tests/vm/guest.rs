//! What the tests do in a guest: the package and the Hermes venv on the payload disk, the
//! package installed as an operator installs it, workers configured, tasks created.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

use crate::qemu::{repo, venv, Vm};

pub const BOARD: &str = "/var/lib/hermes/kanban.db";

/// The payload disk, made once per test process: the package built from this build's
/// binary (`payload/hermes-mgr.deb`, and as the next revision `hermes-mgr-next.deb`;
/// `payload/hermes-mgr.rpm`) and the host's Hermes venv (`payload/venv`).
pub fn payload() -> &'static Path {
    static PAYLOAD: OnceLock<PathBuf> = OnceLock::new();
    PAYLOAD.get_or_init(|| {
        let dir = PathBuf::from(format!(
            "/var/tmp/hermes-mgr-vm/payload-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // This version, and the next revision of it (the upgrade).
        for (file, revision) in [("hermes-mgr.deb", "1"), ("hermes-mgr-next.deb", "2")] {
            crate::deb::build_deb(&repo(), &dir.join(file), revision);
        }
        run(Command::new("cargo")
            .args(["generate-rpm", "--profile", "dev", "-o"])
            .arg(dir.join("hermes-mgr.rpm"))
            .current_dir(repo()));
        run(Command::new("cp")
            .arg("-a")
            .arg(venv())
            .arg(dir.join("venv")));
        let image = dir.with_extension("raw");
        run(Command::new("mke2fs")
            .args(["-q", "-t", "ext4", "-d"])
            .arg(&dir)
            .arg(&image)
            .arg("1G"));
        let _ = std::fs::remove_dir_all(&dir);
        image
    })
}

fn run(c: &mut Command) {
    let o = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    assert!(
        o.status.success(),
        "{c:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `apt install ./hermes-mgr.deb`, as an operator does; the service must be running after.
pub fn install(vm: &mut Vm) {
    apt(vm, "install ./hermes-mgr.deb");
    assert_eq!(
        vm.ok("systemctl is-active hermes-dispatcher").trim(),
        "active"
    );
}

/// Point the installed dispatcher at `worker` (a script run as the hermes user) with
/// `extra` TOML, and reload it.
pub fn configure(vm: &mut Vm, worker: &str, extra: &str) {
    vm.write("/var/lib/hermes/worker.sh", worker.as_bytes(), "0755");
    vm.ok("chown hermes:hermes /var/lib/hermes/worker.sh && install -d -o hermes -g hermes /var/lib/hermes/sync");
    let config =
        format!("worker_user = \"hermes\"\nhermes_bin = \"/var/lib/hermes/worker.sh\"\n{extra}\n");
    vm.write("/etc/hermes-mgr/config.toml", config.as_bytes(), "0644");
    vm.ok("systemctl reload hermes-dispatcher");
    // A configured machine has its configuration on disk: without this, a power cut within
    // ext4's writeback delay leaves an empty worker.sh (seen once: every start of the task then
    // failed with ENOEXEC — booked as the dispatcher's failure, never the task's — and the power
    // test waited for it in vain).
    vm.ok("sync");
}

/// `hermes-mgr add` as the hermes user (the board is the hermes user's); the new id.
pub fn add(vm: &mut Vm, title: &str) -> String {
    let out = vm.ok(&format!(
        "runuser -u hermes -- env HERMES_HOME=/var/lib/hermes hermes-mgr add --assignee default --json '{title}'"
    ));
    let v: Value = serde_json::from_str(&out).unwrap();
    v["id"].as_str().unwrap().to_string()
}

/// One column of a task, read with sqlite3 (read-only).
pub fn task_field(vm: &mut Vm, id: &str, column: &str) -> String {
    vm.ok(&format!(
        "sqlite3 -readonly {BOARD} \"SELECT {column} FROM tasks WHERE id='{id}'\""
    ))
    .trim()
    .to_string()
}

/// `hermes-mgr status --json` in the guest.
pub fn status(vm: &mut Vm) -> Value {
    serde_json::from_str(&vm.ok(&format!("hermes-mgr --db {BOARD} status --json"))).unwrap()
}

/// Wait until task `id` has `status`.
pub fn wait_status(vm: &mut Vm, id: &str, status: &str, within: Duration) {
    vm.wait_ok(
        &format!("{id} {status}"),
        within,
        &format!("test \"$(sqlite3 -readonly {BOARD} \"SELECT status FROM tasks WHERE id='{id}'\")\" = {status}"),
    );
}

/// `apt-get -y <args>` in the payload directory, non-interactive; its output.
pub fn apt(vm: &mut Vm, args: &str) -> String {
    vm.ok(&format!(
        "cd /payload && DEBIAN_FRONTEND=noninteractive apt-get -y -q {args} 2>&1"
    ))
}

/// Hermes' own CLI (`hermes <args>`) as the hermes user on /var/lib/hermes; its stdout.
pub fn hermes(vm: &mut Vm, args: &str) -> String {
    vm.ok(&format!(
        "runuser -u hermes -- env HOME=/var/lib/hermes HERMES_HOME=/var/lib/hermes {}/bin/hermes {args}",
        venv().display()
    ))
}

/// The dispatcher's main PID.
pub fn main_pid(vm: &mut Vm) -> String {
    vm.ok("systemctl show -p MainPID --value hermes-dispatcher")
        .trim()
        .to_string()
}

/// A worker that says hello, waits for the word (the FIFO `sync/go-<task>`, made before it
/// says `sync/ready-<task>`) and then completes its task with `complete <task>`.
pub fn waiting_worker(complete: &str) -> String {
    format!(
        "#!/bin/sh\necho \"hello from $HERMES_KANBAN_TASK\"\nd=/var/lib/hermes/sync/$HERMES_KANBAN_TASK\nrm -f $d.go; mkfifo $d.go; touch $d.ready\nread x < $d.go\nexec {complete} \"$HERMES_KANBAN_TASK\"\n"
    )
}

/// Say the word to the waiting worker of `id`.
pub fn go(vm: &mut Vm, id: &str) {
    vm.ok(&format!("echo go > /var/lib/hermes/sync/{id}.go"));
}

/// Wait until the waiting worker of `id` is ready.
pub fn wait_ready(vm: &mut Vm, id: &str) {
    vm.wait_ok(
        &format!("{id}'s worker"),
        Duration::from_secs(120),
        &format!("test -e /var/lib/hermes/sync/{id}.ready"),
    );
}
