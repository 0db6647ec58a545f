//! The board's rules, against real SQLite files.

use std::path::Path;

use hermes_mgr::board::{
    Board, BoardError, BoardPaths, NewTask, OpenMode, RunEnd, DEFAULT_FAILURE_LIMIT,
};
use serde_json::json;

use crate::harness::scratch;

/// 0.19.0's booking, at its default limit.
const RULES: hermes_mgr::outcome::Rules = hermes_mgr::outcome::Rules {
    failure_limit: DEFAULT_FAILURE_LIMIT,
    hermes: hermes_mgr::contract::Generation::V019,
};

fn open(db: &Path) -> Board {
    Board::open(&BoardPaths::for_db(db), OpenMode::CreateIfMissing).expect("open board")
}

fn add(b: &Board, title: &str) -> String {
    b.create(&NewTask {
        title: title.into(),
        assignee: Some("default".into()),
        ..Default::default()
    })
    .expect("create")
}

fn kinds(b: &Board, id: &str) -> Vec<String> {
    b.events(id).unwrap().into_iter().map(|e| e.kind).collect()
}

#[test]
fn create_gives_upstream_ids_and_gates_on_parents() {
    let d = scratch();
    let b = open(&d.path().join("kanban.db"));
    let p = add(&b, "parent");
    assert!(
        p.len() == 10 && p.starts_with("t_") && p[2..].bytes().all(|c| c.is_ascii_hexdigit()),
        "{p}"
    );
    let c = b
        .create(&NewTask {
            title: "  child  ".into(),
            parents: vec![p.clone(), p.clone()],
            priority: 3,
            ..Default::default()
        })
        .unwrap();
    let child = b.require_task(&c).unwrap();
    assert_eq!(child.status.as_str(), "todo");
    assert_eq!(child.title, "child");
    assert_eq!(b.parents(&c).unwrap(), vec![p.clone()]);
    let created = &b.events(&c).unwrap()[0];
    assert_eq!(created.kind, "created");
    assert_eq!(created.payload.as_ref().unwrap()["parents"], json!([p]));
    assert_eq!(created.payload.as_ref().unwrap()["status"], json!("todo"));

    let err = b.create(&NewTask {
        title: "x".into(),
        parents: vec!["t_00000000".into()],
        ..Default::default()
    });
    assert!(
        matches!(err, Err(BoardError::Invalid(ref m)) if m.contains("t_00000000")),
        "{err:?}"
    );
    assert!(matches!(
        b.create(&NewTask {
            title: " \n".into(),
            ..Default::default()
        }),
        Err(BoardError::Invalid(_))
    ));
    assert_eq!(
        b.list(None, None).unwrap().len(),
        2,
        "refused creates left rows behind"
    );
}

#[test]
fn claim_is_compare_and_swap_with_a_run_and_an_event() {
    let d = scratch();
    let b = open(&d.path().join("kanban.db"));
    let id = add(&b, "work");
    let c = b
        .claim(&id, "host:1", 900)
        .unwrap()
        .expect("first claim wins");
    assert_eq!(c.task.status.as_str(), "running");
    assert_eq!(c.task.claim_lock.as_deref(), Some("host:1"));
    assert_eq!(c.task.current_run_id, Some(c.run_id));
    assert!(
        b.claim(&id, "host:2", 900).unwrap().is_none(),
        "second claim must lose"
    );
    let runs = b.runs(&id).unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(
        (
            runs[0].status.as_str(),
            runs[0].claim_lock.as_deref(),
            runs[0].profile.as_deref()
        ),
        ("running", Some("host:1"), Some("default"))
    );
    let ev = b.events(&id).unwrap();
    let claimed = ev
        .iter()
        .find(|e| e.kind == "claimed")
        .expect("claimed event");
    assert_eq!(claimed.run_id, Some(c.run_id));
    assert_eq!(claimed.payload.as_ref().unwrap()["lock"], json!("host:1"));
    assert_eq!(claimed.payload.as_ref().unwrap()["run_id"], json!(c.run_id));

    // Extending works for the owner only.
    assert!(b.extend_claim(&id, "host:1", 5000).unwrap());
    assert!(!b.extend_claim(&id, "host:2", 5000).unwrap());
    let t = b.require_task(&id).unwrap();
    assert!(t.claim_expires.unwrap() >= c.expires + 4000);
    assert_eq!(
        b.run(c.run_id).unwrap().unwrap().claim_expires,
        t.claim_expires
    );
}

