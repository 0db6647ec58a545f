//! Many live workers on one host: a correctness check of the scale the benchmarks measure
//! (`BENCH=scale`, BENCHMARKS.md). It asserts what an operator would see — every task
//! running in its own scope, none failed — and never a speed.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::rig::{sh, Dispatcher, SERVICE};
use crate::systemd_test;

/// More than journald serves as stdout streams (4,096 on systemd 252) would have needed at
/// two per run.
const N: usize = 2_500;

systemd_test!(
    two_and_a_half_thousand_workers_started_at_once_all_run_each_in_its_own_scope,
    {
        // Each worker writes a line first: a worker whose output had nowhere to go would
        // die of SIGPIPE on it.
        let d = Dispatcher::with_stub(
            "#!/bin/sh\necho \"started $HERMES_KANBAN_TASK\"\nexec sleep 3600\n",
            "tick_seconds = 3600",
        );
        std::fs::write(
            d.rig.dir.join("config.yaml"),
            format!("kanban:\n  max_spawn: {}\n", N + 10),
        )
        .unwrap();
        let b = d.rig.board();
        let ids: Vec<String> = (0..N)
            .map(|i| {
                b.create(&hermes_mgr::board::NewTask {
                    title: format!("sleeper {i}"),
                    assignee: Some("default".into()),
                    ..Default::default()
                })
                .unwrap()
            })
            .collect();
        d.install_logging("info");
        d.start();
        // Wait while the count moves: the burst's length depends on the machine.
        let count = |sql: &str| -> usize {
            b.connection()
                .query_row(sql, [], |r| r.get::<_, i64>(0))
                .unwrap() as usize
        };
        let mut last = (Instant::now(), usize::MAX);
        loop {
            let running = count(
                "SELECT count(*) FROM tasks WHERE status='running' AND worker_pid IS NOT NULL",
            );
            if running == N {
                break;
            }
            // A run that ended is a failure already (a crash, a spawn failure): say which.
            let ended = count("SELECT count(*) FROM task_runs WHERE ended_at IS NOT NULL");
            if ended > 0 {
                let mut st = b
                    .connection()
                    .prepare(
                        "SELECT outcome, count(*), max(error) FROM task_runs \
                         WHERE ended_at IS NOT NULL GROUP BY 1",
                    )
                    .unwrap();
                let why: Vec<String> = st
                    .query_map([], |r| {
                        Ok(format!(
                            "{:?} x{}: {:?}",
                            r.get::<_, Option<String>>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, Option<String>>(2)?
                        ))
                    })
                    .unwrap()
                    .map(Result::unwrap)
                    .collect();
                panic!("{ended} runs ended with {running} of {N} running: {why:?}");
            }
            if running != last.1 {
                last = (Instant::now(), running);
            }
            assert!(
                last.0.elapsed() < Duration::from_secs(120),
                "stuck at {running} of {N} running:\n{}",
                crate::rig::journal(SERVICE)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // None failed, none counted, none blocked: one run per task, still open.
        assert_eq!(count("SELECT count(*) FROM task_runs"), N);
        assert_eq!(
            count("SELECT count(*) FROM task_runs WHERE ended_at IS NULL"),
            N
        );
        assert_eq!(
            count("SELECT count(*) FROM tasks WHERE consecutive_failures > 0"),
            0
        );
        // Each in its own live scope, named for its run.
        let want: BTreeSet<String> = ids
            .iter()
            .map(|id| {
                let run = b.require_task(id).unwrap().current_run_id.unwrap();
                hermes_mgr::names::worker_scope("default", id, run)
            })
            .collect();
        let have: BTreeSet<String> = crate::rig::worker_units(false)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect();
        assert_eq!(have.len(), N);
        assert!(have == want, "scopes differ from the runs");
        // The last one started still has its output in its journal.
        let last_unit = want.iter().next_back().unwrap();
        let text = crate::harness::wait_for(
            "the worker's line in its unit's journal",
            Duration::from_secs(30),
            || {
                let t = sh(&format!("journalctl -o cat --no-pager -u {last_unit}"));
                t.contains("started t_").then_some(t)
            },
        );
        assert!(!text.contains("refusing"), "{text}");
        sh(&format!("systemctl stop {SERVICE} hermes-workers.slice"));
    }
);
