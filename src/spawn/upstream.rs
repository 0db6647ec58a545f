//! What only upstream's own code can say, asked of it with the interpreter of the `hermes`
//! script itself (its `#!` line), as the worker user, with the worker's environment — never
//! as root, never through a shell. Upstream's code imports the plugins and reads the files
//! the worker writes: it is the worker's code, and runs as the worker does.
//!
//! For a run, it is asked by the run's own process, in the run's scope, before it becomes
//! the worker (`PRELUDE`): the supervisor's child drops root as for any worker and execs the
//! interpreter with `PRELUDE`, which asks, then execs the worker with the answers — the same
//! PID, the same scope, its runtime limit, its journal. The dispatcher never waits on it.
//!
//! - `--toolsets`: the pin of upstream's `_default_spawn`, the assignee profile's effective
//!   CLI toolsets (`kanban_db._resolve_worker_cli_toolsets`), which depends on Hermes'
//!   toolset registry, plugins, MCP servers and credentials. A failure or no answer within
//!   20 s means "no pin", as upstream.
//! - a `worktree` task's workspace, materialized by upstream's `_resolve_worktree_workspace`
//!   (`git worktree add`, its anchors and its refusals), recorded on the task with upstream's
//!   `set_workspace_path`/`set_branch_name`, as its dispatcher does before the spawn.
//! - ~0.22's pid fingerprint of the worker (`_process_fingerprint`, its `worker_started_at`),
//!   without which 0.22's own tools take our workers for pre-fingerprint ones.
//!
//! Whose fault a failure is follows what ran: before `asking` is said, only the
//! interpreter and Hermes' installed package have run — the dispatcher's configuration
//! (`Fault::Infrastructure`); after it, the profile's plugins and the task's repository have
//! (`Fault::Task`). What it says travels on descriptor 3, a pipe to its supervisor, closed
//! by the exec of the worker. `hermes-mgr complete` asks from the CLI, detached (`run`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long the toolset resolver and the worktree resolver may take.
pub(super) const TOOLSETS_TIMEOUT: Duration = Duration::from_secs(20);
pub(super) const WORKTREE_TIMEOUT: Duration = Duration::from_secs(120);

/// Run as `python -I -c PRELUDE <plan>` (`-I`: no user site-packages and no `PYTHON*`
/// variables, which the worker controls, before `asking`); `<plan>` is JSON: `argv` (the
/// worker's), `toolsets_home`, `toolsets_at`, `run`, `worktree`, `fingerprint`, the two
/// timeouts.
/// On descriptor 3 it says `asking` once only the interpreter and Hermes' installed package
/// have run, then at most one JSON line (`{"failed": …}` after it, `{"unavailable": …}`
/// before it), then `exec` just before the exec of the worker.
pub(super) const PRELUDE: &str = r#"
import os, sys
def say(line):
    os.write(3, (line + "\n").encode("utf-8", "replace"))
os.set_inheritable(3, False)
import json, signal
def unavailable(reason):
    say(json.dumps({"unavailable": reason[:500]}))
    os._exit(127)
def fail(reason):
    say(json.dumps({"failed": reason[:500]}))
    os._exit(127)
plan = json.loads(sys.argv[1])
argv = plan["argv"]
if not os.access(argv[0], os.X_OK):
    unavailable("%s is not executable" % argv[0])
try:
    from hermes_cli import kanban_db
except Exception as exc:
    why = "import hermes_cli.kanban_db with %s: %s" % (sys.executable, exc)
    if plan.get("worktree"):
        unavailable(why)
    # Only the pin is lost: the worker starts as upstream starts one whose toolsets it
    # could not resolve, and the unit's journal says why.
    sys.stderr.write("hermes-mgr: %s; the worker starts without upstream's --toolsets pin\n" % why)
    sys.stderr.flush()
def upstream(name):
    # 0.19 keeps the kanban code in kanban_db; ~0.22 split it into kanban_db_* modules,
    # which kanban_db imports at its end: looked up among those loaded, nothing imported.
    mods = sorted((n, m) for n, m in list(sys.modules.items())
                  if n == "hermes_cli.kanban_db" or n.startswith("hermes_cli.kanban_db_"))
    for _, m in mods:
        f = getattr(m, name, None)
        if f is not None:
            return f
    return None