#[test]
fn claim_of_a_task_whose_parent_reopened_demotes_it() {
    let d = scratch();
    let b = open(&d.path().join("kanban.db"));
    let p = add(&b, "parent");
    let c = b
        .create(&NewTask {
            title: "child".into(),
            parents: vec![p.clone()],
            ..Default::default()
        })
        .unwrap();
    // Someone (an operator with sqlite3) forced the child to ready early.
    b.connection()
        .execute("UPDATE tasks SET status='ready' WHERE id=?1", [&c])
        .unwrap();
    assert!(b.claim(&c, "h:1", 60).unwrap().is_none());
    assert_eq!(b.require_task(&c).unwrap().status.as_str(), "todo");
    assert!(kinds(&b, &c).contains(&"claim_rejected".to_string()));
}

#[test]
fn complete_closes_the_run_promotes_children_and_honours_the_fence() {
    let d = scratch();
    let b = open(&d.path().join("kanban.db"));
    let p = add(&b, "parent");
    let c = b
        .create(&NewTask {
            title: "child".into(),
            parents: vec![p.clone()],
            ..Default::default()
        })
        .unwrap();
    let claim = b.claim(&p, "h:1", 60).unwrap().unwrap();
    assert!(
        !b.complete(
            &p,
            Some("r"),
            None,
            None,
            Some(claim.run_id + 1),
            DEFAULT_FAILURE_LIMIT
        )
        .unwrap(),
        "a stale run id must not complete"
    );
    assert_eq!(b.require_task(&p).unwrap().status.as_str(), "running");
    assert!(b
        .complete(
            &p,
            Some("the result"),
            Some("did it\nmore"),
            Some(&json!({"x": 1})),
            Some(claim.run_id),
            DEFAULT_FAILURE_LIMIT
        )
        .unwrap());
    let t = b.require_task(&p).unwrap();
    assert_eq!(
        (
            t.status.as_str(),
            t.result.as_deref(),
            t.claim_lock.as_deref(),
            t.current_run_id
        ),
        ("done", Some("the result"), None, None)
    );
    let run = b.run(claim.run_id).unwrap().unwrap();
    assert_eq!(
        (
            run.outcome.as_deref(),
            run.status.as_str(),
            run.summary.as_deref()
        ),
        (Some("completed"), "done", Some("did it\nmore"))
    );
    assert_eq!(run.metadata, Some(json!({"x": 1})));
    let done = b
        .events(&p)
        .unwrap()
        .into_iter()
        .find(|e| e.kind == "completed")
        .unwrap();
    assert_eq!(
        done.payload,
        Some(json!({"result_len": 10, "summary": "did it"}))
    );
    assert_eq!(b.require_task(&c).unwrap().status.as_str(), "ready");
    assert!(kinds(&b, &c).contains(&"promoted".to_string()));
    assert!(
        !b.complete(&p, None, None, None, None, DEFAULT_FAILURE_LIMIT)
            .unwrap(),
        "done is terminal"
    );
}

#[test]
fn complete_of_an_unclaimed_task_synthesizes_a_run() {
    let d = scratch();
    let b = open(&d.path().join("kanban.db"));
    let id = add(&b, "manual");
    assert!(b
        .complete(
            &id,
            None,
            Some("by hand"),
            None,
            None,
            DEFAULT_FAILURE_LIMIT
        )
        .unwrap());
    let runs = b.runs(&id).unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(
        (runs[0].outcome.as_deref(), runs[0].started_at),
        (Some("completed"), runs[0].ended_at.unwrap())
    );
}

