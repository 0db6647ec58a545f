//! Hermes' own kanban settings: the `kanban:` section of Hermes' `config.yaml`
//! (`$HERMES_HOME/config.yaml`, else `~/.hermes/config.yaml`, as `hermes_cli.config`
//! finds it), with the managed layer (`$HERMES_MANAGED_DIR/config.yaml`, else
//! `/etc/hermes/config.yaml`) over it, read with upstream 0.19.0's meaning and defaults
//! (`gateway/kanban_watchers.py`'s dispatcher watcher). A Hermes user configures the
//! dispatcher once, where Hermes reads it; hermes-mgr's TOML keeps what Hermes has no key
//! for.
//!
//! YAML is parsed as YAML 1.2; PyYAML's 1.1 booleans (`yes`/`no`/`on`/`off`) are read as
//! booleans for the boolean keys, as PyYAML reads them unquoted. `${VAR}` references are not
//! expanded (upstream expands them; a kanban key that uses one is reported invalid).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use yaml_rust2::parser::{Event, MarkedEventReceiver};
use yaml_rust2::scanner::Marker;
use yaml_rust2::{Yaml, YamlLoader};

/// The keys hermes-mgr honours, with upstream's defaults.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Kanban {
    /// `kanban.max_spawn`: at most this many running tasks per board; `None` = no cap.
    pub max_spawn: Option<usize>,
    /// `kanban.max_in_progress`: the same cap, under its other name (0.19.0 counts per
    /// board too); below 1 or invalid = ignored, as upstream.
    pub max_in_progress: Option<usize>,
    /// `kanban.max_in_progress_per_profile`: running tasks per assignee.
    pub max_in_progress_per_profile: Option<usize>,
    /// `kanban.failure_limit` (2): consecutive failures before a task is blocked.
    pub failure_limit: i64,
    /// `kanban.default_assignee`: the profile unassigned ready tasks go to.
    pub default_assignee: Option<String>,
    /// `kanban.auto_decompose` (true) and `auto_decompose_per_tick` (3, at least 1).
    pub auto_decompose: bool,
    pub auto_decompose_per_tick: usize,
    /// `kanban.dispatch_stale_timeout_seconds` (14400; 0 = off): a run going this long with
    /// no heartbeat for an hour is stopped and requeued (`stale`).
    pub dispatch_stale_timeout_seconds: i64,
    /// `kanban.dispatch_in_gateway` (true): whether a gateway would dispatch (and, in
    /// 0.19.0, notify) when it gets the lock. Reported by `doctor`.
    pub dispatch_in_gateway: bool,
}

impl Default for Kanban {
    fn default() -> Kanban {
        Kanban {
            max_spawn: None,
            max_in_progress: None,
            max_in_progress_per_profile: None,
            failure_limit: 2,
            default_assignee: None,
            auto_decompose: true,
            auto_decompose_per_tick: 3,
            dispatch_stale_timeout_seconds: 14400,
            dispatch_in_gateway: true,
        }
    }
}

/// What was read: the settings, the file each key came from, what was wrong.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub kanban: Kanban,
    /// Key → the file that set it (keys left at their default are absent).
    pub sources: BTreeMap<&'static str, PathBuf>,
    /// Values upstream would ignore or replace with its default (it logs a warning).
    pub warnings: Vec<String>,
}

/// Where Hermes' config files are.
#[derive(Debug, Clone)]
pub struct Files {
    pub user: PathBuf,
    pub managed: Option<PathBuf>,
}

impl Files {
    /// As upstream finds them from this process's environment.
    pub fn from_env() -> Files {
        let home = std::env::var_os("HERMES_HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                    .join(".hermes")
            });
        let managed_dir = match std::env::var_os("HERMES_MANAGED_DIR").filter(|d| !d.is_empty()) {
            Some(d) => Some(PathBuf::from(d)),
            None => Some(PathBuf::from("/etc/hermes")),
        }
        .filter(|d| d.is_dir());
        Files {
            user: home.join("config.yaml"),
            managed: managed_dir.map(|d| d.join("config.yaml")),
        }
    }
}

/// The name of Hermes' emergency stop: `hermes pause` (0.22, upstream #81148) writes it in
/// the Hermes home, `hermes resume` removes it; while it exists nothing new is started.
pub const ESTOP: &str = "ESTOP";