kb = {n: upstream(n) for n in ("connect_closing", "get_task", "_resolve_worktree_workspace",
                               "set_workspace_path", "set_branch_name", "_resolve_worker_cli_toolsets",
                               "write_txn", "_process_fingerprint")}
if plan.get("worktree"):
    missing = [n for n in ("connect_closing", "get_task", "_resolve_worktree_workspace",
                           "set_workspace_path", "set_branch_name") if kb[n] is None]
    if missing:
        unavailable("this Hermes (%s) has no %s" % (sys.executable, ", ".join(missing)))
say("asking")
class Late(BaseException):
    pass
def late(signum, frame):
    raise Late()
signal.signal(signal.SIGALRM, late)
env = dict(os.environ)
run = plan["run"]
os.environ["HERMES_KANBAN_HOME"] = run["kanban_home"]
if plan.get("fingerprint") and kb["_process_fingerprint"] and kb["write_txn"] and kb["connect_closing"]:
    # ~0.22 records its worker's pid fingerprint at spawn, and its own tools call a worker
    # alive, or signal it, only when pid and fingerprint agree. This process is the worker
    # to be (same pid, same start time). Best effort: without it, 0.22 reads a legacy row.
    try:
        value = kb["_process_fingerprint"](os.getpid())
        if value:
            with kb["connect_closing"](board=run["board"]) as conn:
                with kb["write_txn"](conn):
                    conn.execute("UPDATE tasks SET worker_started_at = ? WHERE id = ? AND current_run_id = ? AND status = 'running'",
                                 (value, run["task"], run["run_id"]))
                    conn.execute("UPDATE task_runs SET worker_started_at = ? WHERE id = ? AND task_id = ?",
                                 (value, run["run_id"], run["task"]))
    except Exception as exc:
        sys.stderr.write("hermes-mgr: the worker's pid fingerprint was not recorded: %s\n" % exc)
        sys.stderr.flush()
wt = run if plan.get("worktree") else None
if wt:
    signal.alarm(plan["worktree_timeout"])
    try:
        with kb["connect_closing"](board=wt["board"]) as conn:
            task = kb["get_task"](conn, wt["task"])
        if task is None or task.current_run_id != wt["run_id"]:
            fail("workspace: run %d is no longer the task's current run" % wt["run_id"])
        path, branch = kb["_resolve_worktree_workspace"](task, board=wt["board"])
        branch = branch or (task.branch_name or "").strip() or "wt/%s" % task.id
        with kb["connect_closing"](board=wt["board"]) as conn:
            kb["set_workspace_path"](conn, task.id, str(path))
            kb["set_branch_name"](conn, task.id, branch)
    except Late:
        fail("workspace: Hermes' own code did not answer within %ds" % plan["worktree_timeout"])
    except Exception as exc:
        fail("workspace: %s" % exc)
    finally:
        signal.alarm(0)
    try:
        os.chdir(path)
    except OSError as exc:
        fail("cannot enter the workspace %s: %s" % (path, exc))
    env["HERMES_KANBAN_WORKSPACE"] = env["TERMINAL_CWD"] = str(path)
    env["HERMES_KANBAN_BRANCH"] = branch
toolsets = None
resolve = kb["_resolve_worker_cli_toolsets"]
if resolve is not None:
    signal.alarm(plan["toolsets_timeout"])
    try:
        toolsets = resolve(plan["toolsets_home"])
    except BaseException:
        toolsets = None
    finally:
        signal.alarm(0)
if toolsets:
    at = plan["toolsets_at"]
    argv[at:at] = ["--toolsets", ",".join(toolsets)]
del os.environ["HERMES_KANBAN_HOME"]
signal.signal(signal.SIGALRM, signal.SIG_DFL)
say("exec")
try:
    os.execve(argv[0], argv, env)
except OSError as exc:
    fail("cannot start %s: exec: %s" % (argv[0], exc))
"#;

