//! Everything a worker needs, looked up and checked before a scope or a process exists:
//! the worker user, the binary, the workspace, and — pure functions of the run — its
//! environment and argv, as the Hermes it runs gives them.

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::spec::{self, WorkerSpec};
use super::{installed, upstream, SpawnError};
use crate::board::{Board, BoardPaths, Claim};
use crate::config::Config;
use crate::names::{self, profile_home, profile_name};

/// Upstream's `KANBAN_TERMINAL_TIMEOUT_GRACE_SECONDS`.
const TERMINAL_TIMEOUT_GRACE: i64 = 30;

/// `p` made absolute by its text alone: root resolves no symlink in a tree others write.
pub(crate) fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Variables of the dispatcher's own environment that reach workers (beside the contract's
/// and `pass_environment`'s): the rest is the service's business, not the worker's.
pub(crate) fn passed_through(name: &str, cfg: &Config) -> bool {
    matches!(name, "PATH" | "LANG" | "LANGUAGE" | "TZ")
        || name.starts_with("LC_")
        || cfg.pass_environment.iter().any(|p| p == name)
}

/// Resolve the worker binary as `execvp` would, but now, so that a missing binary is a
/// clear spawn failure before any scope exists.
/// The contract of the Hermes `cfg`'s workers run (`installed::generation_of`).
pub fn hermes_generation(cfg: &Config) -> installed::Generation {
    let bin = resolve_binary(&cfg.hermes_bin).unwrap_or_else(|_| PathBuf::from(&cfg.hermes_bin));
    installed::generation_of(&bin)
}

pub fn resolve_binary(bin: &str) -> Result<PathBuf, String> {
    let is_exec = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if bin.contains('/') {
        let p = PathBuf::from(bin);
        return if is_exec(&p) {
            Ok(absolute(&p))
        } else {
            Err(format!("worker binary {bin} does not exist or is not executable (set hermes_bin in the config or $HERMES_BIN)"))
        };
    }
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(bin))
        .find(|p| is_exec(p))
        .ok_or_else(|| format!("worker binary {bin:?} not found on PATH={path} (set hermes_bin in the config or $HERMES_BIN)"))
}

/// Everything is looked up and checked here, before a scope or a process exists.
pub fn prepare(
    board: &Board,
    cfg: &Config,
    claim: &Claim,
    unit: &str,
) -> Result<WorkerSpec, SpawnError> {
    // The worker user and the binary are the dispatcher's configuration, the same for every
    // task: when they are wrong, no task is at fault.
    let who = worker_identity(cfg).map_err(SpawnError::infra)?;
    let bin = resolve_binary(&cfg.hermes_bin).map_err(SpawnError::infra)?;
    // From here on, what fails is the task's own data (a plain message is the task's fault).
    prepare_task(board, cfg, claim, unit, who, bin)
}

/// The worker user and its groups.
#[derive(Clone)]
pub(crate) struct Identity {
    pub user: nix::unistd::User,
    pub groups: Vec<u32>,
}

impl Identity {
    /// Who asks upstream's own code, in `env` (`upstream.rs`).
    fn asker<'a>(&'a self, env: &'a [(String, String)]) -> upstream::Asker<'a> {
        upstream::Asker {
            uid: self.user.uid.as_raw(),
            gid: self.user.gid.as_raw(),
            groups: &self.groups,
            env,
        }
    }
}

/// `worker_user`, looked up with its groups; never root. Each start needs it, and the
/// lookup can be a round trip to PID 1 (`nss-systemd`) while PID 1 is busiest, so it is
/// kept for up to a minute, and looked up again at once when `/etc/passwd` or `/etc/group`
/// changes or another user is configured.
pub(crate) fn worker_identity(cfg: &Config) -> Result<Identity, String> {
    type Key = (String, Vec<Option<(u64, i64, i64)>>);
    static KEPT: std::sync::Mutex<Option<(Key, std::time::Instant, Identity)>> =
        std::sync::Mutex::new(None);
    let stamp = |p: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.ino(), m.mtime(), m.mtime_nsec()))
    };
    let key: Key = (
        cfg.worker_user.clone(),
        vec![stamp("/etc/passwd"), stamp("/etc/group")],
    );
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((k, at, who)) = kept.as_ref() {
        if *k == key && at.elapsed() < Duration::from_secs(60) {
            return Ok(who.clone());
        }
    }
    let who = look_up_identity(cfg)?;
    *kept = Some((key, std::time::Instant::now(), who.clone()));
    Ok(who)
}

