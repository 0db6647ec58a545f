//! Fault injection: 200 tasks with fast, slow, crashing and SIGTERM-ignoring workers, while
//! the daemon is SIGKILLed again and again, dbus-daemon is restarted, systemd re-executes
//! itself and the board is held locked for 30 s. Afterwards every task is in the state its
//! worker earned, no task ever had two live scopes, and the board is intact.

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hermes_mgr::board::NewTask;

use crate::harness::{mgr_bin, wait_for};
use crate::rig::{journal, sh, Dispatcher, SERVICE};
use crate::systemd_test;

const KINDS: [&str; 4] = ["fast", "slow", "crash", "stubborn"];

fn worker_stub() -> String {
    format!(
        r#"#!/bin/sh
m={mgr}
kind=$($m --db "$HERMES_KANBAN_DB" show "$HERMES_KANBAN_TASK" | sed -n 's/^  kind: //p')
case "$kind" in
  fast) exec $m --db "$HERMES_KANBAN_DB" complete "$HERMES_KANBAN_TASK" --summary fast ;;
  slow) sleep 2; exec $m --db "$HERMES_KANBAN_DB" complete "$HERMES_KANBAN_TASK" --summary slow ;;
  crash) echo "crashing on purpose" >&2; exit 1 ;;
  stubborn) trap '' TERM; sleep 1; exec $m --db "$HERMES_KANBAN_DB" complete "$HERMES_KANBAN_TASK" --summary stubborn ;;
esac
exit 9
"#,
        mgr = mgr_bin().display()
    )
}

fn restart_daemon(d: &Dispatcher) {
    sh(&format!(
        "systemctl reset-failed {SERVICE} 2>/dev/null || true"
    ));
    d.start();
}

/// Every process left in a live worker scope, and where in the kernel it waits.
fn scope_processes() -> String {
    let mut out = String::new();
    let units = crate::rig::worker_units(false);
    for unit in units.lines().filter_map(|l| l.split_whitespace().next()) {
        let cg = crate::rig::systemctl_show(unit, "ControlGroup");
        let cg = cg.trim().trim_start_matches("ControlGroup=");
        let procs =
            std::fs::read_to_string(format!("/sys/fs/cgroup{cg}/cgroup.procs")).unwrap_or_default();
        let events = std::fs::read_to_string(format!("/sys/fs/cgroup{cg}/cgroup.events"));
        out += &format!("{unit}: cgroup {cg} events {events:?} procs {procs:?}\n");
        out += &Command::new("journalctl")
            .args(["--no-pager", "-o", "short-monotonic", "-u", unit])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for pid in procs.lines() {
            let read =
                |f: &str| std::fs::read_to_string(format!("/proc/{pid}/{f}")).unwrap_or_default();
            let state = read("status")
                .lines()
                .find(|l| l.starts_with("State:"))
                .unwrap_or("")
                .to_string();
            let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| {
                            let t = std::fs::read_link(e.path()).unwrap_or_default();
                            format!("{}->{}", e.file_name().to_string_lossy(), t.display())
                        })
                        .collect()
                })
                .unwrap_or_default();
            for pipe in fds
                .iter()
                .filter_map(|f| f.split_once("->pipe:"))
                .map(|(_, p)| p)
            {
                out += &format!("  pipe:{pipe} held by {:?}\n", pipe_holders(pipe));
            }
            out += &format!(
                "  {pid} {:?} {state} wchan={} fds={fds:?}\n  stack: {}\n",
                read("cmdline").replace('\0', " "),
                read("wchan"),
                read("stack").replace('\n', " | ")
            );
        }
    }
    out
}

fn pipe_holders(pipe: &str) -> Vec<String> {
    let want = format!("pipe:{pipe}");
    let mut who = Vec::new();
    for p in procfs::process::all_processes()
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(fds) = std::fs::read_dir(format!("/proc/{}/fd", p.pid)) {
            for e in fds.flatten() {
                if std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy() == want) {
                    let comm = std::fs::read_to_string(format!("/proc/{}/comm", p.pid))
                        .unwrap_or_default();
                    who.push(format!(
                        "{}({})fd{}",
                        p.pid,
                        comm.trim(),
                        e.file_name().to_string_lossy()
                    ));
                }
            }
        }
    }
    who
}

/// What a stuck run looks like, decisive facts first: CI shows only the head of a failure.
fn diagnosis(d: &Dispatcher) -> String {
    let b = d.rig.board();
    let mut out = format!("board: {:?}\n", b.counts().unwrap_or_default());
    for t in b.list(None, None).unwrap_or_default() {
        if matches!(t.status.as_str(), "done" | "blocked") {
            continue;
        }
        let runs: Vec<String> = b
            .runs(&t.id)
            .unwrap_or_default()
            .iter()
            .map(|r| format!("{}:{}", r.id, r.outcome.clone().unwrap_or("-".into())))
            .collect();
        out += &format!(
            "  {} {} claim={:?} pid={:?} runs={runs:?}\n",
            t.id,
            t.status.as_str(),
            t.claim_lock,
            t.worker_pid
        );
    }
    out += &crate::rig::systemctl_show(SERVICE, "ActiveState,SubState,Result,NRestarts,MainPID");
    out += &crate::rig::worker_units(true);
    out += &scope_processes();
    let tail = journal(SERVICE);
    let lines: Vec<&str> = tail.lines().collect();
    out += "journal tail:\n";
    out += &lines[lines.len().saturating_sub(60)..].join("\n");
    out
}