/// The emergency stop, as upstream's `agent/estop.py` sees it: the first of `dirs` (the
/// process's Hermes home, then the root it serves) that holds an `ESTOP` of any kind, or
/// any it cannot tell about (fail safe: an error other than "not there" counts as engaged).
/// Looked at with `lstat`: nothing there is followed or read.
pub fn estop(dirs: &[&Path]) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(ESTOP)).find(|p| {
        !matches!(std::fs::symlink_metadata(p), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
    })
}

/// Where the emergency stop of the Hermes root `root` is looked for, from this process: its
/// Hermes home (where `hermes pause` writes), then the root served (upstream's canonical
/// root), once each.
pub fn estop_dirs(root: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Files::from_env()
        .user
        .parent()
        .map(Path::to_path_buf)
        .into_iter()
        .collect();
    if !dirs.iter().any(|d| d == root) {
        dirs.push(root.to_path_buf());
    }
    dirs
}

/// `estop` of `estop_dirs(root)`.
pub fn estop_of_root(root: &Path) -> Option<PathBuf> {
    let dirs = estop_dirs(root);
    estop(&dirs.iter().map(PathBuf::as_path).collect::<Vec<_>>())
}

/// What an engaged emergency stop holds back, for a person.
pub fn estop_text(path: &Path) -> String {
    format!(
        "EMERGENCY STOP: {} exists (hermes pause); no worker or decomposition is started until `hermes resume` removes it; running workers are still supervised and booked",
        path.display()
    )
}

/// The `kanban:` mapping of one file; an absent file is empty. The user's file lives in the
/// Hermes home, which its owner (and so possibly a worker) writes: it is read as that
/// owner, without following a link, at most 4 MiB.
fn kanban_section(path: &Path) -> anyhow::Result<Option<yaml_rust2::yaml::Hash>> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let owner = crate::safe_fs::Owner::of_tree(dir)?;
    let bytes = crate::safe_fs::as_user(&owner, || crate::safe_fs::read_capped(path, 4 << 20))??;
    let Some(bytes) = bytes else {
        return Ok(None);
    };
    let text =
        String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("{}: not UTF-8", path.display()))?;
    let first = load_bounded(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    match first {
        None | Some(Yaml::Null) => Ok(None),
        Some(Yaml::Hash(top)) => match top.get(&Yaml::String("kanban".into())) {
            None | Some(Yaml::Null) => Ok(None),
            Some(Yaml::Hash(k)) => Ok(Some(k.clone())),
            Some(_) => anyhow::bail!("{}: `kanban:` is not a mapping", path.display()),
        },
        Some(_) => anyhow::bail!("{}: not a mapping at the top", path.display()),
    }
}

/// At most this many nodes per file, an alias counting as every node it stands for: a real
/// `config.yaml` has a few hundred; a 455-byte alias bomb stands for billions, and yaml-rust2
/// clones every alias (it would take tens of GB, on the daemon's thread).
const MAX_YAML_NODES: usize = 100_000;
/// At most this deep: dropping a parsed tree recurses once per level.
const MAX_YAML_DEPTH: usize = 64;

/// The first document of `text`, parsed within the node and depth budgets.
fn load_bounded(text: &str) -> Result<Option<Yaml>, String> {
    let mut b = Budgeted::default();
    yaml_rust2::parser::Parser::new_from_str(text)
        .load(&mut b, true)
        .map_err(|e| format!("invalid YAML: {e}"))?;
    if let Some(why) = b.over {
        return Err(why);
    }
    Ok(b.inner.documents().first().cloned())
}

/// yaml-rust2's own loader, fed only while the document stays within the budgets.
#[derive(Default)]
struct Budgeted {
    inner: YamlLoader,
    nodes: usize,
    /// The node count each anchor stands for.
    anchors: HashMap<usize, usize>,
    /// Open collections: (anchor id, node count at their start).
    open: Vec<(usize, usize)>,
    over: Option<String>,
}

