//! Workers running when the machine reboots, or when its power is cut.

use std::time::Duration;

use crate::guest::{self, BOARD};
use crate::qemu::Vm;

fn runs(vm: &mut Vm, id: &str) -> Vec<String> {
    vm.ok(&format!(
        "sqlite3 -readonly {BOARD} \"SELECT ifnull(outcome, '(running)') FROM task_runs WHERE task_id='{id}' ORDER BY id\""
    ))
    .lines()
    .map(str::to_string)
    .collect()
}

#[test]
fn after_a_reboot_every_run_is_booked_once_as_lost_uncounted_and_runs_again() {
    let mut vm = Vm::boot("reboot", guest::payload());
    guest::install(&mut vm);
    guest::configure(
        &mut vm,
        &guest::waiting_worker("hermes-mgr complete --summary rebooted"),
        "",
    );
    let ids: Vec<String> = (0..3)
        .map(|i| guest::add(&mut vm, &format!("running through a reboot {i}")))
        .collect();
    for id in &ids {
        guest::wait_ready(&mut vm, id);
    }
    vm.ok("rm -f /var/lib/hermes/sync/*.ready");
    vm.reboot();
    // The dispatcher comes up with the machine, finds every run's scope gone and no exit
    // record (/run is new), books each once as lost and starts it again.
    for id in &ids {
        guest::wait_ready(&mut vm, id);
        assert_eq!(runs(&mut vm, id), ["lost", "(running)"], "{id}");
        assert_eq!(guest::task_field(&mut vm, id, "consecutive_failures"), "0");
    }
    for id in &ids {
        guest::go(&mut vm, id);
        guest::wait_status(&mut vm, id, "done", Duration::from_secs(60));
        assert_eq!(runs(&mut vm, id), ["lost", "completed"], "{id}");
    }
    let error = vm.ok(&format!(
        "sqlite3 -readonly {BOARD} \"SELECT error FROM task_runs WHERE task_id='{}' AND outcome='lost'\"",
        ids[0]
    ));
    assert!(error.contains("reboot"), "{error}");
}

#[test]
fn a_power_cut_while_workers_complete_loses_no_verdict_and_books_nothing_twice() {
    let mut vm = Vm::boot("power-cut", guest::payload());
    guest::install(&mut vm);
    // Workers that complete at once: the board is written to all the time.
    guest::configure(
        &mut vm,
        "#!/bin/sh\nexec hermes-mgr complete --summary quick \"$HERMES_KANBAN_TASK\"\n",
        "",
    );
    let n = 24;
    let ids: Vec<String> = (0..n)
        .map(|i| guest::add(&mut vm, &format!("completes at once {i}")))
        .collect();
    // Cut the power once some verdicts are in and others are still being written.
    let done_before: Vec<String> = vm
        .wait_ok(
            "some verdicts",
            Duration::from_secs(120),
            &format!("d=$(sqlite3 -readonly {BOARD} \"SELECT id FROM tasks WHERE status='done'\"); [ $(echo \"$d\" | grep -c .) -ge 4 ] && echo \"$d\""),
        )
        .lines()
        .map(str::to_string)
        .collect();
    vm.power_cut();
    vm.power_on();
    assert_eq!(
        vm.ok(&format!("sqlite3 {BOARD} 'PRAGMA integrity_check'"))
            .trim(),
        "ok"
    );
    for id in &done_before {
        assert_eq!(
            guest::task_field(&mut vm, id, "status"),
            "done",
            "{id} lost its verdict"
        );
    }
    for id in &ids {
        guest::wait_status(&mut vm, id, "done", Duration::from_secs(180));
    }
    // Nothing booked twice: one completed run and one `completed` event per task; any other
    // run is the one the cut interrupted, booked once as lost.
    for id in &ids {
        let r = runs(&mut vm, id);
        assert_eq!(
            r.iter().filter(|o| *o == "completed").count(),
            1,
            "{id}: {r:?}"
        );
        assert!(
            r.iter().all(|o| o == "completed" || o == "lost"),
            "{id}: {r:?}"
        );
        let events = vm.ok(&format!(
            "sqlite3 -readonly {BOARD} \"SELECT count(*) FROM task_events WHERE task_id='{id}' AND kind='completed'\""
        ));
        assert_eq!(events.trim(), "1", "{id}");
    }
}
