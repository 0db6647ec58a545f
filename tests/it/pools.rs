//! Capacity pools against a real systemd: a pool's slice carries its limits (set again, without
//! a restart, when the configuration changes them), its workers run in it, and its cap on
//! running workers holds across two boards — the waiting task unclaimed, and `status`,
//! `doctor`, the service status and the metrics saying why. (The kernel's enforcement of the
//! limits, and memory admission under a real burst, are the VM tier's: this sandbox has no
//! controllers.)

use std::time::Duration;

use crate::boards::{board, complete, create_on, hermes, mgr, wait_running};
use crate::harness::wait_for;
use crate::rig::{journal, sh, systemctl_show, Dispatcher, SERVICE};
use crate::systemd_test;

const POOL: &str = "tick_seconds = 3600\nmetrics_interval_seconds = 1\n\
    [pools.build]\nprofiles = [\"default\"]\nmax_workers = 1\nmemory_max_bytes = 268435456\n\
    cpu_quota_percent = 150\ncpu_weight = 50\ntasks_max = 64\n";

const SLICE: &str = "hermes-workers-build.slice";

fn slice_limits() -> String {
    systemctl_show(SLICE, "MemoryMax,CPUQuotaPerSecUSec,CPUWeight,TasksMax")
}

systemd_test!(
    a_pool_runs_its_workers_in_its_slice_and_caps_them_across_boards,
    {
        let d = Dispatcher::new(POOL);
        hermes(&d, &["boards", "create", "ops"]);
        d.install_all_boards();
        // Both there before the daemon: its first passes see both boards' tasks.
        let a = d.rig.add("on the default board");
        let b = create_on(&d, "ops", "on the ops board");
        d.start();

        // One of them runs, in the pool's slice; the other waits, unclaimed.
        let status = wait_for(
            "the pool to keep one waiting",
            Duration::from_secs(20),
            || {
                let s = systemctl_show(SERVICE, "StatusText");
                s.contains("WAITING for pools: pool build: 1 workers running, max_workers = 1")
                    .then_some(s)
            },
        );
        let (run_a, run_b) = (
            board(&d, "default").require_task(&a).unwrap(),
            board(&d, "ops").require_task(&b).unwrap(),
        );
        let ((first_board, first, _), (second_board, second, waiting)) =
            if run_a.status.as_str() == "running" {
                (("default", a.clone(), run_a), ("ops", b.clone(), run_b))
            } else {
                (("ops", b.clone(), run_b), ("default", a.clone(), run_a))
            };
        assert_eq!(waiting.status.as_str(), "ready", "{status}");
        assert_eq!(waiting.current_run_id, None);
        assert!(board(&d, second_board).runs(&second).unwrap().is_empty());
        let run = wait_running(&d, first_board, &first);
        let unit = hermes_mgr::names::worker_scope(first_board, &first, run);
        assert_eq!(
            systemctl_show(&unit, "Slice").trim(),
            format!("Slice={SLICE}")
        );
        // Its limits, as systemd holds them for the slice.
        let limits = slice_limits();
        for want in [
            "MemoryMax=268435456",
            "CPUQuotaPerSecUSec=1.500000s",
            "CPUWeight=50",
            "TasksMax=64",
        ] {
            assert!(limits.contains(want), "{want} not in {limits}");
        }
        // What an operator reads.
        let st = mgr(&d, &["status"]).ok().stdout;
        assert!(
            st.contains("pool build (default): 1/1 workers")
                && st.contains("waiting: pool build: 1 workers running, max_workers = 1"),
            "{st}"
        );
        let doctor = mgr(&d, &["doctor"]).stdout;
        assert!(
            doctor.contains("warn pool") && doctor.contains(&format!("pool build ({SLICE})")),
            "{doctor}"
        );
        wait_for(
            "the metrics to count the pool",
            Duration::from_secs(20),
            || {
                let m = d.rig.mgr(&["metrics"]).stdout;
                (m.contains("hermes_mgr_pool_workers{pool=\"build\"} 1")
                    && m.contains("hermes_mgr_pool_waiting{pool=\"build\"} 1")
                    && m.contains("hermes_mgr_pool_max_workers{pool=\"build\"} 1"))
                .then_some(())
            },
        );
        assert!(journal(SERVICE).contains("max_workers = 1: its tasks wait"));

        // Its worker ends: the waiting task, on the other board, starts.
        complete(&d, first_board, &first, run);
        wait_running(&d, second_board, &second);
        wait_for(
            "the status to drop the wait",
            Duration::from_secs(20),
            || (!systemctl_show(SERVICE, "StatusText").contains("WAITING for pools")).then_some(()),
        );

        // A changed pool applies without a restart.
        let pid = systemctl_show(SERVICE, "MainPID");
        let cfg = std::fs::read_to_string(&d.rig.config).unwrap();
        let cfg = cfg
            .replace(
                "memory_max_bytes = 268435456",
                "memory_max_bytes = 536870912",
            )
            .replace("tasks_max = 64\n", "");
        std::fs::write(&d.rig.config, cfg).unwrap();
        sh(&format!("systemctl reload {SERVICE}"));
        let limits = wait_for(
            "the new limits on the slice",
            Duration::from_secs(20),
            || {
                let l = slice_limits();
                l.contains("MemoryMax=536870912").then_some(l)
            },
        );
        assert!(limits.contains("TasksMax=infinity"), "{limits}");
        assert_eq!(systemctl_show(SERVICE, "MainPID"), pid);
    }
);
