//! hermes-mgr and the real `hermes kanban` (PyPI hermes-agent 0.19.0) on one board.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use hermes_mgr::board::{Board, BoardPaths, NewTask, OpenMode};
use serde_json::{json, Value};

use crate::harness::{hermes, hermes_cmd, mgr, repo, scratch, venv};

fn created_id(out: &str) -> String {
    // `hermes kanban create --json` prints the task object.
    serde_json::from_str::<Value>(out).expect("create --json output")["id"]
        .as_str()
        .expect("id")
        .to_string()
}

fn hcreate(db: &Path, args: &[&str]) -> String {
    let mut a = vec!["create"];
    a.extend_from_slice(args);
    a.push("--json");
    created_id(&hermes(db, &a).ok().stdout)
}

#[test]
fn boards_written_by_hermes_read_correctly_in_hermes_mgr() {
    let d = scratch();
    let db = d.path().join("kanban.db");
    let parent = hcreate(
        &db,
        &[
            "Parent task",
            "--assignee",
            "Default",
            "--priority",
            "7",
            "--body",
            "the body",
        ],
    );
    let child = hcreate(
        &db,
        &["Child task", "--parent", &parent, "--assignee", "coder"],
    );
    let blocker = hcreate(&db, &["Needs a human"]);
    hermes(
        &db,
        &["block", &blocker, "waiting on Bob", "--kind", "needs_input"],
    )
    .ok();
    hermes(&db, &["claim", &parent, "--ttl", "120"]).ok();
    let mid = mgr(&db, &["show", &parent, "--json"]).ok().json();
    assert_eq!(mid["task"]["status"], json!("running"));
    assert!(
        mid["task"]["claim_lock"].as_str().unwrap().contains(':'),
        "claim lock is host:pid"
    );
    assert_eq!(mid["runs"][0]["outcome"], Value::Null);
    hermes(
        &db,
        &["complete", &parent, "--summary", "did it", "--result", "42"],
    )
    .ok();

    let list = mgr(&db, &["list", "--json"]).ok().json();
    let by_id = |id: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == json!(id))
            .cloned()
            .expect(id)
    };
    let p = by_id(&parent);
    assert_eq!(
        (
            p["status"].clone(),
            p["priority"].clone(),
            p["assignee"].clone()
        ),
        (json!("done"), json!(7), json!("default"))
    );
    assert_eq!(
        (p["body"].clone(), p["result"].clone()),
        (json!("the body"), json!("42"))
    );
    assert_eq!(
        by_id(&child)["status"],
        json!("ready"),
        "hermes promoted the child"
    );
    assert_eq!(by_id(&child)["assignee"], json!("coder"));
    assert_eq!(by_id(&blocker)["status"], json!("blocked"));
    assert_eq!(by_id(&blocker)["block_kind"], json!("needs_input"));

    let show = mgr(&db, &["show", &parent, "--json"]).ok().json();
    assert_eq!(show["children"], json!([child]));
    assert_eq!(show["runs"][0]["outcome"], json!("completed"));
    assert_eq!(show["runs"][0]["summary"], json!("did it"));
    let kinds: Vec<&str> = show["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["created", "claimed", "completed"]);
    let c = mgr(&db, &["show", &child, "--json"]).ok().json();
    assert_eq!(c["parents"], json!([parent]));
    // hermes-mgr keeps working on it: a recompute after hermes' writes finds nothing stale.
    mgr(
        &db,
        &["complete", &child, "--summary", "finished by hermes-mgr"],
    )
    .ok();
}