#[test]
fn block_routes_like_upstream_and_explicit_blocks_are_sticky() {
    let d = scratch();
    let b = open(&d.path().join("kanban.db"));
    let id = add(&b, "needs a human");
    let claim = b.claim(&id, "h:1", 60).unwrap().unwrap();
    assert_eq!(
        b.block(
            &id,
            Some("which API key?"),
            Some("needs_input"),
            Some(claim.run_id)
        )
        .unwrap()
        .as_deref(),
        Some("blocked")
    );
    let run = b.run(claim.run_id).unwrap().unwrap();
    assert_eq!(
        (run.outcome.as_deref(), run.summary.as_deref()),
        (Some("blocked"), Some("which API key?"))
    );
    assert_eq!(
        b.recompute_ready(DEFAULT_FAILURE_LIMIT).unwrap(),
        0,
        "an explicit block must stay until unblocked"
    );
    assert_eq!(b.unblock(&id).unwrap().as_deref(), Some("ready"));
    assert_eq!(b.unblock(&id).unwrap(), None, "unblock of a ready task");
    // The same cause again reaches the recurrence limit: triage, not blocked.
    assert_eq!(
        b.block(&id, Some("again"), Some("needs_input"), None)
            .unwrap()
            .as_deref(),
        Some("triage")
    );
    assert!(kinds(&b, &id).contains(&"block_loop_detected".to_string()));

    let dep = add(&b, "waits on another task");
    assert_eq!(
        b.block(&dep, Some("t_x first"), Some("dependency"), None)
            .unwrap()
            .as_deref(),
        Some("todo")
    );
    assert!(kinds(&b, &dep).contains(&"dependency_wait".to_string()));
    assert!(matches!(
        b.block(&dep, None, Some("bogus"), None),
        Err(BoardError::Invalid(_))
    ));
}

#[test]
fn requeue_releases_the_claim_without_counting_a_failure() {
    let d = scratch();
    let b = open(&d.path().join("kanban.db"));
    let id = add(&b, "stuck");
    let claim = b.claim(&id, "h:1", 60).unwrap().unwrap();
    assert!(b.requeue(&id, Some("operator says so")).unwrap());
    let t = b.require_task(&id).unwrap();
    assert_eq!(
        (
            t.status.as_str(),
            t.claim_lock.as_deref(),
            t.consecutive_failures
        ),
        ("ready", None, 0)
    );
    let run = b.run(claim.run_id).unwrap().unwrap();
    assert_eq!(
        (run.outcome.as_deref(), run.error.as_deref()),
        (Some("reclaimed"), Some("manual_reclaim: operator says so"))
    );
    let ev = b
        .events(&id)
        .unwrap()
        .into_iter()
        .find(|e| e.kind == "reclaimed")
        .unwrap();
    assert_eq!(ev.payload.as_ref().unwrap()["manual"], json!(true));
    assert_eq!(ev.payload.as_ref().unwrap()["prev_lock"], json!("h:1"));
    assert!(
        !b.requeue(&id, None).unwrap(),
        "a ready, unclaimed task has nothing to requeue"
    );
}

fn crash(code: i64) -> RunEnd {
    RunEnd::Crashed {
        error: format!("pid 9 exited with code {code}"),
        details: json!({"pid": 9, "exit_code": code}),
    }
}

#[test]
fn crashes_requeue_then_trip_the_breaker() {
    let d = scratch();
    let b = open(&d.path().join("kanban.db"));
    let id = add(&b, "flaky");
    let r1 = b.claim(&id, "h:1", 60).unwrap().unwrap().run_id;
    let e = b.end_run(&id, r1, &crash(1), RULES).unwrap().unwrap();
    assert_eq!(
        (e.status.as_str(), e.failures, e.gave_up),
        ("ready", 1, false)
    );
    let t = b.require_task(&id).unwrap();
    assert_eq!(
        (t.status.as_str(), t.claim_lock.as_deref(), t.current_run_id),
        ("ready", None, None)
    );
    assert_eq!(
        t.last_failure_error.as_deref(),
        Some("pid 9 exited with code 1")
    );
    assert_eq!(
        b.run(r1).unwrap().unwrap().outcome.as_deref(),
        Some("crashed")
    );
    assert!(
        b.end_run(&id, r1, &crash(1), RULES).unwrap().is_none(),
        "a duplicate report changes nothing"
    );

    let r2 = b.claim(&id, "h:1", 60).unwrap().unwrap().run_id;
    let e = b.end_run(&id, r2, &crash(3), RULES).unwrap().unwrap();
    assert_eq!(
        (e.status.as_str(), e.failures, e.gave_up),
        ("blocked", 2, true)
    );
    let gave_up = b
        .events(&id)
        .unwrap()
        .into_iter()
        .find(|e| e.kind == "gave_up")
        .expect("gave_up event");
    let p = gave_up.payload.unwrap();
    assert_eq!(
        (
            p["failures"].clone(),
            p["effective_limit"].clone(),
            p["trigger_outcome"].clone()
        ),
        (json!(2), json!(2), json!("crashed"))
    );
    assert_eq!(
        b.recompute_ready(DEFAULT_FAILURE_LIMIT).unwrap(),
        0,
        "a tripped breaker holds while at its limit"
    );
    assert_eq!(b.unblock(&id).unwrap().as_deref(), Some("ready"));
    assert_eq!(b.require_task(&id).unwrap().consecutive_failures, 0);
}

