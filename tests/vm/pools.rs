//! Capacity pools and admission where the kernel enforces and measures: a pool's limits in
//! its slice's cgroup files, its cap across two boards, a burst of memory-hungry tasks with
//! and without a memory reservation, and a task waiting for the pool's pressure to fall.

use std::time::{Duration, Instant};

use crate::guest::{self, BOARD};
use crate::qemu::Vm;

/// The pool's slice's cgroup in the guest.
const SLICE: &str = "/sys/fs/cgroup/hermes.slice/hermes-workers.slice/hermes-workers-build.slice";

/// A worker that takes ~90 MiB (80 MiB written, so really resident, and the interpreter) for
/// 8 s, then completes its task: three of them do not fit in a 256 MiB pool.
const BURST: &str = "#!/bin/sh\npython3 -c 'import time; b = b\"x\" * (80 << 20); time.sleep(8)' || exit 1\nexec hermes-mgr complete --summary fine \"$HERMES_KANBAN_TASK\"\n";

const POOL_256M: &str = "[pools.build]\nprofiles = [\"default\"]\nmemory_max_bytes = 268435456\n";

/// How a burst of `n` tasks, made ready at once, ended: (done, blocked, runs, OOM-killed
/// runs, seconds from ready to every task settled).
fn burst(vm: &mut Vm, n: usize, label: &str) -> (usize, usize, usize, usize, f64) {
    // Held while they are made, so the pool sees them ready together.
    vm.ok("HERMES_HOME=/var/lib/hermes hermes-mgr pause --all");
    let ids: Vec<String> = (0..n)
        .map(|i| guest::add(vm, &format!("{label} {i}")))
        .collect();
    let list = ids
        .iter()
        .map(|i| format!("'{i}'"))
        .collect::<Vec<_>>()
        .join(",");
    let t0 = Instant::now();
    vm.ok("HERMES_HOME=/var/lib/hermes hermes-mgr resume --all");
    vm.wait_ok(
        &format!("the {label} burst settled"),
        Duration::from_secs(900),
        &format!("test \"$(sqlite3 -readonly {BOARD} \"SELECT count(*) FROM tasks WHERE id IN ({list}) AND status IN ('done','blocked')\")\" = {n}"),
    );
    let secs = t0.elapsed().as_secs_f64();
    let count = |vm: &mut Vm, q: &str| -> usize {
        vm.ok(&format!("sqlite3 -readonly {BOARD} \"{q}\""))
            .trim()
            .parse()
            .unwrap()
    };
    let done = count(
        vm,
        &format!("SELECT count(*) FROM tasks WHERE id IN ({list}) AND status = 'done'"),
    );
    let runs = count(
        vm,
        &format!("SELECT count(*) FROM task_runs WHERE task_id IN ({list})"),
    );
    let killed = count(
        vm,
        &format!("SELECT count(*) FROM task_runs WHERE task_id IN ({list}) AND error LIKE '%OOM killer%'"),
    );
    (done, n - done, runs, killed, secs)
}

#[test]
fn a_burst_in_a_pool_fits_with_a_memory_reservation_and_is_oom_killed_without_one() {
    let mut vm = Vm::boot("burst", guest::payload());
    guest::install(&mut vm);
    // Without: the kernel's limit alone.
    guest::configure(&mut vm, BURST, POOL_256M);
    let without = burst(&mut vm, 6, "without");
    assert_eq!(
        vm.ok(&format!("cat {SLICE}/memory.max")).trim(),
        "268435456"
    );
    // With: each worker counts at least 120 MiB, so two run at once and the rest wait.
    guest::configure(
        &mut vm,
        BURST,
        &format!("{POOL_256M}memory_per_worker_bytes = 125829120\n"),
    );
    let with = burst(&mut vm, 6, "with");
    let journal = vm.ok("journalctl -u hermes-dispatcher -o cat --no-pager -g 'its tasks wait'");
    eprintln!(
        "6 tasks of ~90 MiB each, made ready at once, in a 256 MiB pool (2 vCPUs, TCG):\n\
         without a reservation: {} done, {} blocked, {} runs, {} OOM-killed, {:.1} s\n\
         with 120 MiB reserved: {} done, {} blocked, {} runs, {} OOM-killed, {:.1} s\n{journal}",
        without.0,
        without.1,
        without.2,
        without.3,
        without.4,
        with.0,
        with.1,
        with.2,
        with.3,
        with.4
    );
    assert!(
        without.3 > 0,
        "the burst without a reservation was not OOM-killed: it proves nothing ({without:?})"
    );
    assert_eq!((with.0, with.1, with.3), (6, 0, 0), "{with:?}");
    assert_eq!(with.2, 6, "one run per task: {with:?}");
    assert!(
        journal.contains("one more would pass memory_max_bytes = 256 MiB: its tasks wait"),
        "{journal}"
    );
}

/// A worker that keeps four CPU-bound loops busy on the guest's two CPUs until it is stopped.
const HOG: &str = "#!/bin/sh\nfor i in 1 2 3 4; do (while :; do :; done) & done\nwait\n";

