//! `hermes-mgr doctor`: what the dispatcher needs, checked one by one, each failing line
//! with the fix.

use serde::Serialize;

use crate::board::{Board, BoardPaths, OpenMode};
use crate::config::Config;
use crate::liveness::memory_monitors;
use crate::systemd::Systemd;

mod host;
use host::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub level: Level,
    pub detail: String,
    /// What to do, for warn and fail.
    pub fix: Option<String>,
}

fn check(name: &'static str, level: Level, detail: impl Into<String>, fix: Option<&str>) -> Check {
    Check {
        name,
        level,
        detail: detail.into(),
        fix: fix.map(str::to_string),
    }
}

/// Every check, in the order `doctor` prints them; each is one function below.
pub async fn run(paths: &BoardPaths, cfg: anyhow::Result<Config>) -> Vec<Check> {
    let (mut out, cfg) = config(cfg);
    let sd = Systemd::connect().await;
    out.extend(systemd(&sd).await);
    out.extend(privileges());
    out.extend(cgroup_v2());
    out.extend(cgroup_migration());
    out.push(freezer());
    out.push(memory_monitor(
        &memory_monitors(),
        crate::dispatch::caps::of(&cfg).most(),
    ));
    out.extend(controllers());
    out.extend(slice(&cfg));
    out.push(host_room(&cfg));
    out.extend(kanban_settings(&cfg));
    out.extend(board(paths));
    out.push(dispatcher(paths));
    out.extend(emergency_stop(paths));
    out.extend(paused(paths, &cfg));
    out.extend(board_tree(paths));
    if let Ok(sd) = &sd {
        out.extend(dispatcher_health(sd).await);
    }
    out.push(admission(&cfg));
    out.extend(pools(&cfg));
    out.push(sandbox(&cfg));
    out.push(metrics(&cfg));
    out.extend(worker_user(&cfg));
    out.extend(worker_binary(&cfg));
    out
}

/// The configuration parses; a broken one is reported and the defaults checked instead.
fn config(cfg: anyhow::Result<Config>) -> (Vec<Check>, Config) {
    let mut out = Vec::new();
    let cfg = match cfg {
        Ok(c) => {
            out.push(check("config", Level::Ok, "configuration valid", None));
            c
        }
        Err(e) => {
            out.push(check(
                "config",
                Level::Fail,
                format!("{e:#}"),
                Some("fix the file named above (see README.md, Configuration)"),
            ));
            Config::default()
        }
    };
    (out, cfg)
}

/// systemd answers on the bus, is new enough, and takes PIDFDs.
async fn systemd(sd: &Result<Systemd, crate::systemd::SystemdError>) -> Vec<Check> {
    let mut out = Vec::new();
    match sd {
        Ok(sd) => {
            out.push(check(
                "system bus",
                Level::Ok,
                "systemd answers on the system bus",
                None,
            ));
            match sd.version().await {
                Ok(v) => {
                    let major: u32 = v
                        .split(|c: char| !c.is_ascii_digit())
                        .next()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    out.push(if major >= 252 {
                        check("systemd", Level::Ok, format!("systemd {v}"), None)
                    } else {
                        check(
                            "systemd",
                            Level::Fail,
                            format!("systemd {v}"),
                            Some("hermes-mgr needs systemd 252 or newer"),
                        )
                    });
                    out.push(if major >= 255 {
                        check(
                            "pidfds",
                            Level::Ok,
                            "scopes are created with PIDFDs (immune to PID reuse)",
                            None,
                        )
                    } else {
                        check(
                            "pidfds",
                            Level::Warn,
                            "systemd < 255 takes no PIDFDs; scopes are created with PIDs",
                            Some("none needed; systemd 255+ closes the PID-reuse window"),
                        )
                    });
                }
                Err(e) => out.push(check(
                    "systemd",
                    Level::Fail,
                    e.to_string(),
                    Some("is systemd PID 1?"),
                )),
            }
        }
        Err(e) => out.push(check(
            "system bus",
            Level::Fail,
            e.to_string(),
            Some(
                "start dbus (systemctl start dbus.socket) and run on a host whose PID 1 is systemd",
            ),
        )),
    }
    out
}