#[test]
fn per_task_max_retries_beats_the_dispatcher_limit() {
    let d = scratch();
    let b = open(&d.path().join("kanban.db"));
    let id = b
        .create(&NewTask {
            title: "t".into(),
            max_retries: Some(3),
            ..Default::default()
        })
        .unwrap();
    for n in 1..=3 {
        let r = b.claim(&id, "h:1", 60).unwrap().unwrap().run_id;
        let e = b.end_run(&id, r, &crash(1), RULES).unwrap().unwrap();
        assert_eq!(e.gave_up, n == 3, "after {n} crashes");
    }
}

#[test]
fn infrastructure_endings_are_not_counted() {
    let d = scratch();
    let b = open(&d.path().join("kanban.db"));
    let id = add(&b, "t");
    for end in [
        RunEnd::RateLimited {
            error: "quota".into(),
            details: json!({"exit_code": 75}),
        },
        RunEnd::Lost {
            error: "scope vanished".into(),
        },
        RunEnd::Stopped {
            error: "stopped by operator".into(),
        },
        RunEnd::RateLimited {
            error: "quota".into(),
            details: json!({"exit_code": 75}),
        },
    ] {
        let r = b.claim(&id, "h:1", 60).unwrap().unwrap().run_id;
        let e = b
            .end_run(
                &id,
                r,
                &end,
                hermes_mgr::outcome::Rules {
                    failure_limit: 1,
                    ..RULES
                },
            )
            .unwrap()
            .unwrap();
        assert_eq!((e.status.as_str(), e.failures), ("ready", 0), "{end:?}");
    }
    let outcomes: Vec<_> = b
        .runs(&id)
        .unwrap()
        .into_iter()
        .map(|r| r.outcome.unwrap())
        .collect();
    assert_eq!(
        outcomes,
        ["rate_limited", "lost", "stopped", "rate_limited"]
    );
}

#[test]
fn clean_exits_without_a_verdict_trip_after_their_own_streak() {
    let d = scratch();
    let b = open(&d.path().join("kanban.db"));
    let id = add(&b, "t");
    let pv = RunEnd::ProtocolViolation {
        error: "pid 5 exited 0 without complete or block".into(),
        details: json!({"exit_code": 0}),
    };
    for n in 1..=3 {
        let r = b.claim(&id, "h:1", 60).unwrap().unwrap().run_id;
        let e = b.end_run(&id, r, &pv, RULES).unwrap().unwrap();
        assert_eq!(e.gave_up, n == 3, "after {n} violations");
        let run = b.run(r).unwrap().unwrap();
        assert_eq!(run.metadata.unwrap()["protocol_violation"], json!(true));
    }
}

#[test]
fn spawn_failure_at_the_limit_closes_the_run_as_gave_up() {
    let d = scratch();
    let b = open(&d.path().join("kanban.db"));
    let id = b
        .create(&NewTask {
            title: "t".into(),
            max_retries: Some(1),
            ..Default::default()
        })
        .unwrap();
    let r = b.claim(&id, "h:1", 60).unwrap().unwrap().run_id;
    let e = b
        .end_run(
            &id,
            r,
            &RunEnd::SpawnFailed {
                error: "hermes: not found".into(),
            },
            RULES,
        )
        .unwrap()
        .unwrap();
    assert!(e.gave_up);
    assert_eq!(
        b.run(r).unwrap().unwrap().outcome.as_deref(),
        Some("gave_up")
    );
}

