//! The state directory's layout (`/run/hermes-mgr`): each run's exit record, and the
//! claimers of this boot.

use std::path::{Path, PathBuf};

use crate::record::{ExitRecord, Paused, TmpdirNote};

/// `<state_dir>/runs/<task>-run-<run>.json`, `<board>.` in front off the default board
/// (`names::run_record`: bounded, one component, whatever the ids are).
pub fn record_path(state_dir: &Path, board: &str, task: &str, run_id: i64) -> PathBuf {
    state_dir
        .join("runs")
        .join(crate::names::run_record(board, task, run_id))
}

/// `<state_dir>/claimers`: one line `<boot id> <claimer id>` for every hermes-mgr process
/// that claimed a task on this boot (`note_claimer`). A `running` row of this host with no
/// worker, no scope and no exit record is ours to requeue only when its claim lock is one
/// of these: the dispatcher that claimed it died before the worker started. Any other lock
/// is someone's hand claim (`hermes kanban claim`, a terminal lane), left to its claim TTL
/// as upstream leaves it. Noted once per process, before its first claim, so no kill can
/// fall between a claim and its being known as ours.
pub fn claimers_path(state_dir: &Path) -> PathBuf {
    state_dir.join("claimers")
}

/// Note this process (`host::claimer_id()`) as a claimer of this boot; once per process
/// and state directory.
pub fn note_claimer(state_dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    static NOTED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut noted = NOTED.lock().unwrap_or_else(|e| e.into_inner());
    if noted.iter().any(|d| d == state_dir) {
        return Ok(());
    }
    std::fs::create_dir_all(state_dir)?;
    // One short `write` with O_APPEND: lines of concurrent claimers never interleave.
    let line = format!(
        "{} {}\n",
        crate::host::boot_id().unwrap_or_default(),
        crate::host::claimer_id()
    );
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(claimers_path(state_dir))?
        .write_all(line.as_bytes())?;
    noted.push(state_dir.to_path_buf());
    Ok(())
}

/// The claimer ids hermes-mgr processes noted on this boot.
pub fn claimers_of_this_boot(state_dir: &Path) -> std::collections::HashSet<String> {
    let boot = crate::host::boot_id().unwrap_or_default();
    std::fs::read_to_string(claimers_path(state_dir))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(b, _)| *b == boot)
        .map(|(_, c)| c.to_string())
        .collect()
}

/// Less room than this in the state directory's filesystem is too little for a supervisor's
/// exit record (a few KiB, with the worker's last output).
const ROOM_NEEDED: u64 = 64 * 1024;

/// The state directory's filesystem has no room for an exit record: its free bytes, then.
/// Supervisors keep what they cannot write and retry; the service status says why runs stay
/// open meanwhile.
pub fn full(state_dir: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(state_dir).ok()?;
    let free = s.blocks_available() as u64 * s.fragment_size() as u64;
    (free < ROOM_NEEDED).then_some(free)
}

/// A booked run's files in the runtime directory: its exit record, its pauses, the note of
/// its TMPDIR (by then the dispatcher keeps that in memory, if the directory is left).
pub fn forget_run(state_dir: &Path, board: &str, task: &str, run_id: i64) {
    let _ = std::fs::remove_file(record_path(state_dir, board, task, run_id));
    let _ = std::fs::remove_file(paused_path(state_dir, board, task, run_id));
    let _ = std::fs::remove_file(tmpdir_note_path(state_dir, board, task, run_id));
}

/// `<state_dir>/tmpdirs/`, the exit record's name with `.tmpdir` for `.json`: where the
/// run's TMPDIR is (`record::TmpdirNote`). Beside `runs/`, not in it: the daemon watches
/// that, and these change twice per run for nothing it must do then.
pub fn tmpdir_note_path(state_dir: &Path, board: &str, task: &str, run_id: i64) -> PathBuf {
    state_dir
        .join("tmpdirs")
        .join(crate::names::run_record(board, task, run_id))
        .with_extension("tmpdir")
}

/// The note in `path`; none when it is missing or unreadable (at most 4 KiB is read).
pub fn read_tmpdir_note(path: &Path) -> Option<TmpdirNote> {
    crate::safe_fs::read_capped(path, 4096)
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// `record_path` with `.paused` for `.json`: the run's pauses (`record::Paused`).
pub fn paused_path(state_dir: &Path, board: &str, task: &str, run_id: i64) -> PathBuf {
    record_path(state_dir, board, task, run_id).with_extension("paused")
}

/// The pauses in `path`; none when it is missing or unreadable (at most 4 KiB is read).
pub fn read_paused(path: &Path) -> Paused {
    crate::safe_fs::read_capped(path, 4096)
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Change the pauses in `path` (replaced whole: the supervisor reads a whole one).
pub fn update_paused(path: &Path, change: impl FnOnce(Paused) -> Paused) -> std::io::Result<()> {
    let next = change(read_paused(path));
    let tmp = path.with_extension("paused.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec(&next).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, path)
}

/// The names of the exit records there are (`names::run_record`), in one listing; `None`
/// when the directory cannot be listed. Reconcile goes through every live run, and most
/// have no record.
pub fn records_present(state_dir: &Path) -> Option<std::collections::HashSet<String>> {
    let names = std::fs::read_dir(state_dir.join("runs"))
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    Some(names)
}

/// The exit record a supervisor left for this run, if any.
pub fn read_record(
    state_dir: &Path,
    board: &str,
    task: &str,
    run_id: i64,
) -> std::io::Result<Option<ExitRecord>> {
    match std::fs::read(record_path(state_dir, board, task, run_id)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(std::io::Error::other),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// When the run's exit record was written (its file's time, to the nanosecond): the
/// moment its worker's end was known.
pub fn record_written(
    state_dir: &Path,
    board: &str,
    task: &str,
    run_id: i64,
) -> Option<std::time::SystemTime> {
    std::fs::metadata(record_path(state_dir, board, task, run_id))
        .and_then(|m| m.modified())
        .ok()
}

/// Where the daemon keeps its latest metrics (`hermes-mgr metrics` prints them).
pub fn metrics_path(state_dir: &Path) -> PathBuf {
    state_dir.join(METRICS_FILE)
}

pub const METRICS_FILE: &str = "metrics.prom";
