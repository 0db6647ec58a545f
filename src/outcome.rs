//! How a run ended, and what that means for its task: the one place that decides.
//!
//! Two pure functions, facts in, decisions out. [`decide`] turns what is known about a run
//! (the supervisor's exit record, the scope as systemd and the kernel see it, an operator's
//! stop, the task's runtime limit) into a [`RunEnd`]; [`booking`] turns a `RunEnd` and the
//! task's counters into exactly what is written: the run's outcome, the event, whether the
//! failure counts, whether the breaker trips. The daemon gathers facts and books in one
//! place (`daemon::book`), `stop` and `dispatch` hand their facts to the same functions,
//! and `Board::end_run` only applies a [`Booking`] in SQL.

use serde_json::{json, Map, Value};

use crate::contract::Generation;
use crate::record::ExitRecord;
pub use crate::record::Fault;

/// Exit code 75 (`EX_TEMPFAIL`): upstream's worker says "rate limited, try later".
pub const EXIT_RATE_LIMITED: i32 = 75;
/// Exit code 78 (`EX_CONFIG`): newer Hermes' worker says "the provider rejected the
/// configuration" (credential revoked, model gone, TLS broken): no retry can help, so the
/// task is blocked on the first such exit, sticky (`KANBAN_TERMINAL_PROVIDER_EXIT_CODE`).
pub const EXIT_TERMINAL_PROVIDER: i32 = 78;
/// Upstream's `_PROTOCOL_VIOLATION_FAILURE_LIMIT`.
pub const PROTOCOL_VIOLATION_LIMIT: i64 = 3;
/// Errors stored on rows are cut here, as upstream does.
const ERROR_MAX: usize = 500;

/// How a run that was not ended by the worker itself (complete/block) ended.
/// Each maps onto upstream's outcome names and event kinds (see [`booking`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// Non-zero exit or death by signal: counted towards the breaker.
    Crashed { error: String, details: Value },
    /// Exit 0 without complete/block: upstream books it `crashed` + `protocol_violation`.
    ProtocolViolation { error: String, details: Value },
    /// Exit 75: requeued, not counted; stamps `last_failure_error` for the cooldown guard.
    RateLimited { error: String, details: Value },
    /// Exit 78: counted, and the task is blocked at once, sticky.
    TerminalProvider { error: String, details: Value },
    /// `max_runtime_seconds` exceeded: counted.
    TimedOut { error: String, details: Value },
    /// The worker never started because of the task or its configuration: counted.
    SpawnFailed { error: String },
    /// The worker never started because the dispatcher's side failed (systemd, D-Bus, fork,
    /// descriptors, the runs directory, a silent supervisor): not the task's fault, not
    /// counted (upstream HEAD's "infrastructure" spawn failure).
    Infrastructure { error: String },
    /// The worker's scope vanished with no word (reboot, lost unit, a supervisor that died
    /// before the worker started): not the worker's fault, not counted.
    Lost { error: String },
    /// Stopped from outside (an operator, a shutdown): requeued, not counted.
    Stopped { error: String },
    /// Stopped by the dispatcher for showing no heartbeat (`kanban.dispatch_stale_timeout_
    /// seconds`): requeued, not counted, as upstream's `detect_stale_running`.
    Stale { error: String, details: Value },
}

impl RunEnd {
    pub fn error(&self) -> &str {
        match self {
            RunEnd::Crashed { error, .. }
            | RunEnd::ProtocolViolation { error, .. }
            | RunEnd::RateLimited { error, .. }
            | RunEnd::TerminalProvider { error, .. }
            | RunEnd::TimedOut { error, .. }
            | RunEnd::SpawnFailed { error }
            | RunEnd::Infrastructure { error }
            | RunEnd::Lost { error }
            | RunEnd::Stopped { error }
            | RunEnd::Stale { error, .. } => error,
        }
    }
}

/// A spawn failure's end.
pub fn spawn_failure(fault: Fault, reason: &str) -> RunEnd {
    match fault {
        Fault::Task => RunEnd::SpawnFailed {
            error: reason.to_string(),
        },
        Fault::Infrastructure => RunEnd::Infrastructure {
            error: reason.to_string(),
        },
    }
}

/// The scope of a run as systemd and the kernel see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Loaded and live, with processes in its cgroup.
    Live,
    /// Gone (or failed/inactive).
    Gone,
    /// systemd calls it live but its cgroup is empty (`liveness::cgroup_populated`): its
    /// supervisor died before the attach. Over.
    Empty,
}

/// Everything known about one run when deciding how it ended.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    pub unit: &'a str,
    /// The supervisor's exit record, if it wrote one.
    pub record: Option<&'a ExitRecord>,
    pub scope: Scope,
    /// This dispatcher watched the run live (it did not only find it after a restart).
    pub watched: bool,
    /// An operator's `stop` signalled the live scope; how it ended ("ended on SIGTERM …").
    pub operator_stop: Option<&'a str>,
    pub max_runtime: Option<i64>,
    /// The dispatcher stopped the run for a missing heartbeat (`stale`'s verdict).
    pub stale: Option<&'a Stale>,
    /// The Hermes whose dispatcher's booking is followed.
    pub hermes: Generation,
    /// The board's filesystem was full when the run ended (its booking failed for want of
    /// space): a worker that failed then, failed writing its verdict — the disk's fault,
    /// not the task's.
    pub board_full: bool,
}

