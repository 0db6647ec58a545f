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
    /// Consecutive failures before a task is blocked. Hermes' `kanban.failure_limit`; set
    /// here only by installs from before hermes-mgr read Hermes' `config.yaml` (set in both,
    /// this one is used, with a warning).
    pub failure_limit: i64,
    /// At most this many live workers per board. Hermes' `kanban.max_spawn`; unset = no
    /// cap, as upstream. Same rule as `failure_limit`.
    pub max_spawn: Option<usize>,
    /// Tasks without an assignee go to this profile; unset = they are skipped. Hermes'
    /// `kanban.default_assignee`; same rule as `failure_limit`.
    pub default_assignee: Option<String>,
    /// Runtime state: exit statuses of runs, written by each run's supervisor.
    pub state_dir: PathBuf,
    /// Parent of each run's private `TMPDIR` (removed when the run ends).
    pub tmp_root: PathBuf,
    /// Operators' holds (`hermes-mgr pause`): kept across restarts and reboots, root's.
    pub holds_file: PathBuf,
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
    /// At most this many boards of the Hermes root are served (the default board first, then
    /// by name); the rest are named in the journal and the status. Anyone who writes the root
    /// can make boards, and each served one costs a connection and an inotify watch.
    pub max_boards: usize,
    /// On SIGTERM, stop every worker too (default: leave them running; the next start adopts them).
    pub stop_workers_on_exit: bool,
    /// Admission by pressure: a worker starts only while the workers' slice's and the host's
    /// `some avg10` of memory (CPU, IO) is at most this percent; unset = not looked at.
    pub admit_memory_pressure_percent: Option<f64>,
    pub admit_cpu_pressure_percent: Option<f64>,
    pub admit_io_pressure_percent: Option<f64>,
    /// A worker starts only while the host's `MemAvailable` is at least this; unset = not
    /// looked at.
    pub admit_memory_available_bytes: Option<u64>,
    /// How often the daemon gathers its metrics and writes them out, in seconds.
    pub metrics_interval_seconds: u64,
    /// node_exporter's textfile collector directory: `hermes-mgr.prom` is written there
    /// when the directory exists (Debian's `prometheus-node-exporter` makes it).
    pub metrics_textfile_dir: PathBuf,
    /// Serve the metrics over HTTP too: `127.0.0.1:PORT`, `[::1]:PORT` or `unix:PATH`;
    /// unset = no listening socket.
    pub metrics_listen: Option<String>,
    /// Variables of the dispatcher's environment that workers get, beside `PATH`, `LANG`,
    /// `LANGUAGE`, `LC_*`, `TZ` and the Hermes contract (e.g. `["OPENROUTER_API_KEY"]`, set
    /// for the service with `Environment=` or `EnvironmentFile=`). Nothing else passes.
    pub pass_environment: Vec<String>,
    /// Named capacity pools (`[pools.NAME]`): each a slice of its own under `slice`, with its
    /// limits, its cap on running workers (across every board) and its own admission; a task
    /// goes to the pool that lists its profile (assignee), else to `slice` as without pools.
    pub pools: std::collections::BTreeMap<String, Pool>,
    /// The worker sandbox (`spawn::sandbox`): `true` for every worker, or the profiles whose
    /// workers get it (`["coder"]`); default `false`.
    pub sandbox: SandboxSetting,
    /// Hermes' `kanban.max_in_progress`: per board up to 0.20, for the host from 0.22 on
    /// (`dispatch::caps`).
    #[serde(skip)]
    pub max_in_progress: Option<usize>,
    /// Hermes' `kanban.max_in_progress_per_profile`: live workers per assignee.
    #[serde(skip)]
    pub max_in_progress_per_profile: Option<usize>,
    /// Hermes' `kanban.auto_decompose` and `auto_decompose_per_tick`.
    #[serde(skip)]
    pub auto_decompose: bool,
    #[serde(skip)]
    pub auto_decompose_per_tick: usize,
    /// Hermes' `kanban.dispatch_stale_timeout_seconds` (0 = off).
    #[serde(skip)]
    pub stale_timeout_seconds: i64,
    /// Where each Hermes kanban setting came from: a file, or `default`.
    #[serde(skip)]
    pub sources: std::collections::BTreeMap<String, String>,
    /// Values in Hermes' files that upstream would ignore (it warns; so do we).
    #[serde(skip)]
    pub warnings: Vec<String>,
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
            max_spawn: None,
            default_assignee: None,
            state_dir: "/run/hermes-mgr".into(),
            tmp_root: "/tmp".into(),
            holds_file: "/var/lib/hermes-mgr/holds.json".into(),
            worker_log_file: false,
            tick_seconds: 30,
            verdict_grace_seconds: 30,
            rate_limit_cooldown_seconds: 300,
            busy_timeout_ms: 2000,
            max_boards: 100,
            stop_workers_on_exit: false,
            admit_memory_pressure_percent: None,
            admit_cpu_pressure_percent: None,
            admit_io_pressure_percent: None,
            admit_memory_available_bytes: None,
            metrics_interval_seconds: 15,
            metrics_textfile_dir: "/var/lib/prometheus/node-exporter".into(),
            metrics_listen: None,
            pass_environment: Vec::new(),
            pools: Default::default(),
            sandbox: SandboxSetting::All(false),
            max_in_progress: None,
            max_in_progress_per_profile: None,
            auto_decompose: true,
            auto_decompose_per_tick: 3,
            stale_timeout_seconds: 14400,
            sources: Default::default(),
            warnings: Vec::new(),
        }
    }
}

