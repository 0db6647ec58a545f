//! Per-run limits where the kernel enforces them.

use std::time::Duration;

use crate::guest::{self, BOARD};
use crate::qemu::Vm;

/// A worker that takes 512 MiB (written, so really resident) and then waits.
const HOG: &str = "#!/bin/sh\necho \"hog $HERMES_KANBAN_TASK\"\nexec python3 -c 'import time; b = b\"x\" * (512 << 20); time.sleep(600)'\n";

#[test]
fn an_oom_killed_worker_is_booked_as_such_counted_and_blocked_at_the_failure_limit() {
    let mut vm = Vm::boot("oom", guest::payload());
    guest::install(&mut vm);
    guest::configure(
        &mut vm,
        HOG,
        "memory_max_bytes = 67108864\nfailure_limit = 2",
    );
    let id = guest::add(&mut vm, "needs more memory than it may have");
    guest::wait_status(&mut vm, &id, "blocked", Duration::from_secs(180));
    let runs = vm.ok(&format!(
        "sqlite3 -readonly {BOARD} \"SELECT outcome || ': ' || error FROM task_runs WHERE task_id='{id}' ORDER BY id\""
    ));
    let runs: Vec<&str> = runs.lines().collect();
    assert_eq!(runs.len(), 2, "{runs:#?}");
    for r in &runs {
        assert!(
            r.starts_with("crashed: ")
                && r.contains("killed by the OOM killer at MemoryMax=64M, peak"),
            "{runs:#?}"
        );
    }
    assert_eq!(guest::task_field(&mut vm, &id, "consecutive_failures"), "2");
    let show = vm.ok(&format!("hermes-mgr --db {BOARD} show {id}"));
    assert!(
        show.contains("killed by the OOM killer at MemoryMax=64M"),
        "{show}"
    );
    let status = guest::status(&mut vm).to_string();
    assert!(
        status.contains("killed by the OOM killer at MemoryMax=64M"),
        "{status}"
    );
    // Hermes' own CLI tells the same story.
    let hermes = guest::hermes(&mut vm, &format!("kanban show {id}"));
    assert!(
        hermes.contains("killed by the OOM killer at MemoryMax=64M"),
        "{hermes}"
    );
    // The journal, with the run's fields.
    let journal = vm.ok(&format!(
        "journalctl -u hermes-dispatcher -o verbose --no-pager HERMES_KANBAN_TASK={id} -g 'OOM killer'"
    ));
    assert!(journal.contains("MESSAGE=run ended: pid "), "{journal}");
    assert!(
        journal.contains(&format!("UNIT=hermes-worker-kanban-{id}-run-2.scope")),
        "{journal}"
    );
    // What each run cost, as the kernel counted it: the peak at the limit.
    let last = &guest::status(&mut vm)["tasks"][0]["last_run"]["resources"];
    let peak = last["memory_peak_bytes"].as_u64().unwrap_or(0);
    assert!((60 << 20..=64 << 20).contains(&peak), "{last}");
    assert!(
        show.contains("cost: cpu ") && show.contains("memory peak 64M"),
        "{show}"
    );
    eprintln!("{}", runs.join("\n"));
}

/// A fork bomb, then a wait: it stops at TasksMax, and max_runtime ends it.
const BOMB: &str = "#!/bin/bash\nb() { b | b & }\nb\nsleep 600\n";