/// The rules a booking follows: the breaker's limit, and the Hermes whose dispatcher's
/// booking is followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    pub failure_limit: i64,
    pub hermes: Generation,
}

/// A run that shows no progress: upstream's `detect_stale_running` verdict, with its
/// payload's facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    pub elapsed_seconds: i64,
    pub last_heartbeat_at: Option<i64>,
    pub timeout_seconds: i64,
    pub pid: Option<i64>,
}

/// Upstream's `_STALE_HEARTBEAT_GAP_SECONDS`.
pub const STALE_HEARTBEAT_GAP: i64 = 3600;

/// Whether a live run is stale, as upstream's `detect_stale_running` judges it: running
/// for at least `timeout` (0 = never), and no heartbeat for `STALE_HEARTBEAT_GAP` (or none
/// ever).
pub fn stale(
    started_at: i64,
    last_heartbeat_at: Option<i64>,
    now: i64,
    timeout: i64,
    pid: Option<i64>,
) -> Option<Stale> {
    let elapsed = now - started_at;
    let beat_recently = last_heartbeat_at.is_some_and(|hb| now - hb < STALE_HEARTBEAT_GAP);
    (timeout > 0 && elapsed >= timeout && !beat_recently).then_some(Stale {
        elapsed_seconds: elapsed,
        last_heartbeat_at,
        timeout_seconds: timeout,
        pid,
    })
}

/// What `decide` concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The worker still runs: nothing to book.
    Running,
    Ended(RunEnd),
}

/// How the run ended, from facts alone (the rows of this function are its table test).
pub fn decide(f: &Facts) -> Decision {
    if let Some(how) = f.operator_stop {
        return Decision::Ended(RunEnd::Stopped {
            error: format!("stopped by operator: {how}"),
        });
    }
    // The dispatcher stopped it for its silence: that, not the SIGTERM it sent, is why it
    // ended — once it has ended (an exit record, or no scope left; a live scope without a
    // record is still being stopped).
    if let Some(st) = f
        .stale
        .filter(|_| f.record.is_some() || f.scope != Scope::Live)
    {
        let secs = st.elapsed_seconds;
        let error = match st.last_heartbeat_at {
            Some(_) => {
                format!("no heartbeat for over {STALE_HEARTBEAT_GAP}s after {secs}s running")
            }
            None => format!("no heartbeat ever after {secs}s running"),
        };
        return Decision::Ended(RunEnd::Stale {
            error,
            details: json!({
                "elapsed_seconds": st.elapsed_seconds,
                "last_heartbeat_at": st.last_heartbeat_at,
                "timeout_seconds": st.timeout_seconds,
                "pid": st.pid,
                "unit": f.unit,
            }),
        });
    }
    if let Some(st) = f.record {
        return Decision::Ended(match from_record(st, f.max_runtime, f.hermes) {
            RunEnd::Crashed { error, .. } | RunEnd::ProtocolViolation { error, .. }
                if f.board_full || st.board_full =>
            {
                RunEnd::Lost {
                    error: format!(
                        "{error}, while its board's filesystem was full (the worker could not write its verdict); requeued, not charged"
                    ),
                }
            }
            end => end,
        });
    }
    Decision::Ended(match f.scope {
        Scope::Live => return Decision::Running,
        Scope::Empty => RunEnd::Lost {
            error: format!(
                "{} was live with no process left and no exit status (its supervisor died before the worker started); requeued",
                f.unit
            ),
        },
        Scope::Gone if f.watched => RunEnd::Crashed {
            error: format!(
                "{} ended without an exit status (worker and supervisor were killed)",
                f.unit
            ),
            details: json!({"unit": f.unit, "signal": 9}),
        },
        Scope::Gone => RunEnd::Lost {
            error: format!(
                "{} is gone and left no exit status (reboot or lost unit); requeued",
                f.unit
            ),
        },
    })
}

/// The end a supervisor's exit record says, in the words of Hermes `hermes`' dispatcher:
/// from 0.22 on, a dead worker's end (not a rate-limited one, nor one stopped from outside)
/// carries its last output, as `_classify_dead_worker` adds it.
fn from_record(st: &ExitRecord, max_runtime: Option<i64>, hermes: Generation) -> RunEnd {
    let mut end = exit_of(st, max_runtime, hermes);
    let said = st
        .output_tail
        .as_deref()
        .filter(|_| hermes.worker_output())
        .and_then(last_output);
    if let (
        Some((said, note)),
        RunEnd::Crashed { error, details }
        | RunEnd::ProtocolViolation { error, details }
        | RunEnd::TerminalProvider { error, details },
    ) = (said, &mut end)
    {
        error.push_str(&note);
        merge(details, &json!({ "worker_output": said }));
    }
    end
}

/// A dead worker's last words from the tail of its output, and what follows the error for
/// them (`" Worker's last output: '…'"`); `None` when it said nothing worth keeping.
pub fn last_output(raw: &str) -> Option<(String, String)> {
    let said = worker_final_output(raw);
    (!said.is_empty()).then(|| {
        let note = format!(" Worker's last output: {}", py_repr(&said));
        (said, note)
    })
}

