//! Text and JSON shapes of CLI output, kept apart from printing so tests can check them.

use serde_json::{json, Value};

use crate::board::{Event, Run, Task};

pub use crate::text::{clean, clean_output};

fn icon(status: &str) -> &'static str {
    // Upstream's `hermes kanban list` icons, so both tools look alike.
    match status {
        "todo" => "◻",
        "ready" => "▶",
        "running" => "●",
        "scheduled" => "⏱",
        "blocked" => "⊘",
        "done" => "✓",
        "archived" => "—",
        _ => "?",
    }
}

pub fn task_json(t: &Task, parents: &[String]) -> Value {
    let mut v = serde_json::to_value(t).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("parents".into(), json!(parents));
    }
    v
}

pub fn task_table(tasks: &[Task]) -> String {
    if tasks.is_empty() {
        return "No tasks. Create one with: hermes-mgr add \"TITLE\" --assignee PROFILE\n".into();
    }
    let mut out = String::new();
    for t in tasks {
        let assignee = t
            .assignee
            .as_deref()
            .map(clean)
            .unwrap_or_else(|| "(unassigned)".into());
        out.push_str(&format!(
            "{} {}  {:8}  {:>4}  {:20}  {}\n",
            icon(t.status.as_str()),
            clean(&t.id),
            clean(t.status.as_str()),
            t.priority,
            assignee,
            clean(&t.title)
        ));
    }
    out
}

fn ts(epoch: Option<i64>) -> String {
    epoch.map(local_time).unwrap_or_else(|| "-".into())
}