fn look_up_identity(cfg: &Config) -> Result<Identity, String> {
    let user = nix::unistd::User::from_name(&cfg.worker_user)
        .map_err(|e| format!("look up worker user {:?}: {e}", cfg.worker_user))?
        .ok_or_else(|| format!("worker user {:?} does not exist; create it (useradd --system {0}) or set worker_user", cfg.worker_user))?;
    if user.uid.is_root() {
        return Err(format!(
            "worker user {:?} is root; workers never run as root",
            cfg.worker_user
        ));
    }
    let cname = CString::new(user.name.as_str()).map_err(|_| "worker user name contains NUL")?;
    let groups = nix::unistd::getgrouplist(&cname, user.gid)
        .map_err(|e| format!("groups of {}: {e}", user.name))?
        .into_iter()
        .map(|g| g.as_raw())
        .collect();
    Ok(Identity { user, groups })
}

/// The skills a worker is started with (`--skills`, each its own pair): the task's, and on
/// the review lane upstream's review skill — in place of them (0.19.0) or after them, once
/// (0.20.1 on: `dict.fromkeys([*skills, "sdlc-review"])`). Empty names are skipped, as
/// upstream skips them; a name that is not a string is no skill.
fn worker_skills(task: Option<&serde_json::Value>, review: bool, keeps: bool) -> Vec<String> {
    let own = task
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|s| s.as_str()).map(str::to_string))
        .into_iter()
        .flatten();
    let mut out: Vec<String> = Vec::new();
    let wanted: Vec<String> = match (review, keeps) {
        (false, _) => own.collect(),
        (true, false) => vec![REVIEW_SKILL.to_string()],
        (true, true) => own.chain([REVIEW_SKILL.to_string()]).collect(),
    };
    for s in wanted {
        if review && out.contains(&s) {
            continue;
        }
        out.push(s);
    }
    out.retain(|s| !s.is_empty());
    out
}

/// The skill upstream's review lane loads.
const REVIEW_SKILL: &str = "sdlc-review";

