//! The `.deb` on a real boot: installed with apt, its unit read from
//! /usr/lib/systemd/system by the guest's own systemd (no workaround of any kind), a task
//! created with Hermes' own CLI run to done, an upgrade with a worker running, remove, purge.

use std::time::Duration;

use crate::guest::{self, BOARD};
use crate::qemu::Vm;

#[test]
fn apt_installs_enables_and_starts_it_upgrades_keep_the_worker_remove_and_purge_keep_the_board() {
    let mut vm = Vm::boot("package", guest::payload());
    guest::install(&mut vm);
    assert_eq!(
        vm.ok("systemctl is-enabled hermes-dispatcher").trim(),
        "enabled"
    );
    assert_eq!(
        vm.ok("systemctl show -p FragmentPath --value hermes-dispatcher")
            .trim(),
        "/lib/systemd/system/hermes-dispatcher.service"
    );
    assert!(vm.ok("id -u hermes").trim().parse::<u32>().unwrap() > 0);
    let worker = guest::waiting_worker(&format!(
        "{}/bin/hermes kanban complete --summary packaged",
        crate::qemu::venv().display()
    ));
    // No TOML beyond the worker: the package's defaults.
    guest::configure(&mut vm, &worker, "");
    let created = guest::hermes(
        &mut vm,
        "kanban create 'a packaged task' --assignee default --json",
    );
    let id = serde_json::from_str::<serde_json::Value>(&created).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    guest::wait_ready(&mut vm, &id);
    let scope = format!("hermes-worker-kanban-{id}-run-1.scope");
    assert_eq!(
        vm.ok(&format!("systemctl show -p Slice --value {scope}"))
            .trim(),
        hermes_mgr::names::worker_slice("hermes-workers.slice", &scope)
    );
    let worker_pid = guest::task_field(&mut vm, &id, "worker_pid");

    // The next revision over it, with the worker running: the daemon restarts, the worker lives.
    let before = guest::main_pid(&mut vm);
    guest::apt(&mut vm, "install ./hermes-mgr-next.deb");
    assert_eq!(vm.ok("dpkg-query -W -f '${Version}' hermes-mgr"), "0.1.0-2");
    assert_ne!(
        guest::main_pid(&mut vm),
        before,
        "the upgrade did not restart the daemon"
    );
    assert_eq!(
        vm.ok("systemctl is-active hermes-dispatcher").trim(),
        "active"
    );
    vm.ok(&format!("kill -0 {worker_pid}"));
    guest::go(&mut vm, &id);
    guest::wait_status(&mut vm, &id, "done", Duration::from_secs(120));
    let runs = vm.ok(&format!(
        "sqlite3 -readonly {BOARD} \"SELECT outcome FROM task_runs WHERE task_id='{id}'\""
    ));
    assert_eq!(runs.trim(), "completed", "one run, completed");
    // The run the worker closed itself carries what it cost, once its worker has gone.
    vm.wait_ok(
        "the completed run's cost",
        Duration::from_secs(60),
        &format!(
            "test \"$(sqlite3 -readonly {BOARD} \"SELECT json_extract(metadata, '$.resources.cpu_usec') > 0 AND json_extract(metadata, '$.resources.memory_peak_bytes') > 0 FROM task_runs WHERE task_id='{id}'\")\" = 1"
        ),
    );
    let journal = vm.ok(&format!("journalctl -o cat --no-pager -u {scope}"));
    assert!(journal.contains(&format!("hello from {id}")), "{journal}");

    // Remove: the service and every dispatcher process are gone; the configuration (a
    // conffile) and the board stay.
    guest::apt(&mut vm, "remove hermes-mgr");
    assert_ne!(
        vm.sh("systemctl is-active hermes-dispatcher").out.trim(),
        "active"
    );
    assert_eq!(vm.sh("pgrep -f '^/usr/bin/hermes-mgr dispatcher'").code, 1);
    vm.ok("test -f /etc/hermes-mgr/config.toml && test -f /var/lib/hermes/kanban.db");
    // Purge: the configuration and the runtime state go; the board and the hermes user stay.
    guest::apt(&mut vm, "purge hermes-mgr");
    vm.ok("test ! -e /etc/hermes-mgr && test ! -e /run/hermes-mgr");
    vm.ok("test -f /var/lib/hermes/kanban.db && id hermes");
    assert_eq!(
        vm.ok(&format!(
            "sqlite3 -readonly {BOARD} 'PRAGMA integrity_check'"
        ))
        .trim(),
        "ok"
    );
}

/// The `.rpm`, installed with `rpm` on the same Debian boot: its scriptlets run (the user,
/// the state directory, enable and start; on erase, stop and disable), its unit is read
/// from /usr/lib/systemd/system, and a task runs to done. `--nodeps`: rpm's database on
/// Debian knows none of the system's packages, so the dependencies (systemd, dbus, libc —
/// Debian's here) are not resolved by rpm; that, and a distribution's own systemd macros
/// and SELinux, are what this does not verify.
#[test]
fn rpm_installs_runs_its_scriptlets_starts_runs_a_task_and_erases() {
    let mut vm = Vm::boot("rpm", guest::payload());
    vm.ok("rpm -i --nodeps /payload/hermes-mgr.rpm");
    assert_eq!(
        vm.ok("systemctl is-enabled hermes-dispatcher").trim(),
        "enabled"
    );
    assert_eq!(
        vm.ok("systemctl is-active hermes-dispatcher").trim(),
        "active"
    );
    // Where rpm put it (Debian 12 merges /lib into /usr/lib: systemd names either).
    vm.ok("test -f /usr/lib/systemd/system/hermes-dispatcher.service");
    let fragment = vm.ok("systemctl show -p FragmentPath --value hermes-dispatcher");
    assert!(
        fragment
            .trim()
            .ends_with("lib/systemd/system/hermes-dispatcher.service"),
        "{fragment}"
    );
    vm.ok("id hermes && test -d /run/hermes-mgr/runs");
    guest::configure(
        &mut vm,
        "#!/bin/sh\nexec hermes-mgr complete --summary rpm \"$HERMES_KANBAN_TASK\"\n",
        "",
    );
    let id = guest::add(&mut vm, "a task under the rpm");
    guest::wait_status(&mut vm, &id, "done", Duration::from_secs(120));
    vm.ok("rpm -e hermes-mgr");
    assert_ne!(
        vm.sh("systemctl is-active hermes-dispatcher").out.trim(),
        "active"
    );
    assert_eq!(vm.sh("pgrep -f '^/usr/bin/hermes-mgr dispatcher'").code, 1);
    vm.ok("test ! -e /run/hermes-mgr && test ! -e /usr/bin/hermes-mgr");
    vm.ok("test -f /var/lib/hermes/kanban.db && id hermes");
}
