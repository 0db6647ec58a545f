//! `/etc/hermes-mgr/config.toml`: every key optional, every default documented here and in
//! `hermes-mgr.toml(5)`. Unknown keys are an error, so a typo is not silently ignored.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

pub const DEFAULT_PATH: &str = "/etc/hermes-mgr/config.toml";

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The worker binary (`hermes`); `$HERMES_BIN` overrides it. Searched on `$PATH` when
    /// it has no slash.
    pub hermes_bin: String,
    /// The user workers run as; never root.
    pub worker_user: String,
    /// The slice worker scopes go into.
    pub slice: String,
    /// SIGTERM → SIGKILL delay when a worker's scope is stopped (`TimeoutStopSec`).
    pub stop_timeout_seconds: u64,
    /// How long systemd may take to create a scope before the spawn counts as failed.
    pub start_timeout_seconds: u64,
    /// `MemoryMax=` per worker scope, in bytes; unset = no limit.
    pub memory_max_bytes: Option<u64>,
    /// `TasksMax=` per worker scope; unset = systemd's default.
    pub tasks_max: Option<u64>,
    /// `CPUQuota=` per worker scope, in percent of one CPU; unset = no limit.
    pub cpu_quota_percent: Option<u64>,
    /// Claim TTL in seconds (`HERMES_KANBAN_CLAIM_TTL_SECONDS` overrides it, as upstream).
    pub claim_ttl_seconds: i64,
    /// Consecutive failures before a task is blocked (`kanban.failure_limit`).
    pub failure_limit: i64,
    /// At most this many live workers per board (`kanban.max_spawn`).
    pub max_spawn: usize,
    /// Tasks without an assignee go to this profile; unset = they are skipped.
    pub default_assignee: Option<String>,
    /// Runtime state: exit statuses of runs, written by each run's supervisor.
    pub state_dir: PathBuf,
    /// Parent of each run's private `TMPDIR` (removed when the run ends).
    pub tmp_root: PathBuf,
    /// Also append worker output to upstream's `<root>/kanban/logs/<task>.log` (rotated at
    /// 2 MiB, one `.log.1` kept), so `hermes kanban log` keeps working.
    pub worker_log_file: bool,
    /// The daemon's safety-net pass, in seconds (events do the real work).
    pub tick_seconds: u64,
    /// A worker whose run was closed by someone else (its own complete/block, an operator's
    /// reclaim) may take this long to exit before its scope is stopped.
    pub verdict_grace_seconds: u64,
    /// After a rate-limited exit (75), the task waits this long before it is dispatched again.
    pub rate_limit_cooldown_seconds: i64,
    /// How long the daemon waits for a locked board per attempt before retrying later.
    pub busy_timeout_ms: u64,
    /// On SIGTERM, stop every worker too (default: leave them running; the next start adopts them).
    pub stop_workers_on_exit: bool,
    /// Variables of the dispatcher's environment that workers get, beside `PATH`, `LANG`,
    /// `LANGUAGE`, `LC_*`, `TZ` and the Hermes contract (e.g. `["OPENROUTER_API_KEY"]`, set
    /// for the service with `Environment=` or `EnvironmentFile=`). Nothing else passes.
    pub pass_environment: Vec<String>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            hermes_bin: "hermes".into(),
            worker_user: "hermes".into(),
            slice: "hermes-workers.slice".into(),
            stop_timeout_seconds: 30,
            start_timeout_seconds: 30,
            memory_max_bytes: None,
            tasks_max: None,
            cpu_quota_percent: None,
            claim_ttl_seconds: crate::board::DEFAULT_CLAIM_TTL,
            failure_limit: crate::board::DEFAULT_FAILURE_LIMIT,
            max_spawn: 8,
            default_assignee: None,
            state_dir: "/run/hermes-mgr".into(),
            tmp_root: "/tmp".into(),
            worker_log_file: false,
            tick_seconds: 30,
            verdict_grace_seconds: 30,
            rate_limit_cooldown_seconds: 300,
            busy_timeout_ms: 2000,
            stop_workers_on_exit: false,
            pass_environment: Vec::new(),
        }
    }
}

impl Config {
    /// Read `path`; a missing file at the default path means all defaults, a missing file
    /// that was asked for by name is an error. Environment overrides are applied last.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_PATH), false),
        };
        let mut cfg = match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text)
                .with_context(|| format!("{}: invalid configuration", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Config::default(),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot read configuration {}", path.display()))
            }
        };
        if let Some(bin) = std::env::var("HERMES_BIN")
            .ok()
            .filter(|b| !b.trim().is_empty())
        {
            cfg.hermes_bin = bin;
        }
        if let Some(ttl) = std::env::var("HERMES_KANBAN_CLAIM_TTL_SECONDS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
        {
            cfg.claim_ttl_seconds = ttl;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.worker_user.is_empty(), "worker_user must name a user");
        anyhow::ensure!(
            self.worker_user != "root",
            "worker_user = \"root\": workers never run as root; create a user (e.g. `hermes`)"
        );
        anyhow::ensure!(
            self.slice.ends_with(".slice"),
            "slice {:?} must end in .slice",
            self.slice
        );
        anyhow::ensure!(
            self.claim_ttl_seconds > 0,
            "claim_ttl_seconds must be positive"
        );
        anyhow::ensure!(self.failure_limit > 0, "failure_limit must be positive");
        anyhow::ensure!(
            self.stop_timeout_seconds > 0,
            "stop_timeout_seconds must be positive"
        );
        anyhow::ensure!(
            self.start_timeout_seconds > 0,
            "start_timeout_seconds must be positive"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_parses_and_typos_are_refused() {
        let c: Config = toml::from_str(
            r#"hermes_bin = "/opt/hermes/bin/hermes"
               worker_user = "worker"
               memory_max_bytes = 1073741824
               cpu_quota_percent = 150
               max_spawn = 3"#,
        )
        .unwrap();
        assert_eq!(
            (c.max_spawn, c.memory_max_bytes, c.stop_timeout_seconds),
            (3, Some(1 << 30), 30)
        );
        assert!(toml::from_str::<Config>("max_spwan = 3").is_err());
        let root = Config {
            worker_user: "root".into(),
            ..Config::default()
        };
        assert!(root.validate().is_err());
    }
}