/// `prepare`'s part that reads the task: assignee, workspace, environment, argv.
fn prepare_task(
    board: &Board,
    cfg: &Config,
    claim: &Claim,
    unit: &str,
    who: Identity,
    bin: PathBuf,
) -> Result<WorkerSpec, SpawnError> {
    let user = &who.user;
    let paths: &BoardPaths = board.paths();
    let task = &claim.task;
    let python = upstream::interpreter(&bin);
    // The contract of the Hermes the workers run (`installed`): what its `_default_spawn`
    // gives a worker.
    let generation = installed::generation_of(&bin);
    let assignee = task
        .assignee
        .clone()
        .or_else(|| cfg.default_assignee.clone())
        .ok_or_else(|| SpawnError::task("task has no assignee"))?;
    // The task's own data: a bad value is the task's fault.
    let profile = profile_name(&assignee).ok_or_else(|| {
        SpawnError::task(format!("assignee {assignee:?} is not a valid profile name"))
    })?;

    let workspaces = absolute(&paths.workspaces);
    let (workspace, make_workspace) = workspace(task, &workspaces, python.as_deref(), &bin)?;

    let places = Places {
        user,
        hermes_home: profile_home(&absolute(&paths.root), &profile),
        profile: &profile,
        run_id: claim.run_id,
        lock: &claim.lock,
        workspace: &workspace,
        db: absolute(&paths.db),
        workspaces: &workspaces,
        board: &paths.slug,
    };
    let passed: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| passed_through(k, cfg))
        .collect();
    let env = worker_env(passed, &places, task, generation);
    let (argv, toolsets_at) = worker_argv(&bin, &profile, task, claim.review, generation);
    // Upstream pins the profile's CLI toolsets here; its own code says which, asked in the
    // scope (`upstream.rs`).
    let prelude = python.map(|python| spec::Prelude {
        python,
        toolsets_home: profile_home(&absolute(&paths.root), &profile),
        toolsets_at,
        run: spec::RunRef {
            board: paths.slug.clone(),
            task: task.id.clone(),
            run_id: claim.run_id,
            kanban_home: absolute(&paths.root),
        },
        worktree: task.workspace_kind == "worktree",
        fingerprint: generation.fingerprint(),
    });
    let sandbox = if cfg.sandbox.covers(&profile) {
        let home = profile_home(&absolute(&paths.root), &profile);
        Some(sandbox_of(board, task, &workspace, &home, user, &bin)?)
    } else {
        None
    };
    // Opened (and rotated) by the supervisor, as the board's owner.
    let log_file = cfg
        .worker_log_file
        .then(|| absolute(&paths.logs).join(format!("{}.log", names::file_component(&task.id))));

    Ok(WorkerSpec {
        log_file,
        log_owner: board.owner().clone(),
        log_owner_groups: board.owner().groups().to_vec(),
        task: task.id.clone(),
        run_id: claim.run_id,
        unit: unit.to_string(),
        argv,
        env,
        cwd: workspace,
        make_cwd: make_workspace,
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        groups: who.groups.clone(),
        tmp_root: absolute(&cfg.tmp_root),
        status_file: crate::state_dir::record_path(
            &cfg.state_dir,
            &board.paths().slug,
            &task.id,
            claim.run_id,
        ),
        identifier: "hermes-worker".into(),
        prelude,
        output_tail: generation.worker_output(),
        max_runtime: task
            .max_runtime_seconds
            .filter(|r| *r > 0)
            .map(|r| r as u64),
        stop_timeout: cfg.stop_timeout_seconds,
        paused_file: crate::state_dir::paused_path(
            &cfg.state_dir,
            &board.paths().slug,
            &task.id,
            claim.run_id,
        ),
        sandbox,
        board_dir: absolute(&paths.db).parent().map(Path::to_path_buf),
        tmpdir_note: Some(crate::state_dir::tmpdir_note_path(
            &cfg.state_dir,
            &board.paths().slug,
            &task.id,
            claim.run_id,
        )),
    })
}

/// The sandbox of a run (`spawn::sandbox`): a worktree task's repository is its workspace
/// there (the task's error when it names none).
fn sandbox_of(
    board: &Board,
    task: &crate::board::Task,
    workspace: &Path,
    profile_home: &Path,
    user: &nix::unistd::User,
    bin: &Path,
) -> Result<spec::Sandbox, SpawnError> {
    let paths = board.paths();
    // A worktree is made in its repository during the run (by Hermes' own code): the
    // repository is the workspace there (once made, Hermes records the worktree,
    // `<repository>/.worktrees/<task>`, whose git data is the repository's). Without one
    // named, Hermes would take the board's `default_workdir`, which only its own code reads.
    let repository = (task.workspace_kind == "worktree")
        .then(|| {
            task.workspace_path
                .as_deref()
                .map(|p| p.split("/.worktrees/").next().unwrap_or(p))
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .ok_or_else(|| {
                    SpawnError::task(
                        "a worktree task in the sandbox needs its repository as its workspace path (worktree:/path/to/repo)",
                    )
                })
        })
        .transpose()?;
    let root = absolute(&paths.root);
    let db = absolute(&paths.db);
    // Hermes' own directories of what steers it, made now (as the tree's owner; one that
    // exists is left as it is) so they are shown read-only from the first run on.
    let _ = crate::safe_fs::as_user(board.owner(), || {
        for d in super::sandbox::STEERING_DIRS {
            let _ = std::fs::create_dir(root.join(d));
        }
    });
    Ok(super::sandbox::plan(&super::sandbox::Where {
        root: &root,
        board_dir: db.parent().unwrap_or(&root),
        workspace,
        repository: repository.as_deref(),
        profile_home,
        home: &user.dir,
        install: installed::install_dir(bin).as_deref(),
        steering: super::sandbox::steering(&root, profile_home),
    }))
}