/// The board opens and is intact; a dispatcher serves it.
fn board(paths: &BoardPaths) -> Vec<Check> {
    let mut out = Vec::new();
    match Board::open(paths, OpenMode::MustExist) {
        Ok(b) => {
            out.push(match b.integrity_check() {
                Ok(v) if v == "ok" => check("board", Level::Ok, format!("{}: integrity ok, schema of hermes-agent 0.19.0 or newer", paths.db.display()), None),
                Ok(v) => check("board", Level::Fail, format!("{}: integrity_check says {v}", paths.db.display()), Some("restore the board from a backup")),
                Err(e) => check("board", Level::Fail, e.to_string(), Some("see the message")),
            });
        }
        Err(e) => out.push(check("board", Level::Fail, e.to_string(), Some("point --db/--board/$HERMES_HOME at the board, or create it with hermes kanban init"))),
    }
    out
}

/// Who holds the root's `.dispatcher.lock`: hermes-dispatcher (ok), a Hermes gateway or
/// anything else (a warning that says what to do), nobody (a warning).
fn dispatcher(paths: &BoardPaths) -> Check {
    let lock = paths.dispatcher_lock();
    let held = crate::safe_fs::Owner::of_tree(&paths.owner_dir)
        .is_ok_and(|owner| crate::board::lock::held(&lock, &owner));
    if !held {
        return check(
            "dispatcher",
            Level::Warn,
            format!(
                "nobody holds {}: no dispatcher runs for this root",
                lock.display()
            ),
            Some("systemctl enable --now hermes-dispatcher"),
        );
    }
    let holders = crate::liveness::flock_holders(&lock);
    let ours = |cmd: &str| cmd.contains("hermes-mgr") && cmd.contains("dispatcher");
    let who = crate::liveness::describe(&holders);
    if !holders.is_empty() && holders.iter().all(|h| ours(&h.cmd)) {
        check(
            "dispatcher",
            Level::Ok,
            format!("hermes-dispatcher holds {}: {who}", lock.display()),
            None,
        )
    } else if holders.is_empty() {
        check(
            "dispatcher",
            Level::Ok,
            format!(
                "a dispatcher holds {} (its process is not visible here)",
                lock.display()
            ),
            None,
        )
    } else {
        check(
            "dispatcher",
            Level::Warn,
            format!("{who} holds {}: that process dispatches this root, not hermes-mgr", lock.display()),
            Some("stop that gateway, systemctl start hermes-dispatcher, then start the gateway again: it finds the lock held, does not dispatch, and keeps delivering notifications"),
        )
    }
}

/// Hermes' kanban settings as the dispatcher applies them, each with where it came from.
fn kanban_settings(cfg: &Config) -> Vec<Check> {
    let opt = |v: Option<usize>| v.map(|n| n.to_string()).unwrap_or_else(|| "no cap".into());
    let src = |k: &str| {
        cfg.sources
            .get(k)
            .cloned()
            .unwrap_or_else(|| "default".into())
    };
    // How the Hermes served counts `max_in_progress` (`dispatch::caps`).
    let caps = crate::dispatch::caps::of(cfg);
    let in_progress = match (caps.host, cfg.max_in_progress) {
        (Some(n), Some(_)) => format!("{n} for the host"),
        (Some(n), None) => format!("{n} for the host, derived from its memory as Hermes 0.22 does"),
        (None, n) => format!("{} per board", opt(n)),
    };
    let mut detail = format!(
        "max_spawn={} ({}), max_in_progress={} ({}), max_in_progress_per_profile={} ({}), failure_limit={} ({}), default_assignee={} ({}), auto_decompose={} ({}), auto_decompose_per_tick={} ({}), dispatch_stale_timeout_seconds={} ({})",
        opt(cfg.max_spawn),
        src("max_spawn"),
        in_progress,
        src("max_in_progress"),
        opt(cfg.max_in_progress_per_profile),
        src("max_in_progress_per_profile"),
        cfg.failure_limit,
        src("failure_limit"),
        cfg.default_assignee.as_deref().unwrap_or("none"),
        src("default_assignee"),
        cfg.auto_decompose,
        src("auto_decompose"),
        cfg.auto_decompose_per_tick,
        src("auto_decompose_per_tick"),
        cfg.stale_timeout_seconds,
        src("dispatch_stale_timeout_seconds"),
    );
    let level = if cfg.warnings.is_empty() {
        Level::Ok
    } else {
        detail.push_str("; ");
        detail.push_str(&cfg.warnings.join("; "));
        Level::Warn
    };
    vec![check(
        "kanban settings",
        level,
        crate::text::clean(&detail),
        (level == Level::Warn).then_some("fix the value in Hermes' config.yaml"),
    )]
}

