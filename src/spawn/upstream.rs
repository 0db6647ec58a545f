//! What only upstream's own code can say, asked of it: run with the interpreter of the
//! `hermes` script itself (its `#!` line), as the worker user, with the worker's
//! environment — never as root, never through a shell. A miss costs an interpreter start
//! (about a second), paid on the daemon's thread.
//!
//! - `toolsets`: the `--toolsets` pin of upstream's `_default_spawn`, the assignee profile's
//!   effective CLI toolsets (`kanban_db._resolve_worker_cli_toolsets`, i.e.
//!   `tools_config._get_platform_tools(load_config(), "cli")` under the profile's home),
//!   which depends on Hermes' toolset registry, plugins, MCP servers and credentials. A
//!   failure means "no pin", as upstream. Cached per profile home while its `config.yaml`
//!   and `.env` are unchanged, at most five minutes.
//! - `worktree`: a `worktree` task's workspace, materialized by upstream's
//!   `_resolve_worktree_workspace` (`git worktree add`, its anchors and its refusals).

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const TTL: Duration = Duration::from_secs(300);
const TIMEOUT: Duration = Duration::from_secs(20);

/// What the answer depended on that we can see: the files' (mtime, size).
type Fingerprint = Vec<Option<(i64, u64)>>;

struct Entry {
    at: Instant,
    fingerprint: Fingerprint,
    toolsets: Option<Vec<String>>,
}

static CACHE: Mutex<Option<HashMap<(PathBuf, PathBuf), Entry>>> = Mutex::new(None);

/// Called about once a second while upstream's code is awaited (the daemon feeds its
/// watchdog with it).
type Keepalive = Box<dyn Fn() + Send + Sync>;
static KEEPALIVE: std::sync::OnceLock<Keepalive> = std::sync::OnceLock::new();

/// Set what runs about once a second while upstream's code is awaited. The wait is bounded
/// (its timeout), so it is progress, not a hang: a plugin that makes upstream slow costs
/// its task the wait, never the daemon a watchdog restart — which requeued every run and
/// met the same plugin again, for ever.
pub fn set_keepalive(f: impl Fn() + Send + Sync + 'static) {
    let _ = KEEPALIVE.set(Box::new(f));
}

const TOOLSETS: &str = r#"
import json, sys
from hermes_cli.kanban_db import _resolve_worker_cli_toolsets
print(json.dumps(_resolve_worker_cli_toolsets(sys.argv[1])))
"#;

const WORKTREE: &str = r#"
import json, sys
from hermes_cli import kanban_db as kb
board, task_id = sys.argv[1], sys.argv[2]
with kb.connect_closing(board=board) as conn:
    task = kb.get_task(conn, task_id)
try:
    path, branch = kb._resolve_worktree_workspace(task, board=board)
    print(json.dumps({"path": str(path), "branch": branch}))
except Exception as exc:
    print(json.dumps({"error": str(exc)[:500]}))
"#;

fn fingerprint(home: &Path) -> Fingerprint {
    ["config.yaml", ".env"]
        .iter()
        .map(|f| {
            // Not through a link: the profile's home is the worker's to write.
            std::fs::symlink_metadata(home.join(f))
                .ok()
                .map(|m| (m.mtime(), m.size()))
        })
        .collect()
}

/// The interpreter of a `#!` script, if it is one (a binary or a shell stub has none that
/// can import Hermes; then there is no pin).
fn interpreter(bin: &Path) -> Option<PathBuf> {
    let head = crate::safe_fs::read_capped(bin, 256).ok()??;
    let line = head.split(|b| *b == b'\n').next()?;
    let rest = line.strip_prefix(b"#!")?;
    let text = std::str::from_utf8(rest).ok()?.trim();
    let first = text.split_whitespace().next()?;
    let p = PathBuf::from(first);
    (p.is_absolute() && p.file_name()?.to_str()?.starts_with("python")).then_some(p)
}

/// Who asks, and with what environment (the worker's own: allowlist + contract).
pub struct Asker<'a> {
    pub uid: u32,
    pub gid: u32,
    pub groups: &'a [u32],
    pub env: &'a [(String, String)],
}

/// The sorted toolsets upstream would pin for a worker of the profile at `home`, or `None`.
pub fn resolve(bin: &Path, home: &Path, who: &Asker) -> Option<Vec<String>> {
    let key = (bin.to_path_buf(), home.to_path_buf());
    let fp = fingerprint(home);
    {
        let cache = CACHE.lock().ok()?;
        if let Some(e) = cache.as_ref().and_then(|c| c.get(&key)) {
            if e.fingerprint == fp && e.at.elapsed() < TTL {
                return e.toolsets.clone();
            }
        }
    }
    let toolsets = run(bin, who, TOOLSETS, &[home.as_os_str()], TIMEOUT)
        .ok()
        .and_then(|out| serde_json::from_slice::<Option<Vec<String>>>(&out).ok())
        .flatten()
        .filter(|t| !t.is_empty());
    if let Ok(mut cache) = CACHE.lock() {
        cache.get_or_insert_with(HashMap::new).insert(
            key,
            Entry {
                at: Instant::now(),
                fingerprint: fp,
                toolsets: toolsets.clone(),
            },
        );
    }
    toolsets
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

/// The workspace of worktree task `task` on board `board`, materialized by upstream:
/// `Ok(Ok((path, branch)))`, `Ok(Err(upstream's reason why not))`, or `Err` when upstream
/// gave no answer (`AskError` says on whose side).
pub fn worktree(
    bin: &Path,
    who: &Asker,
    board: &str,
    task: &str,
) -> Result<Result<(PathBuf, String), String>, AskError> {
    let out = run(
        bin,
        who,
        WORKTREE,
        &[std::ffi::OsStr::new(board), std::ffi::OsStr::new(task)],
        Duration::from_secs(120),
    )?;
    let v: serde_json::Value = serde_json::from_slice(&out)
        .map_err(|e| AskError::Failed(format!("upstream's worktree resolver said no JSON: {e}")))?;
    if let Some(e) = v["error"].as_str() {
        return Ok(Err(e.to_string()));
    }
    match (v["path"].as_str(), v["branch"].as_str()) {
        (Some(p), b) => Ok(Ok((PathBuf::from(p), b.unwrap_or_default().to_string()))),
        _ => Err(AskError::Failed(format!(
            "upstream's worktree resolver answered {v}"
        ))),
    }
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
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

fn finish(mut cmd: Command, timeout: Duration, python: &Path) -> Result<Vec<u8>, AskError> {
    let mut child = cmd
        .spawn()
        .map_err(|e| AskError::Unavailable(format!("start {}: {e}", python.display())))?;
    // The answers are a few hundred bytes: the pipe holds them until the child is done (no
    // reader thread: the dispatcher forks, and stays single-threaded).
    let mut stdout = child.stdout.take().expect("piped");
    let deadline = Instant::now() + timeout;
    let mut alive_at = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => {
                if alive_at.elapsed() >= Duration::from_secs(1) {
                    if let Some(f) = KEEPALIVE.get() {
                        f();
                    }
                    alive_at = Instant::now();
                }
                std::thread::sleep(Duration::from_millis(10))
            }
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
