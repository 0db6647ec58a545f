//! Benchmarks against a real systemd (in the project's sandbox): `cargo test --release --test bench`
//! (or `bench/run.sh`). Not part of `cargo test`: speed is measured here, not asserted in tests.
//!
//! 1. worker death → its run booked and the task `ready` again: a driven stub worker is told
//!    to exit 1 (T0 = the write to its FIFO); T1 = the first moment a read-only connection sees
//!    the run closed (`ended_at` set in the same transaction that makes the task `ready`),
//!    polled every 200 µs. Repeated on one task with `max_retries` high enough that the
//!    breaker never trips; the daemon respawns it after each crash.

#[path = "../it/harness.rs"]
#[allow(dead_code)]
mod harness;
#[path = "../it/rig.rs"]
#[allow(dead_code)]
mod rig;

use std::time::{Duration, Instant};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn requeue_latency(n: usize) {
    let d = rig::Dispatcher::new("tick_seconds = 3600");
    d.install();
    d.start();
    let id = d.rig.add("crash forever");
    d.rig
        .board()
        .connection()
        .execute("UPDATE tasks SET max_retries=100000 WHERE id=?1", [&id])
        .unwrap();
    let ro = rusqlite::Connection::open_with_flags(
        &d.rig.db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let ended = |run: i64| -> bool {
        ro.query_row(
            "SELECT ended_at IS NOT NULL FROM task_runs WHERE id=?1",
            [run],
            |r| r.get(0),
        )
        .unwrap_or(false)
    };
    let mut samples = Vec::with_capacity(n);
    let mut run = d.wait_running(&id, 0);
    for _ in 0..n {
        let ws = d.rig.dir.join("kanban/workspaces").join(&id);
        d.rig.wait_file(&ws.join(format!("ready-{run}")));
        let t0 = Instant::now();
        std::fs::write(ws.join("cmd"), "exit 1\n").unwrap();
        while !ended(run) {
            std::thread::sleep(Duration::from_micros(200));
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "run {run} never booked"
            );
        }
        samples.push(t0.elapsed());
        run = d.wait_running(&id, run);
    }
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    println!(
        "worker death -> task ready: n={} p50={:.2?} p99={:.2?} max={:.2?} mean={:.2?}",
        samples.len(),
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples[samples.len() - 1],
        mean
    );
}

fn main() {
    let n: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    if harness::inside() {
        requeue_latency(n);
        return;
    }
    harness::Instance::get().run_inside(&[], "bench");
}