/// Whose powers hermes-mgr uses in the board's tree: its owner's (`safe_fs`). A root-owned
/// Hermes root that others may write gives that protection up — root would then follow
/// what they plant there — so it fails.
fn board_tree(paths: &BoardPaths) -> Vec<Check> {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata(&paths.owner_dir) else {
        return Vec::new();
    };
    let shared = m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0;
    vec![match (m.uid(), shared) {
        (0, true) => check(
            "board tree",
            Level::Fail,
            format!(
                "{} belongs to root and others may write it: hermes-mgr would act there as root",
                paths.owner_dir.display()
            ),
            Some("give the Hermes root to the user who runs Hermes (chown -R hermes: …), or chmod go-w it"),
        ),
        (uid, _) => check(
            "board tree",
            Level::Ok,
            format!(
                "{}: file work there runs as uid {uid}, its owner",
                paths.owner_dir.display()
            ),
            None,
        ),
    }]
}

/// Hermes' emergency stop (`hermes pause`), said only while it holds: nothing is started.
fn emergency_stop(paths: &BoardPaths) -> Vec<Check> {
    crate::hermes_config::estop_of_root(&paths.root)
        .map(|p| {
            check(
                "emergency stop",
                Level::Warn,
                crate::text::clean(&crate::hermes_config::estop_text(&p)),
                Some("hermes resume (or remove the file) when work may start again"),
            )
        })
        .into_iter()
        .collect()
}

/// The operators' holds on this board (`hermes-mgr pause`), said only while they hold.
fn paused(paths: &BoardPaths, cfg: &Config) -> Vec<Check> {
    let holds = match crate::holds::read(&cfg.holds_file) {
        Ok(h) => h,
        Err(e) => {
            return vec![check(
                "paused",
                Level::Fail,
                format!("{e:#}: every board counts as held"),
                Some("fix or remove the file (hermes-mgr resume rewrites it)"),
            )]
        }
    };
    let db = crate::holds::board_key(&paths.db);
    let mut out: Vec<Check> = holds
        .board(&db)
        .map(|b| {
            check(
                "paused",
                Level::Warn,
                crate::holds::describe(&b),
                Some("hermes-mgr resume --board SLUG (or --all) when work may start again"),
            )
        })
        .into_iter()
        .collect();
    let tasks = holds.tasks.get(&db).map_or(0, |t| t.len());
    if tasks > 0 {
        out.push(check(
            "paused tasks",
            Level::Warn,
            format!("{tasks} task(s) held by hermes-mgr pause (hermes-mgr status shows which)"),
            Some("hermes-mgr resume ID when each may go on"),
        ));
    }
    out
}

/// What `hermes-dispatcher.service` last said of itself: it says `FAILING to start workers`
/// while its own side (systemd, D-Bus, descriptors, its directories) fails — never the
/// tasks' fault, and never counted against them, but nothing runs meanwhile.
async fn dispatcher_health(sd: &Systemd) -> Vec<Check> {
    const SERVICE: &str = "hermes-dispatcher.service";
    match sd.status_text(SERVICE).await {
        Ok(Some(text)) if text.starts_with("FAILING") => vec![check(
            "dispatcher health",
            Level::Fail,
            crate::text::clean(&text),
            Some("journalctl -u hermes-dispatcher names the failing step; tasks are requeued, not charged"),
        )],
        Ok(Some(text)) if !text.is_empty() => vec![check(
            "dispatcher health",
            Level::Ok,
            crate::text::clean(&text),
            None,
        )],
        _ => Vec::new(),
    }
}

/// Admission by pressure: off, admitting, or holding new workers (and why), now.
fn admission(cfg: &Config) -> Check {
    if cfg.admission().none() {
        return check(
            "admission",
            Level::Ok,
            "by pressure: off (no admit_* threshold set)",
            None,
        );
    }
    let limits = cfg.admission();
    let wants_psi = limits.memory_pressure.is_some()
        || limits.cpu_pressure.is_some()
        || limits.io_pressure.is_some();
    if wants_psi && !crate::liveness::has_psi() {
        return check(
            "admission",
            Level::Warn,
            "admit_*_pressure_percent is set, but this kernel gives no pressure figures (/proc/pressure): those thresholds hold nothing",
            Some("boot with psi=1 (a kernel built with CONFIG_PSI_DEFAULT_DISABLED), or use admit_memory_available_bytes"),
        );
    }
    match crate::dispatch::pressure_hold(cfg) {
        Some(why) => check(
            "admission",
            Level::Warn,
            format!("holding new workers: {why}"),
            Some("the host is busy: ready tasks wait and start once it is not; or raise the threshold (hermes-mgr.toml(5))"),
        ),
        None => check(
            "admission",
            Level::Ok,
            "by pressure: admitting (every figure within its threshold)",
            None,
        ),
    }
}