/// The interpreter of a `#!` script, if it is one (a binary or a shell stub has none that
/// can import Hermes; then there is nothing to ask).
pub(super) fn interpreter(bin: &Path) -> Option<PathBuf> {
    let head = crate::safe_fs::read_capped(bin, 256).ok()??;
    let line = head.split(|b| *b == b'\n').next()?;
    let rest = line.strip_prefix(b"#!")?;
    let text = std::str::from_utf8(rest).ok()?.trim();
    let first = text.split_whitespace().next()?;
    let p = PathBuf::from(first);
    (p.is_absolute() && p.file_name()?.to_str()?.starts_with("python")).then_some(p)
}

/// What the prelude said on descriptor 3, and how its process ended: `None` when it became
/// the worker (the run is booked as any other), else why no worker started.
pub(super) fn prelude_verdict(
    said: &[u8],
    exit_code: Option<i32>,
    signal: Option<i32>,
) -> Option<crate::record::NotStarted> {
    use crate::outcome::Fault;
    let text = String::from_utf8_lossy(said);
    let mut lines = text.lines();
    let first = lines.next();
    let word = |l: &str, key: &str| {
        serde_json::from_str::<serde_json::Value>(l)
            .ok()
            .and_then(|v| v[key].as_str().map(str::to_string))
    };
    let ended = match (exit_code, signal) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "ended".into(),
    };
    let not_started = |fault, reason: String| Some(crate::record::NotStarted { reason, fault });
    if first != Some("asking") {
        // Killed before it said anything (a stop, the runtime limit, the OOM killer): how
        // it ended is booked as for any run.
        if first.is_none() && signal.is_some() {
            return None;
        }
        let why = first
            .and_then(|l| word(l, "unavailable"))
            .unwrap_or_else(|| {
                format!("it ended ({ended}) before asking; its words are in the unit's journal")
            });
        return not_started(
            Fault::Infrastructure,
            format!("Hermes' own code cannot be started: {why}"),
        );
    }
    // From here on the profile's plugins and the task's repository ran: what they say is
    // the task's, whatever they say.
    let rest: Vec<&str> = lines.collect();
    if rest.contains(&"exec") && !rest.iter().any(|l| word(l, "failed").is_some()) {
        return None;
    }
    if let Some(r) = rest.iter().find_map(|l| word(l, "failed")) {
        return not_started(Fault::Task, r);
    }
    if signal.is_some() {
        return None;
    }
    not_started(
        Fault::Task,
        format!("Hermes' own code ended ({ended}) before starting the worker, on the task's profile or repository"),
    )
}

/// Who asks, and with what environment (the worker's own: allowlist + contract).
pub struct Asker<'a> {
    pub uid: u32,
    pub gid: u32,
    pub groups: &'a [u32],
    pub env: &'a [(String, String)],
}

const AFTER_COMPLETE: &str = r#"
import json, sys, time
from pathlib import Path
from hermes_cli import kanban_db as kb
task_id, metadata = sys.argv[1], json.loads(sys.argv[2])
with kb.connect_closing() as conn:
    if isinstance(metadata, dict):
        kb._persist_scratch_completion_artifacts(conn, task_id, metadata)
        for stored in metadata.pop("_staged_artifacts", []):
            p = Path(stored)
            kb._insert_completion_attachment(conn, task_id, filename=p.name, stored_path=str(p),
                                             size=p.stat().st_size, created_at=int(time.time()))
        conn.commit()
    kb._cleanup_workspace(conn, task_id)
"#;

/// How long upstream's after-completion may take.
const AFTER_COMPLETE_TIMEOUT: Duration = Duration::from_secs(60);