/// One capacity pool (`[pools.NAME]`): the slice `<slice stem>-NAME.slice`, a child of the
/// workers' slice, whose limits cover every worker of the profiles it lists, on every board.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Pool {
    /// The Hermes profiles (task assignees) whose workers run in this pool.
    pub profiles: Vec<String>,
    /// At most this many of its workers run at once, every board counted; unset = no cap.
    pub max_workers: Option<usize>,
    /// The slice's `MemoryMax=`: what all its workers together may use.
    pub memory_max_bytes: Option<u64>,
    /// What one worker of the pool is expected to need: a worker starts only while the
    /// pool's workers, each counted at least this much, leave room for it under
    /// `memory_max_bytes` (which it requires). The kernel's averages cannot see a burst
    /// coming; this can.
    pub memory_per_worker_bytes: Option<u64>,
    /// The slice's `CPUQuota=`, in percent of one CPU.
    pub cpu_quota_percent: Option<u64>,
    /// The slice's `CPUWeight=` (1–10000; systemd's default 100).
    pub cpu_weight: Option<u64>,
    /// The slice's `TasksMax=`.
    pub tasks_max: Option<u64>,
    /// Admission by the pool slice's own pressure (`some avg10`, percent), as the `admit_*`
    /// keys do for the workers' slice.
    pub admit_memory_pressure_percent: Option<f64>,
    pub admit_cpu_pressure_percent: Option<f64>,
    pub admit_io_pressure_percent: Option<f64>,
}

/// `sandbox`: every worker (`true`), none (`false`), or those of the profiles listed.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(untagged)]
pub enum SandboxSetting {
    All(bool),
    Profiles(Vec<String>),
}

impl Default for SandboxSetting {
    fn default() -> Self {
        SandboxSetting::All(false)
    }
}

impl SandboxSetting {
    /// Whether workers of `profile` run in the sandbox.
    pub fn covers(&self, profile: &str) -> bool {
        match self {
            SandboxSetting::All(on) => *on,
            SandboxSetting::Profiles(p) => p.iter().any(|x| x == profile),
        }
    }
}

/// At most this many pools: each is a slice, read on the passes that start its workers.
pub const MAX_POOLS: usize = 32;

impl Pool {
    /// The thresholds of admission by the pool slice's pressure.
    pub fn admission(&self) -> crate::admission::Limits {
        crate::admission::Limits {
            memory_pressure: self.admit_memory_pressure_percent,
            cpu_pressure: self.admit_cpu_pressure_percent,
            io_pressure: self.admit_io_pressure_percent,
            memory_available: None,
        }
    }

