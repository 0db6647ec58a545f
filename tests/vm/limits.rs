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
    eprintln!("{}", runs.join("\n"));
}

/// A worker whose tool (a child) takes 512 MiB; the worker would report and exit 3 after it.
const TOOL_HOG: &str = "#!/bin/sh\npython3 -c 'import time; b = b\"x\" * (512 << 20); time.sleep(600)'\necho \"tool ended: $?\" > /var/lib/hermes/tool-$HERMES_KANBAN_TASK\nexit 3\n";

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
    // tool, systemd stopped the scope, the agent got its SIGTERM and never went on.
    let scope = format!("hermes-worker-kanban-{id}-run-1.scope");
    let journal = vm.ok(&format!("journalctl -o cat --no-pager -u {scope}"));
    assert!(
        journal.contains("Failed with result 'oom-kill'"),
        "{journal}"
    );
    assert_eq!(vm.sh(&format!("test -e /var/lib/hermes/tool-{id}")).code, 1);
    // Booked as the OOM kill it was, counted (blocked at failure_limit = 1), not "stopped".
    let run = vm.ok(&format!(
        "sqlite3 -readonly {BOARD} \"SELECT outcome || ': ' || error FROM task_runs WHERE task_id='{id}'\""
    ));
    assert_eq!(
        run.trim(),
        format!("crashed: pid {} killed by signal 15 (SIGTERM): the OOM killer killed 1 process of the run at MemoryMax=64M, peak 64M",
                run.split_whitespace().nth(2).unwrap()),
    );
    eprintln!("{run}{journal}");
}