#[test]
fn boards_written_by_hermes_mgr_read_correctly_in_hermes() {
    let d = scratch();
    let db = d.path().join("kanban.db");
    let parent = mgr(
        &db,
        &[
            "add",
            "Mgr parent",
            "--assignee",
            "default",
            "--priority",
            "4",
            "--body",
            "b",
        ],
    )
    .ok()
    .json_id();
    let child = mgr(
        &db,
        &[
            "add",
            "Mgr child",
            "--parent",
            &parent,
            "--max-retries",
            "3",
        ],
    )
    .ok()
    .json_id();
    let blocked = mgr(&db, &["add", "Mgr blocked"]).ok().json_id();
    mgr(
        &db,
        &["block", &blocked, "ask Alice", "--kind", "capability"],
    )
    .ok();
    let b = Board::open(&BoardPaths::for_db(&db), OpenMode::MustExist).unwrap();
    let claim = b.claim(&parent, "mgrhost:77", 900).unwrap().unwrap();
    assert!(b
        .complete(
            &parent,
            Some("the result"),
            Some("all good"),
            None,
            Some(claim.run_id),
            hermes_mgr::board::DEFAULT_FAILURE_LIMIT
        )
        .unwrap());
    drop(b);

    let list: Value = serde_json::from_str(&hermes(&db, &["list", "--json"]).ok().stdout).unwrap();
    let by_id = |id: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == json!(id))
            .cloned()
            .expect(id)
    };
    let p = by_id(&parent);
    assert_eq!(
        (
            p["status"].clone(),
            p["priority"].clone(),
            p["assignee"].clone(),
            p["body"].clone()
        ),
        (json!("done"), json!(4), json!("default"), json!("b"))
    );
    assert_eq!(p["result"], json!("the result"));
    assert_eq!(by_id(&child)["status"], json!("ready"));
    assert_eq!(by_id(&child)["max_retries"], json!(3));
    assert_eq!(by_id(&blocked)["status"], json!("blocked"));

    let show: Value =
        serde_json::from_str(&hermes(&db, &["show", &parent, "--json"]).ok().stdout).unwrap();
    assert_eq!(show["children"], json!([child]));
    assert_eq!(show["latest_summary"], json!("all good"));
    let ev: Vec<(String, Value)> = show["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_string(),
                e["payload"].clone(),
            )
        })
        .collect();
    assert_eq!(
        ev.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
        ["created", "claimed", "completed"]
    );
    assert_eq!(ev[1].1["lock"], json!("mgrhost:77"));
    assert_eq!(ev[2].1["summary"], json!("all good"));
    let runs = hermes(&db, &["runs", &parent]).ok().stdout;
    assert!(
        runs.contains("completed") && runs.contains("default"),
        "{runs}"
    );
    let bshow: Value =
        serde_json::from_str(&hermes(&db, &["show", &blocked, "--json"]).ok().stdout).unwrap();
    let last = bshow["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (last["kind"].clone(), last["payload"]["reason"].clone()),
        (json!("blocked"), json!("ask Alice"))
    );
    // And hermes can keep writing it: unblock what hermes-mgr blocked.
    hermes(&db, &["unblock", &blocked]).ok();
    assert_eq!(
        mgr(&db, &["show", &blocked, "--json"]).ok().json()["task"]["status"],
        json!("ready")
    );
}

#[test]
fn hermes_complete_is_fenced_by_the_run_hermes_mgr_claimed() {
    let d = scratch();
    let db = d.path().join("kanban.db");
    let id = mgr(&db, &["add", "fenced"]).ok().json_id();
    let b = Board::open(&BoardPaths::for_db(&db), OpenMode::MustExist).unwrap();
    let first = b.claim(&id, "mgrhost:1", 900).unwrap().unwrap();
    assert!(b.requeue(&id, Some("retry")).unwrap());
    let second = b.claim(&id, "mgrhost:1", 900).unwrap().unwrap();
    // A worker of the first run finishing late must not complete the second run's task.
    let stale = hermes_cmd(&db, &["complete", &id, "--summary", "late"])
        .env("HERMES_KANBAN_TASK", &id)
        .env("HERMES_KANBAN_RUN_ID", first.run_id.to_string())
        .output()
        .unwrap();
    // (hermes 0.19.0 exits 0 even when it refuses; the board and its message are the truth.)
    assert!(
        String::from_utf8_lossy(&stale.stderr).contains("cannot complete"),
        "stale run id was honoured"
    );
    assert_eq!(
        b.require_task(&id).unwrap().status.as_str(),
        "running",
        "stale run id was honoured"
    );
    let ok = hermes_cmd(&db, &["complete", &id, "--summary", "current"])
        .env("HERMES_KANBAN_TASK", &id)
        .env("HERMES_KANBAN_RUN_ID", second.run_id.to_string())
        .output()
        .unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let t = b.require_task(&id).unwrap();
    assert_eq!(t.status.as_str(), "done");
    let run = b.run(second.run_id).unwrap().unwrap();
    assert_eq!(
        (run.outcome.as_deref(), run.summary.as_deref()),
        (Some("completed"), Some("current"))
    );
    assert_eq!(
        b.run(first.run_id).unwrap().unwrap().outcome.as_deref(),
        Some("reclaimed")
    );
}