/// Where the metrics go, and whether the dispatcher's latest are fresh.
fn metrics(cfg: &Config) -> Check {
    let age = std::fs::metadata(crate::state_dir::metrics_path(&cfg.state_dir))
        .and_then(|m| m.modified())
        .ok()
        .map(|t| t.elapsed().unwrap_or_default().as_secs());
    let textfile = cfg.metrics_textfile_dir.is_dir();
    metrics_check(
        age,
        cfg.metrics_interval_seconds,
        textfile.then_some(cfg.metrics_textfile_dir.as_path()),
        cfg.metrics_listen.as_deref(),
    )
}

/// `metrics`, from the facts: the latest metrics' age, how often they are written, the
/// textfile directory when it exists, the endpoint when one is set.
fn metrics_check(
    age: Option<u64>,
    every: u64,
    textfile: Option<&std::path::Path>,
    listen: Option<&str>,
) -> Check {
    let mut to = vec!["hermes-mgr metrics".to_string()];
    to.extend(textfile.map(|d| format!("node_exporter ({})", d.join("hermes-mgr.prom").display())));
    to.extend(listen.map(|l| format!("http://{l}/metrics")));
    let to = to.join(", ");
    match age {
        None => check(
            "metrics",
            Level::Warn,
            format!("none written yet; once the dispatcher runs, every {every} s to {to}"),
            Some("systemctl start hermes-dispatcher"),
        ),
        Some(a) if a > 3 * every + 5 => check(
            "metrics",
            Level::Warn,
            format!("last written {a} s ago, though every {every} s is due: the dispatcher is down or stuck; to {to}"),
            Some("systemctl status hermes-dispatcher"),
        ),
        Some(a) => check(
            "metrics",
            Level::Ok,
            format!("written {a} s ago, every {every} s, to {to}"),
            None,
        ),
    }
}

/// The worker user exists and is not root.
fn worker_user(cfg: &Config) -> Vec<Check> {
    let mut out = Vec::new();
    match nix::unistd::User::from_name(&cfg.worker_user) {
        Ok(Some(u)) if !u.uid.is_root() => out.push(check(
            "worker user",
            Level::Ok,
            format!("{} (uid {})", u.name, u.uid),
            None,
        )),
        Ok(Some(_)) => out.push(check(
            "worker user",
            Level::Fail,
            "worker_user is root",
            Some("workers never run as root: create a user and set worker_user"),
        )),
        _ => out.push(check(
            "worker user",
            Level::Fail,
            format!("user {:?} does not exist", cfg.worker_user),
            Some("useradd --system --user-group hermes, or set worker_user"),
        )),
    }
    out
}

/// The worker binary resolves.
fn worker_binary(cfg: &Config) -> Vec<Check> {
    let mut out = Vec::new();
    match crate::spawn::resolve_binary(&cfg.hermes_bin) {
        Ok(p) => {
            out.push(check(
                "worker binary",
                Level::Ok,
                p.display().to_string(),
                None,
            ));
            out.push(hermes_version(&p));
        }
        Err(e) => out.push(check(
            "worker binary",
            Level::Fail,
            e,
            Some("install hermes-agent or set hermes_bin"),
        )),
    }
    out
}

