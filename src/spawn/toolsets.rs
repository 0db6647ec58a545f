//! `--toolsets` for a worker, as upstream's `_default_spawn` pins it: the assignee profile's
//! effective CLI toolsets (`kanban_db._resolve_worker_cli_toolsets`, i.e.
//! `tools_config._get_platform_tools(load_config(), "cli")` under the profile's home). That
//! function depends on Hermes' toolset registry, its plugins, MCP servers and credentials,
//! so it is not re-implemented: upstream's own code is asked, with the interpreter of the
//! `hermes` script itself (its `#!` line), as the worker user, with the workers' environment.
//! Upstream treats a failure as "no pin" (the worker then resolves its own); so does this.
//!
//! The answer is cached per profile home for as long as its `config.yaml` and `.env` are
//! unchanged, at most five minutes (plugins and MCP servers come and go): a miss costs an
//! interpreter start (about a second), paid on the daemon's thread.

use std::collections::HashMap;
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

const SNIPPET: &str = r#"
import json, sys
from hermes_cli.kanban_db import _resolve_worker_cli_toolsets
print(json.dumps(_resolve_worker_cli_toolsets(sys.argv[1])))
"#;

fn fingerprint(home: &Path) -> Fingerprint {
    ["config.yaml", ".env"]
        .iter()
        .map(|f| {
            std::fs::metadata(home.join(f))
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
    let toolsets = ask(bin, home, who);
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

fn ask(bin: &Path, home: &Path, who: &Asker) -> Option<Vec<String>> {
    let python = interpreter(bin)?;
    let groups: Vec<u32> = who.groups.to_vec();
    let mut cmd = Command::new(&python);
    cmd.args(["-c", SNIPPET])
        .arg(home)
        .env_clear()
        .envs(who.env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let (uid, gid) = (who.uid, who.gid);
    // SAFETY: only raw setgroups/setresgid/setresuid (async-signal-safe) between fork and
    // exec; groups first, while still root (std's own `uid()` would run before us).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().ok()?;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!(home = %home.display(), "resolving the worker's toolsets took over {TIMEOUT:?}; no --toolsets pin");
                return None;
            }
        }
    }
    let out = child.wait_with_output().ok()?;
    if !out.status.success() {
        return None;
    }
    let v: Option<Vec<String>> = serde_json::from_slice(&out.stdout).ok()?;
    v.filter(|t| !t.is_empty())
}
