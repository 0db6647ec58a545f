//! What a task's verbs do to it, as upstream's `kanban_db` decides it: where a block
//! sends a task, whether parent gating promotes a blocked one, what a completion says.
//! Pure, table-tested; `board` reads the facts and writes the answer in one transaction,
//! as `outcome` is for a run's end.

use serde_json::{json, Value};

/// Upstream's `BLOCK_RECURRENCE_LIMIT`: re-blocks for one cause before `triage`.
pub const BLOCK_RECURRENCE_LIMIT: i64 = 2;

/// Upstream's block kinds (`VALID_BLOCK_KINDS`).
pub const BLOCK_KINDS: &[&str] = &["dependency", "needs_input", "capability", "transient"];

/// Where a block sends a task, and the event that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRoute {
    /// The status the task lands in.
    pub to: &'static str,
    /// Its `block_recurrences` after this block.
    pub recurrences: i64,
    pub event: &'static str,
}

/// `block_task`'s routing: kind `dependency` goes to `todo` (parent gating frees it); a
/// re-block for the same kind as the last one counts a recurrence, and at
/// `BLOCK_RECURRENCE_LIMIT` the task goes to `triage`; anything else is `blocked`.
pub fn block_route(
    kind: Option<&str>,
    prev_kind: Option<&str>,
    prev_recurrences: i64,
) -> BlockRoute {
    if kind == Some("dependency") {
        return BlockRoute {
            to: "todo",
            recurrences: prev_recurrences,
            event: "dependency_wait",
        };
    }
    let recurrences = if prev_kind == kind {
        prev_recurrences + 1
    } else {
        1
    };
    let (to, event) = if recurrences >= BLOCK_RECURRENCE_LIMIT {
        ("triage", "block_loop_detected")
    } else {
        ("blocked", "blocked")
    };
    BlockRoute {
        to,
        recurrences,
        event,
    }
}

/// The payload of a block's event, as upstream writes each.
pub fn block_payload(route: &BlockRoute, reason: Option<&str>, kind: Option<&str>) -> Value {
    match route.event {
        "dependency_wait" => json!({"reason": reason, "kind": kind}),
        "block_loop_detected" => json!({
            "reason": reason,
            "kind": kind,
            "recurrences": route.recurrences,
            "limit": BLOCK_RECURRENCE_LIMIT,
        }),
        _ => json!({"reason": reason, "kind": kind, "recurrences": route.recurrences}),
    }
}

/// The `completed` event's payload: the result's length and the summary's first line (at
/// most 400 characters), as upstream's `_completed_event_payload` for a worker's verdict.
pub fn completed_payload(result: Option<&str>, summary: Option<&str>) -> Value {
    let first_line = summary
        .and_then(|s| s.trim().lines().next())
        .map(|l| l.chars().take(400).collect::<String>());
    json!({
        "result_len": result.map(|r| r.chars().count()).unwrap_or(0),
        "summary": first_line.filter(|s| !s.is_empty()),
    })
}

/// Why a `blocked` task whose parents are all done stays blocked when parent gating runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaysBlocked {
    /// Its last block event is a `blocked` one (an explicit block, #28712): only `unblock`
    /// frees it.
    ExplicitBlock,
    /// The breaker tripped and it is still at its limit (`max_retries`, else the
    /// configured failure limit; #35072).
    Breaker,
    /// A `gave_up` since its last unblock that ~0.22 marks sticky (the protocol-violation
    /// budget, a terminal provider error: upstream's `_has_sticky_block`).
    StickyGaveUp,
}