/// Which Hermes the workers run, and the contract they get.
fn hermes_version(bin: &std::path::Path) -> Check {
    use crate::spawn::installed::{self, Contract};
    let proven = installed::PROVEN.join(", ");
    match installed::of_binary(bin) {
        Some(h) => {
            let gets = h.generation().version();
            match h.contract() {
                Contract::Proven => check(
                    "hermes version",
                    Level::Ok,
                    format!("{h}: its workers get its own contract, proven against its own code"),
                    None,
                ),
                Contract::Unproven => check(
                    "hermes version",
                    Level::Warn,
                    format!(
                        "{h}: not one of the versions whose contract hermes-mgr proves ({proven}); its workers get {gets}'s, with its own code asked for toolsets and worktrees"
                    ),
                    Some("see README, \"Which Hermes\""),
                ),
                Contract::Older => check(
                    "hermes version",
                    Level::Warn,
                    format!("{h}: older than {}, the oldest Hermes hermes-mgr serves", installed::PROVEN[0]),
                    Some("upgrade hermes-agent"),
                ),
            }
        }
        None => check(
            "hermes version",
            Level::Warn,
            format!(
                "{}: no Hermes package found beside its interpreter (not a Python script, or not installed from a package); its workers get 0.19.0's contract",
                bin.display()
            ),
            Some("set hermes_bin to the `hermes` script of a hermes-agent installation"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::{favordynmods, memory_monitor, metrics_check, room, Level};
    use crate::liveness::MemoryMonitor;

    #[test]
    fn metrics_are_fresh_stale_or_not_yet_there_and_say_where_they_go() {
        let dir = std::path::Path::new("/var/lib/prometheus/node-exporter");
        for (age, textfile, listen, level, says) in [
            (
                Some(3),
                None,
                None,
                Level::Ok,
                "written 3 s ago, every 15 s, to hermes-mgr metrics",
            ),
            (
                Some(50),
                Some(dir),
                None,
                Level::Ok,
                "node_exporter (/var/lib/prometheus/node-exporter/hermes-mgr.prom)",
            ),
            (
                Some(51),
                None,
                Some("127.0.0.1:9469"),
                Level::Warn,
                "last written 51 s ago",
            ),
            (
                Some(0),
                None,
                Some("127.0.0.1:9469"),
                Level::Ok,
                "http://127.0.0.1:9469/metrics",
            ),
            (None, None, None, Level::Warn, "none written yet"),
        ] {
            let c = metrics_check(age, 15, textfile, listen);
            assert_eq!(c.level, level, "{age:?}");
            assert!(c.detail.contains(says), "{}", c.detail);
        }
    }

    #[test]
    fn the_smallest_kernel_limit_bounds_the_workers_a_cap_may_ask_for() {
        // (pid_max, threads-max, slice pids.max, kanban.max_spawn) -> level, limit named
        let rows = [
            (
                (32768, 192729, Some(65536), Some(10_000)),
                Level::Ok,
                "kernel.pid_max",
            ),
            (
                (32768, 192729, Some(65536), Some(20_000)),
                Level::Warn,
                "kernel.pid_max",
            ),
            (
                (4194304, 192729, Some(65536), Some(40_000)),
                Level::Warn,
                "TasksMax",
            ),
            (
                (4194304, 30_000, None, Some(16_000)),
                Level::Warn,
                "threads-max",
            ),
            ((32768, 192729, None, None), Level::Ok, "kernel.pid_max"),
        ];
        for ((pid_max, threads, slice, cap), level, named) in rows {
            let c = room(pid_max, threads, slice, cap);
            assert_eq!(c.level, level, "{c:?}");
            assert!(c.detail.contains(named), "{c:?}");
            assert_eq!(c.fix.is_some(), level == Level::Warn, "{c:?}");
        }
    }

    #[test]
    fn favordynmods_is_read_from_the_cgroup2_mount_only() {
        let plain =
            "71 70 0:38 / /sys/fs/cgroup rw,nosuid,relatime - cgroup2 cgroup2 rw,nsdelegate\n";
        let favoured =
            "71 70 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate,favordynmods\n";
        let elsewhere =
            "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,favordynmods\n";
        assert_eq!(favordynmods(plain), Some(false));
        assert_eq!(favordynmods(favoured), Some(true));
        assert_eq!(favordynmods(elsewhere), None);
        assert_eq!(favordynmods(""), None);
    }

    #[test]
    fn a_physical_memory_monitor_is_a_warning_only_where_thousands_of_workers_may_run() {
        let reclaim = || MemoryMonitor {
            name: "the damon_reclaim module".into(),
            off: "echo N > /sys/module/damon_reclaim/parameters/enabled".into(),
        };
        // (monitors, kanban.max_spawn) -> level
        let rows = [
            (vec![], None, Level::Ok),
            (vec![], Some(10_000), Level::Ok),
            (vec![reclaim()], Some(8), Level::Ok),
            (vec![reclaim()], Some(999), Level::Ok),
            (vec![reclaim()], Some(1000), Level::Warn),
            (vec![reclaim()], None, Level::Warn),
        ];
        for (monitors, cap, level) in rows {
            let c = memory_monitor(&monitors, cap);
            assert_eq!(c.level, level, "{c:?}");
            assert_eq!(
                c.detail.contains("damon_reclaim"),
                !monitors.is_empty(),
                "{c:?}"
            );
            match level {
                Level::Warn => assert!(c
                    .fix
                    .unwrap()
                    .contains("echo N > /sys/module/damon_reclaim")),
                _ => assert!(c.fix.is_none()),
            }
        }
    }
}