systemd_test!(
    two_hundred_tasks_survive_kills_bus_and_systemd_restarts_and_a_locked_board,
    {
        let d = Dispatcher::new("tick_seconds = 5\nmax_spawn = 6\nbusy_timeout_ms = 500");
        std::fs::write(d.rig.dir.join("worker"), worker_stub()).unwrap();
        d.install();
        d.start();
        let b = d.rig.board();
        let mut kind_of = HashMap::new();
        for i in 0..200 {
            let kind = KINDS[i % 4];
            let id = b
                .create(&NewTask {
                    title: format!("fault {i}"),
                    body: Some(format!("kind: {kind}")),
                    assignee: Some("default".into()),
                    ..Default::default()
                })
                .unwrap();
            kind_of.insert(id, kind);
        }
        drop(b);

        // Watch the worker scopes throughout: never two live ones for one task.
        let stop = Arc::new(AtomicBool::new(false));
        let doubles = Arc::new(Mutex::new(Vec::<String>::new()));
        let watcher = {
            let (stop, doubles) = (stop.clone(), doubles.clone());
            std::thread::spawn(move || {
                let mut samples = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let units = crate::rig::worker_units(false);
                    let mut seen = HashSet::new();
                    for unit in units.lines().filter_map(|l| l.split_whitespace().next()) {
                        let task = unit
                            .trim_start_matches("hermes-worker-kanban-")
                            .rsplit_once("-run-")
                            .map(|(t, _)| t.to_string());
                        if let Some(t) = task {
                            if !seen.insert(t.clone()) {
                                doubles.lock().unwrap().push(unit.to_string());
                            }
                        }
                    }
                    samples += 1;
                    std::thread::sleep(Duration::from_millis(25));
                }
                samples
            })
        };

        let all_settled = |d: &Dispatcher| -> bool {
            let b = d.rig.board();
            let counts = b.counts().unwrap();
            counts.get("done").copied().unwrap_or(0) + counts.get("blocked").copied().unwrap_or(0)
                == 200
        };
        let started = Instant::now();
        let mut kills = 0;
        let mut step = 0u64;
        while !all_settled(&d) {
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "not settled after 5 min (step {step}, {kills} kills):\n{}",
                diagnosis(&d)
            );
            step += 1;
            match step {
                3 => {
                    sh("systemctl restart dbus.service");
                }
                6 => {
                    sh("systemctl daemon-reexec");
                }
                9 => {
                    let holder = rusqlite::Connection::open(&d.rig.db).unwrap();
                    holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
                    std::thread::sleep(Duration::from_secs(30));
                    holder.execute_batch("ROLLBACK").unwrap();
                }
                _ => {}
            }
            if kills < 25 {
                // A pseudo-random moment: 100..900 ms into the daemon's life.
                std::thread::sleep(Duration::from_millis(100 + (step * 7919 % 800)));
                sh(&format!("systemctl kill --signal=KILL {SERVICE} || true"));
                kills += 1;
                wait_for("the daemon dead", Duration::from_secs(10), || {
                    let s = crate::rig::systemctl_show(SERVICE, "ActiveState");
                    (!s.contains("=active") && !s.contains("=activating")).then_some(())
                });
                restart_daemon(&d);
            } else {
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        stop.store(true, Ordering::Relaxed);
        let samples = watcher.join().unwrap();
        let husks = Command::new("journalctl")
            .args(["-u", SERVICE, "-o", "cat", "--no-pager"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .matches("but its cgroup")
                    .count()
            })
            .unwrap_or(0);
        println!(
            "settled after {:?}, {kills} SIGKILLs, {samples} scope samples, {husks} empty scopes stopped",
            started.elapsed()
        );
        let doubles = doubles.lock().unwrap().clone();
        assert!(
            doubles.is_empty(),
            "two live scopes for one task: {doubles:?}"
        );

        let b = d.rig.board();
        assert_eq!(b.integrity_check().unwrap(), "ok");
        for (id, kind) in &kind_of {
            let t = b.require_task(id).unwrap();
            let runs = b.runs(id).unwrap();
            let outcomes: Vec<String> = runs
                .iter()
                .map(|r| r.outcome.clone().unwrap_or_default())
                .collect();
            match *kind {
                "crash" => {
                    assert_eq!(t.status.as_str(), "blocked", "{id} ({kind}): {outcomes:?}");
                    assert!(
                        outcomes.iter().filter(|o| *o == "crashed").count() >= 2,
                        "{id}: {outcomes:?}"
                    );
                }
                _ => {
                    assert_eq!(t.status.as_str(), "done", "{id} ({kind}): {outcomes:?}");
                    assert_eq!(
                        outcomes.last().map(String::as_str),
                        Some("completed"),
                        "{id} ({kind}): {outcomes:?}"
                    );
                    assert_eq!(runs.last().unwrap().summary.as_deref(), Some(*kind));
                    // These workers never fail: a crash booked for one would be a misbooking.
                    assert!(
                        !outcomes.iter().any(|o| o == "crashed" || o == "gave_up"),
                        "{id} ({kind}) misbooked: {outcomes:?}"
                    );
                }
            }
            // Every run that was not the worker's own verdict is an infrastructure ending or a crash.
            for o in &outcomes {
                assert!(
                    [
                        "completed",
                        "crashed",
                        "lost",
                        "stopped",
                        "spawn_failed",
                        "gave_up"
                    ]
                    .contains(&o.as_str()),
                    "{id}: {o}"
                );
            }
        }
        // No worker process is left anywhere.
        let left: Vec<i32> = procfs::process::all_processes()
            .unwrap()
            .filter_map(|p| p.ok())
            .filter(|p| {
                p.environ()
                    .is_ok_and(|e| e.keys().any(|k| k == "HERMES_KANBAN_TASK"))
            })
            .map(|p| p.pid)
            .collect();
        assert!(left.is_empty(), "worker processes left: {left:?}");
        assert!(kills >= 20, "only {kills} kills before everything settled");
    }
);