#[test]
fn both_tools_writing_at_once_lose_nothing() {
    const POOL: usize = 300;
    const EACH: usize = 150;
    let d = scratch();
    let db = d.path().join("kanban.db");
    let b = Board::open(&BoardPaths::for_db(&db), OpenMode::CreateIfMissing).unwrap();
    for i in 0..POOL {
        b.create(&NewTask {
            title: format!("pool-{i:04}"),
            assignee: Some("default".into()),
            ..Default::default()
        })
        .unwrap();
    }
    let pool: Vec<String> = b
        .list(None, None)
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    drop(b);
    let home = d.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let py = Command::new(venv().join("bin/python"))
        .arg(repo().join("tests/fixtures/hermes_writer.py"))
        .arg(&db)
        .arg(EACH.to_string())
        .arg("py")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", &home)
        .env("HERMES_HOME", home.join(".hermes"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start upstream writer");
    // The same workload through hermes-mgr's board, at the same time.
    let b = Board::open(&BoardPaths::for_db(&db), OpenMode::MustExist).unwrap();
    let mut ours = HashSet::new();
    let mut sorted = pool.clone();
    sorted.sort_by_key(|id| b.require_task(id).unwrap().title);
    #[allow(clippy::needless_range_loop)]
    for i in 0..POOL.max(EACH) {
        if i < EACH {
            let id = b
                .create(&NewTask {
                    title: format!("rs-{i}"),
                    priority: (i % 3) as i64,
                    ..Default::default()
                })
                .unwrap();
            if i % 10 == 0 {
                assert_eq!(
                    b.block(&id, Some("rs blocks"), Some("needs_input"), None)
                        .unwrap()
                        .as_deref(),
                    Some("blocked")
                );
                assert!(b.unblock(&id).unwrap().is_some());
            }
        }
        if i < POOL {
            if let Some(c) = b.claim(&sorted[i], "rs:1", 600).unwrap() {
                assert!(b
                    .complete(
                        &sorted[i],
                        None,
                        Some("rs"),
                        None,
                        Some(c.run_id),
                        hermes_mgr::board::DEFAULT_FAILURE_LIMIT
                    )
                    .unwrap());
                ours.insert(sorted[i].clone());
            }
        }
    }
    let out = py.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "upstream writer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: Value = serde_json::from_slice(&out.stdout).unwrap();
    println!(
        "upstream torn-extend false alarms during the run: {}",
        theirs["false_alarms"]
    );
    let theirs: HashSet<String> = theirs["won"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();

    assert_eq!(b.integrity_check().unwrap(), "ok");
    assert!(
        ours.is_disjoint(&theirs),
        "a task was claimed by both tools"
    );
    assert_eq!(
        ours.len() + theirs.len(),
        POOL,
        "pool tasks left unclaimed: ours {} theirs {}",
        ours.len(),
        theirs.len()
    );
    println!(
        "pool split: hermes-mgr {} / hermes {}",
        ours.len(),
        theirs.len()
    );
    for id in &pool {
        let t = b.require_task(id).unwrap();
        assert_eq!(t.status.as_str(), "done", "{id}");
        let runs = b.runs(id).unwrap();
        assert_eq!(runs.len(), 1, "{id}: {} runs", runs.len());
        let who = if ours.contains(id) { "rs" } else { "py" };
        assert_eq!(
            runs[0].summary.as_deref(),
            Some(who),
            "{id} completed by the wrong claimer"
        );
        let claimed = b
            .events(id)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "claimed")
            .count();
        assert_eq!(claimed, 1, "{id}");
    }
    let all = b.list(None, None).unwrap();
    assert_eq!(all.len(), POOL + 2 * EACH, "created tasks lost");
    for tag in ["rs", "py"] {
        let mine: Vec<_> = all
            .iter()
            .filter(|t| t.title.starts_with(&format!("{tag}-")))
            .collect();
        assert_eq!(mine.len(), EACH, "{tag}");
        assert!(
            mine.iter().all(|t| t.status.as_str() == "ready"),
            "{tag}: a block/unblock pair was lost"
        );
    }
}

#[test]
fn files_hermes_mgr_creates_beside_a_users_board_stay_the_users() {
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("user nobody");
    let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());
    let d = scratch();
    let dir = d.path().join("users-board");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
    std::os::unix::fs::chown(d.path(), Some(uid), Some(gid)).unwrap();
    let db = dir.join("kanban.db");
    std::fs::create_dir(dir.join("home")).unwrap();
    std::os::unix::fs::chown(dir.join("home"), Some(uid), Some(gid)).unwrap();
    let as_user = |args: &[&str]| {
        let out = hermes_cmd(&db, args).uid(uid).gid(gid).output().unwrap();
        assert!(
            out.status.success(),
            "hermes {args:?} as nobody failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Owned by nobody from the start, then root's hermes-mgr writes it while a
    // connection stays open, so -wal and -shm exist as root writes.
    let first = created_id(&as_user(&["create", "users task", "--json"]));
    let b = Board::open(&BoardPaths::for_db(&db), OpenMode::MustExist).unwrap();
    b.create(&NewTask {
        title: "root's task".into(),
        ..Default::default()
    })
    .unwrap();
    b.claim(&first, "mgr:1", 60).unwrap().unwrap();
    let ws = dir.join("kanban/workspaces").join(&first);
    b.make_dir(&ws).unwrap();
    for f in [
        "kanban.db",
        "kanban.db-wal",
        "kanban.db-shm",
        "kanban.db.init.lock",
        "kanban",
        "kanban/workspaces",
    ] {
        let m = std::fs::metadata(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(
            (m.uid(), m.gid()),
            (uid, gid),
            "{f} is not the board owner's"
        );
    }
    assert_eq!(std::fs::metadata(&ws).unwrap().uid(), uid);
    // The user's hermes keeps reading and writing while hermes-mgr has it open.
    as_user(&["create", "another", "--json"]);
    let listing = as_user(&["list", "--json"]);
    assert_eq!(
        serde_json::from_str::<Value>(&listing)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        3
    );
    drop(b);

    // A board hermes-mgr creates in a user's directory is that user's too.
    let fresh = dir.join("fresh").join("kanban.db");
    for sub in ["fresh", "fresh/home"] {
        std::fs::create_dir(dir.join(sub)).unwrap();
        std::os::unix::fs::chown(dir.join(sub), Some(uid), Some(gid)).unwrap();
    }
    mgr(&fresh, &["add", "made by root"]).ok();
    assert_eq!(std::fs::metadata(&fresh).unwrap().uid(), uid);
    let out = hermes_cmd(&fresh, &["list", "--json"])
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

trait JsonId {
    fn json_id(self) -> String;
}

impl JsonId for crate::harness::Ran {
    fn json_id(self) -> String {
        // `hermes-mgr add` prints `Created <id> (<status>)`.
        self.stdout
            .split_whitespace()
            .nth(1)
            .expect("Created <id>")
            .to_string()
    }
}