/// The run's workspace, and whether the worker makes it: created (scratch) and entered
/// by the worker's own process, after it dropped root, so a path in the board's tree is
/// never followed with root's powers.
fn workspace(
    task: &crate::board::Task,
    workspaces: &Path,
    python: Option<&Path>,
    bin: &Path,
) -> Result<(PathBuf, bool), SpawnError> {
    Ok(match task.workspace_kind.as_str() {
        // Upstream uses the raw id; a hostile id must not name another directory.
        "scratch" => (workspaces.join(names::file_component(&task.id)), true),
        "dir" => {
            let p = task
                .workspace_path
                .as_deref()
                .ok_or_else(|| SpawnError::task("workspace kind dir without a workspace_path"))?;
            let p = PathBuf::from(p);
            if !p.is_absolute() {
                return Err(SpawnError::task(format!(
                    "workspace {} is not an absolute path",
                    p.display()
                )));
            }
            (p, false)
        }
        // Materialized by upstream's own resolver (`git worktree add`, its anchors: the
        // task's path or the board's default_workdir), as the worker, in the run's scope,
        // before the worker starts there (`upstream::PRELUDE`); until then its process is
        // at `/`. Without upstream's code there is no one to ask: the dispatcher's binary.
        "worktree" => {
            if python.is_none() {
                return Err(SpawnError::infra(format!(
                    "{} is not a Python script: cannot ask Hermes' own code for the worktree",
                    bin.display()
                )));
            }
            (PathBuf::from("/"), false)
        }
        other => {
            return Err(SpawnError::task(format!(
                "unknown workspace kind {other:?}"
            )))
        }
    })
}

/// Where a run lives, for its worker's environment.
struct Places<'a> {
    user: &'a nix::unistd::User,
    hermes_home: PathBuf,
    profile: &'a str,
    run_id: i64,
    lock: &'a str,
    workspace: &'a Path,
    db: PathBuf,
    workspaces: &'a Path,
    board: &'a str,
}

/// The worker's environment: what `passed` (the dispatcher's own, through the allowlist)
/// holds, then upstream's contract for Hermes `g` (`_default_spawn`), set over it.
fn worker_env(
    passed: Vec<(String, String)>,
    p: &Places,
    task: &crate::board::Task,
    g: installed::Generation,
) -> Vec<(String, String)> {
    let mut env = passed;
    // Upstream raises these to max_runtime - 30 s unless the worker's environment already
    // has more; only what passes the allowlist is the worker's environment.
    let timeouts_passed = ["TERMINAL_TIMEOUT", "TERMINAL_MAX_FOREGROUND_TIMEOUT"].map(|k| {
        env.iter()
            .find(|(x, _)| x == k)
            .and_then(|(_, v)| v.trim().parse::<i64>().ok())
            .unwrap_or(0)
    });
    let mut set = |k: &str, v: String| {
        env.retain(|(x, _)| x != k);
        env.push((k.to_string(), v));
    };
    set("HOME", p.user.dir.to_string_lossy().into_owned());
    set("USER", p.user.name.clone());
    set("LOGNAME", p.user.name.clone());
    set("SHELL", p.user.shell.to_string_lossy().into_owned());
    set("HERMES_HOME", p.hermes_home.to_string_lossy().into_owned());
    set("HERMES_PROFILE", p.profile.to_string());
    set("HERMES_KANBAN_TASK", task.id.clone());
    set("HERMES_KANBAN_RUN_ID", p.run_id.to_string());
    set("HERMES_KANBAN_CLAIM_LOCK", p.lock.to_string());
    set(
        "HERMES_KANBAN_WORKSPACE",
        p.workspace.to_string_lossy().into_owned(),
    );
    set("TERMINAL_CWD", p.workspace.to_string_lossy().into_owned());
    set("HERMES_KANBAN_DB", p.db.to_string_lossy().into_owned());
    set(
        "HERMES_KANBAN_WORKSPACES_ROOT",
        p.workspaces.to_string_lossy().into_owned(),
    );
    set("HERMES_KANBAN_BOARD", p.board.to_string());
    if g.session_source() {
        set("HERMES_SESSION_SOURCE", "kanban".into());
    }
    if g.real_home() {
        // `apply_subprocess_home_env`: the worker user's, here.
        set(
            "HERMES_REAL_HOME",
            p.user.dir.to_string_lossy().into_owned(),
        );
    }
    if let Some(t) = &task.tenant {
        set("HERMES_TENANT", t.clone());
    }
    // A worktree's branch is upstream's answer, set by the prelude (upstream's first spawn
    // passes the task object it claimed, before recording the branch, so only its later
    // runs get it; ours get it from the first).
    if let Some(b) = &task.branch_name {
        set("HERMES_KANBAN_BRANCH", b.clone());
    }
    if task.goal_mode {
        set("HERMES_KANBAN_GOAL_MODE", "1".into());
        if let Some(n) = task.goal_max_turns {
            set("HERMES_KANBAN_GOAL_MAX_TURNS", n.to_string());
        }
    }
    if let Some(rt) = task.max_runtime_seconds.filter(|r| *r > 0) {
        let want = (rt - TERMINAL_TIMEOUT_GRACE).max(1);
        for (k, have) in ["TERMINAL_TIMEOUT", "TERMINAL_MAX_FOREGROUND_TIMEOUT"]
            .into_iter()
            .zip(timeouts_passed)
        {
            if have < want {
                set(k, want.to_string());
            }
        }
    }
    env
}

