//! `hermes-mgr` as a user runs it: output, JSON, exit codes, error messages.

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::harness::{mgr, mgr_bin, scratch};

#[test]
fn add_list_show_complete_round_trip() {
    let d = scratch();
    let db = d.path().join("kanban.db");
    let a = mgr(
        &db,
        &[
            "add",
            "Summarise the logs",
            "--assignee",
            "Default",
            "--priority",
            "5",
            "--json",
        ],
    )
    .ok()
    .json();
    let id = a["id"]
        .as_str()
        .expect("add --json prints the id")
        .to_string();
    assert_eq!(
        (
            a["status"].clone(),
            a["assignee"].clone(),
            a["priority"].clone()
        ),
        (json!("ready"), json!("default"), json!(5))
    );
    let child = mgr(
        &db,
        &[
            "add",
            "Follow up",
            "--parent",
            &id,
            "--max-runtime",
            "30m",
            "--max-retries",
            "4",
            "--json",
        ],
    )
    .ok()
    .json();
    assert_eq!(
        (child["status"].clone(), child["parents"].clone()),
        (json!("todo"), json!([id]))
    );
    assert_eq!(
        (
            child["max_runtime_seconds"].clone(),
            child["max_retries"].clone()
        ),
        (json!(1800), json!(4))
    );

    let list = mgr(&db, &["list", "--json"]).ok().json();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[0]["id"], json!(id), "highest priority first");
    let text = mgr(&db, &["list"]).ok().stdout;
    assert!(
        text.contains(&id) && text.contains("Summarise the logs") && text.contains("ready"),
        "{text}"
    );
    let ready = mgr(&db, &["list", "--status", "todo", "--json"])
        .ok()
        .json();
    assert_eq!(ready.as_array().unwrap().len(), 1);

    let out = mgr(
        &db,
        &[
            "complete",
            &id,
            "--summary",
            "done it",
            "--metadata",
            r#"{"files": 3}"#,
        ],
    )
    .ok()
    .stdout;
    assert!(out.contains(&format!("Completed {id}")), "{out}");
    let show = mgr(&db, &["show", &id, "--json"]).ok().json();
    assert_eq!(show["task"]["status"], json!("done"));
    assert_eq!(show["runs"][0]["metadata"], json!({"files": 3}));
    let kinds: Vec<_> = show["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, ["created", "completed"]);
    let child_now = mgr(&db, &["show", child["id"].as_str().unwrap(), "--json"])
        .ok()
        .json();
    assert_eq!(
        child_now["task"]["status"],
        json!("ready"),
        "completing the parent promotes the child"
    );
}

#[test]
fn block_unblock_requeue_report_and_refuse_clearly() {
    let d = scratch();
    let db = d.path().join("kanban.db");
    let id = mgr(&db, &["add", "t", "--json"]).ok().json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        mgr(
            &db,
            &[
                "block",
                &id,
                "need a key",
                "--kind",
                "needs_input",
                "--json"
            ]
        )
        .ok()
        .json(),
        json!({"id": id, "status": "blocked"})
    );
    let again = mgr(&db, &["block", &id]);
    assert_eq!(again.code, Some(1));
    assert!(again.stderr.contains("it is blocked"), "{}", again.stderr);
    mgr(&db, &["unblock", &id]).ok();
    let rq = mgr(&db, &["requeue", &id]);
    assert_eq!(rq.code, Some(1));
    assert!(
        rq.stderr.contains("cannot requeue") && rq.stderr.contains("it is ready"),
        "{}",
        rq.stderr
    );
}

#[test]
fn exit_codes_and_errors_say_what_to_do() {
    let d = scratch();
    let db = d.path().join("kanban.db");
    // Usage errors: 2.
    for args in [
        &["frobnicate"][..],
        &["add"],
        &["add", "t", "--priority", "high"],
        &["list", "--status", "bogus"],
        &["add", "t", "--max-runtime", "-3"],
    ] {
        let r = mgr(&db, args);
        assert_eq!(r.code, Some(2), "{args:?}: {}", r.stderr);
    }
    // A read of a board that does not exist: 1, and no empty board left behind.
    let r = mgr(&d.path().join("typo.db"), &["list"]);
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("does not exist") && r.stderr.contains("hermes-mgr add"),
        "{}",
        r.stderr
    );
    assert!(!d.path().join("typo.db").exists());
    mgr(&db, &["add", "t"]).ok();
    let r = mgr(&db, &["show", "t_nothere"]);
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("no task \"t_nothere\"") && r.stderr.contains("hermes-mgr list"),
        "{}",
        r.stderr
    );
    let r = mgr(&db, &["add", "t", "--parent", "t_nothere"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("unknown parent"), "{}", r.stderr);
    let r = mgr(&db, &["complete", "x", "--metadata", "[1,2]"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("JSON object"), "{}", r.stderr);
    let r = Command::new(mgr_bin())
        .args(["--board", "../etc", "list"])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("invalid board slug"));
}

#[test]
fn hostile_titles_round_trip_exactly_and_print_harmlessly() {
    let d = scratch();
    let db = d.path().join("kanban.db");
    let long = "ü".repeat(300);
    for title in [
        "it's \"quoted\" $(rm -rf /) `x`",
        "line1\nline2\x1b[2J",
        "../../etc/passwd",
        long.as_str(),
    ] {
        let id = mgr(&db, &["add", title, "--json"]).ok().json()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let shown = mgr(&db, &["show", &id, "--json"]).ok().json();
        assert_eq!(shown["task"]["title"], json!(title.trim()));
        let text = mgr(&db, &["show", &id]).ok().stdout;
        assert!(!text.contains('\x1b'), "raw escape sequence printed");
    }
    let listing = mgr(&db, &["list"]).ok().stdout;
    assert_eq!(
        listing.lines().count(),
        4,
        "a newline in a title broke the table:\n{listing}"
    );
}

#[test]
fn a_locked_board_waits_then_fails_clearly_and_loses_nothing() {
    let d = scratch();
    let db = d.path().join("kanban.db");
    mgr(&db, &["add", "existing"]).ok();
    let holder = rusqlite::Connection::open(&db).unwrap();
    holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let r = Command::new(mgr_bin())
        .args(["--db"])
        .arg(&db)
        .args(["add", "blocked writer"])
        .env("HERMES_KANBAN_BUSY_TIMEOUT_MS", "300")
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("locked by another writer"), "{err}");
    // A writer that holds the lock briefly is waited for (the default timeout is 120 s).
    let (tx, rx) = std::sync::mpsc::channel();
    let db2 = db.clone();
    let writer = std::thread::spawn(move || {
        tx.send(()).unwrap();
        mgr(&db2, &["add", "patient writer"])
    });
    rx.recv().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    holder.execute_batch("ROLLBACK").unwrap();
    writer.join().unwrap().ok();
    let titles: Vec<String> = mgr(&db, &["list", "--json"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["title"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(titles.len(), 2, "{titles:?}");
    assert!(
        titles.contains(&"existing".to_string()) && titles.contains(&"patient writer".to_string())
    );
}

#[test]
fn completions_are_generated_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef hermes-mgr"),
        ("fish", "complete -c hermes-mgr"),
    ] {
        let o = Command::new(mgr_bin())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(o.status.success());
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            text.contains(marker) && text.contains("dispatch"),
            "{shell}: {}",
            &text[..text.len().min(300)]
        );
    }
    let bad = Command::new(mgr_bin())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}