/// ~0.22's `_worker_final_output`: a dead worker's last printed text from the tail of its
/// output — the exit trailer, the CLI's exit summary, panel chrome and its own preamble
/// lines left out, the rest joined by spaces, its last 400 characters.
pub fn worker_final_output(raw: &str) -> String {
    // `^[kanban-worker-exit] rc=<digits>\s*$` lines go.
    let kept: Vec<&str> = raw
        .split_inclusive('\n')
        .filter(|l| {
            let l = l.trim_end_matches(['\n', '\r', ' ', '\t']);
            !l.strip_prefix(EXIT_TRAILER)
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    let mut text = kept.concat();
    if let Some(cut) = text.rfind(EXIT_SUMMARY_MARKER) {
        text.truncate(cut);
    }
    let lines: Vec<String> = text
        .lines()
        .map(|l| strip_chrome(l).trim().to_string())
        .filter(|l| !l.is_empty() && !LOG_NOISE.iter().any(|p| l.starts_with(p)))
        .collect();
    let joined = lines.join(" ");
    let n = joined.chars().count();
    joined.chars().skip(n.saturating_sub(400)).collect()
}

/// The trailer a worker CLI writes as its last log line (`KANBAN_WORKER_EXIT_TRAILER`).
const EXIT_TRAILER: &str = "[kanban-worker-exit] rc=";
/// `t("cli.session.exit_resume_hint")` and `t("cli.chat.initializing_agent")`: the keys
/// themselves, as the packaged ~0.22 (without its locale catalogs) gives them.
const EXIT_SUMMARY_MARKER: &str = "cli.session.exit_resume_hint";
const LOG_NOISE: [&str; 3] = ["session_id:", "Query:", "cli.chat.initializing_agent"];

/// `_LOG_CHROME` (`[─━═╭╮╰╯│┃┌┐└┘]+|☤\s*Hermes`) removed from a line.
fn strip_chrome(line: &str) -> String {
    const BOX: &[char] = &[
        '─', '━', '═', '╭', '╮', '╰', '╯', '│', '┃', '┌', '┐', '└', '┘',
    ];
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(c) = rest.chars().next() {
        if BOX.contains(&c) {
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if let Some(after) = rest.strip_prefix('☤') {
            let t = after.trim_start_matches(char::is_whitespace);
            if let Some(r) = t.strip_prefix("Hermes") {
                rest = r;
                continue;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Python's `repr()` of a string, as upstream formats the output into the error: quoted
/// with `'` (with `"` when only `'` occurs), backslashes, quotes and control characters
/// escaped.
fn py_repr(s: &str) -> String {
    let q = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(q);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == q => {
                out.push('\\');
                out.push(c);
            }
            // Not `isprintable()`: controls, and the invisible and separator characters.
            c if (c as u32) < 0x20 || (0x7f..=0xa0).contains(&(c as u32)) || c == '\u{ad}' => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if matches!(c as u32, 0x1680 | 0x2000..=0x200f | 0x2028..=0x202f | 0x205f..=0x2064 | 0x3000 | 0xfeff) => {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(q);
    out
}

/// The end the exit itself says.
fn exit_of(st: &ExitRecord, max_runtime: Option<i64>, hermes: Generation) -> RunEnd {
    // Its process never became the worker: upstream's code, asked first in the scope,
    // refused or failed (`spawn::upstream::PRELUDE`), on whichever side the record says.
    if let Some(n) = &st.not_started {
        return spawn_failure(n.fault, &n.reason);
    }
    let pid = st.worker_pid;
    // Upstream's `_classify_worker_exit`: a signal's number stands as the exit code, and a
    // crash says which kind of exit it was.
    let mut details = json!({"pid": pid, "exit_code": st.exit_code.or(st.signal),
                             "signal": st.signal, "unit": st.unit});
    let exit_kind = match (st.exit_code, st.signal) {
        (Some(_), _) => json!({"exit_kind": "nonzero_exit"}),
        (None, Some(_)) => json!({"exit_kind": "signaled"}),
        (None, None) => json!({}),
    };
    // The kernel's OOM killer acted in the scope: that, not a SIGTERM systemd may have sent
    // after it, is how the run ended. Counted like a crash.
    if let Some(m) = st.memory.as_ref().filter(|m| m.oom_kills > 0) {
        let mib = |b: u64| format!("{}M", b / (1024 * 1024));
        let limit = m.max.map(mib).unwrap_or_else(|| "no limit".into());
        let peak = m
            .peak
            .map(|p| format!(", peak {}", mib(p)))
            .unwrap_or_default();
        merge(
            &mut details,
            &json!({"oom_kill": m.oom_kills, "memory_max": m.max, "memory_peak": m.peak}),
        );
        merge(&mut details, &exit_kind);
        // The worker itself, or one of its processes (a tool): then systemd stops the whole
        // scope (OOMPolicy=stop, see `Systemd::start_scope`) and the worker sees a SIGTERM.
        let what = if st.signal == Some(libc::SIGKILL) {
            "killed by the OOM killer".to_string()
        } else {
            let n = m.oom_kills;
            format!(
                "the OOM killer killed {n} process{} of the run",
                if n == 1 { "" } else { "es" }
            )
        };
        return RunEnd::Crashed {
            error: format!(
                "pid {pid} {}: {what} at MemoryMax={limit}{peak}",
                st.describe()
            ),
            details,
        };
    }
    if st.sigterm_received || st.timed_out {
        // Its supervisor ended it at the runtime limit, or a stop came from outside the
        // worker (a shutdown, a stop; an older supervisor's scope's RuntimeMaxSec). The time
        // a pause kept it frozen is not its runtime.
        let elapsed = (st.ended_at - st.started_at).saturating_sub(st.paused_seconds as i64);
        if let Some(m) = max_runtime.filter(|m| st.timed_out || elapsed >= m - 1) {
            // As upstream's `enforce_max_runtime` words it (`>` even at the limit itself).
            merge(
                &mut details,
                &json!({"elapsed_seconds": elapsed, "limit_seconds": m,
                        "sigkill": st.signal == Some(libc::SIGKILL)}),
            );
            return RunEnd::TimedOut {
                error: format!("elapsed {elapsed}s > limit {m}s"),
                details,
            };
        }
        return RunEnd::Stopped {
            error: format!("pid {pid} stopped from outside ({})", st.describe()),
        };
    }
    match (st.exit_code, st.signal) {
        (Some(0), _) => RunEnd::ProtocolViolation {
            error: hermes.protocol_violation_error().to_string(),
            details,
        },
        (Some(EXIT_RATE_LIMITED), _) => RunEnd::RateLimited {
            error: format!(
                "pid {pid} exited rate-limited (quota wall) — requeued without counting a failure"
            ),
            details,
        },
        (Some(EXIT_TERMINAL_PROVIDER), _) if hermes.terminal_provider_exit() => {
            merge(&mut details, &json!({"exit_kind": "terminal_provider"}));
            RunEnd::TerminalProvider {
                error: format!(
                    "pid {pid} exited on a terminal provider error (exit 78): the provider rejected this profile's credential or model — fix the configuration, then unblock."
                ),
                details,
            }
        }
        (Some(c), _) => {
            merge(&mut details, &exit_kind);
            RunEnd::Crashed {
                error: format!("pid {pid} exited with code {c}"),
                details,
            }
        }
        (None, Some(s)) => {
            merge(&mut details, &exit_kind);
            RunEnd::Crashed {
                error: format!("pid {pid} killed by signal {s}"),
                details,
            }
        }
        (None, None) => RunEnd::Crashed {
            error: format!("pid {pid} ended without an exit status"),
            details,
        },
    }
}

/// The task's counters, read in the booking's own transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counters {
    pub failures: i64,
    pub max_retries: Option<i64>,
    /// Protocol violations in a row before this run (rate-limited runs skipped).
    pub violation_streak: i64,
    pub claimer: Option<String>,
    /// Where the task goes back to when the run ends without tripping the breaker: `review`
    /// for a run the review lane claimed (0.20 on), else `ready`.
    pub retry_status: &'static str,
}

impl Default for Counters {
    fn default() -> Counters {
        Counters {
            failures: 0,
            max_retries: None,
            violation_streak: 0,
            claimer: None,
            retry_status: "ready",
        }
    }
}

/// Exactly what is written for an ended run.
#[derive(Debug, Clone, PartialEq)]
pub struct Booking {
    /// The run row's status and outcome.
    pub run_outcome: &'static str,
    pub error: String,
    pub run_metadata: Value,
    /// The task's `consecutive_failures` afterwards; stamped with `last_failure_error` when
    /// `stamp_error`.
    pub failures: i64,
    pub stamp_error: bool,
    /// The run's own event (`crashed`, `reclaimed`, …) and its payload; none when the
    /// `gave_up` event replaces it.
    pub event: Option<(&'static str, Value)>,
    /// The breaker tripped: the task ends `blocked` with this `gave_up` payload.
    pub gave_up: Option<Value>,
    /// The `gave_up` event carries the run id (a spawn failure that tripped).
    pub gave_up_on_run: bool,
    /// Counted against the task.
    pub counted: bool,
    /// The task's `last_heartbeat_at` is reset (upstream's stale reclaim does).
    pub clear_heartbeat: bool,
    /// The task's status afterwards when the breaker did not trip (`Counters::retry_status`).
    pub retry_status: &'static str,
}

impl Booking {
    /// The task's status afterwards.
    pub fn status(&self) -> &'static str {
        if self.gave_up.is_some() {
            "blocked"
        } else {
            self.retry_status
        }
    }
}

fn merge(into: &mut Value, from: &Value) {
    if let (Value::Object(a), Value::Object(b)) = (into, from) {
        for (k, v) in b {
            a.insert(k.clone(), v.clone());
        }
    }
}

/// What `end` means for the task, as upstream books it: outcome and event names, counted
/// or not, the protocol-violation streak's own budget, the breaker.
pub fn booking(end: &RunEnd, c: &Counters, rules: Rules) -> Booking {
    let failure_limit = rules.failure_limit;
    let (outcome, event, details, counted) = match end {
        RunEnd::Crashed { details, .. } => ("crashed", "crashed", details.clone(), true),
        RunEnd::TimedOut { details, .. } => ("timed_out", "timed_out", details.clone(), true),
        RunEnd::SpawnFailed { .. } => ("spawn_failed", "spawn_failed", json!({}), true),
        RunEnd::Infrastructure { .. } => (
            "spawn_failed",
            "spawn_failed",
            json!({"infrastructure": true}),
            false,
        ),
        RunEnd::RateLimited { details, .. } => {
            ("rate_limited", "rate_limited", details.clone(), false)
        }
        RunEnd::TerminalProvider { details, .. } => {
            let mut d = details.clone();
            merge(&mut d, &json!({"terminal_provider": true}));
            ("crashed", "crashed", d, true)
        }
        RunEnd::ProtocolViolation { details, .. } => {
            let mut d = details.clone();
            merge(&mut d, &json!({"protocol_violation": true}));
            ("crashed", "protocol_violation", d, false)
        }
        RunEnd::Lost { .. } => ("lost", "reclaimed", json!({"reason": "lost"}), false),
        RunEnd::Stopped { .. } => ("stopped", "reclaimed", json!({"reason": "stopped"}), false),
        RunEnd::Stale { details, .. } => ("stale", "stale", details.clone(), false),
    };
    let error: String = end.error().chars().take(ERROR_MAX).collect();
    let mut details = details;
    merge(&mut details, &json!({"claimer": c.claimer}));
    if rules.hermes.retry_status() {
        merge(&mut details, &json!({"retry_status": c.retry_status}));
    }
    let limit = c.max_retries.unwrap_or(failure_limit);
    let mut failures = c.failures;
    let mut trip = false;
    // A trip by a policy of its own, not by the counter.
    let mut forced = matches!(end, RunEnd::TerminalProvider { .. });
    if counted {
        failures += 1;
        trip = failures >= limit || forced;
    } else if matches!(end, RunEnd::ProtocolViolation { .. }) {
        // Clean exits without a verdict have their own streak budget; reaching it counts
        // and trips, as upstream's detect_crashed_workers does.
        let streak = c.violation_streak + 1;
        let vlimit = c.max_retries.unwrap_or(PROTOCOL_VIOLATION_LIMIT);
        if streak >= vlimit {
            failures += 1;
            trip = true;
            forced = true;
            merge(
                &mut details,
                &json!({"protocol_violations": streak, "protocol_violation_limit": vlimit}),
            );
        }
    }
    let spawn_tripped = trip && matches!(end, RunEnd::SpawnFailed { .. });
    let mut run_metadata = details.clone();
    if counted || trip {
        merge(&mut run_metadata, &json!({"failures": failures}));
    }
    let event = (!spawn_tripped).then(|| {
        let mut payload = details.clone();
        // Upstream's reclaimed and stale payloads carry no error.
        if event != "reclaimed" && event != "stale" {
            merge(&mut payload, &json!({"error": error}));
        }
        if counted {
            merge(&mut payload, &json!({"failures": failures}));
        }
        (event, payload)
    });
    // The protocol-violation budget trips at its own limit.
    let limit = details
        .get("protocol_violation_limit")
        .and_then(Value::as_i64)
        .unwrap_or(limit);
    let gave_up = trip.then(|| {
        let mut payload = Value::Object(Map::new());
        merge(
            &mut payload,
            &json!({
                "failures": failures, "effective_limit": limit,
                "limit_source": if c.max_retries.is_some() { "task" } else { "dispatcher" },
                "error": error, "trigger_outcome": outcome,
            }),
        );
        merge(&mut payload, &details);
        // 0.22 holds such a block for an operator (`_has_sticky_block`); before it, the
        // counter judges it like any other.
        if forced && rules.hermes.sticky_trips() {
            merge(&mut payload, &json!({"sticky": true}));
        }
        payload
    });
    Booking {
        run_outcome: if spawn_tripped { "gave_up" } else { outcome },
        stamp_error: counted
            || trip
            || matches!(
                end,
                RunEnd::RateLimited { .. } | RunEnd::ProtocolViolation { .. }
            ),
        error,
        run_metadata,
        failures,
        event,
        gave_up,
        gave_up_on_run: spawn_tripped,
        counted,
        clear_heartbeat: matches!(end, RunEnd::Stale { .. }),
        retry_status: c.retry_status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Limit 2, as each version's dispatcher.
    const V019: Rules = Rules {
        failure_limit: 2,
        hermes: Generation::V019,
    };
    const V022: Rules = Rules {
        failure_limit: 2,
        hermes: Generation::V022,
    };

    fn rec(code: Option<i32>, sig: Option<i32>, sigterm: bool, secs: i64) -> ExitRecord {
        ExitRecord {
            task: "t".into(),
            run_id: 1,
            unit: "u.scope".into(),
            worker_pid: 9,
            started_at: 100,
            ended_at: 100 + secs,
            exit_code: code,
            signal: sig,
            sigterm_received: sigterm,
            memory: None,
            usage: None,
            not_started: None,
            output_tail: None,
            paused_seconds: 0,
            timed_out: false,
            board_full: false,
        }
    }

    fn facts<'a>(record: Option<&'a ExitRecord>, scope: Scope) -> Facts<'a> {
        Facts {
            unit: "u.scope",
            record,
            scope,
            watched: true,
            operator_stop: None,
            max_runtime: None,
            stale: None,
            hermes: Generation::V022,
            board_full: false,
        }
    }

    fn name(d: &Decision) -> String {
        match d {
            Decision::Running => "running".into(),
            Decision::Ended(e) => format!("{}: {}", kind(e), e.error()),
        }
    }

    fn kind(e: &RunEnd) -> &'static str {
        match e {
            RunEnd::Crashed { .. } => "crashed",
            RunEnd::ProtocolViolation { .. } => "protocol_violation",
            RunEnd::RateLimited { .. } => "rate_limited",
            RunEnd::TerminalProvider { .. } => "terminal_provider",
            RunEnd::TimedOut { .. } => "timed_out",
            RunEnd::SpawnFailed { .. } => "spawn_failed",
            RunEnd::Infrastructure { .. } => "infrastructure",
            RunEnd::Lost { .. } => "lost",
            RunEnd::Stopped { .. } => "stopped",
            RunEnd::Stale { .. } => "stale",
        }
    }

    #[test]
    fn every_fact_pattern_decides_one_end() {
        let exit0 = rec(Some(0), None, false, 5);
        let exit1 = rec(Some(1), None, false, 5);
        let exit1_on_full = ExitRecord {
            board_full: true,
            ..exit1.clone()
        };
        let exit75 = rec(Some(75), None, false, 5);
        let exit78 = rec(Some(78), None, false, 5);
        let killed = rec(None, Some(9), false, 5);
        let neither = rec(None, None, false, 5);
        let termed = rec(None, Some(15), true, 5);
        let termed_late = rec(None, Some(15), true, 60);
        let mut with_limit = facts(Some(&termed_late), Scope::Gone);
        with_limit.max_runtime = Some(60);
        let mut short_of_limit = facts(Some(&termed), Scope::Gone);
        short_of_limit.max_runtime = Some(60);
        // Ended by its supervisor at the limit: 90 s of wall time, 30 of them paused.
        let limit_hit = ExitRecord {
            timed_out: true,
            paused_seconds: 30,
            ..rec(None, Some(15), false, 90)
        };
        let mut by_supervisor = facts(Some(&limit_hit), Scope::Gone);
        by_supervisor.max_runtime = Some(60);
        // Stopped after a long pause, short of its limit in active time.
        let paused_long = ExitRecord {
            paused_seconds: 50,
            ..rec(None, Some(15), true, 70)
        };
        let mut stopped_after_pause = facts(Some(&paused_long), Scope::Gone);
        stopped_after_pause.max_runtime = Some(60);
        let mut operator = facts(Some(&termed), Scope::Gone);
        operator.operator_stop = Some("ended on SIGTERM after 12 ms");
        let oom = |sigterm| ExitRecord {
            memory: Some(crate::record::MemoryFacts {
                oom_kills: 1,
                max: Some(64 << 20),
                peak: Some(64 << 20),
            }),
            ..rec(None, Some(9), sigterm, 5)
        };
        let (oom_alone, oom_then_term) = (oom(false), oom(true));
        // A tool of the worker was the OOM killer's victim; systemd stopped the scope.
        let tool_oom = ExitRecord {
            signal: Some(15),
            ..oom(true)
        };
        // A tool's OOM kill, and the worker exited on its own before the stop reached it.
        let tool_oom_exit = ExitRecord {
            exit_code: Some(3),
            signal: None,
            ..oom(false)
        };
        let no_oom = ExitRecord {
            memory: Some(crate::record::MemoryFacts::default()),
            ..rec(None, Some(15), true, 5)
        };
        let mut after_restart = facts(None, Scope::Gone);
        after_restart.watched = false;
        let silent = stale(0, None, 20000, 14400, Some(9)).unwrap();
        let mut stale_gone = facts(Some(&termed), Scope::Gone);
        stale_gone.stale = Some(&silent);
        let mut stale_stopping = facts(None, Scope::Live);
        stale_stopping.stale = Some(&silent);
        // The supervisor's record comes while systemd still tears the scope down.
        let mut stale_recorded = facts(Some(&termed), Scope::Live);
        stale_recorded.stale = Some(&silent);
        let refused = |fault| ExitRecord {
            not_started: Some(crate::record::NotStarted {
                reason: "workspace: no repo".into(),
                fault,
            }),
            ..rec(Some(127), None, false, 1)
        };
        let (refused_task, refused_infra) = (refused(Fault::Task), refused(Fault::Infrastructure));
        let rows: Vec<(Facts, &str)> = vec![
            (facts(Some(&refused_task), Scope::Gone), "spawn_failed: workspace: no repo"),
            (facts(Some(&refused_infra), Scope::Live), "infrastructure: workspace: no repo"),
            (facts(Some(&exit0), Scope::Gone), "protocol_violation: worker exited cleanly (rc=0) without kanban_complete, kanban_block or kanban_request_review — protocol violation. If the prior run already did the work, verify it and report it via kanban_complete (or kanban_request_review); a run without a terminal kanban call counts as failed no matter what it did."),
            (Facts { hermes: Generation::V019, ..facts(Some(&exit0), Scope::Gone) }, "protocol_violation: worker exited cleanly (rc=0) without calling kanban_complete or kanban_block — protocol violation. If the prior run already did the work, verify it and report the result via kanban_complete; a run that ends without a terminal kanban call counts as failed no matter what it did."),
            (facts(Some(&exit1), Scope::Live), "crashed: pid 9 exited with code 1"),
            // Failed while its board could not be written: the disk's fault, not charged.
            (Facts { board_full: true, ..facts(Some(&exit1), Scope::Gone) }, "lost: pid 9 exited with code 1, while its board's filesystem was full (the worker could not write its verdict); requeued, not charged"),
            // … as seen by its supervisor when it ended (booked after room came back).
            (facts(Some(&exit1_on_full), Scope::Gone), "lost: pid 9 exited with code 1, while its board's filesystem was full (the worker could not write its verdict); requeued, not charged"),
            (Facts { board_full: true, ..facts(Some(&exit75), Scope::Gone) }, "rate_limited: pid 9 exited rate-limited (quota wall) — requeued without counting a failure"),
            (Facts { board_full: true, max_runtime: Some(60), ..facts(Some(&termed_late), Scope::Gone) }, "timed_out: elapsed 60s > limit 60s"),
            (facts(Some(&exit75), Scope::Gone), "rate_limited: pid 9 exited rate-limited (quota wall) — requeued without counting a failure"),
            (facts(Some(&killed), Scope::Gone), "crashed: pid 9 killed by signal 9"),
            (facts(Some(&exit78), Scope::Gone), "terminal_provider: pid 9 exited on a terminal provider error (exit 78): the provider rejected this profile's credential or model — fix the configuration, then unblock."),
            // Before 0.22, 78 is one more exit code.
            (Facts { hermes: Generation::V020, ..facts(Some(&exit78), Scope::Gone) }, "crashed: pid 9 exited with code 78"),
            (facts(Some(&neither), Scope::Gone), "crashed: pid 9 ended without an exit status"),
            (with_limit, "timed_out: elapsed 60s > limit 60s"),
            (by_supervisor, "timed_out: elapsed 60s > limit 60s"),
            (stopped_after_pause, "stopped: pid 9 stopped from outside (killed by signal 15 (SIGTERM))"),
            (short_of_limit, "stopped: pid 9 stopped from outside (killed by signal 15 (SIGTERM))"),
            (operator, "stopped: stopped by operator: ended on SIGTERM after 12 ms"),
            (facts(None, Scope::Live), "running"),
            (facts(None, Scope::Empty), "lost: u.scope was live with no process left and no exit status (its supervisor died before the worker started); requeued"),
            (facts(None, Scope::Gone), "crashed: u.scope ended without an exit status (worker and supervisor were killed)"),
            (after_restart, "lost: u.scope is gone and left no exit status (reboot or lost unit); requeued"),
            (facts(Some(&oom_alone), Scope::Gone), "crashed: pid 9 killed by signal 9 (SIGKILL): killed by the OOM killer at MemoryMax=64M, peak 64M"),
            (facts(Some(&oom_then_term), Scope::Gone), "crashed: pid 9 killed by signal 9 (SIGKILL): killed by the OOM killer at MemoryMax=64M, peak 64M"),
            (facts(Some(&tool_oom), Scope::Gone), "crashed: pid 9 killed by signal 15 (SIGTERM): the OOM killer killed 1 process of the run at MemoryMax=64M, peak 64M"),
            (facts(Some(&tool_oom_exit), Scope::Gone), "crashed: pid 9 exit code 3: the OOM killer killed 1 process of the run at MemoryMax=64M, peak 64M"),
            (facts(Some(&no_oom), Scope::Gone), "stopped: pid 9 stopped from outside (killed by signal 15 (SIGTERM))"),
            (stale_gone, "stale: no heartbeat ever after 20000s running"),
            (stale_stopping, "running"),
            (stale_recorded, "stale: no heartbeat ever after 20000s running"),
        ];
        for (f, want) in rows {
            assert_eq!(name(&decide(&f)), want, "{f:?}");
        }
    }

    /// (started, last heartbeat, now, timeout) → stale?, as upstream's detect_stale_running.
    #[test]
    fn staleness_is_upstreams() {
        let rows = [
            ((0, None, 14399, 14400), false),
            ((0, None, 14400, 14400), true),
            ((0, Some(14400 - 3599), 14400, 14400), false),
            ((0, Some(14400 - 3600), 14400, 14400), true),
            ((0, None, 1_000_000, 0), false),
        ];
        for ((started, hb, now, timeout), want) in rows {
            assert_eq!(
                stale(started, hb, now, timeout, None).is_some(),
                want,
                "{started} {hb:?} {now} {timeout}"
            );
        }
    }

    #[test]
    fn spawn_failures_are_counted_only_when_the_task_is_at_fault() {
        assert!(matches!(
            spawn_failure(Fault::Task, "x"),
            RunEnd::SpawnFailed { .. }
        ));
        assert!(matches!(
            spawn_failure(Fault::Infrastructure, "x"),
            RunEnd::Infrastructure { .. }
        ));
    }

    #[test]
    fn exit_78_blocks_at_once_sticky_whatever_the_budget() {
        let end = RunEnd::TerminalProvider {
            error: "pid 9 exited 78".into(),
            details: json!({"pid": 9}),
        };
        let c = Counters {
            max_retries: Some(5),
            ..Counters::default()
        };
        let b = booking(&end, &c, V022);
        assert_eq!(
            (b.run_outcome, b.counted, b.failures, b.status()),
            ("crashed", true, 1, "blocked")
        );
        let gave_up = b.gave_up.unwrap();
        assert_eq!(
            (&gave_up["terminal_provider"], &gave_up["sticky"]),
            (&json!(true), &json!(true))
        );
    }

    #[test]
    fn a_stale_run_is_requeued_uncounted_with_upstreams_payload() {
        let end = RunEnd::Stale {
            error: "no heartbeat ever after 20000s running".into(),
            details: json!({"elapsed_seconds": 20000, "timeout_seconds": 14400}),
        };
        let b = booking(
            &end,
            &Counters {
                failures: 1,
                ..Counters::default()
            },
            V022,
        );
        assert_eq!(
            (b.run_outcome, b.counted, b.failures, b.status()),
            ("stale", false, 1, "ready")
        );
        let (kind, payload) = b.event.unwrap();
        assert_eq!(kind, "stale");
        assert_eq!(payload["elapsed_seconds"], 20000);
        assert!(payload.get("error").is_none(), "{payload}");
        assert!(b.clear_heartbeat);
    }

    /// (end, failures before, max_retries, streak before) → (run outcome, event, counted,
    /// failures after, status, gave_up on the run, last error stamped).
    #[test]
    fn every_end_books_as_upstream_does() {
        let e = |s: &str| s.to_string();
        let d = || json!({"pid": 9});
        type Row = (
            RunEnd,
            i64,
            Option<i64>,
            i64,
            (
                &'static str,
                Option<&'static str>,
                bool,
                i64,
                &'static str,
                bool,
                bool,
            ),
        );
        let rows: Vec<Row> = vec![
            (
                RunEnd::Crashed {
                    error: e("c"),
                    details: d(),
                },
                0,
                None,
                0,
                ("crashed", Some("crashed"), true, 1, "ready", false, true),
            ),
            (
                RunEnd::Crashed {
                    error: e("c"),
                    details: d(),
                },
                1,
                None,
                0,
                ("crashed", Some("crashed"), true, 2, "blocked", false, true),
            ),
            (
                RunEnd::Crashed {
                    error: e("c"),
                    details: d(),
                },
                1,
                Some(5),
                0,
                ("crashed", Some("crashed"), true, 2, "ready", false, true),
            ),
            (
                RunEnd::TimedOut {
                    error: e("t"),
                    details: d(),
                },
                0,
                None,
                0,
                (
                    "timed_out",
                    Some("timed_out"),
                    true,
                    1,
                    "ready",
                    false,
                    true,
                ),
            ),
            (
                RunEnd::SpawnFailed { error: e("s") },
                0,
                None,
                0,
                (
                    "spawn_failed",
                    Some("spawn_failed"),
                    true,
                    1,
                    "ready",
                    false,
                    true,
                ),
            ),
            (
                RunEnd::SpawnFailed { error: e("s") },
                1,
                None,
                0,
                ("gave_up", None, true, 2, "blocked", true, true),
            ),
            (
                RunEnd::Infrastructure { error: e("i") },
                1,
                None,
                0,
                (
                    "spawn_failed",
                    Some("spawn_failed"),
                    false,
                    1,
                    "ready",
                    false,
                    false,
                ),
            ),
            (
                RunEnd::RateLimited {
                    error: e("r"),
                    details: d(),
                },
                1,
                None,
                0,
                (
                    "rate_limited",
                    Some("rate_limited"),
                    false,
                    1,
                    "ready",
                    false,
                    true,
                ),
            ),
            (
                RunEnd::ProtocolViolation {
                    error: e("p"),
                    details: d(),
                },
                0,
                None,
                0,
                (
                    "crashed",
                    Some("protocol_violation"),
                    false,
                    0,
                    "ready",
                    false,
                    true,
                ),
            ),
            (
                RunEnd::ProtocolViolation {
                    error: e("p"),
                    details: d(),
                },
                0,
                None,
                2,
                (
                    "crashed",
                    Some("protocol_violation"),
                    false,
                    1,
                    "blocked",
                    false,
                    true,
                ),
            ),
            (
                RunEnd::Lost { error: e("l") },
                1,
                None,
                0,
                ("lost", Some("reclaimed"), false, 1, "ready", false, false),
            ),
            (
                RunEnd::Stopped { error: e("x") },
                1,
                None,
                0,
                (
                    "stopped",
                    Some("reclaimed"),
                    false,
                    1,
                    "ready",
                    false,
                    false,
                ),
            ),
        ];
        for (end, failures, max_retries, streak, want) in rows {
            let c = Counters {
                failures,
                max_retries,
                violation_streak: streak,
                claimer: Some("h:1".into()),
                retry_status: "ready",
            };
            let b = booking(&end, &c, V019);
            let got = (
                b.run_outcome,
                b.event.as_ref().map(|(k, _)| *k),
                b.counted,
                b.failures,
                b.status(),
                b.gave_up_on_run,
                b.stamp_error,
            );
            assert_eq!(got, want, "{end:?} after {failures} failures");
            if let Some((_, payload)) = &b.event {
                assert_eq!(payload["claimer"], json!("h:1"));
            }
        }
    }

    /// 0.20 on: a run the review lane claimed goes back to review, and every payload says
    /// where the task went back to; 0.19 says nothing and goes back to ready.
    #[test]
    fn a_review_runs_end_goes_back_to_review_from_020_on() {
        let end = RunEnd::Crashed {
            error: "pid 9 exited with code 3".into(),
            details: json!({"pid": 9}),
        };
        let review = Counters {
            retry_status: "review",
            ..Counters::default()
        };
        let v020 = Rules {
            failure_limit: 2,
            hermes: Generation::V020,
        };
        let b = booking(&end, &review, v020);
        assert_eq!(b.status(), "review");
        assert_eq!(b.event.unwrap().1["retry_status"], "review");
        assert_eq!(b.run_metadata["retry_status"], "review");
        let b = booking(&end, &Counters::default(), V019);
        assert_eq!(b.status(), "ready");
        assert!(b.event.unwrap().1.get("retry_status").is_none());
        // Tripped: blocked, whatever the lane.
        let tripped = Counters {
            failures: 1,
            ..review
        };
        assert_eq!(booking(&end, &tripped, v020).status(), "blocked");
    }

    #[test]
    fn long_errors_are_cut_and_the_gave_up_payload_says_why() {
        let b = booking(
            &RunEnd::Crashed {
                error: "x".repeat(2000),
                details: json!({}),
            },
            &Counters {
                failures: 4,
                max_retries: Some(5),
                ..Counters::default()
            },
            V019,
        );
        assert_eq!(b.error.len(), 500);
        let g = b.gave_up.unwrap();
        assert_eq!(
            (
                &g["failures"],
                &g["effective_limit"],
                &g["limit_source"],
                &g["trigger_outcome"]
            ),
            (&json!(5), &json!(5), &json!("task"), &json!("crashed"))
        );
    }
}