/// Upstream's argv for Hermes `g` (`_default_spawn`), and where the profile's `--toolsets`
/// pin goes (asked of upstream's own code in the scope, `upstream.rs`). Each value is its
/// own argument, never a shell word.
fn worker_argv(
    bin: &Path,
    profile: &str,
    task: &crate::board::Task,
    review: bool,
    g: installed::Generation,
) -> (Vec<String>, usize) {
    let mut argv = vec![
        bin.to_string_lossy().into_owned(),
        "-p".into(),
        profile.to_string(),
        "--cli".into(),
        "--accept-hooks".into(),
    ];
    for s in worker_skills(task.skills.as_ref(), review, g.review_keeps_skills()) {
        argv.extend(["--skills".to_string(), s]);
    }
    if let Some(m) = &task.model_override {
        argv.extend(["-m".to_string(), m.clone()]);
        // Newer Hermes pins the provider with the model.
        if let Some(p) = task
            .provider_override
            .as_ref()
            .filter(|_| g.provider_and_reasoning())
        {
            argv.extend(["--provider".to_string(), p.clone()]);
        }
    }
    if let Some(r) = task
        .reasoning_effort
        .as_ref()
        .filter(|_| g.provider_and_reasoning())
    {
        argv.extend(["--reasoning".to_string(), r.clone()]);
    }
    let toolsets_at = argv.len();
    argv.extend([
        "chat".to_string(),
        "-q".to_string(),
        format!("work kanban task {}", task.id),
    ]);
    // 0.19.0 and 0.20.1 run goal mode quiet; ~0.22 keeps the worker log's live tool feed.
    if task.goal_mode && g.goal_quiet() {
        argv.push("-Q".into());
    }
    (argv, toolsets_at)
}

/// The environment upstream's own code is asked in for this board (`upstream.rs`): the
/// workers' allowlist, the worker user's home, a Hermes home, the board pinned.
fn upstream_env(
    cfg: &Config,
    user: &nix::unistd::User,
    paths: &BoardPaths,
    hermes_home: &Path,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| passed_through(k, cfg))
        .collect();
    let text = |p: &Path| absolute(p).to_string_lossy().into_owned();
    env.extend([
        ("HOME".into(), user.dir.to_string_lossy().into_owned()),
        ("HERMES_HOME".into(), text(hermes_home)),
        ("HERMES_KANBAN_HOME".into(), text(&paths.root)),
        ("HERMES_KANBAN_DB".into(), text(&paths.db)),
        ("HERMES_KANBAN_BOARD".into(), paths.slug.clone()),
    ]);
    env
}