    fn validate(&self, name: &str) -> anyhow::Result<()> {
        let ok = name.len() <= 32
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        anyhow::ensure!(
            ok,
            "pool {name:?}: a pool's name is a lowercase letter, then letters, digits or _ (at most 32): it names a slice, where - would nest it"
        );
        anyhow::ensure!(
            !self.profiles.is_empty(),
            "pool {name}: profiles is empty, so no task would ever run in it"
        );
        for p in &self.profiles {
            anyhow::ensure!(
                crate::names::profile_name(p).as_deref() == Some(p.as_str()),
                "pool {name}: {p:?} is not a Hermes profile name (lowercase letters, digits, - and _)"
            );
        }
        anyhow::ensure!(
            self.max_workers != Some(0),
            "pool {name}: max_workers = 0 would never start a worker; remove the pool instead"
        );
        if let Some(per) = self.memory_per_worker_bytes {
            let Some(max) = self.memory_max_bytes else {
                anyhow::bail!("pool {name}: memory_per_worker_bytes is counted against memory_max_bytes, which is not set");
            };
            anyhow::ensure!(
                per > 0 && per <= max,
                "pool {name}: memory_per_worker_bytes = {per} must be between 1 and memory_max_bytes = {max}"
            );
        }
        anyhow::ensure!(
            self.cpu_quota_percent != Some(0),
            "pool {name}: cpu_quota_percent = 0 would starve its workers"
        );
        if let Some(w) = self.cpu_weight {
            anyhow::ensure!(
                (1..=10_000).contains(&w),
                "pool {name}: cpu_weight = {w}: 1 to 10000"
            );
        }
        percents(&self.admission()).map_err(|e| anyhow::anyhow!("pool {name}: {e}"))
    }
}

/// The pressure thresholds of `l` are percents.
fn percents(l: &crate::admission::Limits) -> anyhow::Result<()> {
    for (key, v) in [
        ("admit_memory_pressure_percent", l.memory_pressure),
        ("admit_cpu_pressure_percent", l.cpu_pressure),
        ("admit_io_pressure_percent", l.io_pressure),
    ] {
        if let Some(v) = v {
            anyhow::ensure!(
                (0.0..=100.0).contains(&v),
                "{key} = {v}: a percent, 0 to 100"
            );
        }
    }
    Ok(())
}

/// The keys both files know. Hermes' `config.yaml` is where they belong.
const SHARED_KEYS: [&str; 3] = ["failure_limit", "max_spawn", "default_assignee"];