impl MarkedEventReceiver for Budgeted {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.over.is_some() {
            return;
        }
        match &ev {
            Event::Scalar(_, _, aid, _) => {
                self.nodes += 1;
                if *aid > 0 {
                    self.anchors.insert(*aid, 1);
                }
            }
            Event::SequenceStart(aid, _) | Event::MappingStart(aid, _) => {
                self.open.push((*aid, self.nodes));
                self.nodes += 1;
                if self.open.len() > MAX_YAML_DEPTH {
                    self.over = Some(format!(
                        "nested deeper than {MAX_YAML_DEPTH} levels (line {})",
                        mark.line()
                    ));
                    return;
                }
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((aid, start)) = self.open.pop() {
                    if aid > 0 {
                        self.anchors.insert(aid, self.nodes - start);
                    }
                }
            }
            Event::Alias(aid) => {
                let n = self.anchors.get(aid).copied().unwrap_or(1);
                self.nodes = self.nodes.saturating_add(n);
            }
            _ => {}
        }
        if self.nodes > MAX_YAML_NODES {
            self.over = Some(format!(
                "more than {MAX_YAML_NODES} YAML nodes, aliases expanded (line {}): refused",
                mark.line()
            ));
            return;
        }
        self.inner.on_event(ev, mark);
    }
}

