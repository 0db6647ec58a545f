//! Upstream's respawn guards (`kanban_db.check_respawn_guard`, 0.19.0): a ready task is not
//! started when starting it now would not help or would do harm. Checked in upstream's
//! order; the first that applies is the reason:
//!
//! 1. `rate_limit_cooldown` — its newest ended run was `rate_limited` less than the cooldown
//!    ago (after the cooldown, the task goes, and 2. is skipped: the quota text stamped on
//!    it must not park it for ever);
//! 2. `blocker_auth` — its last failure reads like quota or authentication trouble;
//! 3. `recent_success` — a run completed within the hour and nobody asked for a re-run
//!    since (a `status`, `promoted`, `unblocked` or `reclaimed` event after it);
//! 4. `active_pr` — a comment of the last 24 h carries a GitHub pull-request URL.
//!
//! Pure: the board gathers the facts (`Board::guard_facts`), this decides.

use std::sync::LazyLock;

use regex::Regex;

/// Upstream's `_RESPAWN_GUARD_SUCCESS_WINDOW`.
pub const SUCCESS_WINDOW: i64 = 3600;
/// Upstream's `_RESPAWN_GUARD_PR_WINDOW`.
pub const PR_WINDOW: i64 = 86_400;

/// Upstream's `_RESPAWN_BLOCKER_RE`, verbatim.
static BLOCKER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)\b(quota|rate[\s_\-]?limit|429|403|auth\w*|unauthorized|forbidden|billing|subscription|access[\s_]denied|permission[\s_]denied|invalid[\s_]api[\s_]key)\b",
    )
    .expect("the blocker pattern compiles")
});

/// The dispatcher's own numbers in the failures it books — `pid 429 killed by signal 9`,
/// `max_runtime_seconds=403` — are not HTTP statuses, and are taken out before `BLOCKER` is
/// tried. Upstream 0.19.0 matches them too: a crashed worker whose PID was 403 or 429 parks
/// its task for ever (no new failure comes to move it), and in a container's PID namespace
/// PIDs are that small — 1 in ~500 crashes with 1,000 workers. Deliberately not 0.19.0's
/// behaviour (`tests/it/parity.rs` shows it); ~0.22's own guard no longer reads the PID, and
/// agrees with this one in every shape there.
static OWN_NUMBERS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\bpid \d+|\b\w+=\d+").expect("the own-numbers pattern compiles"));

/// Upstream's `_RESPAWN_GUARD_PR_URL_RE`, verbatim.
static PR_URL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"https?://github\.com/[^/\s]+/[^/\s]+/pull/\d+").expect("the PR pattern compiles")
});

/// What the guards look at, as the board has it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// The newest ended run: its outcome and when it ended.
    pub latest_ended: Option<(Option<String>, i64)>,
    pub last_failure_error: Option<String>,
    /// When the newest `completed` run of the last `SUCCESS_WINDOW` ended.
    pub recent_completion: Option<i64>,
    /// A re-run was asked for after that completion.
    pub requeued_since: bool,
    /// Bodies of the comments of the last `PR_WINDOW`.
    pub recent_comments: Vec<String>,
}

/// The guard that holds the task back now, if any.
pub fn respawn_guard(f: &Facts, now: i64, rate_limit_cooldown: i64) -> Option<&'static str> {
    if let Some((Some(outcome), ended)) = &f.latest_ended {
        if outcome == "rate_limited" {
            return (rate_limit_cooldown > 0 && now - ended < rate_limit_cooldown)
                .then_some("rate_limit_cooldown");
        }
    }
    if f.last_failure_error
        .as_deref()
        .is_some_and(|e| BLOCKER.is_match(&OWN_NUMBERS.replace_all(e, "")))
    {
        return Some("blocker_auth");
    }
    if f.recent_completion.is_some() && !f.requeued_since {
        return Some("recent_success");
    }
    if f.recent_comments.iter().any(|c| PR_URL.is_match(c)) {
        return Some("active_pr");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_guard_in_upstreams_order() {
        let now = 100_000;
        let rl = |ended| Some((Some("rate_limited".to_string()), ended));
        let f = |latest_ended, err: Option<&str>, completion, requeued, comments: &[&str]| Facts {
            latest_ended,
            last_failure_error: err.map(String::from),
            recent_completion: completion,
            requeued_since: requeued,
            recent_comments: comments.iter().map(|c| c.to_string()).collect(),
        };
        let rows: Vec<(Facts, Option<&str>)> = vec![
            (f(None, None, None, false, &[]), None),
            (
                f(
                    rl(now - 10),
                    Some("rate limited (quota wall)"),
                    None,
                    false,
                    &[],
                ),
                Some("rate_limit_cooldown"),
            ),
            // After the cooldown the stamped quota text does not park it.
            (
                f(
                    rl(now - 400),
                    Some("rate limited (quota wall)"),
                    None,
                    false,
                    &[],
                ),
                None,
            ),
            (
                f(None, Some("HTTP 429 Too Many Requests"), None, false, &[]),
                Some("blocker_auth"),
            ),
            (
                f(None, Some("Authentication failed"), None, false, &[]),
                Some("blocker_auth"),
            ),
            (
                f(None, Some("pid 9 exited with code 1"), None, false, &[]),
                None,
            ),
            // The dispatcher's own PIDs and settings are not HTTP statuses; the text still is.
            (
                f(
                    None,
                    Some("pid 429 killed by signal 9 (SIGKILL)"),
                    None,
                    false,
                    &[],
                ),
                None,
            ),
            (
                f(
                    None,
                    Some("pid 77 timed out: max_runtime_seconds=403"),
                    None,
                    false,
                    &[],
                ),
                None,
            ),
            (
                f(
                    None,
                    Some("pid 403 exited with code 1: HTTP 403"),
                    None,
                    false,
                    &[],
                ),
                Some("blocker_auth"),
            ),
            (
                f(None, Some("author mismatch"), None, false, &[]),
                Some("blocker_auth"),
            ),
            (f(None, Some("oauthx"), None, false, &[]), None),
            (
                f(None, None, Some(now - 5), false, &[]),
                Some("recent_success"),
            ),
            (f(None, None, Some(now - 5), true, &[]), None),
            (
                f(
                    None,
                    None,
                    None,
                    false,
                    &["see https://github.com/o/r/pull/12"],
                ),
                Some("active_pr"),
            ),
            (
                f(
                    None,
                    None,
                    None,
                    false,
                    &["see https://github.com/o/r/issues/12"],
                ),
                None,
            ),
        ];
        for (facts, want) in rows {
            assert_eq!(respawn_guard(&facts, now, 300), want, "{facts:?}");
        }
    }
}
