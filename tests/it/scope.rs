//! Transient scopes created over zbus in a real systemd (inside the sandbox).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use hermes_mgr::liveness;
use hermes_mgr::names;
use hermes_mgr::systemd::{Property, Systemd, SystemdError, UnitState};
use zbus::Variant;

use crate::systemd_test;

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

pub fn scope_props(pid: u32, desc: &str) -> Vec<Property> {
    vec![
        ("PIDs", Variant::from(vec![pid])),
        ("Slice", Variant::from("hermes-workers.slice".to_string())),
        ("Description", Variant::from(desc.to_string())),
        ("KillMode", Variant::from("control-group".to_string())),
        ("TimeoutStopUSec", Variant::from(5_000_000u64)),
        (
            "CollectMode",
            Variant::from("inactive-or-failed".to_string()),
        ),
    ]
}

fn cgroup_of(pid: u32) -> String {
    liveness::cgroup_of(pid)
        .expect("read /proc/PID/cgroup")
        .expect("process exists")
}

systemd_test!(a_held_child_is_in_its_scope_before_it_runs, {
    // The child blocks on its stdin (the "hold") and only then reports where it is.
    let mut child = Command::new("sh")
        .args([
            "-c",
            "read go; grep '^0::' /proc/self/cgroup; exec sleep 600",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn held child");
    let pid = child.id();
    let unit = names::worker_scope("default", &format!("t_test{pid}"), 1);
    let want = liveness::unit_cgroup("hermes-workers.slice", &unit);
    assert_ne!(cgroup_of(pid), want);
    let rt = rt();
    let sd = rt.block_on(Systemd::connect()).expect("connect to systemd");
    println!("systemd {}", rt.block_on(sd.version()).unwrap());
    rt.block_on(sd.start_transient(
        &unit,
        scope_props(pid, "hermes-mgr test scope"),
        Duration::from_secs(10),
    ))
    .expect("StartTransientUnit");
    // The job is done: the held child is already in the scope, before it ran a thing.
    assert_eq!(cgroup_of(pid), want);
    let procs = std::fs::read_to_string(format!("/sys/fs/cgroup{want}/cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|l| l == pid.to_string()),
        "cgroup.procs: {procs}"
    );
    assert_eq!(
        rt.block_on(sd.active_state(&unit)).unwrap(),
        Some(UnitState::Active)
    );
    assert_eq!(liveness::cgroup_populated(&want), Some(true));

    child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        line.trim(),
        format!("0::{want}"),
        "the released child saw itself elsewhere"
    );

    let result = rt
        .block_on(sd.stop_and_wait(&unit, Duration::from_secs(20)))
        .expect("StopUnit");
    assert_eq!(result, "done");
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
    assert_eq!(
        rt.block_on(sd.active_state(&unit)).unwrap(),
        None,
        "collected after stop"
    );
});

systemd_test!(
    a_second_scope_of_the_same_name_is_refused_with_a_typed_error,
    {
        let mut a = Command::new("sleep")
            .arg("600")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut b = Command::new("sleep")
            .arg("600")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let unit = names::worker_scope("default", &format!("t_dup{}", a.id()), 1);
        let rt = rt();
        let sd = rt.block_on(Systemd::connect()).unwrap();
        rt.block_on(sd.start_transient(
            &unit,
            scope_props(a.id(), "first"),
            Duration::from_secs(10),
        ))
        .unwrap();
        let err = rt
            .block_on(sd.start_transient(
                &unit,
                scope_props(b.id(), "second"),
                Duration::from_secs(10),
            ))
            .unwrap_err();
        assert!(matches!(err, SystemdError::UnitExists { .. }), "{err:?}");
        assert!(
            !cgroup_of(b.id()).contains(&unit),
            "the refused process was moved anyway"
        );
        rt.block_on(sd.stop_and_wait(&unit, Duration::from_secs(20)))
            .unwrap();
        assert_eq!(a.wait().unwrap().signal(), Some(libc::SIGTERM));
        b.kill().unwrap();
        b.wait().unwrap();
    }
);

systemd_test!(
    a_scope_whose_process_died_before_the_attach_is_active_and_empty,
    {
        // What a dispatcher killed between spawning a worker's supervisor and the end of
        // the start job leaves behind (found by the fault suite): the PID is gone by the
        // time systemd attaches it. A zombie makes that moment reproducible.
        let mut z = crate::rig::zombie();
        let unit = names::worker_scope("default", &format!("t_husk{}", z.id()), 1);
        let cgroup = liveness::unit_cgroup("hermes-workers.slice", &unit);
        let rt = rt();
        let sd = rt.block_on(Systemd::connect()).unwrap();
        rt.block_on(sd.start_transient(
            &unit,
            scope_props(z.id(), "husk"),
            Duration::from_secs(10),
        ))
        .expect("systemd 252 accepts a zombie's PID");
        // systemd keeps the scope active for ever: its cgroup was never populated, so it
        // never reports becoming empty. Only the kernel's flag tells the truth.
        let state = rt.block_on(sd.active_state(&unit)).unwrap();
        println!("unit state: {state:?}");
        assert_eq!(liveness::cgroup_populated(&cgroup), Some(false));
        z.wait().unwrap();
        // A stop ends it at once.
        rt.block_on(sd.stop_and_wait(&unit, Duration::from_secs(10)))
            .unwrap();
        assert_eq!(rt.block_on(sd.active_state(&unit)).unwrap(), None);
    }
);

systemd_test!(
    signals_nobody_reads_yet_do_not_stall_the_connections_method_calls,
    {
        // The dispatcher's loop reads its UnitRemoved stream only between passes. zbus
        // stops reading the socket while any signal queue is full, so before the signal
        // pump, a busy pass waited for ever on a reply (found by the throughput benchmark).
        let rt = rt();
        let sd = rt.block_on(Systemd::connect()).unwrap();
        let _unread = sd.unit_removed_stream();
        for _ in 0..200 {
            let ok = Command::new("systemd-run")
                .args(["--scope", "--quiet", "--collect", "true"])
                .status()
                .unwrap()
                .success();
            assert!(ok);
        }
        // 200 scopes came and went: ≥ 400 signals for this connection, none read yet.
        let answer = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), sd.list_units("*.scope")).await
        });
        assert!(
            matches!(answer, Ok(Ok(_))),
            "a method call after unread signals: {answer:?}"
        );
    }
);
