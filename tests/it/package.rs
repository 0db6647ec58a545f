//! The `.deb` (cargo-deb), installed with dpkg into the sandbox's systemd: install, a real
//! Hermes task run to done, an upgrade in place with a worker running, removal.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::harness::{hermes_bin, repo, wait_for};
use crate::rig::{alive, sh, systemctl_show, SERVICE};
use crate::systemd_test;

/// Build the package from this build's binary.
pub fn build_deb() -> PathBuf {
    let out = PathBuf::from(format!(
        "/var/tmp/hermes-mgr-test-{}.deb",
        std::process::id()
    ));
    crate::deb::build_deb(&repo(), &out, "1");
    out
}

fn dpkg(args: &[&str]) {
    let o = Command::new("dpkg")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "dpkg {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A worker that says hello, waits for the word ("go" FIFO in its workspace), then
/// completes its task with the real CLI and `summary`; configured for an installed service.
pub fn install_stub_worker(summary: &str) {
    let stub = format!(
        "#!/bin/sh\necho \"hello from $HERMES_KANBAN_TASK\"\nrm -f go; mkfifo go; echo END > ready; read x < go\nexec {} kanban complete \"$HERMES_KANBAN_TASK\" --summary {summary}\n",
        hermes_bin().display()
    );
    std::fs::write("/var/lib/hermes/worker.sh", stub).unwrap();
    sh("chmod 0755 /var/lib/hermes/worker.sh && chown hermes:hermes /var/lib/hermes/worker.sh");
    std::fs::write(
        "/etc/hermes-mgr/config.toml",
        "worker_user = \"hermes\"\nhermes_bin = \"/var/lib/hermes/worker.sh\"\n",
    )
    .unwrap();
    sh(&format!("systemctl reload {SERVICE}"));
}

/// `hermes kanban create TITLE` as the hermes user against /var/lib/hermes; the new id.
pub fn hermes_create(title: &str) -> String {
    let o = Command::new("runuser")
        .args([
            "-u",
            "hermes",
            "--",
            "env",
            "HOME=/var/lib/hermes",
            "HERMES_HOME=/var/lib/hermes",
        ])
        .arg(hermes_bin())
        .args(["kanban", "create", title, "--assignee", "default", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "hermes kanban create: {e}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    v["id"].as_str().unwrap().to_string()
}

/// An upgrade in place with a worker running: `upgrade` must restart the daemon and leave
/// the worker alive; released (its `go` file), the worker completes the task in its one run,
/// and the scope's journal has its output. Returns that run.
pub fn upgrade_keeps_the_worker(
    board: &hermes_mgr::board::Board,
    id: &str,
    unit: &str,
    worker: u32,
    upgrade: impl FnOnce(),
) -> hermes_mgr::board::Run {
    let before = systemctl_show(SERVICE, "MainPID");
    upgrade();
    assert_ne!(
        systemctl_show(SERVICE, "MainPID"),
        before,
        "the upgrade did not restart the daemon"
    );
    assert!(alive(worker), "the upgrade killed the worker");
    let ws = Path::new("/var/lib/hermes/kanban/workspaces").join(id);
    std::fs::write(ws.join("go"), "\n").unwrap();
    wait_for("done", Duration::from_secs(30), || {
        board
            .require_task(id)
            .ok()
            .filter(|t| t.status.as_str() == "done")
    });
    let mut runs = board.runs(id).unwrap();
    assert_eq!(runs.len(), 1, "a second worker was started");
    let journal = Command::new("journalctl")
        .args(["-u", unit, "-o", "cat", "--no-pager"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&journal.stdout).contains(&format!("hello from {id}")));
    runs.remove(0)
}

fn dispatcher_processes() -> usize {
    procfs::process::all_processes()
        .unwrap()
        .filter_map(|p| p.ok())
        .filter(|p| {
            p.cmdline()
                .is_ok_and(|c| c.len() >= 2 && c[0].ends_with("hermes-mgr") && c[1] == "dispatcher")
        })
        .count()
}

systemd_test!(
    the_deb_installs_runs_a_real_task_upgrades_in_place_and_removes_cleanly,
    {
        let deb = build_deb();
        // This machine image carries Docker's policy-rc.d ("exit 101": maintainer scripts may not
        // start services). A real host has none; remove it in the sandbox (its overlay only).
        let _ = std::fs::remove_file("/usr/sbin/policy-rc.d");
        // The sandbox's systemd does not search /usr/lib/systemd/system (that keeps the real
        // sysinit units away, see tests/sdharness), and a unit linked from there counts as
        // "linked", not enableable: stand the package's own unit files up in /etc/systemd/system
        // (the same files the package ships to /usr/lib/systemd/system).
        for unit in [SERVICE, "hermes-workers.slice"] {
            std::fs::copy(
                repo().join("units").join(unit),
                format!("/etc/systemd/system/{unit}"),
            )
            .unwrap();
        }
        sh("systemctl daemon-reload");
        dpkg(&["-i", deb.to_str().unwrap()]);
        let state = systemctl_show(SERVICE, "ActiveState");
        assert!(
            state.contains("ActiveState=active"),
            "not started by the package: {state}\n{}",
            crate::rig::journal(SERVICE)
        );
        assert!(systemctl_show(SERVICE, "UnitFileState").contains("=enabled"));
        assert!(
            sh("id -u hermes").trim().parse::<u32>().unwrap() > 0,
            "sysusers made no hermes user"
        );
        assert!(
            Path::new("/run/hermes-mgr/runs").is_dir(),
            "tmpfiles not applied"
        );
        install_stub_worker("packaged");
        let id = hermes_create("packaged task");
        let ws = PathBuf::from("/var/lib/hermes/kanban/workspaces").join(&id);
        wait_for("the worker", Duration::from_secs(30), || {
            std::fs::read_to_string(ws.join("ready"))
                .ok()
                .filter(|s| s.contains("END"))
        });
        let board = hermes_mgr::board::Board::open(
            &hermes_mgr::board::BoardPaths::for_db(Path::new("/var/lib/hermes/kanban.db")),
            hermes_mgr::board::OpenMode::Inspect,
        )
        .unwrap();
        let task = board.require_task(&id).unwrap();
        let unit = format!(
            "hermes-worker-kanban-{id}-run-{}.scope",
            task.current_run_id.unwrap()
        );
        assert!(systemctl_show(&unit, "ControlGroup")
            .contains("/hermes.slice/hermes-workers.slice/hermes-workers-"));
        let worker = task.worker_pid.unwrap() as u32;
        // The worker's parent, its run's supervisor, is the package's small program.
        let supervisor = procfs::process::Process::new(worker as i32)
            .and_then(|p| p.stat())
            .unwrap()
            .ppid;
        assert_eq!(
            std::fs::read_link(format!("/proc/{supervisor}/exe")).unwrap(),
            Path::new("/usr/libexec/hermes-mgr/hermes-mgr-supervise")
        );

        // Installing the package over itself is an upgrade: the daemon restarts, the worker lives on.
        upgrade_keeps_the_worker(&board, &id, &unit, worker, || {
            dpkg(&["-i", deb.to_str().unwrap()])
        });

        dpkg(&["-r", "hermes-mgr"]);
        assert!(!systemctl_show(SERVICE, "ActiveState").contains("=active"));
        assert_eq!(
            dispatcher_processes(),
            0,
            "a dispatcher process survived removal"
        );
        assert!(
            Path::new("/var/lib/hermes/kanban.db").exists(),
            "removal deleted the user's board"
        );
        let _ = std::fs::remove_file(&deb);
    }
);

#[test]
fn lintian_finds_no_error_in_the_deb() {
    // Outside the sandbox: lintian only reads the file.
    let deb = build_deb();
    let o = Command::new("lintian")
        .arg("--no-tag-display-limit")
        .arg(&deb)
        .output()
        .expect("lintian (tests/setup.sh installs it)");
    let report = String::from_utf8_lossy(&o.stdout);
    println!("{report}");
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{}", errors.join("\n"));
    let _ = std::fs::remove_file(&deb);
}

#[test]
fn the_rpm_has_the_files_the_dependencies_and_the_scriptlets() {
    let rpm = PathBuf::from(format!(
        "/var/tmp/hermes-mgr-test-{}.rpm",
        std::process::id()
    ));
    let o = Command::new("cargo")
        .args([
            "generate-rpm",
            "--profile",
            "dev",
            "--payload-compress",
            "none",
            "-o",
        ])
        .arg(&rpm)
        .current_dir(repo())
        .output()
        .expect("cargo generate-rpm (tests/setup.sh installs it)");
    assert!(
        o.status.success(),
        "cargo generate-rpm: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let q = |args: &[&str]| {
        let o = Command::new("rpm")
            .args(args)
            .arg(&rpm)
            .output()
            .expect("rpm (tests/setup.sh installs it)");
        assert!(
            o.status.success(),
            "rpm {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let files = q(&["-qlp"]);
    for f in [
        "/usr/bin/hermes-mgr",
        "/usr/libexec/hermes-mgr/hermes-mgr-supervise",
        "/usr/lib/systemd/system/hermes-dispatcher.service",
        "/usr/lib/systemd/system/hermes-workers.slice",
        "/usr/lib/sysusers.d/hermes-mgr.conf",
        "/usr/lib/tmpfiles.d/hermes-mgr.conf",
        "/usr/share/man/man1/hermes-mgr.1",
        "/usr/share/man/man8/hermes-dispatcher.8",
        "/usr/share/man/man5/hermes-mgr.toml.5",
        "/usr/share/doc/hermes-mgr/examples/hermes-mgr-rules.yml",
        "/etc/hermes-mgr/config.toml",
    ] {
        assert!(
            files.lines().any(|l| l == f),
            "{f} missing from the rpm:\n{files}"
        );
    }
    assert_eq!(
        q(&["-qp", "--configfiles"]).trim(),
        "/etc/hermes-mgr/config.toml"
    );
    assert!(q(&["-qpR"]).lines().any(|l| l.trim() == "systemd >= 252"));
    let scripts = q(&["-qp", "--scripts"]);
    let part = |name: &str| -> String {
        let start = scripts
            .find(&format!("{name} scriptlet"))
            .unwrap_or_else(|| panic!("no {name} scriptlet:\n{scripts}"));
        let body = &scripts[start..];
        let body = &body[body.find('\n').unwrap() + 1..];
        body.split("scriptlet (using")
            .next()
            .unwrap()
            .split("\npre")
            .next()
            .unwrap()
            .split("\npost")
            .next()
            .unwrap()
            .to_string()
    };
    assert!(
        part("preinstall").contains("systemd-sysusers"),
        "the user is not created before install"
    );
    let post = part("postinstall");
    assert!(
        post.contains("systemd-tmpfiles --create")
            && post.contains("enable --now")
            && post.contains("try-restart"),
        "{post}"
    );
    let preun = part("preuninstall");
    assert!(
        preun.contains("[ \"$1\" -eq 0 ]") && preun.contains("disable --now"),
        "erase must stop, upgrade must not: {preun}"
    );
    let postun = part("postuninstall");
    assert!(
        !postun
            .lines()
            .any(|l| l.contains("rm ") && l.contains("/var/lib/hermes")),
        "the user's Hermes root must never be deleted: {postun}"
    );
    for name in ["preinstall", "postinstall", "preuninstall", "postuninstall"] {
        let mut sh = Command::new("sh")
            .arg("-n")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        sh.stdin
            .take()
            .unwrap()
            .write_all(part(name).as_bytes())
            .unwrap();
        assert!(
            sh.wait().unwrap().success(),
            "{name} scriptlet does not parse"
        );
    }
    let _ = std::fs::remove_file(&rpm);
}

#[test]
fn the_readme_demo_runs_end_to_end() {
    // packaging/demo.sh boots its own sandbox; here with the dev-profile package.
    let deb = build_deb();
    let o = Command::new("bash")
        .arg(repo().join("packaging/demo.sh"))
        .env("DEB", &deb)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "demo failed:\n{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for want in [
        "dispatcher: running",
        "blocked 1 · done 1 · running 1",
        "exited after SIGTERM",
        "task is now blocked",
        "gave_up",
        "demo worker for",
    ] {
        assert!(
            out.contains(want),
            "{want:?} missing from the demo's output:\n{out}"
        );
    }
    let _ = std::fs::remove_file(&deb);
}