#[test]
fn a_pools_limits_are_the_kernels_its_cap_spans_boards_and_a_task_starts_as_pressure_falls() {
    let mut vm = Vm::boot("pools", guest::payload());
    guest::install(&mut vm);
    guest::hermes(&mut vm, "kanban boards create ops");
    guest::configure(
        &mut vm,
        &guest::waiting_worker("hermes-mgr complete"),
        "[pools.build]\nprofiles = [\"default\"]\nmax_workers = 1\nmemory_max_bytes = 268435456\n\
         cpu_quota_percent = 150\ntasks_max = 64\n",
    );
    let a = guest::add(&mut vm, "on the default board");
    guest::wait_ready(&mut vm, &a);
    // The limits are in the kernel's files of the pool's slice.
    assert_eq!(
        vm.ok(&format!("cat {SLICE}/memory.max")).trim(),
        "268435456"
    );
    assert_eq!(
        vm.ok(&format!("cat {SLICE}/cpu.max")).trim(),
        "150000 100000"
    );
    assert_eq!(vm.ok(&format!("cat {SLICE}/pids.max")).trim(), "64");
    let scopes = vm.ok(&format!("ls {SLICE}"));
    assert!(
        scopes.contains(&format!("hermes-worker-kanban-{a}-run-1.scope")),
        "{scopes}"
    );
    // A task on the other board waits for the pool, unclaimed.
    let out = guest::hermes(
        &mut vm,
        "kanban --board ops create 'on the ops board' --assignee default --json",
    );
    let b = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let ops = "/var/lib/hermes/kanban/boards/ops/kanban.db";
    vm.wait_ok(
        "the service status to say the pool holds it",
        Duration::from_secs(60),
        "systemctl show -p StatusText --value hermes-dispatcher | grep -q 'pool build: 1 workers running, max_workers = 1'",
    );
    assert_eq!(
        vm.ok(&format!("sqlite3 -readonly {ops} \"SELECT status || ' ' || ifnull(current_run_id, '-') FROM tasks WHERE id='{b}'\"")).trim(),
        "ready -"
    );
    guest::go(&mut vm, &a);
    vm.wait_ok(
        "the ops task running once the pool has room",
        Duration::from_secs(120),
        &format!("test -e /var/lib/hermes/sync/{b}.ready"),
    );
    guest::go(&mut vm, &b);

    // Pressure: a hog makes the pool's CPU pressure high; a task waits for it to fall.
    guest::configure(
        &mut vm,
        HOG,
        "[pools.build]\nprofiles = [\"default\"]\nadmit_cpu_pressure_percent = 30\n",
    );
    let hog = guest::add(&mut vm, "keeps the pool CPUs busy");
    vm.wait_ok(
        "the pool's CPU pressure above 50 %",
        Duration::from_secs(120),
        &format!("awk '/^some/ {{ split($2, a, \"=\"); exit !(a[2] > 50) }}' {SLICE}/cpu.pressure"),
    );
    guest::configure(
        &mut vm,
        &guest::waiting_worker("hermes-mgr complete"),
        "[pools.build]\nprofiles = [\"default\"]\nadmit_cpu_pressure_percent = 30\n",
    );
    let c = guest::add(&mut vm, "waits for the pool pressure to fall");
    vm.wait_ok(
        "the status to say the pool's pressure holds it",
        Duration::from_secs(60),
        "systemctl show -p StatusText --value hermes-dispatcher | grep -q 'pool build: cpu pressure'",
    );
    assert_eq!(guest::task_field(&mut vm, &c, "status"), "ready");
    vm.ok(&format!("hermes-mgr --db {BOARD} stop {hog}"));
    // In the guest, every 20 ms: when the pool's avg10 first reads at most 30 %, and when
    // the task is claimed.
    let script = format!(
        "fell=; while :; do now=$(date +%s%N); \
         if [ -z \"$fell\" ] && awk '/^some/ {{ split($2, a, \"=\"); exit !(a[2] <= 30) }}' {SLICE}/cpu.pressure; then fell=$now; fi; \
         if [ \"$(sqlite3 -readonly {BOARD} \"SELECT status FROM tasks WHERE id='{c}'\")\" = running ]; then \
           echo \"${{fell:-$now}} $now\"; exit 0; fi; sleep 0.02; done"
    );
    let out = vm.ok(&format!(
        "timeout 300 sh -c '{}'",
        script.replace('\'', "'\\''")
    ));
    let t: Vec<u128> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
    let ms = (t[1] - t[0]) / 1_000_000;
    eprintln!("the pool's CPU pressure fell below 30 %; the task was claimed {ms} ms later");
    assert!(ms < 1000, "claimed {ms} ms after the pressure fell");
    guest::wait_ready(&mut vm, &c);
    guest::go(&mut vm, &c);
    guest::wait_status(&mut vm, &c, "done", Duration::from_secs(120));
}