fn sha(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn a_file_that_is_not_sqlite_is_refused_and_left_alone() {
    let d = scratch();
    let db = d.path().join("kanban.db");
    std::fs::write(&db, b"this is my shopping list, not a database\n").unwrap();
    let before = sha(&db);
    let err = Board::open(&BoardPaths::for_db(&db), OpenMode::CreateIfMissing).unwrap_err();
    assert!(matches!(err, BoardError::NotSqlite { .. }), "{err}");
    assert!(err.to_string().contains("left untouched"), "{err}");
    assert_eq!(sha(&db), before);
    assert!(!d.path().join("kanban.db-wal").exists());
}

#[test]
fn a_corrupt_board_is_refused_and_left_alone() {
    let d = scratch();
    let db = d.path().join("kanban.db");
    {
        let b = open(&db);
        for i in 0..200 {
            add(&b, &format!("task {i} {}", "x".repeat(200)));
        }
        b.connection()
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .unwrap();
    }
    // Scribble over the middle of the file, past the header: b-tree pages, not the header.
    let mut bytes = std::fs::read(&db).unwrap();
    assert!(bytes.len() > 40_000);
    for b in &mut bytes[12_000..20_000] {
        *b = 0xA5;
    }
    std::fs::write(&db, &bytes).unwrap();
    let err = Board::open(&BoardPaths::for_db(&db), OpenMode::CreateIfMissing).unwrap_err();
    assert!(matches!(err, BoardError::Corrupt { .. }), "{err}");
    assert_eq!(
        std::fs::read(&db).unwrap(),
        bytes,
        "the corrupt file was modified"
    );
}

#[test]
fn newer_upstream_columns_are_tolerated_and_kept() {
    let d = scratch();
    let db = d.path().join("kanban.db");
    {
        let b = open(&db);
        // Columns hermes-agent HEAD adds after 0.19.0.
        b.connection()
            .execute_batch(
                "ALTER TABLE tasks ADD COLUMN provider_override TEXT;
                 ALTER TABLE tasks ADD COLUMN worker_started_at TEXT;
                 ALTER TABLE task_runs ADD COLUMN worker_started_at TEXT;",
            )
            .unwrap();
    }
    let b = open(&db);
    let id = add(&b, "t");
    b.connection()
        .execute(
            "UPDATE tasks SET provider_override='openrouter' WHERE id=?1",
            [&id],
        )
        .unwrap();
    let r = b.claim(&id, "h:1", 60).unwrap().unwrap().run_id;
    assert!(b
        .complete(&id, None, Some("ok"), None, Some(r), DEFAULT_FAILURE_LIMIT)
        .unwrap());
    assert_eq!(b.require_task(&id).unwrap().status.as_str(), "done");
    let kept: String = b
        .connection()
        .query_row(
            "SELECT provider_override FROM tasks WHERE id=?1",
            [&id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(kept, "openrouter");
    assert!(b
        .columns("tasks")
        .unwrap()
        .contains(&"worker_started_at".to_string()));
}

#[test]
fn a_board_from_before_0_19_is_refused_for_writes_not_altered() {
    let d = scratch();
    let db = d.path().join("kanban.db");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch("CREATE TABLE tasks (id TEXT PRIMARY KEY, title TEXT NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL);")
            .unwrap();
    }
    let err = Board::open(&BoardPaths::for_db(&db), OpenMode::CreateIfMissing).unwrap_err();
    assert!(matches!(err, BoardError::OldSchema { .. }), "{err}");
    let c = rusqlite::Connection::open(&db).unwrap();
    let n: i64 = c
        .query_row("SELECT count(*) FROM pragma_table_info('tasks')", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(n, 4, "hermes-mgr added columns to a foreign schema");
}

#[test]
fn a_board_created_here_is_upstreams_schema() {
    let d = scratch();
    let db = d.path().join("kanban.db");
    drop(open(&db));
    let c = rusqlite::Connection::open(&db).unwrap();
    let mode: String = c
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let tables: Vec<String> = c
        .prepare("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        tables,
        [
            "kanban_notify_subs",
            "task_attachments",
            "task_comments",
            "task_events",
            "task_links",
            "task_runs",
            "tasks"
        ]
    );
    let ncols: i64 = c
        .query_row("SELECT count(*) FROM pragma_table_info('tasks')", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(ncols, 35);
}

/// A completion promotes the children it frees in its own transaction, by the configured
/// breaker limit: a task the breaker tripped at a limit of 1 stays blocked, where
/// upstream's default limit (2) would have let it run again.
#[test]
fn a_completion_promotes_by_the_configured_limit() {
    let d = scratch();
    let b = open(&d.path().join("kanban.db"));
    let one = hermes_mgr::outcome::Rules {
        failure_limit: 1,
        ..RULES
    };
    let tripped = add(&b, "tripped at one failure");
    let r = b.claim(&tripped, "h:1", 60).unwrap().unwrap().run_id;
    let e = b.end_run(&tripped, r, &crash(1), one).unwrap().unwrap();
    assert_eq!((e.status.as_str(), e.gave_up), ("blocked", true));
    let parent = add(&b, "parent");
    let child = b
        .create(&NewTask {
            title: "child".into(),
            assignee: Some("default".into()),
            parents: vec![parent.clone()],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(b.require_task(&child).unwrap().status.as_str(), "todo");
    assert!(b
        .complete(&parent, None, Some("done"), None, None, 1)
        .unwrap());
    assert_eq!(
        b.require_task(&child).unwrap().status.as_str(),
        "ready",
        "the child its parent freed"
    );
    assert_eq!(
        b.require_task(&tripped).unwrap().status.as_str(),
        "blocked",
        "a task at the configured limit stays blocked"
    );
}

/// Statements SQLite began on the connection `statements_of` watches (only one test
/// watches one).
static STATEMENTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

unsafe extern "C" fn count_statement(
    _: std::ffi::c_uint,
    _: *mut std::ffi::c_void,
    _: *mut std::ffi::c_void,
    _: *mut std::ffi::c_void,
) -> std::ffi::c_int {
    STATEMENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    0
}

/// How many statements `f` has `b`'s connection run.
fn statements_of(b: &Board, f: impl FnOnce()) -> usize {
    use rusqlite::ffi;
    // SAFETY: the board's own open handle; the callback touches only an atomic counter.
    unsafe {
        ffi::sqlite3_trace_v2(
            b.connection().handle(),
            ffi::SQLITE_TRACE_STMT as std::ffi::c_uint,
            Some(count_statement),
            std::ptr::null_mut(),
        )
    };
    STATEMENTS.store(0, std::sync::atomic::Ordering::Relaxed);
    f();
    let n = STATEMENTS.load(std::sync::atomic::Ordering::Relaxed);
    // SAFETY: as above; no callback from here on.
    unsafe { ffi::sqlite3_trace_v2(b.connection().handle(), 0, None, std::ptr::null_mut()) };
    n
}

// Found by the chaos soak (issue 31): every dispatch pass (one per board commit) asked the
// event log about each blocked task, so the daemon's CPU per task grew tenfold as crashers'
// tasks piled up blocked. The tasks that stay blocked whatever (at their breaker's limit, or
// explicitly blocked) now cost no statement of their own.
#[test]
fn blocked_tasks_that_stay_blocked_cost_a_pass_no_statement_each() {
    let dir = scratch();
    let b = open(&dir.path().join("kanban.db"));
    let count = |b: &Board| {
        statements_of(b, || {
            b.recompute_ready(DEFAULT_FAILURE_LIMIT).unwrap();
        })
    };
    let empty = count(&b);
    for i in 0..60 {
        let id = add(&b, &format!("at its limit {i}"));
        b.connection()
            .execute(
                "UPDATE tasks SET status='blocked', consecutive_failures=?2 WHERE id=?1",
                rusqlite::params![id, DEFAULT_FAILURE_LIMIT],
            )
            .unwrap();
        let id = add(&b, &format!("blocked by a worker {i}"));
        b.block(&id, Some("which key?"), Some("needs_input"), None)
            .unwrap();
    }
    let with_blocked = count(&b);
    assert_eq!(
        b.recompute_ready(DEFAULT_FAILURE_LIMIT).unwrap(),
        0,
        "they stay blocked"
    );
    assert_eq!(
        with_blocked, empty,
        "a pass with 120 blocked tasks ran {with_blocked} statements, {empty} with none"
    );
    // One that may go on is still promoted: below its limit, blocked by no one.
    let id = add(&b, "below its limit");
    b.connection()
        .execute(
            "UPDATE tasks SET status='blocked', consecutive_failures=1 WHERE id=?1",
            [&id],
        )
        .unwrap();
    assert_eq!(b.recompute_ready(DEFAULT_FAILURE_LIMIT).unwrap(), 1);
}
