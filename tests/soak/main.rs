//! The chaos soak (issue 31), in the project's systemd sandbox; not part of the test suite:
//!
//!     SOAK_TASKS=100000 cargo test --release --locked --test soak
//!
//! The real daemon serves twenty boards of one Hermes root, fed continuously with trivial
//! tasks (`fast`: the worker books its verdict with `hermes-mgr complete`), long sleepers,
//! crashers and SIGTERM-ignoring workers (their kind is their assignee), while faults are
//! injected at random moments (`SOAK_FAULT_EVERY` seconds apart on average, seed
//! `SOAK_SEED`): the daemon SIGKILLed, `systemctl restart dbus`, `systemctl daemon-reexec`,
//! journald restarted or stopped, a board held locked for 30 s, the board's filesystem and
//! the state directory filled to the last byte (small tmpfs mounts) for 15 s, the wall clock
//! stepped by ±90 s or ±10 min for 20 s (then put back against `CLOCK_MONOTONIC`).
//!
//! At the end it checks, and prints each breach: every task done, or blocked for its own
//! crashes; exactly one booking per run; no run open, no scope, no worker process, no TMPDIR
//! and no exit record left; `PRAGMA integrity_check` ok on every board; the daemon never died
//! on its own. Every 5 s it samples the daemon's RSS, descriptors, inotify watches and CPU
//! time, PID 1's and journald's RSS, to `$SOAK_OUT/samples.csv` (faults: `faults.csv`);
//! `tests/soak/plot.py` draws them against the tasks served.

#[path = "../it/harness.rs"]
#[allow(dead_code)]
mod harness;
#[path = "../it/rig.rs"]
#[allow(dead_code)]
mod rig;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hermes_mgr::board::{Board, NewTask, OpenMode, Resolver};

/// Several boards: and enough of them that none grows past ~5,000 tasks in 100,000 — each
/// `fast` worker's `hermes-mgr complete` checks its whole board's integrity, as upstream's
/// `connect()` does (66 ms at 12,000 tasks: on 3 boards the workers, not the dispatcher,
/// set the pace, and it falls as the boards grow).
const BOARDS: [&str; 20] = [
    "default", "b01", "b02", "b03", "b04", "b05", "b06", "b07", "b08", "b09", "b10", "b11", "b12",
    "b13", "b14", "b15", "b16", "b17", "b18", "b19",
];
/// Kinds (the task's assignee) and their share per thousand tasks.
const KINDS: [(&str, u64); 4] = [
    ("fast", 975),
    ("crasher", 15),
    ("sleeper", 5),
    ("stubborn", 5),
];
const STATE: &str = "/run/hermes-mgr-test";
/// Ready tasks kept waiting on each board while the feed lasts.
const BACKLOG: i64 = 60;

fn stub() -> String {
    format!(
        r#"#!/bin/sh
m={m}
case "$HERMES_PROFILE" in
  fast) exec $m --db "$HERMES_KANBAN_DB" complete "$HERMES_KANBAN_TASK" --summary fast ;;
  sleeper) sleep $(( $(od -An -N1 -tu1 /dev/urandom) % 40 + 5 ))
           exec $m --db "$HERMES_KANBAN_DB" complete "$HERMES_KANBAN_TASK" --summary sleeper ;;
  crasher) echo "crashing on purpose" >&2; exit 1 ;;
  stubborn) trap '' TERM; sleep 1
            exec $m --db "$HERMES_KANBAN_DB" complete "$HERMES_KANBAN_TASK" --summary stubborn ;;
esac
exit 9
"#,
        m = harness::mgr_bin().display()
    )
}

/// xorshift64*: the soak's faults and kinds, repeatable from `SOAK_SEED`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn kind(&mut self) -> &'static str {
        let mut r = self.below(1000);
        for (k, share) in KINDS {
            if r < share {
                return k;
            }
            r -= share;
        }
        "fast"
    }
}

fn sh_ok(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .is_ok_and(|s| s.success())
}

fn active() -> bool {
    rig::systemctl_show(rig::SERVICE, "ActiveState").contains("=active")
}