impl Config {
    /// Read `path`; a missing file at the default path means all defaults, a missing file
    /// that was asked for by name is an error. Environment overrides are applied last.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        Config::load_with(path, &crate::hermes_config::Files::from_env())
    }

    /// `load`, with Hermes' own `kanban:` settings from `hermes` (its `config.yaml` and
    /// managed layer). Those files never make this an error: a file upstream cannot use, or a
    /// key set in both, is a warning (`warnings`) naming what was used instead.
    pub fn load_with(
        path: Option<&Path>,
        hermes: &crate::hermes_config::Files,
    ) -> anyhow::Result<Config> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_PATH), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => String::new(),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot read configuration {}", path.display()))
            }
        };
        let mut cfg: Config = toml::from_str(&text)
            .with_context(|| format!("{}: invalid configuration", path.display()))?;
        let ours: toml::Table = toml::from_str(&text).unwrap_or_default();
        // Hermes' files are written by their owner, and so possibly by a worker: nothing in
        // them may keep the dispatcher down (a restart would then be an outage). A file
        // upstream cannot use leaves its settings at upstream's defaults, loudly; a key also
        // set here keeps the operator's value.
        let mut warnings = Vec::new();
        let theirs = crate::hermes_config::load(hermes).unwrap_or_else(|e| {
            warnings.push(format!(
                "{e:#}: Hermes' kanban settings are at upstream's defaults until it is fixed"
            ));
            crate::hermes_config::Loaded::default()
        });
        for key in SHARED_KEYS {
            if let (true, Some(yaml)) = (ours.contains_key(key), theirs.sources.get(key)) {
                warnings.push(format!(
                    "{key} is set in both {} and {}: using {}'s; it is Hermes' setting (kanban.{key}): remove it from {}",
                    path.display(),
                    yaml.display(),
                    path.display(),
                    path.display()
                ));
            }
        }
        let k = &theirs.kanban;
        let source = |key: &str| -> String {
            if ours.contains_key(key) {
                path.display().to_string()
            } else {
                theirs
                    .sources
                    .get(key)
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "default".into())
            }
        };
        for key in SHARED_KEYS.iter().chain(&[
            "max_in_progress",
            "max_in_progress_per_profile",
            "auto_decompose",
            "auto_decompose_per_tick",
            "dispatch_stale_timeout_seconds",
        ]) {
            cfg.sources.insert(key.to_string(), source(key));
        }
        if !ours.contains_key("failure_limit") {
            cfg.failure_limit = k.failure_limit;
        }
        if !ours.contains_key("default_assignee") {
            cfg.default_assignee = k.default_assignee.clone();
        }
        if !ours.contains_key("max_spawn") {
            cfg.max_spawn = k.max_spawn;
        }
        // How it counts depends on the Hermes served (`dispatch::caps`).
        cfg.max_in_progress = k.max_in_progress;
        cfg.max_in_progress_per_profile = k.max_in_progress_per_profile;
        cfg.auto_decompose = k.auto_decompose;
        cfg.auto_decompose_per_tick = k.auto_decompose_per_tick;
        cfg.stale_timeout_seconds = k.dispatch_stale_timeout_seconds;
        warnings.extend(theirs.warnings);
        cfg.warnings = warnings;
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

    /// The thresholds of admission by pressure.
    pub fn admission(&self) -> crate::admission::Limits {
        crate::admission::Limits {
            memory_pressure: self.admit_memory_pressure_percent,
            cpu_pressure: self.admit_cpu_pressure_percent,
            io_pressure: self.admit_io_pressure_percent,
            memory_available: self.admit_memory_available_bytes,
        }
    }

    /// The pool a worker of `profile` runs in, if any.
    pub fn pool_of(&self, profile: &str) -> Option<(&str, &Pool)> {
        self.pools
            .iter()
            .find(|(_, p)| p.profiles.iter().any(|x| x == profile))
            .map(|(n, p)| (n.as_str(), p))
    }

    /// The slice of pool `name`.
    pub fn pool_slice(&self, name: &str) -> String {
        crate::names::pool_slice(&self.slice, name)
    }

    /// The slice a worker scope `unit` of `profile` goes into: its pool's, or one of the
    /// workers' slice's children (`names::worker_slice`).
    pub fn worker_slice(&self, profile: Option<&str>, unit: &str) -> String {
        match profile.and_then(|p| self.pool_of(p)) {
            Some((name, _)) => self.pool_slice(name),
            None => crate::names::worker_slice(&self.slice, unit),
        }
    }

    /// The cgroup (`/hermes.slice/…/unit`) of a live worker scope `unit` of `profile`:
    /// where this configuration puts it, else wherever one of its slices holds it (started
    /// before a pool was added, changed or removed; or flat in `slice`, by an older version).
    pub fn worker_cgroup(&self, profile: Option<&str>, unit: &str) -> String {
        let mut slices = vec![self.worker_slice(profile, unit)];
        for s in std::iter::once(crate::names::worker_slice(&self.slice, unit))
            .chain(self.pools.keys().map(|n| self.pool_slice(n)))
            .chain(std::iter::once(self.slice.clone()))
        {
            if !slices.contains(&s) {
                slices.push(s);
            }
        }
        let candidates: Vec<String> = slices
            .iter()
            .map(|s| crate::liveness::unit_cgroup(s, unit))
            .collect();
        crate::liveness::first_existing(&candidates)
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
        anyhow::ensure!(self.max_boards > 0, "max_boards must be positive");
        anyhow::ensure!(
            self.stop_timeout_seconds > 0,
            "stop_timeout_seconds must be positive"
        );
        anyhow::ensure!(
            self.start_timeout_seconds > 0,
            "start_timeout_seconds must be positive"
        );
        percents(&self.admission())?;
        anyhow::ensure!(
            self.pools.len() <= MAX_POOLS,
            "{} pools: at most {MAX_POOLS}",
            self.pools.len()
        );
        let mut owner: std::collections::HashMap<&str, &str> = Default::default();
        for (name, pool) in &self.pools {
            pool.validate(name)?;
            for p in &pool.profiles {
                if let Some(other) = owner.insert(p, name) {
                    anyhow::bail!("profile {p} is in two pools, {other} and {name}: a worker runs in one slice");
                }
            }
        }
        anyhow::ensure!(
            self.metrics_interval_seconds > 0,
            "metrics_interval_seconds must be positive"
        );
        if let Some(l) = &self.metrics_listen {
            l.parse::<crate::metrics::serve::Listen>()
                .map_err(|e| anyhow::anyhow!("metrics_listen: {e}"))?;
        }
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
            (Some(3), Some(1 << 30), 30)
        );
        assert!(toml::from_str::<Config>("max_spwan = 3").is_err());
        let root = Config {
            worker_user: "root".into(),
            ..Config::default()
        };
        assert!(root.validate().is_err());
    }

    #[test]
    fn pools_parse_and_what_cannot_work_is_refused() {
        let ok = |t: &str| -> anyhow::Result<Config> {
            let c: Config = toml::from_str(t)?;
            c.validate()?;
            Ok(c)
        };
        let c = ok("[pools.build]\nprofiles = [\"builder\", \"ci\"]\nmax_workers = 2\nmemory_max_bytes = 4096\nmemory_per_worker_bytes = 1024\n[pools.gpu]\nprofiles = [\"local\"]\n").unwrap();
        assert_eq!(c.pool_of("ci").map(|(n, _)| n), Some("build"));
        assert_eq!(c.pool_of("local").map(|(n, _)| n), Some("gpu"));
        assert_eq!(c.pool_of("default"), None);
        assert_eq!(
            c.worker_slice(Some("ci"), "u.scope"),
            "hermes-workers-build.slice"
        );
        assert_eq!(
            c.worker_slice(Some("default"), "u.scope"),
            crate::names::worker_slice("hermes-workers.slice", "u.scope")
        );
        for (bad, says) in [
            ("[pools.Build]\nprofiles = [\"a\"]", "lowercase letter"),
            ("[pools.a-b]\nprofiles = [\"a\"]", "nest"),
            ("[pools.07]\nprofiles = [\"a\"]", "lowercase letter"),
            ("[pools.a]\n", "profiles is empty"),
            ("[pools.a]\nprofiles = [\"A B\"]", "not a Hermes profile"),
            (
                "[pools.a]\nprofiles = [\"x\"]\n[pools.b]\nprofiles = [\"x\"]",
                "two pools",
            ),
            (
                "[pools.a]\nprofiles = [\"x\"]\nmax_workers = 0",
                "max_workers = 0",
            ),
            (
                "[pools.a]\nprofiles = [\"x\"]\nmemory_per_worker_bytes = 1",
                "not set",
            ),
            (
                "[pools.a]\nprofiles = [\"x\"]\nmemory_max_bytes = 1\nmemory_per_worker_bytes = 2",
                "between 1 and",
            ),
            (
                "[pools.a]\nprofiles = [\"x\"]\ncpu_weight = 0",
                "1 to 10000",
            ),
            (
                "[pools.a]\nprofiles = [\"x\"]\nadmit_io_pressure_percent = 101.0",
                "0 to 100",
            ),
            (
                "[pools.a]\nprofiles = [\"x\"]\nmax_wrokers = 1",
                "unknown field",
            ),
        ] {
            let e = format!("{:#}", ok(bad).unwrap_err());
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    fn with_files(toml: &str, yaml: &str) -> anyhow::Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("config.toml");
        std::fs::write(&t, toml).unwrap();
        let y = dir.path().join("config.yaml");
        std::fs::write(&y, yaml).unwrap();
        Config::load_with(
            Some(&t),
            &crate::hermes_config::Files {
                user: y,
                managed: None,
            },
        )
    }

    #[test]
    fn hermes_settings_are_honoured_and_hermes_files_never_stop_a_start() {
        let c = with_files(
            "worker_user = \"w\"",
            "kanban:\n  max_spawn: 4\n  max_in_progress: 2\n  failure_limit: 5\n  default_assignee: coder\n  max_in_progress_per_profile: 1\n  auto_decompose: false\n",
        )
        .unwrap();
        assert_eq!(
            (
                c.max_spawn,
                c.max_in_progress,
                c.failure_limit,
                c.default_assignee.as_deref(),
                c.max_in_progress_per_profile,
                c.auto_decompose
            ),
            (Some(4), Some(2), 5, Some("coder"), Some(1), false)
        );
        assert!(c.sources["failure_limit"].ends_with("config.yaml"));
        let c = with_files("max_spawn = 3", "model: {}\n").unwrap();
        assert_eq!((c.max_spawn, c.failure_limit), (Some(3), 2));
        assert!(c.sources["max_spawn"].ends_with("config.toml"));
        assert_eq!(c.sources["failure_limit"], "default");
        // A key in both: the operator's value, and a warning naming both files.
        let c = with_files("max_spawn = 3", "kanban:\n  max_spawn: 4\n").unwrap();
        assert_eq!(c.max_spawn, Some(3));
        let w = c.warnings.join("\n");
        assert!(
            w.contains("config.toml") && w.contains("config.yaml") && w.contains("max_spawn"),
            "{w}"
        );
        // A file upstream cannot use (a worker may write it): upstream's defaults, loudly.
        for bad in ["kanban: 3\n", "kanban:\n  max_spawn: many\n", "kanban: [\n"] {
            let c = with_files("", &format!("{bad}kanban_extra: 1\n")).unwrap();
            assert_eq!((c.max_spawn, c.failure_limit), (None, 2), "{bad:?}");
            let w = c.warnings.join("\n");
            assert!(
                w.contains("config.yaml") && w.contains("defaults"),
                "{bad:?}: {w}"
            );
        }
    }
}