/// After `hermes-mgr complete` wrote a task's verdict itself: what upstream's `complete_task`
/// does next for a scratch workspace (keep the declared artifacts, remove the workspace
/// unless children still need it), by upstream's own functions as the worker user.
/// Best-effort, as upstream's: `Err` says why it could not, the verdict stands.
pub async fn after_complete(
    board: &Board,
    cfg: &Config,
    task: &crate::board::Task,
    metadata: Option<&serde_json::Value>,
) -> Result<(), String> {
    if task.workspace_kind != "scratch" {
        return Ok(());
    }
    let who = worker_identity(cfg)?;
    let bin = resolve_binary(&cfg.hermes_bin)?;
    let paths = board.paths();
    let env = upstream_env(cfg, &who.user, paths, &absolute(&paths.root));
    let md = metadata
        .cloned()
        .unwrap_or(serde_json::Value::Null)
        .to_string();
    upstream::after_complete(&bin, &who.asker(&env), &task.id, &md, cfg).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(goal: bool) -> crate::board::Task {
        crate::board::Task {
            id: "t_1".into(),
            title: "t".into(),
            body: None,
            assignee: Some("coder".into()),
            status: crate::board::Status::Running,
            priority: 0,
            created_by: None,
            created_at: 0,
            started_at: None,
            completed_at: None,
            workspace_kind: "scratch".into(),
            workspace_path: None,
            branch_name: None,
            tenant: None,
            result: None,
            claim_lock: None,
            claim_expires: None,
            consecutive_failures: 0,
            worker_pid: None,
            last_failure_error: None,
            max_runtime_seconds: None,
            last_heartbeat_at: None,
            current_run_id: None,
            skills: Some(serde_json::json!(["a"])),
            model_override: Some("m".into()),
            provider_override: Some("p".into()),
            reasoning_effort: Some("high".into()),
            max_retries: None,
            goal_mode: goal,
            goal_max_turns: None,
            session_id: None,
            block_kind: None,
            block_recurrences: 0,
        }
    }

    /// What each generation's `_default_spawn` puts on the command line (proven against
    /// each version's own code, run, in `tests/it/parity.rs`).
    #[test]
    fn the_argv_is_each_generations() {
        use installed::Generation::*;
        let bin = Path::new("/usr/bin/hermes");
        let head = [
            "/usr/bin/hermes",
            "-p",
            "coder",
            "--cli",
            "--accept-hooks",
            "--skills",
            "a",
            "-m",
            "m",
        ];
        let tail = ["chat", "-q", "work kanban task t_1"];
        let rows: [(installed::Generation, bool, &[&str], &[&str]); 4] = [
            (V019, true, &[], &["-Q"]),
            (
                V020,
                true,
                &["--provider", "p", "--reasoning", "high"],
                &["-Q"],
            ),
            (V022, true, &["--provider", "p", "--reasoning", "high"], &[]),
            (
                V022,
                false,
                &["--provider", "p", "--reasoning", "high"],
                &[],
            ),
        ];
        for (g, goal, middle, end) in rows {
            let (argv, at) = worker_argv(bin, "coder", &task(goal), false, g);
            let want: Vec<&str> = head
                .iter()
                .chain(middle)
                .chain(&tail)
                .chain(end)
                .copied()
                .collect();
            assert_eq!(argv, want, "{g:?}");
            assert_eq!(
                at,
                head.len() + middle.len(),
                "{g:?}: the --toolsets pin goes before chat"
            );
        }
    }

    #[test]
    fn the_review_lane_replaces_or_extends_the_tasks_skills_as_each_version_does() {
        let j = |v: serde_json::Value| Some(v);
        let rows: [(Option<serde_json::Value>, bool, bool, &[&str]); 8] = [
            (
                j(serde_json::json!(["a", "", "a"])),
                false,
                false,
                &["a", "a"],
            ),
            (
                j(serde_json::json!(["a", "", "a"])),
                false,
                true,
                &["a", "a"],
            ),
            (
                j(serde_json::json!(["a", "b"])),
                true,
                false,
                &["sdlc-review"],
            ),
            (
                j(serde_json::json!(["a", "b"])),
                true,
                true,
                &["a", "b", "sdlc-review"],
            ),
            (
                j(serde_json::json!(["sdlc-review", "a", "a"])),
                true,
                true,
                &["sdlc-review", "a"],
            ),
            (None, true, true, &["sdlc-review"]),
            (j(serde_json::json!([1, "a"])), false, true, &["a"]),
            (j(serde_json::json!("a")), false, true, &[]),
        ];
        for (skills, review, keeps, want) in rows {
            assert_eq!(
                worker_skills(skills.as_ref(), review, keeps),
                want,
                "{skills:?} review={review} keeps={keeps}"
            );
        }
    }
}