fn daemon_pid() -> Option<u32> {
    rig::systemctl_show(rig::SERVICE, "MainPID")
        .trim()
        .trim_start_matches("MainPID=")
        .parse()
        .ok()
        .filter(|p| *p != 0)
}

fn open_paths(dir: &Path, slug: &str) -> hermes_mgr::board::BoardPaths {
    Resolver {
        kanban_home: Some(dir.to_string_lossy().into()),
        board_flag: Some(slug.into()),
        ..Default::default()
    }
    .resolve()
    .unwrap()
}

fn open_board(dir: &Path, slug: &str) -> Board {
    let paths = Resolver {
        kanban_home: Some(dir.to_string_lossy().into()),
        board_flag: Some(slug.into()),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    Board::open(&paths, OpenMode::MustExist).unwrap()
}

/// A tmpfs filled to its last byte by root while this lives.
struct Filled(PathBuf);

impl Filled {
    fn fill(dir: &Path) -> Filled {
        let f = dir.join(".soak-filler");
        let free = nix::sys::statvfs::statvfs(dir)
            .map(|s| s.blocks_available() as u64 * s.fragment_size() as u64)
            .unwrap_or(0);
        let _ = Command::new("fallocate")
            .args(["-l", &free.to_string()])
            .arg(&f)
            .status();
        let _ = sh_ok(&format!(
            "dd if=/dev/zero bs=4k status=none >> {} 2>/dev/null",
            f.display()
        ));
        Filled(f)
    }
}

impl Drop for Filled {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec for the call to fill.
    assert_eq!(unsafe { libc::clock_gettime(clock, &mut t) }, 0);
    t.tv_sec as i128 * 1_000_000_000 + t.tv_nsec as i128
}

fn realtime_minus_monotonic() -> i128 {
    clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC)
}

/// Set the wall clock to `CLOCK_MONOTONIC + offset` (ns).
fn set_clock(offset: i128) {
    let want = clock_ns(libc::CLOCK_MONOTONIC) + offset;
    let t = libc::timespec {
        tv_sec: (want / 1_000_000_000) as libc::time_t,
        tv_nsec: (want % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: a valid timespec.
    let rc = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &t) };
    assert_eq!(rc, 0, "clock_settime: {}", std::io::Error::last_os_error());
}

/// The wall clock as it was (against the monotonic clock) when this was made, put back
/// when it goes, whatever happened meanwhile.
struct Clock(i128);

impl Drop for Clock {
    fn drop(&mut self) {
        set_clock(self.0);
    }
}

struct Soak {
    d: rig::Dispatcher,
    t0: Instant,
    faults: Mutex<std::fs::File>,
    /// A fault is restarting the daemon: its absence is expected.
    restarting: AtomicBool,
    created: AtomicU64,
    findings: Mutex<Vec<String>>,
    clock: i128,
    /// Where the samples go: a corrupt board's files and the journal too.
    out: PathBuf,
    /// Boards found corrupt in the middle of the run (said once each).
    corrupt: Mutex<std::collections::BTreeSet<String>>,
}

impl Soak {
    fn log_fault(&self, what: &str) {
        let line = format!("{:.1},{what}", self.t0.elapsed().as_secs_f64());
        println!("fault {line}");
        let _ = writeln!(self.faults.lock().unwrap(), "{line}");
    }

    fn finding(&self, what: String) {
        println!("FINDING at {:.0}s: {what}", self.t0.elapsed().as_secs_f64());
        self.findings.lock().unwrap().push(what);
    }

    /// A board found corrupt in the middle of the run: a finding, with its files and the
    /// journal so far kept beside the samples (later faults could hide how it came).
    fn found_corrupt(&self, slug: &str, what: &str) {
        if !self.corrupt.lock().unwrap().insert(slug.to_string()) {
            return;
        }
        let db = open_paths(&self.d.rig.dir, slug).db;
        let t = self.t0.elapsed().as_secs();
        let _ = sh_ok(&format!(
            "for x in '' -wal -shm; do cp {d}$x {o}/{slug}-at-{t}.kanban.db$x; done; journalctl -o short-monotonic --no-pager > {o}/journal-at-{t}.txt",
            d = db.display(),
            o = self.out.display()
        ));
        self.finding(format!("board {slug} found corrupt: {what}"));
    }

