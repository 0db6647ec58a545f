//! `hermes-mgr logs`: a run's journal, or the task's log file when the journal has none.

use anyhow::{bail, Context};

use super::{render, Cli};
use crate::board::{Board, OpenMode};

use super::verbs::open_with_task;

/// `logs`: the worker's output.
pub(super) fn cmd_logs(
    cli: &Cli,
    id: &str,
    follow: &bool,
    run: &Option<i64>,
) -> anyhow::Result<()> {
    let b = open_with_task(cli, id, OpenMode::Inspect)?;
    logs(&b, id, *run, *follow)
}

/// `logs`: the journal of the run's scope; upstream's log file when the journal has none.
/// Either way every line passes `render::clean_output`: it is the worker's text.
pub(super) fn logs(b: &Board, id: &str, run: Option<i64>, follow: bool) -> anyhow::Result<()> {
    let task = b.require_task(id)?;
    let run = match run {
        Some(r) => r,
        None => match task.current_run_id.or(b.last_run(id)?.map(|r| r.id)) {
            Some(r) => r,
            None => bail!("task {id} has never run; there is no output yet"),
        },
    };
    if !b.runs(id)?.iter().any(|r| r.id == run) {
        bail!("task {id} has no run {run}; `hermes-mgr show {id}` lists its runs");
    }
    let unit = crate::names::worker_scope(&b.paths().slug, id, run);
    let mut j = std::process::Command::new("journalctl");
    j.args(["--no-pager", "-o", "cat", "-u", &unit]);
    let has_journal = journal_has_entries(&unit);
    let file = b
        .paths()
        .logs
        .join(format!("{}.log", crate::names::file_component(id)));
    let mut out = std::io::stdout().lock();
    if !has_journal {
        // Upstream's log, read as the board's owner: it sits in the tree workers write.
        let opened = crate::safe_fs::as_user(b.owner(), || {
            crate::safe_fs::open_regular(&file, crate::safe_fs::Access::Read)
        })?;
        match opened {
            Ok(f) => return relay(std::io::BufReader::new(f), &mut out, follow),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow::Error::new(e).context("the worker log")),
        }
    }
    if follow {
        j.arg("--follow");
    }
    let mut child = j
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("run journalctl")?;
    let piped = child.stdout.take().context("journalctl's output")?;
    let r = relay(std::io::BufReader::new(piped), &mut out, false);
    let _ = child.kill();
    let _ = child.wait();
    r
}

/// Whether the journal holds any line of `unit`: its first byte is enough (a run's whole
/// journal may be gigabytes, and one line of it as long as the worker made it).
pub(super) fn journal_has_entries(unit: &str) -> bool {
    use std::io::Read;
    let Ok(mut child) = std::process::Command::new("journalctl")
        .args(["--no-pager", "-q", "-o", "cat", "-n", "1", "-u", unit])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        return false;
    };
    let mut byte = [0u8; 1];
    let any = child
        .stdout
        .take()
        .is_some_and(|mut o| matches!(o.read(&mut byte), Ok(1)));
    let _ = child.kill();
    let _ = child.wait();
    any
}

/// A line longer than this is relayed in pieces of this size: the worker decides how long
/// its lines are (a 64 GiB sparse log is one line of zeros), the reader's memory does not.
const RELAY_PIECE: u64 = 64 * 1024;

/// Copy lines through `clean_output`; with `follow`, keep reading what is appended. A
/// closed stdout (`| head`) ends it quietly.
pub(super) fn relay(
    mut from: impl std::io::BufRead,
    out: &mut impl std::io::Write,
    follow: bool,
) -> anyhow::Result<()> {
    use std::io::{BufRead, Read};
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = from
            .by_ref()
            .take(RELAY_PIECE)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            if !follow {
                break;
            }
            let _ = out.flush();
            std::thread::sleep(std::time::Duration::from_millis(250));
            continue;
        }
        match out.write_all(render::clean_output(&line).as_bytes()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            r => r?,
        }
    }
    match out.flush() {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}
