//! A board carrying newer Hermes' schema (0.20–0.21, installed from git: PyPI stays at
//! 0.19.0), built the way upstream builds it — a board made by the real 0.19.0 CLI, then
//! upstream HEAD's additive migration DDL as written upstream (`../shared/research/
//! hermes-upstream-head.md` §1a: the new task and run columns, the notify-subscription
//! columns, and the first tables with foreign keys, `recipe_instances` and
//! `recipe_instance_tasks`). hermes-dispatcher must open, dispatch and book on it without
//! dropping or rewriting anything, and `show`/`status` must read its newer outcomes and
//! event kinds.

use std::time::Duration;

use crate::harness::{venv, wait_for};
use crate::rig::Dispatcher;
use crate::systemd_test;

const HEAD_DDL: &str = r#"
ALTER TABLE tasks ADD COLUMN provider_override TEXT;
ALTER TABLE tasks ADD COLUMN reasoning_effort TEXT;
ALTER TABLE tasks ADD COLUMN completion_contract TEXT;
ALTER TABLE tasks ADD COLUMN worker_started_at INTEGER;
ALTER TABLE task_runs ADD COLUMN worker_started_at INTEGER;
ALTER TABLE kanban_notify_subs ADD COLUMN user_id_alt TEXT;
ALTER TABLE kanban_notify_subs ADD COLUMN chat_type TEXT;
ALTER TABLE kanban_notify_subs ADD COLUMN delivery_mode TEXT NOT NULL DEFAULT 'notify';
ALTER TABLE kanban_notify_subs ADD COLUMN delivery_metadata TEXT;
ALTER TABLE kanban_notify_subs ADD COLUMN last_ping_event_id INTEGER NOT NULL DEFAULT 0;
CREATE TABLE recipe_instances (
    id TEXT PRIMARY KEY, idempotency_key TEXT NOT NULL UNIQUE, recipe_id TEXT,
    schema_version INTEGER, definition_digest TEXT, request_digest TEXT, definition_json TEXT,
    inputs_json TEXT, bindings_json TEXT, effective_plan_json TEXT, created_by TEXT,
    created_at INTEGER, imported INTEGER NOT NULL DEFAULT 0);
CREATE TABLE recipe_instance_tasks (
    instance_id TEXT REFERENCES recipe_instances(id) ON DELETE RESTRICT,
    node_key TEXT,
    task_id TEXT NOT NULL UNIQUE REFERENCES tasks(id) ON DELETE RESTRICT,
    PRIMARY KEY (instance_id, node_key));
"#;

/// Python's sqlite3, as the worker user (the board's owner), on the rig's board.
fn sql_as_owner(d: &Dispatcher, script: &str) -> String {
    let o = crate::rig::as_worker(venv().join("bin/python3"))
        .args([
            "-c",
            "import sqlite3, sys\nc = sqlite3.connect(sys.argv[1])\nc.execute('PRAGMA foreign_keys=ON')\n\
             out = []\nfor stmt in sys.argv[2].split(';;'):\n    stmt = stmt.strip()\n    if stmt:\n        out += [repr(r) for r in c.execute(stmt)]\nc.commit()\nprint('\\n'.join(out))",
        ])
        .arg(&d.rig.db)
        .arg(script)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

systemd_test!(
    a_board_of_newer_hermes_is_dispatched_and_booked_and_nothing_of_it_is_lost,
    {
        let d = Dispatcher::new("tick_seconds = 3600");
        crate::boards::hermes(&d, &["init"]);
        let ddl: String = HEAD_DDL.split(';').map(|s| format!("{s};;")).collect();
        sql_as_owner(&d, &ddl);
        let old = d.rig.add("reviewed under newer Hermes");
        let id = d.rig.add("runs under hermes-mgr");
        sql_as_owner(
            &d,
            &format!(
                "UPDATE tasks SET provider_override='openrouter', reasoning_effort='high', \
                   completion_contract='local-only', status='done' WHERE id='{old}';;\
                 UPDATE tasks SET provider_override='anthropic', worker_started_at=42 WHERE id='{id}';;\
                 INSERT INTO recipe_instances (id, idempotency_key, recipe_id, created_at) VALUES ('r1', 'k1', 'ship', 1);;\
                 INSERT INTO recipe_instance_tasks VALUES ('r1', 'n1', '{id}');;\
                 INSERT INTO task_runs (task_id, status, outcome, started_at, ended_at, worker_started_at) \
                   VALUES ('{old}', 'review_requested', 'review_requested', 1, 2, 7);;\
                 INSERT INTO task_events (task_id, kind, payload, created_at) VALUES \
                   ('{old}', 'worker_registered', '{{\"pid\": 1}}', 1), ('{old}', 'review_requested', '{{}}', 2)"
            ),
        );
        let schema = "SELECT type, name, sql FROM sqlite_master ORDER BY type, name";
        let before = sql_as_owner(&d, schema);
        d.install();
        d.start();
        let r = d.wait_running(&id, 0);
        d.command(&id, r, "complete");
        d.wait_task("done", |t| t.status.as_str() == "done", &id);
        wait_for("the run booked", Duration::from_secs(20), || {
            d.rig.board().runs(&id).unwrap()[0]
                .outcome
                .clone()
                .filter(|o| o == "completed")
        });
        // Nothing dropped or rewritten: the schema, the newer values, the foreign keys.
        assert_eq!(sql_as_owner(&d, schema), before);
        assert_eq!(
            sql_as_owner(
                &d,
                &format!("SELECT provider_override, worker_started_at FROM tasks WHERE id='{id}'")
            )
            .trim(),
            "('anthropic', 42)"
        );
        assert_eq!(
            sql_as_owner(
                &d,
                "SELECT instance_id, node_key, task_id FROM recipe_instance_tasks"
            )
            .trim(),
            format!("('r1', 'n1', '{id}')")
        );
        assert_eq!(sql_as_owner(&d, "PRAGMA foreign_key_check").trim(), "");
        // Newer outcomes and event kinds are read and shown, escaped like any text.
        let shown = d.rig.mgr(&["show", &old]).ok().stdout;
        assert!(
            shown.contains("review_requested") && shown.contains("worker_registered"),
            "{shown}"
        );
        let status = d.rig.mgr(&["status", "--json"]).ok().json();
        assert_eq!(status["counts"]["done"], 2, "{status}");
    }
);