/// What upstream's `complete_task` does once a task is done (`hermes-mgr complete` writes the
/// verdict itself): keep the scratch workspace's declared artifacts in
/// `kanban/attachments/<task>/`, then remove the workspace unless children still need it.
/// Upstream's own functions, as the worker user (the workspace is that user's). Asked by
/// root, it runs in a scope of its own under the workers' slice, with the workers' limits
/// and a runtime limit; asked by the worker user itself (a worker completing its own
/// task), in the caller's own cgroup (its run's scope).
pub async fn after_complete(
    bin: &Path,
    who: &Asker<'_>,
    task: &str,
    metadata: &str,
    cfg: &crate::config::Config,
) -> Result<(), String> {
    if interpreter(bin).is_none() {
        // Not Hermes (a test's stub worker): there is no upstream code to ask.
        return Ok(());
    }
    let args = [std::ffi::OsStr::new(task), std::ffi::OsStr::new(metadata)];
    let (mut cmd, hold) = detached(bin, who, AFTER_COMPLETE, &args)?;
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("start Hermes' own code: {e}"))?;
    let pid = child.id();
    let mut scope = None;
    if let Some((hold_r, hold_w)) = hold {
        drop(hold_r);
        let placed = match crate::systemd::Systemd::connect().await {
            Ok(sd) => into_scope(&sd, cfg, task, pid).await.map(|u| (sd, u)),
            Err(e) => Err(format!("no systemd to give it a scope: {e}")),
        };
        match placed {
            Ok(unit) => scope = Some(unit),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("Hermes' own code was not run: {e}"));
            }
        }
        // Released: it may go on now that it is in its scope.
        let _ = nix::unistd::write(&hold_w, b"G");
    }
    let deadline = Instant::now() + AFTER_COMPLETE_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Ok(st),
            Ok(None) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!(
                    "Hermes' own code did not finish within {AFTER_COMPLETE_TIMEOUT:?}"
                ));
            }
        }
    };
    // What it left behind (a git it started) goes with it.
    if let Some((sd, unit)) = &scope {
        let _ = sd.stop(unit).await;
    }
    match status? {
        st if st.success() => Ok(()),
        st => Err(format!("Hermes' own code failed ({st})")),
    }
}

/// Put the held process `pid` into a scope of its own under the workers' slice; its name.
async fn into_scope(
    sd: &crate::systemd::Systemd,
    cfg: &crate::config::Config,
    task: &str,
    pid: u32,
) -> Result<String, String> {
    let unit = crate::names::upstream_scope(task, pid);
    let desc = format!(
        "Hermes' own code after hermes-mgr complete {}",
        super::clean(task, 80)
    );
    let scope = super::scope_spec(
        cfg,
        &unit,
        None,
        desc,
        Some(AFTER_COMPLETE_TIMEOUT.as_secs() as i64),
    );
    let timeout = Duration::from_secs(cfg.start_timeout_seconds);
    sd.start_scope(&unit, &scope, pid, timeout)
        .await
        .map_err(|e| format!("create scope {unit}: {e}"))?;
    let want = crate::liveness::unit_cgroup(&scope.slice, &unit);
    match crate::liveness::cgroup_of(pid) {
        Ok(Some(cg)) if cg == want => Ok(unit),
        other => {
            let _ = sd.stop(&unit).await;
            Err(format!("process {pid} is in {other:?}, not in {want}"))
        }
    }
}

/// Read first when held: the interpreter has run only its own standard library (`-I`) when
/// it waits for the byte that says it is in its scope; without it (the asker gave up), it
/// ends.
const HELD: &str = "import os\nif os.read(3, 1) != b'G':\n    os._exit(125)\nos.close(3)\n";