#[test]
fn a_fork_bomb_stops_at_tasks_max_the_dispatcher_goes_on_and_max_runtime_ends_it() {
    let mut vm = Vm::boot("limits", guest::payload());
    guest::install(&mut vm);
    guest::configure(
        &mut vm,
        BOMB,
        "tasks_max = 32\ncpu_quota_percent = 50\nmemory_max_bytes = 268435456\nfailure_limit = 1",
    );
    let out = vm.ok(
        "runuser -u hermes -- env HERMES_HOME=/var/lib/hermes hermes-mgr add --assignee default --max-runtime 40s --json bomb",
    );
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let scope = format!("hermes-worker-kanban-{id}-run-1.scope");
    let cg = format!(
        "/sys/fs/cgroup/hermes.slice/hermes-workers.slice/{}/{scope}",
        hermes_mgr::names::worker_slice("hermes-workers.slice", &scope)
    );
    // The bomb fills its scope up to the limit, and no further.
    vm.wait_ok(
        "the bomb at its limit",
        Duration::from_secs(60),
        &format!("test $(cat {cg}/pids.current) -ge 30"),
    );
    // The limits are the kernel's, not only systemd's.
    assert_eq!(vm.ok(&format!("cat {cg}/pids.max")).trim(), "32");
    assert_eq!(vm.ok(&format!("cat {cg}/cpu.max")).trim(), "50000 100000");
    assert_eq!(vm.ok(&format!("cat {cg}/memory.max")).trim(), "268435456");
    // Meanwhile the dispatcher answers and runs other work to done.
    guest::status(&mut vm);
    vm.write(
        "/var/lib/hermes/worker.sh",
        b"#!/bin/sh\nexec hermes-mgr complete --summary fine \"$HERMES_KANBAN_TASK\"\n",
        "0755",
    );
    let other = guest::add(&mut vm, "an ordinary task beside the bomb");
    guest::wait_status(&mut vm, &other, "done", Duration::from_secs(60));
    let current: u64 = vm
        .ok(&format!("cat {cg}/pids.current"))
        .trim()
        .parse()
        .unwrap();
    assert!(current <= 32, "{current} tasks in a scope with TasksMax=32");
    // max_runtime: systemd's RuntimeMaxSec stops the scope; booked as the timeout it was.
    guest::wait_status(&mut vm, &id, "blocked", Duration::from_secs(120));
    let run = vm.ok(&format!(
        "sqlite3 -readonly {BOARD} \"SELECT outcome || ': ' || error FROM task_runs WHERE task_id='{id}'\""
    ));
    assert!(
        run.starts_with("timed_out: elapsed ") && run.contains("s > limit 40s"),
        "{run}"
    );
    // Its last processes go with the scope (SIGKILL after the stop timeout, if need be).
    vm.wait_ok(
        "the bomb's scope gone",
        Duration::from_secs(120),
        &format!("test ! -d {cg}"),
    );
}

/// A worker whose tool (a child) takes 512 MiB; after it, the worker would go on for ten
/// minutes. (It does not write anything after its tool: the kernel kills the tool and
/// systemd stops the scope only after it sees the kill, so the agent may run a line or two
/// in between — no one can promise less.)
const TOOL_HOG: &str = "#!/bin/sh\npython3 -c 'import time; b = b\"x\" * (512 << 20); time.sleep(600)'\nsleep 600\nexit 3\n";

#[test]
fn a_tool_killed_by_the_oom_killer_ends_its_whole_run_and_the_run_says_so() {
    let mut vm = Vm::boot("tool-oom", guest::payload());
    guest::install(&mut vm);
    guest::configure(
        &mut vm,
        TOOL_HOG,
        "memory_max_bytes = 67108864\nfailure_limit = 1",
    );
    let id = guest::add(&mut vm, "its tool needs more memory than the run may have");
    guest::wait_status(&mut vm, &id, "blocked", Duration::from_secs(180));
    // OOMPolicy=stop (systemd 252 does nothing else with a scope): the kernel killed the
    // tool, systemd stopped the scope, and the agent, which would have gone on for ten
    // minutes, ended with it by that SIGTERM.
    let scope = format!("hermes-worker-kanban-{id}-run-1.scope");
    let journal = vm.ok(&format!("journalctl -o cat --no-pager -u {scope}"));
    assert!(
        journal.contains("Failed with result 'oom-kill'"),
        "{journal}"
    );
    // Booked as the OOM kill it was, counted (blocked at failure_limit = 1), not "stopped".
    let run = vm.ok(&format!(
        "sqlite3 -readonly {BOARD} \"SELECT outcome || ': ' || error FROM task_runs WHERE task_id='{id}'\""
    ));
    assert_eq!(
        run.trim(),
        format!("crashed: pid {} killed by signal 15 (SIGTERM): the OOM killer killed 1 process of the run at MemoryMax=64M, peak 64M",
                run.split_whitespace().nth(2).unwrap()),
    );
    // What an operator's alert reads: the kernel's kill and the breaker's trip, counted
    // (the metrics are gathered every 15 s).
    let want = [
        "hermes_mgr_oom_kills_total{board=\"default\"} 1",
        "hermes_mgr_breaker_trips_total{board=\"default\"} 1",
        "hermes_mgr_runs_ended_total{board=\"default\",outcome=\"crashed\"} 1",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        let m = vm.ok("hermes-mgr metrics");
        if want.iter().all(|w| m.contains(w)) {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{want:?} not in:\n{m}"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    eprintln!("{run}{journal}{metrics}");
}
