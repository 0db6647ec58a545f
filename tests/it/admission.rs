//! Admission by pressure against a real systemd and the kernel's real figures: a threshold the
//! host cannot meet holds a ready task — never claimed, never counted — and the service
//! status, `doctor`, the journal and the metrics say why; lifted (a reload), the task starts.
//! (Real pressure, made on demand, is the VM tier's: this sandbox has no controllers.)

use std::time::Duration;

use crate::harness::wait_for;
use crate::rig::{journal, sh, systemctl_show, Dispatcher, SERVICE};
use crate::systemd_test;

/// `MemAvailable` never reaches a pebibyte: held, whatever else this machine runs.
const HELD: &str = "admit_memory_available_bytes = 1125899906842624";

systemd_test!(
    a_host_that_cannot_take_a_worker_holds_ready_tasks_until_it_can,
    {
        let d = Dispatcher::new(&format!("{HELD}\nmetrics_interval_seconds = 1"));
        d.install();
        // There before the daemon: its first pass sees it.
        let id = d.rig.add("waits for room");
        d.start();
        let status = wait_for("the status to say why", Duration::from_secs(20), || {
            let s = systemctl_show(SERVICE, "StatusText");
            s.contains("HOLDING new workers: memory available")
                .then_some(s)
        });
        assert!(
            status.contains("< 1073741824 MiB (admit_memory_available_bytes)"),
            "{status}"
        );
        // Never claimed, never counted.
        let t = d.task(&id);
        assert_eq!(t.status.as_str(), "ready");
        assert_eq!(t.current_run_id, None);
        let runs: i64 = d
            .rig
            .board()
            .connection()
            .query_row("SELECT count(*) FROM task_runs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(runs, 0);
        let doctor = d.rig.mgr(&["doctor"]).stdout;
        assert!(
            doctor.contains("warn admission") && doctor.contains("holding new workers"),
            "{doctor}"
        );
        wait_for("the metrics to say it", Duration::from_secs(20), || {
            d.rig
                .mgr(&["metrics"])
                .stdout
                .contains("hermes_mgr_admission_held 1")
                .then_some(())
        });
        assert!(journal(SERVICE).contains("holding new workers: memory available"));

        // Lifted: the task starts, and everything says so.
        let cfg = std::fs::read_to_string(&d.rig.config).unwrap();
        std::fs::write(&d.rig.config, cfg.replace(HELD, "")).unwrap();
        sh(&format!("systemctl reload {SERVICE}"));
        d.wait_running(&id, 0);
        wait_for("the status to drop it", Duration::from_secs(20), || {
            (!systemctl_show(SERVICE, "StatusText").contains("HOLDING")).then_some(())
        });
        assert!(journal(SERVICE).contains("pressure below the thresholds: starting workers again"));
        let doctor = d.rig.mgr(&["doctor"]).stdout;
        assert!(doctor.contains("ok   admission"), "{doctor}");
    }
);