    fn start_daemon(&self) {
        let _ = sh_ok(&format!(
            "systemctl reset-failed {} 2>/dev/null",
            rig::SERVICE
        ));
        for _ in 0..20 {
            if sh_ok(&format!("systemctl start {}", rig::SERVICE)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        self.finding(format!(
            "the daemon does not start:\n{}",
            rig::journal(rig::SERVICE)
        ));
    }

    fn fault(&self, rng: &mut Rng) {
        match rng.below(9) {
            0 | 1 => {
                self.log_fault("daemon SIGKILL");
                self.restarting.store(true, Ordering::SeqCst);
                let _ = sh_ok(&format!(
                    "systemctl kill --signal=KILL {} 2>/dev/null",
                    rig::SERVICE
                ));
                let t = Instant::now();
                while active() && t.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                std::thread::sleep(Duration::from_millis(rng.below(2000)));
                self.start_daemon();
                self.restarting.store(false, Ordering::SeqCst);
            }
            2 => {
                self.log_fault("systemctl restart dbus");
                let _ = sh_ok("systemctl restart dbus.service");
            }
            3 => {
                self.log_fault("systemctl daemon-reexec");
                let _ = sh_ok("systemctl daemon-reexec");
            }
            4 => {
                if rng.below(2) == 0 {
                    self.log_fault("journald restart");
                    let _ = sh_ok("systemctl restart systemd-journald.service");
                } else {
                    self.log_fault("journald stopped 10 s");
                    let _ = sh_ok("systemctl stop systemd-journald.service");
                    std::thread::sleep(Duration::from_secs(10));
                    let _ = sh_ok("systemctl start systemd-journald.service");
                }
            }
            5 => {
                let slug = BOARDS[rng.below(BOARDS.len() as u64) as usize];
                self.log_fault(&format!("board {slug} locked 30 s"));
                let b = match Board::open(&open_paths(&self.d.rig.dir, slug), OpenMode::MustExist) {
                    Ok(b) => b,
                    Err(e) => return self.found_corrupt(slug, &e.to_string()),
                };
                let c = rusqlite::Connection::open(&b.paths().db).unwrap();
                drop(b);
                if c.execute_batch("BEGIN EXCLUSIVE").is_ok() {
                    std::thread::sleep(Duration::from_secs(30));
                    let _ = c.execute_batch("ROLLBACK");
                }
            }
            6 => {
                self.log_fault("board filesystem full 15 s");
                let _full = Filled::fill(&self.d.rig.dir);
                std::thread::sleep(Duration::from_secs(15));
            }
            7 => {
                self.log_fault("state directory full 15 s");
                let _full = Filled::fill(Path::new(STATE));
                std::thread::sleep(Duration::from_secs(15));
            }
            _ => {
                let step: i128 = [90, -90, 600, -600][rng.below(4) as usize];
                self.log_fault(&format!("clock stepped {step:+} s for 20 s"));
                set_clock(self.clock + step * 1_000_000_000);
                std::thread::sleep(Duration::from_secs(20));
                set_clock(self.clock);
            }
        }
    }
}

/// Where the daemon writes its metrics (`hermes-mgr.prom`): the runs it tracks as live.
const METRICS: &str = "/run/hermes-mgr-soak-metrics";

/// The live workers the daemon's last metrics said it tracks.
fn tracked_live() -> i64 {
    std::fs::read_to_string(format!("{METRICS}/hermes-mgr.prom"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("hermes_mgr_live_workers{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as i64
}

/// One sample of the daemon and its neighbours; the tasks settled so far.
fn sample(soak: &Soak, boards: &[Board], out: &mut std::fs::File) -> i64 {
    let done: i64 = boards
        .iter()
        .map(|b| {
            let c = b.counts().unwrap_or_default();
            c.get("done").copied().unwrap_or(0) + c.get("blocked").copied().unwrap_or(0)
        })
        .sum();
    let (mut pid, mut rss, mut fds, mut watches, mut cpu) = (0, 0, 0, 0, 0.0);
    if let Some(p) = daemon_pid().and_then(|p| procfs::process::Process::new(p as i32).ok()) {
        pid = p.pid;
        let tps = procfs::ticks_per_second() as f64;
        if let Ok(st) = p.stat() {
            cpu = (st.utime + st.stime) as f64 / tps;
            rss = st.rss * procfs::page_size() / 1024;
        }
        if let Ok(all) = p.fd() {
            for fd in all.flatten() {
                fds += 1;
                if let procfs::process::FDTarget::AnonInode(k) = &fd.target {
                    if k == "inotify" {
                        watches +=
                            std::fs::read_to_string(format!("/proc/{}/fdinfo/{}", p.pid, fd.fd))
                                .map(|s| s.lines().filter(|l| l.starts_with("inotify wd:")).count())
                                .unwrap_or(0);
                    }
                }
            }
        }
    }
    let rss_of = |p: Option<procfs::process::Process>| {
        p.and_then(|p| p.stat().ok())
            .map(|s| s.rss * procfs::page_size() / 1024)
            .unwrap_or(0)
    };
    let journald = procfs::process::all_processes().ok().and_then(|all| {
        all.flatten()
            .find(|p| p.stat().is_ok_and(|s| s.comm == "systemd-journal"))
    });
    let free_kb = |dir: &Path| {
        nix::sys::statvfs::statvfs(dir)
            .map(|s| s.blocks_available() as u64 * s.fragment_size() as u64 / 1024)
            .unwrap_or(0)
    };
    let records = std::fs::read_dir(format!("{STATE}/runs"))
        .map(|d| d.count())
        .unwrap_or(0);
    let _ = writeln!(
        out,
        "{:.1},{},{},{},{},{},{},{:.2},{},{},{},{},{},{},{}",
        soak.t0.elapsed().as_secs_f64(),
        soak.created.load(Ordering::Relaxed),
        done,
        pid,
        rss,
        fds,
        watches,
        cpu,
        rss_of(procfs::process::Process::new(1).ok()),
        rss_of(journald),
        count_scopes(Path::new("/sys/fs/cgroup"), 0),
        records,
        free_kb(Path::new(STATE)),
        free_kb(&soak.d.rig.dir),
        tracked_live()
    );
    done
}

/// Worker scopes under `dir` (`hermes-worker-*.scope` cgroups).
fn count_scopes(dir: &Path, depth: usize) -> usize {
    if depth > 4 {
        return 0;
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("hermes-worker-") && name.ends_with(".scope") {
            n += 1;
        } else if name.ends_with(".slice") && e.file_type().is_ok_and(|t| t.is_dir()) {
            n += count_scopes(&e.path(), depth + 1);
        }
    }
    n
}

fn run(n: u64, every: u64, seed: u64, out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    std::fs::create_dir_all(METRICS).unwrap();
    // The journal must outlive the run to follow a finding: kept on the sandbox's own
    // tmpfs under /var/log/journal (not /run, which the soak fills), roomy, and never
    // rate-limited (a burst of the daemon's lines dropped is a finding lost).
    std::fs::create_dir_all("/etc/systemd/journald.conf.d").unwrap();
    std::fs::write(
        "/etc/systemd/journald.conf.d/soak.conf",
        "[Journal]\nStorage=persistent\nSystemMaxUse=6G\nSystemKeepFree=0\nRateLimitBurst=0\n",
    )
    .unwrap();
    assert!(sh_ok(
        "systemctl restart systemd-journald.service && journalctl --flush"
    ));
    let _ = std::process::Command::new("systemctl")
        .args(["stop", rig::SERVICE])
        .status();
    let d = rig::Dispatcher::with_stub(
        &stub(),
        &format!("tick_seconds = 5\nmax_spawn = 24\nbusy_timeout_ms = 500\nfailure_limit = 2\nmetrics_textfile_dir = \"{METRICS}\"\nmetrics_interval_seconds = 5"),
    );
    // The Hermes root (every board) on a filesystem of its own, to fill; the state
    // directory too.
    let dir = d.rig.dir.clone();
    assert!(sh_ok(&format!(
        "cp -a {d} {d}.aside && mount -t tmpfs -o size=4g,mode=0755 tmpfs {d} && cp -a {d}.aside/. {d}/ && rm -rf {d}.aside && chown {uid}:{uid} {d}",
        d = dir.display(),
        uid = d.rig.uid
    )));
    std::fs::create_dir_all(STATE).unwrap();
    assert!(sh_ok(&format!(
        "umount -l {STATE} 2>/dev/null; mount -t tmpfs -o size=64m,mode=0755 tmpfs {STATE}"
    )));
    drop(d.rig.board());
    // Hermes dispatches only assignees that are profiles of the host.
    for (kind, _) in KINDS {
        let home = dir.join("profiles").join(kind);
        std::fs::create_dir_all(&home).unwrap();
        assert!(sh_ok(&format!(
            "chown -R {u}:{u} {}",
            dir.join("profiles").display(),
            u = d.rig.uid
        )));
    }
    for slug in &BOARDS[1..] {
        let home = dir.join("home");
        std::fs::create_dir_all(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(d.rig.uid), None).unwrap();
        let ok = rig::as_worker(harness::hermes_bin())
            .args(["kanban", "boards", "create", slug])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", &home)
            .env("HERMES_HOME", &dir)
            .env("HERMES_KANBAN_HOME", &dir)
            .status()
            .unwrap();
        assert!(ok.success(), "hermes kanban boards create {slug}");
    }
    d.install_all_boards();
    // The soak's log level is production's.
    let _ = sh_ok("sed -i 's/HERMES_MGR_LOG=.*/HERMES_MGR_LOG=info/' /run/systemd/system/hermes-dispatcher.service.d/50-test.conf && systemctl daemon-reload");
    let soak = Arc::new(Soak {
        d,
        t0: Instant::now(),
        faults: Mutex::new(std::fs::File::create(out.join("faults.csv")).unwrap()),
        restarting: AtomicBool::new(false),
        created: AtomicU64::new(0),
        findings: Mutex::new(Vec::new()),
        clock: realtime_minus_monotonic(),
        out: out.to_path_buf(),
        corrupt: Mutex::new(Default::default()),
    });
    let _clock = Clock(soak.clock);
    writeln!(soak.faults.lock().unwrap(), "seconds,fault").unwrap();
    soak.start_daemon();
    let stop = Arc::new(AtomicBool::new(false));

    // The feed: each board kept BACKLOG ready tasks deep until n are made.
    let feeder = {
        let (soak, stop) = (soak.clone(), stop.clone());
        std::thread::spawn(move || {
            let boards: Vec<Board> = BOARDS
                .iter()
                .map(|s| open_board(&soak.d.rig.dir, s))
                .collect();
            let mut rng = Rng(seed ^ 0x9E37_79B9_7F4A_7C15);
            let mut kinds = std::collections::BTreeMap::<&str, u64>::new();
            while !stop.load(Ordering::Relaxed) && soak.created.load(Ordering::Relaxed) < n {
                for b in &boards {
                    let ready = b.count("ready").unwrap_or(BACKLOG);
                    for _ in ready..BACKLOG {
                        if soak.created.load(Ordering::Relaxed) >= n {
                            break;
                        }
                        let kind = rng.kind();
                        let made = b.create(&NewTask {
                            title: format!("soak {kind}"),
                            assignee: Some(kind.into()),
                            ..Default::default()
                        });
                        match made {
                            Ok(_) => {
                                soak.created.fetch_add(1, Ordering::Relaxed);
                                *kinds.entry(kind).or_default() += 1;
                            }
                            // Full or locked by a fault: tried again on the next round.
                            Err(_) => break,
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            kinds
        })
    };

    // The samples, and the daemon's own deaths.
    let sampler = {
        let (soak, stop) = (soak.clone(), stop.clone());
        let path = out.join("samples.csv");
        std::thread::spawn(move || {
            let mut f = std::fs::File::create(path).unwrap();
            writeln!(f, "seconds,created,settled,daemon_pid,daemon_rss_kb,daemon_fds,daemon_watches,daemon_cpu_s,pid1_rss_kb,journald_rss_kb,scopes,records,state_free_kb,rig_free_kb,tracked_live").unwrap();
            let boards: Vec<Board> = BOARDS
                .iter()
                .map(|s| open_board(&soak.d.rig.dir, s))
                .collect();
            let (mut last, mut since, mut said) = (-1, Instant::now(), false);
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let settled = sample(&soak, &boards, &mut f);
                // Every minute, each board's integrity: when a board broke, within a minute.
                round += 1;
                if round % 12 == 0 {
                    for (slug, b) in BOARDS.iter().zip(&boards) {
                        match b.integrity_check() {
                            Ok(v) if v == "ok" => {}
                            Ok(v) => soak.found_corrupt(slug, &v),
                            Err(hermes_mgr::board::BoardError::Locked { .. }) => {}
                            Err(e) => soak.found_corrupt(slug, &e.to_string()),
                        }
                    }
                }
                if settled != last {
                    (last, since, said) = (settled, Instant::now(), false);
                } else if since.elapsed() > Duration::from_secs(180)
                    && (settled as u64) < soak.created.load(Ordering::Relaxed)
                    && !said
                {
                    said = true;
                    soak.finding(format!(
                        "no task settled for 180 s ({settled} of {}); {}",
                        soak.created.load(Ordering::Relaxed),
                        rig::systemctl_show(rig::SERVICE, "StatusText").trim()
                    ));
                }
                if !soak.restarting.load(Ordering::SeqCst) && !active() {
                    std::thread::sleep(Duration::from_millis(300));
                    if !soak.restarting.load(Ordering::SeqCst) && !active() {
                        let tail = rig::journal(rig::SERVICE);
                        let lines: Vec<&str> = tail.lines().collect();
                        soak.finding(format!(
                            "the daemon died on its own ({}):\n{}",
                            rig::systemctl_show(
                                rig::SERVICE,
                                "ActiveState,SubState,Result,ExecMainStatus"
                            ),
                            lines[lines.len().saturating_sub(30)..].join("\n")
                        ));
                        soak.start_daemon();
                    }
                }
                std::thread::sleep(Duration::from_secs(5));
            }
        })
    };

    // Faults until the feed is done.
    let mut rng = Rng(seed);
    while soak.created.load(Ordering::Relaxed) < n {
        let wait = every * 500 + rng.below(every * 1000);
        std::thread::sleep(Duration::from_millis(wait));
        if soak.created.load(Ordering::Relaxed) < n {
            soak.fault(&mut rng);
        }
    }
    let kinds = feeder.join().unwrap();
    println!(
        "fed {n} tasks in {:.0} s: {kinds:?}",
        soak.t0.elapsed().as_secs_f64()
    );
    // A corrupt board cannot be opened (its integrity is checked first): said, its files
    // kept beside the samples, the journal too, and nothing else checked.
    let corrupt: Vec<String> = BOARDS
        .iter()
        .filter_map(|slug| {
            let db = open_paths(&soak.d.rig.dir, slug).db;
            let c = rusqlite::Connection::open(&db).ok()?;
            let ok: String = c
                .query_row("PRAGMA integrity_check", [], |r| r.get(0))
                .unwrap_or_else(|e| e.to_string());
            (ok != "ok").then(|| {
                let _ = sh_ok(&format!(
                    "cp {d} {d}-wal {o}/ 2>/dev/null; cp {d} {o}/{slug}.kanban.db",
                    d = db.display(),
                    o = out.display()
                ));
                format!("board {slug} is corrupt: {ok}")
            })
        })
        .collect();
    if !corrupt.is_empty() {
        stop.store(true, Ordering::Relaxed);
        let _ = sh_ok(&format!(
            "journalctl -o short-monotonic --no-pager > {}/journal.txt",
            out.display()
        ));
        panic!("{}", corrupt.join("\n"));
    }
    let settled_by = Instant::now() + Duration::from_secs(900);
    let boards: Vec<Board> = BOARDS
        .iter()
        .map(|s| open_board(&soak.d.rig.dir, s))
        .collect();
    loop {
        let open: i64 = boards
            .iter()
            .map(|b| {
                let c = b.counts().unwrap_or_default();
                c.iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "done" | "blocked" | "archived"))
                    .map(|(_, v)| v)
                    .sum::<i64>()
            })
            .sum();
        if open == 0 {
            break;
        }
        if Instant::now() > settled_by {
            soak.finding(format!(
                "{open} tasks not settled 15 min after the feed ended"
            ));
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let elapsed = soak.t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    check(&soak, &boards);
    let findings = soak.findings.lock().unwrap().clone();
    println!(
        "\nsoak: {n} tasks, seed {seed}, faults every ~{every} s, {:.0} s; {} finding(s)",
        elapsed.as_secs_f64(),
        findings.len()
    );
    for f in &findings {
        println!("- {}", f.lines().next().unwrap_or(""));
    }
    if !findings.is_empty() {
        // The whole journal, to follow each finding's runs.
        let _ = sh_ok(&format!(
            "journalctl -o short-monotonic --no-pager > {}/journal.txt",
            out.display()
        ));
    }
    assert!(findings.is_empty(), "{} finding(s)", findings.len());
}

/// The end state: what a user, an operator and the kernel would each check.
fn check(soak: &Soak, boards: &[Board]) {
    let terminal = "('completed','crashed','protocol_violation','reclaimed','spawn_failed','timed_out','gave_up','rate_limited','stale','blocked')";
    for (slug, b) in BOARDS.iter().zip(boards) {
        let c = b.connection();
        let q = |sql: &str| -> Vec<String> {
            let mut st = c.prepare(sql).unwrap();
            st.query_map([], |r| r.get::<_, String>(0))
                .unwrap()
                .flatten()
                .take(20)
                .collect()
        };
        let breach = |what: &str, rows: Vec<String>| {
            if !rows.is_empty() {
                soak.finding(format!("board {slug}: {what}: {rows:?}"));
            }
        };
        breach("tasks neither done nor blocked", q("SELECT id || ' ' || status FROM tasks WHERE status NOT IN ('done','blocked','archived')"));
        breach("blocked, not for its own crashes", q("SELECT id || ' ' || assignee FROM tasks WHERE status = 'blocked' AND assignee != 'crasher'"));
        breach(
            "a crasher done",
            q("SELECT id FROM tasks WHERE status = 'done' AND assignee = 'crasher'"),
        );
        breach("a run left open", q("SELECT id || ' ' || task_id FROM task_runs WHERE ended_at IS NULL OR outcome IS NULL"));
        breach(
            "a run of a worker that never fails booked as a failure",
            q("SELECT r.task_id || ' run ' || r.id || ' ' || r.outcome || ': ' || COALESCE(r.error, '') FROM task_runs r JOIN tasks t ON t.id = r.task_id WHERE t.assignee != 'crasher' AND (r.outcome IN ('crashed','gave_up','timed_out') OR (r.outcome = 'spawn_failed' AND NOT EXISTS (SELECT 1 FROM task_events e WHERE e.run_id = r.id AND e.kind = 'spawn_failed' AND json_extract(e.payload, '$.infrastructure') = 1)))"),
        );
        breach(
            "a run booked other than once",
            q(&format!("SELECT r.id || ' ' || r.task_id || ' x' || (SELECT count(*) FROM task_events e WHERE e.run_id = r.id AND e.kind IN {terminal}) FROM task_runs r WHERE (SELECT count(*) FROM task_events e WHERE e.run_id = r.id AND e.kind IN {terminal}) != 1")),
        );
        breach("a done task whose last run did not complete", q("SELECT t.id FROM tasks t WHERE t.status = 'done' AND (SELECT outcome FROM task_runs r WHERE r.task_id = t.id ORDER BY r.id DESC LIMIT 1) != 'completed'"));
        let ok = b.integrity_check().unwrap_or_else(|e| e.to_string());
        if ok != "ok" {
            soak.finding(format!("board {slug}: integrity_check: {ok}"));
        }
        let runs: i64 = c
            .query_row("SELECT count(*) FROM task_runs", [], |r| r.get(0))
            .unwrap();
        let by: Vec<String> =
            q("SELECT outcome || ' ' || count(*) FROM task_runs GROUP BY outcome");
        println!(
            "board {slug}: {:?}; {runs} runs: {by:?}",
            b.counts().unwrap()
        );
    }
    // Nothing of any run is left once the last scope is gone.
    let t = Instant::now();
    while count_scopes(Path::new("/sys/fs/cgroup"), 0) > 0 && t.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let scopes = count_scopes(Path::new("/sys/fs/cgroup"), 0);
    if scopes > 0 {
        soak.finding(format!(
            "{scopes} worker scopes left:\n{}",
            rig::worker_units(true)
        ));
    }
    let procs: Vec<i32> = procfs::process::all_processes()
        .unwrap()
        .flatten()
        .filter(|p| {
            p.environ()
                .is_ok_and(|e| e.keys().any(|k| k == "HERMES_KANBAN_TASK"))
        })
        .map(|p| p.pid)
        .collect();
    if !procs.is_empty() {
        soak.finding(format!("worker processes left outside any run: {procs:?}"));
    }
    let left = |dir: &str, prefix: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(prefix))
                    .take(10)
                    .collect()
            })
            .unwrap_or_default()
    };
    let tmp = left("/tmp", "hermes-run.");
    if !tmp.is_empty() {
        let n = std::fs::read_dir("/tmp").map(|d| d.count()).unwrap_or(0);
        soak.finding(format!("TMPDIRs left ({n} entries in /tmp): {tmp:?}"));
    }
    let records = left(&format!("{STATE}/runs"), "");
    if !records.is_empty() {
        let n = std::fs::read_dir(format!("{STATE}/runs"))
            .map(|d| d.count())
            .unwrap_or(0);
        // Each named record against its run on its board: written after its booking, or
        // never booked, and what the supervisor saw.
        let mut seen = Vec::new();
        for name in &records {
            let path = Path::new(STATE).join("runs").join(name);
            let Some((slug, (task, run))) = BOARDS.iter().zip(boards).find_map(|(slug, _)| {
                hermes_mgr::names::record_of(slug, name).map(|tr| (*slug, tr))
            }) else {
                seen.push(format!("{name}: no board's"));
                continue;
            };
            let b = &boards[BOARDS.iter().position(|s| *s == slug).unwrap()];
            let r = b.run(run).ok().flatten();
            let written = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs_f64());
            let body = std::fs::read_to_string(&path).unwrap_or_default();
            seen.push(format!(
                "{name}: run of {task} {:?} ended {:?}, record written {written:?}: {}",
                r.as_ref().map(|r| r.outcome.clone()),
                r.as_ref().map(|r| r.ended_at),
                body.chars().take(300).collect::<String>()
            ));
        }
        soak.finding(format!("exit records left ({n}):\n  {}", seen.join("\n  ")));
    }
    let daemon = rig::systemctl_show(rig::SERVICE, "ActiveState,NRestarts");
    println!("daemon at the end: {}", daemon.replace('\n', " "));
}

fn main() {
    let n: u64 = std::env::var("SOAK_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let every: u64 = std::env::var("SOAK_FAULT_EVERY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let seed: u64 = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(31);
    let out = PathBuf::from(
        std::env::var("SOAK_OUT").unwrap_or_else(|_| "/var/tmp/hermes-mgr-soak".into()),
    );
    if harness::inside() {
        run(n, every, seed.max(1), &out);
        return;
    }
    // The samples outlive the sandbox: its output directory is the host's.
    std::fs::create_dir_all(&out).unwrap();
    let rw = std::env::var("SDH_BIND_RW").unwrap_or_default();
    std::env::set_var("SDH_BIND_RW", format!("{rw} {}", out.display()));
    harness::Instance::get().run_inside(&[], "soak");
}