/// Whether parent gating leaves a `blocked` task blocked, and why. `sticky_gave_up` is
/// asked only when the cheaper facts have not answered (it reads the event log).
pub fn stays_blocked(
    last_block_event: Option<&str>,
    failures: i64,
    max_retries: Option<i64>,
    failure_limit: i64,
    sticky_gave_up: impl FnOnce() -> bool,
) -> Option<StaysBlocked> {
    if last_block_event == Some("blocked") {
        Some(StaysBlocked::ExplicitBlock)
    } else if failures >= max_retries.unwrap_or(failure_limit) {
        Some(StaysBlocked::Breaker)
    } else if sticky_gave_up() {
        Some(StaysBlocked::StickyGaveUp)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_goes_where_upstream_sends_it() {
        let r = |to, recurrences, event| BlockRoute {
            to,
            recurrences,
            event,
        };
        let rows: &[(Option<&str>, Option<&str>, i64, BlockRoute)] = &[
            (Some("dependency"), None, 0, r("todo", 0, "dependency_wait")),
            (
                Some("dependency"),
                Some("dependency"),
                1,
                r("todo", 1, "dependency_wait"),
            ),
            (None, None, 0, r("blocked", 1, "blocked")),
            (Some("needs_input"), None, 0, r("blocked", 1, "blocked")),
            (
                Some("needs_input"),
                Some("capability"),
                1,
                r("blocked", 1, "blocked"),
            ),
            (
                Some("needs_input"),
                Some("needs_input"),
                1,
                r("triage", 2, "block_loop_detected"),
            ),
            (None, None, 1, r("triage", 2, "block_loop_detected")),
            (
                Some("transient"),
                Some("transient"),
                5,
                r("triage", 6, "block_loop_detected"),
            ),
        ];
        for (kind, prev, rec, want) in rows {
            assert_eq!(
                block_route(*kind, *prev, *rec),
                *want,
                "{kind:?} after {prev:?} ×{rec}"
            );
        }
        let loop_ = block_route(Some("transient"), Some("transient"), 1);
        assert_eq!(
            block_payload(&loop_, Some("again"), Some("transient")),
            json!({"reason": "again", "kind": "transient", "recurrences": 2, "limit": 2})
        );
        let dep = block_route(Some("dependency"), None, 0);
        assert_eq!(
            block_payload(&dep, None, Some("dependency")),
            json!({"reason": null, "kind": "dependency"})
        );
        let plain = block_route(None, None, 0);
        assert_eq!(
            block_payload(&plain, Some("why"), None),
            json!({"reason": "why", "kind": null, "recurrences": 1})
        );
    }

    #[test]
    fn a_completion_says_the_results_length_and_the_summarys_first_line() {
        let long = "é".repeat(500);
        let rows: &[(Option<&str>, Option<&str>, Value)] = &[
            (None, None, json!({"result_len": 0, "summary": null})),
            (
                Some("héllo"),
                None,
                json!({"result_len": 5, "summary": null}),
            ),
            (
                None,
                Some("  first\nsecond"),
                json!({"result_len": 0, "summary": "first"}),
            ),
            (
                None,
                Some("   \n  "),
                json!({"result_len": 0, "summary": null}),
            ),
            (
                None,
                Some(&long),
                json!({"result_len": 0, "summary": "é".repeat(400)}),
            ),
        ];
        for (result, summary, want) in rows {
            assert_eq!(
                completed_payload(*result, *summary),
                *want,
                "{result:?} {summary:?}"
            );
        }
    }

    #[test]
    fn a_blocked_task_stays_blocked_for_its_own_reason_only() {
        use StaysBlocked::*;
        type Row<'a> = (
            Option<&'a str>,
            i64,
            Option<i64>,
            bool,
            Option<StaysBlocked>,
        );
        let rows: &[Row] = &[
            (Some("blocked"), 0, None, false, Some(ExplicitBlock)),
            (Some("unblocked"), 0, None, false, None),
            (None, 0, None, false, None),
            // The configured limit (3 here), unless the task sets its own.
            (None, 2, None, false, None),
            (None, 3, None, false, Some(Breaker)),
            (None, 3, Some(5), false, None),
            (None, 1, Some(1), false, Some(Breaker)),
            (Some("unblocked"), 0, None, true, Some(StickyGaveUp)),
        ];
        for (last, failures, max_retries, sticky, want) in rows {
            assert_eq!(
                stays_blocked(*last, *failures, *max_retries, 3, || *sticky),
                *want,
                "{last:?} failures={failures} max_retries={max_retries:?} sticky={sticky}"
            );
        }
        // The event log is not read when a cheaper fact answers.
        assert_eq!(
            stays_blocked(Some("blocked"), 0, None, 3, || panic!("read")),
            Some(ExplicitBlock)
        );
    }
}