/// Epoch seconds as the local time a person reads (`2026-12-05 10:43:17`, in the zone
/// `TZ` or `/etc/localtime` names); the seconds themselves when the C library cannot say.
/// `--json` keeps the board's epoch seconds.
fn local_time(epoch: i64) -> String {
    extern "C" {
        fn tzset();
    }
    static TZ: std::sync::Once = std::sync::Once::new();
    // SAFETY: tzset(3) reads the environment and the zone file once, before any
    // localtime_r(3) here, on the CLI's one thread.
    TZ.call_once(|| unsafe { tzset() });
    let t: libc::time_t = epoch;
    // SAFETY: an all-zero `tm` is a valid value for localtime_r to overwrite.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals for the duration of the call.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return epoch.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        i64::from(tm.tm_year) + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// A run's `resources` (what its scope counted) in one line: `cpu 4.1s, memory peak 64M,
/// io 4K read / 1M written`; `None` when it holds none of them.
pub fn cost(r: &Value) -> Option<String> {
    let n = |k: &str| r.get(k).and_then(Value::as_u64);
    let bytes = |b: u64| match b {
        b if b >= 1 << 30 => format!("{:.1}G", b as f64 / f64::from(1u32 << 30)),
        b if b >= 1 << 20 => format!("{}M", b >> 20),
        b if b >= 1 << 10 => format!("{}K", b >> 10),
        b => format!("{b}B"),
    };
    let mut parts = Vec::new();
    if let Some(us) = n("cpu_usec") {
        parts.push(format!("cpu {:.1}s", us as f64 / 1e6));
    }
    if let Some(p) = n("memory_peak_bytes") {
        parts.push(format!("memory peak {}", bytes(p)));
    }
    if let (Some(rd), Some(wr)) = (n("io_read_bytes"), n("io_write_bytes")) {
        parts.push(format!("io {} read / {} written", bytes(rd), bytes(wr)));
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

pub fn show(
    board: &str,
    t: &Task,
    parents: &[String],
    children: &[String],
    runs: &[Run],
    events: &[Event],
    now: i64,
) -> String {
    let mut o = String::new();
    o.push_str(&format!("{}  {}\n", clean(&t.id), clean(&t.title)));
    if board != crate::board::DEFAULT_BOARD {
        o.push_str(&format!("  board:      {}\n", clean(board)));
    }
    o.push_str(&format!("  status:     {}\n", clean(t.status.as_str())));
    o.push_str(&format!(
        "  assignee:   {}\n",
        t.assignee
            .as_deref()
            .map(clean)
            .unwrap_or_else(|| "-".into())
    ));
    o.push_str(&format!("  priority:   {}\n", t.priority));
    o.push_str(&format!(
        "  failures:   {}{}\n",
        t.consecutive_failures,
        t.max_retries
            .map(|m| format!(" (max {m})"))
            .unwrap_or_default()
    ));
    if let Some(e) = &t.last_failure_error {
        o.push_str(&format!("  last error: {}\n", clean(e)));
    }
    if let Some(l) = &t.claim_lock {
        o.push_str(&format!(
            "  claim:      {} (expires in {}s)\n",
            clean(l),
            t.claim_expires.map(|x| x - now).unwrap_or(0)
        ));
    }
    o.push_str(&format!(
        "  created:    {}  started: {}  completed: {}\n",
        local_time(t.created_at),
        ts(t.started_at),
        ts(t.completed_at)
    ));
    if !parents.is_empty() {
        o.push_str(&format!(
            "  parents:    {}\n",
            parents
                .iter()
                .map(|p| clean(p))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !children.is_empty() {
        o.push_str(&format!(
            "  children:   {}\n",
            children
                .iter()
                .map(|p| clean(p))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if let Some(b) = &t.body {
        o.push_str("\nBody:\n");
        for l in b.lines() {
            o.push_str(&format!("  {}\n", clean(l)));
        }
    }
    o.push_str(&format!("\nRuns ({}):\n", runs.len()));
    for r in runs {
        o.push_str(&run_lines(board, r, now));
    }
    o.push_str(&format!("\nEvents ({}):\n", events.len()));
    for e in events {
        let run = e.run_id.map(|r| format!("[run {r}] ")).unwrap_or_default();
        let payload = e
            .payload
            .as_ref()
            .map(|p| format!(" {}", clean(&p.to_string())))
            .unwrap_or_default();
        o.push_str(&format!(
            "  [{}] {}{}{}\n",
            local_time(e.created_at),
            run,
            clean(&e.kind),
            payload
        ));
    }
    o
}

/// One run of `show`: its line, and its cost when it was kept.
fn run_lines(board: &str, r: &Run, now: i64) -> String {
    let mut o = String::new();
    let dur = r.ended_at.unwrap_or(now) - r.started_at;
    let outcome = r.outcome.as_deref().unwrap_or(if r.ended_at.is_none() {
        "(running)"
    } else {
        &r.status
    });
    let meta = |k: &str| {
        r.metadata
            .as_ref()
            .and_then(|m| m.get(k))
            .and_then(|v| v.as_i64())
    };
    let exit = match (meta("exit_code"), meta("signal")) {
        (Some(c), _) => format!(" exit {c}"),
        (None, Some(sig)) => format!(" signal {sig}"),
        _ => String::new(),
    };
    o.push_str(&format!(
        "  #{:<4} {:12} {:>6}s  {}{exit}  {}{}\n",
        r.id,
        clean(outcome),
        dur,
        r.profile
            .as_deref()
            .map(clean)
            .unwrap_or_else(|| "-".into()),
        crate::names::worker_scope(board, &r.task_id, r.id),
        r.error
            .as_deref()
            .map(|e| format!("  {}", clean(e)))
            .unwrap_or_default()
    ));
    if let Some(c) = r
        .metadata
        .as_ref()
        .and_then(|m| m.get("resources"))
        .and_then(cost)
    {
        o.push_str(&format!("         cost: {c}\n"));
    }
    o
}

fn dur(secs: i64) -> String {
    match secs {
        s if s < 0 => "-".into(),
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// `pool build (builder, ci): 1/2 workers · memory 312M of 8G · pressure memory 0.0 %, …`,
/// and why its next worker would wait.
fn pool_line(p: &crate::dispatch::pools::View, paint: &dyn Fn(&str, String) -> String) -> String {
    let mut line = format!(
        "pool {} ({}): {}{} workers",
        clean(&p.name),
        clean(&p.profiles.join(", ")),
        p.workers,
        p.max_workers.map(|m| format!("/{m}")).unwrap_or_default()
    );
    if p.memory_current.is_some() || p.memory_max.is_some() {
        line.push_str(&format!(" · memory {}", bytes(p.memory_current)));
        if let Some(m) = p.memory_max {
            line.push_str(&format!(" of {}", bytes(Some(m))));
        }
    }
    if !p.pressure.is_empty() {
        let pr: Vec<String> = p
            .pressure
            .iter()
            .map(|(r, v)| format!("{r} {v:.1} %"))
            .collect();
        line.push_str(&format!(" · pressure {}", pr.join(", ")));
    }
    match &p.waiting {
        Some(w) => format!(
            "{line}\n{}\n",
            paint("33", format!("  waiting: {}", clean(w)))
        ),
        None => format!("{line}\n"),
    }
}

fn bytes(b: Option<u64>) -> String {
    match b {
        None => "-".into(),
        Some(b) if b < 1 << 20 => format!("{}K", b >> 10),
        Some(b) if b < 1 << 30 => format!("{:.1}M", b as f64 / (1 << 20) as f64),
        Some(b) => format!("{:.1}G", b as f64 / (1 << 30) as f64),
    }
}

/// `hermes-mgr status`: a summary line, then one row per task worth seeing.
pub fn status(s: &crate::status::Snapshot, colour: bool) -> String {
    let paint = |code: &str, text: String| {
        if colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text
        }
    };
    let counts: Vec<String> = s
        .counts
        .iter()
        .map(|(k, v)| format!("{} {v}", clean(k)))
        .collect();
    let many = s.boards.len() > 1;
    let mut o = format!(
        "{}  dispatcher: {}  {}\n",
        if many {
            format!("boards {}", clean(&s.boards.join(", ")))
        } else {
            format!("board {}", clean(&s.board))
        },
        if s.dispatcher == "running" {
            paint("32", s.dispatcher.to_string())
        } else {
            paint("33", s.dispatcher.to_string())
        },
        if counts.is_empty() {
            "empty".to_string()
        } else {
            counts.join(" · ")
        }
    );
    if let Some(h) = &s.hermes {
        o.push_str(&format!(
            "workers run {} {} (the contract of {})\n",
            clean(&h.package),
            clean(&h.version),
            h.contract
        ));
    }
    if let Some(p) = &s.estop {
        o.push_str(&format!(
            "{}\n",
            paint(
                "31",
                clean(&crate::hermes_config::estop_text(std::path::Path::new(p)))
            )
        ));
    }
    if let Some(p) = paused_line(&s.paused) {
        o.push_str(&format!("{}\n", paint("33", p)));
    }
    for p in &s.pools {
        o.push_str(&pool_line(p, &paint));
    }
    if let Some(failing) = s
        .dispatcher_status
        .as_deref()
        .filter(|t| t.starts_with("FAILING"))
    {
        o.push_str(&format!("{}\n", paint("31", clean(failing))));
    }
    if s.tasks.is_empty() {
        o.push_str("Nothing running, ready or blocked. Create a task with: hermes kanban create TITLE --assignee PROFILE\n");
        return o;
    }
    if many {
        o.push_str(&format!("{:<12} ", "BOARD"));
    }
    o.push_str(&format!(
        "{:<12} {:<8} {:>4} {:<12} {:>5} {:>5}  {}\n",
        "ID", "STATUS", "PRI", "ASSIGNEE", "AGE", "TRIES", "WORKER / LAST ERROR"
    ));
    for t in &s.tasks {
        o.push_str(&task_row(t, many, &paint));
    }
    // What `--limit` left out, said, so that a partial table never passes for the board.
    let more: Vec<String> = ["running", "ready", "blocked", "triage", "todo"]
        .iter()
        .filter_map(|st| {
            let shown = s.tasks.iter().filter(|t| t.status == *st).count() as i64;
            let total = s.counts.get(*st).copied().unwrap_or(0);
            (total > shown).then(|| format!("{} more {st}", total - shown))
        })
        .collect();
    if !more.is_empty() {
        o.push_str(&format!(
            "… {} (--limit N shows more; --json lists every running task)\n",
            more.join(", ")
        ));
    }
    o
}

/// One task of `status`: its row, its run's live facts or its last error.
/// The operators' board holds, for the status header.
fn paused_line(p: &[crate::status::PausedBoard]) -> Option<String> {
    let first = p.first()?;
    let frozen = |f: bool| if f { ", workers frozen" } else { "" };
    Some(if first.all {
        format!(
            "PAUSED: every board (hermes-mgr pause --all{}, since {}); `hermes-mgr resume --all` lifts it",
            frozen(first.freeze),
            first.since
        )
    } else {
        let boards: Vec<String> = p
            .iter()
            .map(|b| format!("{}{}", clean(&b.board), frozen(b.freeze)))
            .collect();
        format!(
            "PAUSED: board {} (hermes-mgr pause); `hermes-mgr resume --board SLUG` lifts it",
            boards.join(", ")
        )
    })
}

fn task_row(
    t: &crate::status::TaskRow,
    many: bool,
    paint: &dyn Fn(&str, String) -> String,
) -> String {
    let mut o = String::new();
    let status = match t.status.as_str() {
        _ if t.paused.is_some() => paint("33", format!("{:<8}", "paused")),
        "running" => paint("32", format!("{:<8}", t.status)),
        "blocked" => paint("31", format!("{:<8}", t.status)),
        _ => format!("{:<8}", clean(&t.status)),
    };
    let detail = match &t.run {
        Some(r) => format!(
            "{} pid {} {} mem {} peak {} cpu {} up {}",
            r.unit,
            r.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            r.state.as_deref().unwrap_or("gone"),
            bytes(r.memory_current),
            bytes(r.memory_peak),
            r.cpu_usec
                .map(|u| format!("{:.1}s", u as f64 / 1e6))
                .unwrap_or_else(|| "-".into()),
            dur(r.uptime_seconds)
        ),
        None => t.last_error.as_deref().map(clean).unwrap_or_default(),
    };
    let detail = match &t.paused {
        Some(p) if p.frozen == Some(true) => format!("FROZEN {detail}"),
        Some(p) if p.frozen == Some(false) => format!("freezing {detail}"),
        Some(_) => format!("held {detail}"),
        None => detail,
    };
    if many {
        o.push_str(&format!("{:<12} ", clean(&t.board)));
    }
    o.push_str(&format!(
        "{:<12} {status} {:>4} {:<12} {:>5} {:>5}  {}\n",
        clean(&t.id),
        t.priority,
        t.assignee
            .as_deref()
            .map(clean)
            .unwrap_or_else(|| "-".into()),
        dur(t.age_seconds),
        t.attempts,
        detail
    ));
    o
}

pub fn doctor(checks: &[crate::doctor::Check]) -> String {
    use crate::doctor::Level::*;
    checks
        .iter()
        .map(|c| {
            let tag = match c.level {
                Ok => "ok  ",
                Warn => "warn",
                Fail => "FAIL",
            };
            let fix = c
                .fix
                .as_deref()
                .filter(|_| c.level != Ok)
                .map(|f| format!(" — fix: {f}"))
                .unwrap_or_default();
            format!("{tag} {:<14} {}{fix}\n", c.name, clean(&c.detail))
        })
        .collect()
}

pub fn pass(r: &crate::dispatch::PassReport) -> String {
    let mut o = String::new();
    if r.skipped_locked {
        o.push_str("Another dispatcher holds this board's dispatch lock; nothing done.\n");
        return o;
    }
    if let Some(why) = &r.pressure {
        o.push_str(&format!(
            "Holding new workers: {}; nothing claimed.\n",
            clean(why)
        ));
    }
    for s in &r.spawned {
        o.push_str(&format!(
            "Spawned {} run {} in {} (pid {})\n",
            clean(&s.task_id),
            s.run_id,
            s.unit,
            s.pid
        ));
    }
    for f in &r.spawn_failed {
        let gave_up = if f.gave_up {
            " — gave up, task blocked"
        } else {
            ""
        };
        o.push_str(&format!(
            "Spawn failed {} run {}: {}{gave_up}\n",
            clean(&f.task_id),
            f.run_id,
            clean(&f.error)
        ));
    }
    for id in &r.skipped_unassigned {
        o.push_str(&format!(
            "Skipped {} (no assignee; set default_assignee)\n",
            clean(id)
        ));
    }
    for id in &r.skipped_nonspawnable {
        o.push_str(&format!(
            "Skipped {} (assignee is not a profile on this host)\n",
            clean(id)
        ));
    }
    if r.skipped_capped > 0 {
        o.push_str(&format!(
            "{} ready task(s) wait for a free slot (max_spawn)\n",
            r.skipped_capped
        ));
    }
    if o.is_empty() {
        o.push_str("Nothing to dispatch.\n");
    }
    o
}

/// One task paused (`pause`) or resumed.
pub fn task_paused(r: &crate::dispatch::pause::TaskPaused, pause: bool) -> String {
    let what = match (pause, &r.unit, r.already) {
        (true, _, true) => "was already paused".to_string(),
        (true, Some(u), _) => format!("paused: held, its worker frozen ({u})"),
        (true, None, _) => "paused: held (nothing was running)".to_string(),
        (false, Some(u), _) => format!("resumed: its worker goes on ({u})"),
        (false, None, _) => "resumed".to_string(),
    };
    format!("{} {what}", clean(&r.task_id))
}

/// Boards held (`pause --board`/`--all`) or released.
pub fn boards_paused(r: &crate::dispatch::pause::BoardsPaused, pause: bool) -> String {
    let which = if r.all {
        "every board".to_string()
    } else {
        format!("board {}", clean(&r.boards.join(", ")))
    };
    let mut o = if pause {
        format!("{which} paused: no new worker starts until `hermes-mgr resume`")
    } else {
        format!("{which} resumed")
    };
    if !r.runs.is_empty() {
        let tasks: Vec<String> = r.runs.iter().map(|t| clean(&t.task_id)).collect();
        o.push_str(&format!(
            "; {} {}: {}",
            r.runs.len(),
            if pause {
                "worker(s) frozen"
            } else {
                "worker(s) thawed"
            },
            tasks.join(", ")
        ));
    }
    o
}

pub fn stopped(r: &crate::dispatch::stop::StopReport) -> String {
    use crate::dispatch::stop::HowItEnded::*;
    let worker = r
        .worker_exit
        .as_deref()
        .map(|w| format!(" (worker: {w})"))
        .unwrap_or_default();
    let how = match r.how {
        ExitedAfterSigterm => format!("exited after SIGTERM in {} ms{worker}", r.elapsed_ms),
        KilledAfterTimeout => format!(
            "killed with SIGKILL after the {}s timeout{worker}",
            r.timeout_seconds
        ),
        AlreadyEnded => format!("had already ended{worker}"),
    };
    format!(
        "{} run {} ({}): {how}; task is now {}",
        clean(&r.task_id),
        r.run_id,
        r.unit,
        r.task_status
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_times_read_as_local_time() {
        // SAFETY: the test sets TZ before the first tzset of this process's CLI code;
        // tests that read the zone run nowhere else in this binary.
        unsafe { std::env::set_var("TZ", "UTC") };
        assert_eq!(local_time(1_796_427_594), "2026-12-04 23:39:54");
        assert_eq!(ts(None), "-");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(clean("a\nb\x1b[2Jc"), "a\\nb\\u{1b}[2Jc");
        assert_eq!(clean("ünïcødé"), "ünïcødé");
    }

    #[test]
    fn a_runs_cost_reads_in_one_line() {
        let full = json!({"cpu_usec": 4_121_000, "memory_peak_bytes": 67_100_000u64,
                          "io_read_bytes": 4196, "io_write_bytes": 1_048_576});
        assert_eq!(
            cost(&full).as_deref(),
            Some("cpu 4.1s, memory peak 63M, io 4K read / 1M written")
        );
        assert_eq!(cost(&json!({"cpu_usec": 50})).as_deref(), Some("cpu 0.0s"));
        assert_eq!(cost(&json!({"something": "else"})), None);
        assert_eq!(cost(&json!("not an object")), None);
    }
}