/// `snippet` with `args`, by the `hermes` script's interpreter, as `who`, detached from the
/// caller. Run by root, it is also held (`HELD`, on the returned pipe) until it is in its
/// scope.
fn detached(
    bin: &Path,
    who: &Asker,
    snippet: &str,
    args: &[&std::ffi::OsStr],
) -> Result<(Command, Option<(OwnedFd, OwnedFd)>), String> {
    let python = interpreter(bin).ok_or_else(|| {
        format!(
            "{} is not a Python script: cannot ask Hermes' own code",
            bin.display()
        )
    })?;
    let groups: Vec<u32> = who.groups.to_vec();
    let me = nix::unistd::geteuid().as_raw();
    let as_root = me == 0;
    let code = if as_root {
        format!("{HELD}{snippet}")
    } else {
        snippet.to_string()
    };
    let mut cmd = Command::new(&python);
    cmd.args(["-I", "-c", &code])
        .args(args)
        .env_clear()
        .envs(who.env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let (uid, gid) = (who.uid, who.gid);
    // Root becomes the worker user; anyone else may only act as themselves.
    if me != 0 && me != uid {
        return Err(format!(
            "only root or uid {uid} may ask Hermes' own code on this worker's behalf"
        ));
    }
    let hold = if as_root {
        Some(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?)
    } else {
        None
    };
    let hold_fd = hold.as_ref().map(|(r, _)| r.as_raw_fd());
    let parent = std::process::id();
    // Upstream's code imports the plugins and reads the files the worker writes: it is the
    // worker's code, and runs detached from whoever asked. Its own session (no controlling
    // terminal: nothing can be pushed into the operator's shell with TIOCSTI), no_new_privs
    // (no setuid program regains what was dropped), an empty bounding set, and no descriptor
    // of ours but 0-2 (every other is close-on-exec).
    // SAFETY: only raw syscalls (setsid, prctl, close_range, setgroups, setresgid, setresuid,
    // getppid, fcntl, dup2; all async-signal-safe) between fork and exec, on values computed before
    // the fork; groups first, while still root (std's own `uid()` would run before us).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0
                || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if as_root {
                // Every capability the kernel knows (EINVAL past the last one ends it).
                for cap in 0..64 {
                    if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                        if *libc::__errno_location() == libc::EINVAL {
                            break;
                        }
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setresgid(gid, gid, gid) != 0
                    || libc::setresuid(uid, uid, uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // It ends with whoever asked (a CLI interrupted at its terminal, which no longer
            // reaches this session, or a daemon killed): set after the uid change, which
            // clears it, and checked against a parent that died before it was set.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            // Held until it is in its scope: the pipe becomes its descriptor 3, which `HELD`
            // reads before anything of Hermes' runs (dup2 onto itself would keep
            // close-on-exec: cleared instead).
            if let Some(fd) = hold_fd {
                let failed = if fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0) < 0
                } else {
                    libc::dup2(fd, 3) < 0
                };
                if failed {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok((cmd, hold))
}

/// `close_range(2)`'s flag: mark the range close-on-exec instead of closing it (std's own
/// error pipe to the parent must stay open until the exec).
pub(super) const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Fault;

    /// What the prelude said and how it ended → whether a worker started, and whose fault.
    #[test]
    fn what_the_prelude_said_decides_whose_failure_it_is() {
        let f = |said: &str, code: Option<i32>, sig: Option<i32>| {
            prelude_verdict(said.as_bytes(), code, sig).map(|n| {
                let who = match n.fault {
                    Fault::Task => "task",
                    Fault::Infrastructure => "ours",
                };
                format!("{who}: {}", n.reason)
            })
        };
        type Row<'a> = ((&'a str, Option<i32>, Option<i32>), Option<&'a str>);
        let rows: Vec<Row> = vec![
            // It became the worker: booked as any run (its exit is the worker's).
            (("asking\nexec\n", Some(3), None), None),
            (("asking\nexec\n", None, Some(9)), None),
            // Killed before a word (a stop, the runtime limit): booked as any run.
            (("", None, Some(15)), None),
            // Before `asking` only the install ran: ours.
            (("{\"unavailable\": \"import hermes_cli.kanban_db with /v/python3: no module\"}\n", Some(127), None),
             Some("ours: Hermes' own code cannot be started: import hermes_cli.kanban_db with /v/python3: no module")),
            (("", Some(1), None),
             Some("ours: Hermes' own code cannot be started: it ended (exit code 1) before asking; its words are in the unit's journal")),
            // After it, the profile's plugins and the task's repository ran: the task's,
            // whatever they wrote (a plugin may write anything on the pipe).
            (("asking\n{\"failed\": \"workspace: not a git repo\"}\n", Some(127), None),
             Some("task: workspace: not a git repo")),
            (("asking\n{\"unavailable\": \"forged\"}\n", Some(1), None),
             Some("task: Hermes' own code ended (exit code 1) before starting the worker, on the task's profile or repository")),
            (("asking\nexec\n{\"failed\": \"cannot start /x: exec: E2BIG\"}\n", Some(127), None),
             Some("task: cannot start /x: exec: E2BIG")),
            (("asking\n", None, Some(9)), None),
        ];
        for ((said, code, sig), want) in rows {
            assert_eq!(
                f(said, code, sig).as_deref(),
                want,
                "{said:?} {code:?} {sig:?}"
            );
        }
    }
}
