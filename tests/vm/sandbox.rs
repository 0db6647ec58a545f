//! The worker sandbox on Debian 12's own kernel (6.1) and systemd, from the package: the
//! layers it gives there, and a worker that tries to read another task's workspace and a
//! file in `/home`, to write `config.yaml`, and writes its workspace, a private `/tmp` and
//! the Hermes root, then completes its task.

use crate::guest::{self, BOARD};
use crate::qemu::Vm;

const ATTACKER: &str = r#"#!/bin/sh
r=/var/lib/hermes/results-$HERMES_KANBAN_TASK
try() { if sh -c "$2" >/dev/null 2>&1; then echo "$1 yes"; else echo "$1 no"; fi >> "$r"; }
try other_read "cat /var/lib/hermes/kanban/workspaces/t_other/secret"
try home_read "cat /home/visible"
try config "echo 'kanban: {max_spawn: 99}' >> /var/lib/hermes/config.yaml"
try own "echo ok > $PWD/own"
try tmp "touch /tmp/hermes-sandbox-private"
try hermes_root "touch /var/lib/hermes/written-by-worker"
exec hermes-mgr complete --summary sandboxed "$HERMES_KANBAN_TASK"
"#;

#[test]
fn a_sandboxed_worker_on_debian_12_reads_and_writes_only_what_it_may() {
    let mut vm = Vm::boot("sandbox", guest::payload());
    guest::install(&mut vm);
    vm.ok(
        "install -d -o hermes -g hermes /var/lib/hermes/kanban/workspaces/t_other && \
         echo 'not yours' > /var/lib/hermes/kanban/workspaces/t_other/secret && \
         chown -R hermes: /var/lib/hermes/kanban && \
         printf 'kanban:\\n  failure_limit: 2\\n' > /var/lib/hermes/config.yaml && \
         chown hermes: /var/lib/hermes/config.yaml && \
         echo 'on the host' > /home/visible",
    );
    guest::configure(&mut vm, ATTACKER, "sandbox = true");
    let doctor = vm.ok("hermes-mgr doctor 2>&1 || true");
    let id = guest::add(&mut vm, "attack the host");
    let done = vm.sh(&format!(
        "for i in $(seq 240); do test \"$(sqlite3 -readonly {BOARD} \"SELECT status FROM tasks WHERE id='{id}'\")\" = done && exit 0; sleep 0.5; done; exit 1"
    ));
    assert!(
        done.code == 0,
        "{id} not done within 120 s\n{}\n{}",
        vm.ok(&format!(
            "sqlite3 -readonly {BOARD} \"SELECT * FROM task_runs WHERE task_id='{id}'\""
        )),
        vm.ok(
            "journalctl --no-pager -o cat -n 60 -u hermes-dispatcher -u 'hermes-worker-kanban-*'"
        )
    );
    let results = vm.ok(&format!("cat /var/lib/hermes/results-{id}"));
    let journal = vm.ok(&format!(
        "journalctl -o cat --no-pager -u hermes-worker-kanban-{id}-run-1.scope"
    ));
    eprintln!("{doctor}\n{results}\n{journal}");
    assert_eq!(
        results.lines().collect::<Vec<_>>(),
        [
            "other_read no",
            "home_read no",
            "config no",
            "own yes",
            "tmp yes",
            "hermes_root yes"
        ],
        "{journal}"
    );
    assert!(
        journal.contains("the worker runs in its sandbox: a mount namespace"),
        "{journal}"
    );
    assert!(doctor.contains("sandbox"), "{doctor}");
    assert_eq!(
        vm.ok("cat /var/lib/hermes/config.yaml"),
        "kanban:\n  failure_limit: 2\n"
    );
    vm.ok("test ! -e /tmp/hermes-sandbox-private");
    assert_eq!(
        vm.ok(&format!(
            "sqlite3 -readonly {BOARD} \"SELECT summary FROM task_runs WHERE task_id='{id}'\""
        ))
        .trim(),
        "sandboxed"
    );
}
