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
//!
//! Whose fault a failure is follows what ran: before `asking` is said, only the
//! interpreter and Hermes' installed package have run — the dispatcher's configuration
//! (`Fault::Infrastructure`); after it, the profile's plugins and the task's repository have
//! (`Fault::Task`). What it says travels on descriptor 3, a pipe to its supervisor, closed
//! by the exec of the worker. `hermes-mgr complete` asks from the CLI, detached (`run`).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long the toolset resolver and the worktree resolver may take.
pub(super) const TOOLSETS_TIMEOUT: Duration = Duration::from_secs(20);
pub(super) const WORKTREE_TIMEOUT: Duration = Duration::from_secs(120);

/// Run as `python -I -c PRELUDE <plan>` (`-I`: no user site-packages and no `PYTHON*`
/// variables, which the worker controls, before `asking`); `<plan>` is JSON: `argv` (the
/// worker's), `toolsets_home`, `toolsets_at`, `worktree` (or null), the two timeouts.
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
    from hermes_cli import kanban_db as kb
except Exception as exc:
    why = "import hermes_cli.kanban_db with %s: %s" % (sys.executable, exc)
    if plan.get("worktree"):
        unavailable(why)
    # Only the pin is lost: the worker starts as upstream starts one whose toolsets it
    # could not resolve, and the unit's journal says why.
    kb = None
    sys.stderr.write("hermes-mgr: %s; the worker starts without upstream's --toolsets pin\n" % why)
    sys.stderr.flush()
say("asking")
class Late(BaseException):
    pass
def late(signum, frame):
    raise Late()
signal.signal(signal.SIGALRM, late)
env = dict(os.environ)
wt = plan.get("worktree")
if wt:
    os.environ["HERMES_KANBAN_HOME"] = wt["kanban_home"]
    signal.alarm(plan["worktree_timeout"])
    try:
        with kb.connect_closing(board=wt["board"]) as conn:
            task = kb.get_task(conn, wt["task"])
        if task is None or task.current_run_id != wt["run_id"]:
            fail("workspace: run %d is no longer the task's current run" % wt["run_id"])
        path, branch = kb._resolve_worktree_workspace(task, board=wt["board"])
        branch = branch or (task.branch_name or "").strip() or "wt/%s" % task.id
        with kb.connect_closing(board=wt["board"]) as conn:
            kb.set_workspace_path(conn, task.id, str(path))
            kb.set_branch_name(conn, task.id, branch)
    except Late:
        fail("workspace: Hermes' own code did not answer within %ds" % plan["worktree_timeout"])
    except Exception as exc:
        fail("workspace: %s" % exc)
    finally:
        signal.alarm(0)
    del os.environ["HERMES_KANBAN_HOME"]
    try:
        os.chdir(path)
    except OSError as exc:
        fail("cannot enter the workspace %s: %s" % (path, exc))
    env["HERMES_KANBAN_WORKSPACE"] = env["TERMINAL_CWD"] = str(path)
    env["HERMES_KANBAN_BRANCH"] = branch
toolsets = None
resolve = getattr(kb, "_resolve_worker_cli_toolsets", None)
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
) -> Option<super::spec::NotStarted> {
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
    let not_started = |fault, reason: String| Some(super::spec::NotStarted { reason, fault });
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

/// What upstream's `complete_task` does once a task is done (`hermes-mgr complete` writes the
/// verdict itself): keep the scratch workspace's declared artifacts in
/// `kanban/attachments/<task>/`, then remove the workspace unless children still need it.
/// Upstream's own functions, as the worker user (the workspace is that user's).
pub fn after_complete(bin: &Path, who: &Asker, task: &str, metadata: &str) -> Result<(), String> {
    if interpreter(bin).is_none() {
        // Not Hermes (a test's stub worker): there is no upstream code to ask.
        return Ok(());
    }
    run(
        bin,
        who,
        AFTER_COMPLETE,
        &[std::ffi::OsStr::new(task), std::ffi::OsStr::new(metadata)],
        Duration::from_secs(60),
    )
    .map(drop)
    .map_err(|e| e.to_string())
}

/// Why upstream's code gave no answer, by whose side it is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AskError {
    /// It could not be started: the dispatcher's configuration or machinery.
    Unavailable(String),
    /// It ran, on the task's input (its profile, plugins, repository), and failed, gave no
    /// answer, or ran out of time: the task's.
    Failed(String),
}

impl std::fmt::Display for AskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AskError::Unavailable(s) | AskError::Failed(s) => f.write_str(s),
        }
    }
}

/// `snippet` with `args`, by the `hermes` script's interpreter, as `who`: its stdout.
fn run(
    bin: &Path,
    who: &Asker,
    snippet: &str,
    args: &[&std::ffi::OsStr],
    timeout: Duration,
) -> Result<Vec<u8>, AskError> {
    let python = interpreter(bin).ok_or_else(|| {
        AskError::Unavailable(format!(
            "{} is not a Python script: cannot ask Hermes' own code",
            bin.display()
        ))
    })?;
    let groups: Vec<u32> = who.groups.to_vec();
    let mut cmd = Command::new(&python);
    cmd.args(["-c", snippet])
        .args(args)
        .env_clear()
        .envs(who.env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let (uid, gid) = (who.uid, who.gid);
    // Root becomes the worker user; anyone else may only act as themselves.
    let me = nix::unistd::geteuid().as_raw();
    if me != 0 && me != uid {
        return Err(AskError::Unavailable(format!(
            "only root or uid {uid} may ask Hermes' own code on this worker's behalf"
        )));
    }
    let as_root = me == 0;
    let parent = std::process::id();
    // Upstream's code imports the plugins and reads the files the worker writes: it is the
    // worker's code, and runs detached from whoever asked. Its own session (no controlling
    // terminal: nothing can be pushed into the operator's shell with TIOCSTI), no_new_privs
    // (no setuid program regains what was dropped), an empty bounding set, and no descriptor
    // of ours but 0-2 (every other is close-on-exec).
    // SAFETY: only raw syscalls (setsid, prctl, close_range, setgroups, setresgid, setresuid,
    // getppid; all async-signal-safe) between fork and exec, on values computed before the fork;
    // groups first, while still root (std's own `uid()` would run before us).
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
            Ok(())
        });
    }
    finish(cmd, timeout, &python)
}

/// `close_range(2)`'s flag: mark the range close-on-exec instead of closing it (std's own
/// error pipe to the parent must stay open until the exec).
pub(super) const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

fn finish(mut cmd: Command, timeout: Duration, python: &Path) -> Result<Vec<u8>, AskError> {
    let mut child = cmd
        .spawn()
        .map_err(|e| AskError::Unavailable(format!("start {}: {e}", python.display())))?;
    // The answers are a few hundred bytes: the pipe holds them until the child is done (no
    // reader thread: the dispatcher forks, and stays single-threaded).
    let mut stdout = child.stdout.take().expect("piped");
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(AskError::Failed(format!(
                    "Hermes' own code did not answer within {timeout:?}"
                )));
            }
        }
    };
    let mut out = Vec::new();
    Read::take(&mut stdout, 1 << 20)
        .read_to_end(&mut out)
        .map_err(|e| AskError::Failed(format!("read Hermes' answer: {e}")))?;
    if !status.success() {
        return Err(AskError::Failed(format!(
            "Hermes' own code failed ({status})"
        )));
    }
    Ok(out)
}

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