/// Python's `int(x)` for what YAML gives.
fn as_int(v: &Yaml) -> Option<i64> {
    match v {
        Yaml::Integer(i) => Some(*i),
        Yaml::Real(r) => r
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(|f| f.trunc() as i64),
        Yaml::Boolean(b) => Some(i64::from(*b)),
        Yaml::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Python's `bool(x)` for what PyYAML gives: a plain `yes`/`no`/`on`/`off` is a boolean there.
fn as_bool(v: &Yaml) -> bool {
    match v {
        Yaml::Boolean(b) => *b,
        Yaml::Null | Yaml::BadValue => false,
        Yaml::Integer(i) => *i != 0,
        Yaml::Real(r) => r.parse::<f64>().is_ok_and(|f| f != 0.0),
        Yaml::String(s) => !matches!(
            s.as_str(),
            "" | "no" | "No" | "NO" | "off" | "Off" | "OFF" | "false" | "False" | "FALSE"
        ),
        Yaml::Array(a) => !a.is_empty(),
        Yaml::Hash(h) => !h.is_empty(),
        _ => true,
    }
}

/// Read the files and apply upstream's rules. A value upstream could not use at all (a
/// `max_spawn` that is not a number) is an error naming the file; a value upstream ignores
/// with a warning is ignored with a warning.
pub fn load(files: &Files) -> anyhow::Result<Loaded> {
    // The managed layer wins key by key (upstream's `_deep_merge(user, managed)`).
    let mut merged: BTreeMap<String, (Yaml, PathBuf)> = BTreeMap::new();
    for path in std::iter::once(&files.user).chain(files.managed.as_ref()) {
        if let Some(section) = kanban_section(path)? {
            for (k, v) in section {
                if let Yaml::String(k) = k {
                    merged.insert(k, (v, path.clone()));
                }
            }
        }
    }
    let mut out = Loaded::default();
    // A key set to null: Python's `cfg.get(key, default)` returns None, not the default.
    // For the numbers and the assignee that means "unset"; `bool(None)` is false.
    let mut take_raw = |key: &'static str| -> Option<(Yaml, PathBuf)> {
        let (v, from) = merged.get(key)?.clone();
        out.sources.insert(key, from.clone());
        Some((v, from))
    };
    let mut raw: BTreeMap<&'static str, (Yaml, PathBuf)> = BTreeMap::new();
    for key in [
        "max_spawn",
        "max_in_progress",
        "max_in_progress_per_profile",
        "failure_limit",
        "default_assignee",
        "auto_decompose",
        "auto_decompose_per_tick",
        "dispatch_stale_timeout_seconds",
        "dispatch_in_gateway",
    ] {
        if let Some(v) = take_raw(key) {
            raw.insert(key, v);
        }
    }
    let take = |key: &'static str| -> Option<(Yaml, PathBuf)> {
        raw.get(key)
            .filter(|(v, _)| !matches!(v, Yaml::Null))
            .cloned()
    };
    let take_bool = |key: &'static str| -> Option<Yaml> { raw.get(key).map(|(v, _)| v.clone()) };
    let mut k = Kanban::default();
    let mut warnings = Vec::new();
    if let Some((v, from)) = take("max_spawn") {
        let n = as_int(&v).filter(|n| *n >= 0).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: kanban.max_spawn = {v:?} is not a number of workers",
                from.display()
            )
        })?;
        k.max_spawn = Some(n as usize);
    }
    if let Some((v, from)) = take("max_in_progress") {
        match as_int(&v) {
            Some(n) if n >= 1 => k.max_in_progress = Some(n as usize),
            _ => warnings.push(format!("{}: kanban.max_in_progress = {v:?} is not a number of at least 1; ignored (as upstream)", from.display())),
        }
    }
    if let Some((v, from)) = take("max_in_progress_per_profile") {
        match as_int(&v) {
            Some(n) if n >= 1 => k.max_in_progress_per_profile = Some(n as usize),
            _ => warnings.push(format!("{}: kanban.max_in_progress_per_profile = {v:?} is not a number of at least 1; ignored (as upstream)", from.display())),
        }
    }
    if let Some((v, from)) = take("failure_limit") {
        match as_int(&v) {
            Some(n) if n >= 1 => k.failure_limit = n,
            _ => warnings.push(format!("{}: kanban.failure_limit = {v:?} is not a number of at least 1; using the default 2 (as upstream)", from.display())),
        }
    }
    if let Some((v, from)) = take("default_assignee") {
        match &v {
            Yaml::String(s) => {
                k.default_assignee = Some(s.trim().to_string()).filter(|s| !s.is_empty())
            }
            _ => anyhow::bail!(
                "{}: kanban.default_assignee = {v:?} is not a profile name",
                from.display()
            ),
        }
    }
    if let Some(v) = take_bool("auto_decompose") {
        k.auto_decompose = as_bool(&v);
    }
    if let Some((v, _)) = take("auto_decompose_per_tick") {
        // `int(x or 3)`, at least 1.
        k.auto_decompose_per_tick = match as_int(&v) {
            Some(0) | None => 3,
            Some(n) => n.max(1) as usize,
        };
    }
    // `int(x or 0)`; invalid disables it, with a warning (as upstream).
    if let Some((v, from)) = raw.get("dispatch_stale_timeout_seconds").cloned() {
        k.dispatch_stale_timeout_seconds = match v {
            Yaml::Null => 0,
            ref v => as_int(v).unwrap_or_else(|| {
                warnings.push(format!("{}: kanban.dispatch_stale_timeout_seconds = {v:?} is not a number; stale detection is off (as upstream)", from.display()));
                0
            }),
        };
    }
    if let Some(v) = take_bool("dispatch_in_gateway") {
        k.dispatch_in_gateway = as_bool(&v);
    }
    out.kanban = k;
    out.warnings = warnings;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(user: &str, managed: Option<&str>) -> anyhow::Result<Loaded> {
        let dir = tempfile::tempdir().unwrap();
        let user_path = dir.path().join("config.yaml");
        std::fs::write(&user_path, user).unwrap();
        let managed = managed.map(|m| {
            let p = dir.path().join("managed.yaml");
            std::fs::write(&p, m).unwrap();
            p
        });
        load(&Files {
            user: user_path,
            managed,
        })
    }

    /// The 455-byte "billion laughs" of the attack: nine levels of nine aliases.
    fn alias_bomb() -> String {
        let mut y = String::from(
            "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        for (prev, name) in ["a", "b", "c", "d", "e", "f", "g", "h"]
            .iter()
            .zip(["b", "c", "d", "e", "f", "g", "h", "i"])
        {
            let refs = vec![format!("*{prev}"); 9].join(",");
            y.push_str(&format!("{name}: &{name} [{refs}]\n"));
        }
        y.push_str("kanban:\n  max_spawn: 2\n");
        y
    }

    #[test]
    fn a_yaml_bomb_is_refused_within_its_budget_not_expanded() {
        let bomb = alias_bomb();
        assert!(bomb.len() < 600, "{}", bomb.len());
        let e = load_text(&bomb, None).unwrap_err().to_string();
        assert!(e.contains("more than 100000 YAML nodes"), "{e}");
        assert!(e.contains("config.yaml"), "{e}");
        let deep = format!("kanban: {}1{}\n", "[".repeat(100), "]".repeat(100));
        let e = load_text(&deep, None).unwrap_err().to_string();
        assert!(e.contains("nested deeper than 64 levels"), "{e}");
        // Anchors and aliases a person writes are read as before.
        let l = load_text(
            "base: &base {max_spawn: 3, failure_limit: 4}\nkanban: *base\n",
            None,
        )
        .unwrap();
        assert_eq!((l.kanban.max_spawn, l.kanban.failure_limit), (Some(3), 4));
    }

    #[test]
    fn the_emergency_stop_is_any_estop_in_home_or_root_and_fails_safe() {
        let home = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let dirs = [home.path(), root.path()];
        assert_eq!(estop(&dirs), None);
        std::fs::write(root.path().join(ESTOP), "{}").unwrap();
        assert_eq!(estop(&dirs), Some(root.path().join(ESTOP)));
        // A dangling link or a directory counts (`touch` or `mkdir` would pause upstream too).
        std::os::unix::fs::symlink("/nonexistent", home.path().join(ESTOP)).unwrap();
        assert_eq!(estop(&dirs), Some(home.path().join(ESTOP)));
        // A home it cannot look into (not a directory): engaged, not ignored.
        let file = home.path().join("plain");
        std::fs::write(&file, "").unwrap();
        assert_eq!(estop(&[file.as_path()]), Some(file.join(ESTOP)));
    }

    #[test]
    fn defaults_are_upstreams() {
        let l = load_text("model:\n  default: x\n", None).unwrap();
        assert_eq!(l.kanban, Kanban::default());
        assert!(l.sources.is_empty());
        let missing = load(&Files {
            user: PathBuf::from("/nonexistent/config.yaml"),
            managed: None,
        })
        .unwrap();
        assert_eq!(missing.kanban, Kanban::default());
    }

    #[test]
    fn values_read_as_upstream_reads_them() {
        type Row = (&'static str, fn(&Kanban) -> bool);
        let rows: &[Row] = &[
            ("max_spawn: 3", |k| k.max_spawn == Some(3)),
            ("max_spawn: '4'", |k| k.max_spawn == Some(4)),
            ("max_in_progress: 0", |k| k.max_in_progress.is_none()),
            ("max_in_progress: 5", |k| k.max_in_progress == Some(5)),
            ("max_in_progress_per_profile: two", |k| {
                k.max_in_progress_per_profile.is_none()
            }),
            ("failure_limit: 0", |k| k.failure_limit == 2),
            ("failure_limit: 4", |k| k.failure_limit == 4),
            ("default_assignee: '  '", |k| k.default_assignee.is_none()),
            ("default_assignee: coder", |k| {
                k.default_assignee.as_deref() == Some("coder")
            }),
            ("auto_decompose: no", |k| !k.auto_decompose),
            ("auto_decompose: off", |k| !k.auto_decompose),
            ("auto_decompose: false", |k| !k.auto_decompose),
            ("auto_decompose_per_tick: 0", |k| {
                k.auto_decompose_per_tick == 3
            }),
            ("auto_decompose_per_tick: -2", |k| {
                k.auto_decompose_per_tick == 1
            }),
            ("dispatch_in_gateway: false", |k| !k.dispatch_in_gateway),
            ("max_spawn: null", |k| k.max_spawn.is_none()),
            ("auto_decompose: null", |k| !k.auto_decompose),
        ];
        for (line, ok) in rows {
            let l = load_text(&format!("kanban:\n  {line}\n"), None).unwrap();
            assert!(ok(&l.kanban), "{line}: {:?}", l.kanban);
        }
    }

    #[test]
    fn unusable_values_are_errors_that_name_the_file() {
        for bad in [
            "kanban:\n  max_spawn: many\n",
            "kanban:\n  default_assignee: [a]\n",
            "kanban: 3\n",
            "kanban: [\n",
        ] {
            let e = load_text(bad, None).unwrap_err().to_string();
            assert!(e.contains("config.yaml"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_managed_layer_wins_key_by_key_and_sources_say_so() {
        let l = load_text(
            "kanban:\n  max_spawn: 3\n  failure_limit: 5\n",
            Some("kanban:\n  max_spawn: 1\n"),
        )
        .unwrap();
        assert_eq!((l.kanban.max_spawn, l.kanban.failure_limit), (Some(1), 5));
        assert!(l.sources["max_spawn"].ends_with("managed.yaml"));
        assert!(l.sources["failure_limit"].ends_with("config.yaml"));
    }
}
