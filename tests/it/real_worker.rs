//! The real thing end to end: hermes-dispatcher runs real Hermes workers, 0.19.0's, 0.20.1's and ~0.22.2's (`hermes -p
//! default --cli --accept-hooks [--toolsets …] chat -q "work kanban task <id>"`), whose model
//! is a small OpenAI-compatible server on loopback (`tests/fixtures/fake_llm.py`, the only
//! fake: no model runs here) that answers with a `kanban_complete` tool call, then a last
//! word. The worker's agent loop, tools and kanban writes are Hermes' own.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use std::path::Path;

use crate::boards::create_with;
use crate::harness::{hermes_020_bin, hermes_022_bin, hermes_bin, repo, venv, venv_020, venv_022};
use crate::rig::Dispatcher;
use crate::systemd_test;

struct Llm(Child);

impl Drop for Llm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const SCRIPT: &str = r#"[
  {"content": null, "tool_calls": [{"id": "call_1", "type": "function",
    "function": {"name": "kanban_complete", "arguments": "{\"summary\": \"done by a real worker\"}"}}]},
  {"content": "All done."}
]"#;

/// In the sandbox, the worker's terminal tool first writes a file in its workspace (a command
/// Hermes' approval lets through unattended; the attacks are `sandbox.rs`'s), then the task is
/// completed.
const SANDBOX_SCRIPT: &str = r#"[
  {"content": null, "tool_calls": [{"id": "call_0", "type": "function",
    "function": {"name": "terminal", "arguments": "{\"command\": \"echo ok > made-by-tool\"}"}}]},
  {"content": null, "tool_calls": [{"id": "call_1", "type": "function",
    "function": {"name": "kanban_complete", "arguments": "{\"summary\": \"done by a real worker\"}"}}]},
  {"content": "All done."}
]"#;

systemd_test!(
    real_hermes_workers_complete_a_scratch_and_a_worktree_task,
    {
        real_workers_complete(&venv(), &hermes_bin(), true, false);
    }
);

systemd_test!(real_020_workers_complete_a_scratch_and_a_worktree_task, {
    // v0.20.1's workers (`hermesx`), its CLI making the board's tasks.
    real_workers_complete(&venv_020(), &hermes_020_bin(), true, false);
});

systemd_test!(real_022_workers_complete_a_scratch_and_a_worktree_task, {
    // ~0.22.2's workers, its CLI making the board's tasks.
    real_workers_complete(&venv_022(), &hermes_022_bin(), false, false);
});

/// `keeps_worktree`: 0.19.0 keeps a done task's worktree; ~0.22's own completion removes one
/// that is provably free of work (`_cleanup_workspace`), as this one is. `sandboxed`: every
/// worker in the sandbox (`sandbox.rs`); the worktree task is then made once the scratch one
/// is done, not as its child (a child's sandbox does not show its parent's workspace, which
/// Hermes removes at the child's completion).
pub(crate) fn real_workers_complete(
    venv: &Path,
    bin: &Path,
    keeps_worktree: bool,
    sandboxed: bool,
) {
    {
        // The `hermes` script itself, behind a Python shim (the rig names its own binary).
        let shim = crate::rig::hermes_python_shim_of(venv, bin);
        let d = Dispatcher::with_stub(
            &shim,
            if sandboxed {
                "tick_seconds = 3600\nsandbox = true"
            } else {
                "tick_seconds = 3600"
            },
        );
        let port = 40000 + std::process::id() % 20000;
        let reply = d.rig.dir.join("reply.txt");
        std::fs::write(&reply, if sandboxed { SANDBOX_SCRIPT } else { SCRIPT }).unwrap();
        let _llm = Llm(Command::new("/usr/bin/python3")
            .arg(repo().join("tests/fixtures/fake_llm.py"))
            .arg(port.to_string())
            .arg(&reply)
            .stdin(Stdio::null())
            .spawn()
            .unwrap());
        let cfg = d.rig.dir.join("config.yaml");
        std::fs::write(
            &cfg,
            format!("model:\n  default: fake\n  provider: custom\n  base_url: http://127.0.0.1:{port}/v1\n  api_key: test\n"),
        )
        .unwrap();
        std::os::unix::fs::chown(&cfg, Some(d.rig.uid), None).unwrap();
        // A repository of the worker user's for the worktree task.
        let repo_dir = d.rig.dir.join("repo");
        crate::rig::git_repo(&repo_dir, &d.rig.dir);
        d.install();
        // Both tasks are made before the dispatcher starts: while a Hermes 0.19 process
        // checkpoints the board, another one's post-commit "torn-extend" check reads the
        // header page count before the file has grown and fails a good write (upstream
        // #60510; 1 run in 6 here under load: `hermes kanban create` printed nothing, its
        // refusal on stderr, exit code 0). Our own checkpoints grow the file first
        // (board::open's chunk size); a running worker's do not. The worktree task is the
        // scratch task's child, so they still run one after the other, and Hermes keeps the
        // parent's scratch workspace until the child is done (#33774).
        let scratch = create_with(bin, &d, &[], "a scratch task for a real worker", &[]);
        let done = |id: &str| {
            let until = std::time::Instant::now() + Duration::from_secs(120);
            loop {
                let t = d.task(id);
                if t.status.as_str() == "done" {
                    return t;
                }
                assert!(
                    std::time::Instant::now() < until,
                    "{id} not done by a real worker within 120 s: {t:?}\nruns: {:?}\ndispatcher:\n{}\nworkers:\n{}",
                    d.rig.board().runs(id).unwrap(),
                    crate::rig::journal(crate::rig::SERVICE),
                    crate::rig::journal("hermes-worker-kanban-*")
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        let create_worktree = |parent: Option<&str>| {
            let workspace = format!("worktree:{}", repo_dir.display());
            let mut after = vec!["--workspace", &workspace];
            after.extend(parent.map(|p| ["--parent", p]).into_iter().flatten());
            create_with(bin, &d, &[], "a worktree task for a real worker", &after)
        };
        let worktree = (!sandboxed).then(|| create_worktree(Some(&scratch)));
        d.start();
        done(&scratch);
        let worktree = worktree.unwrap_or_else(|| create_worktree(None));
        let t = done(&worktree);
        if sandboxed {
            let j = crate::rig::journal("hermes-worker-kanban-*");
            assert_eq!(
                j.matches("the worker runs in its sandbox: a mount namespace")
                    .count(),
                2,
                "{j}"
            );
        }
        for id in [&scratch, &worktree] {
            let runs = d.rig.board().runs(id).unwrap();
            assert_eq!(runs.len(), 1, "{runs:?}");
            assert_eq!(runs[0].outcome.as_deref(), Some("completed"));
            assert_eq!(runs[0].summary.as_deref(), Some("done by a real worker"));
        }
        // The scratch workspace went with its task (Hermes' own completion removes it, once
        // its child is done).
        let ws = d.rig.dir.join("kanban/workspaces").join(&scratch);
        let gone = std::time::Instant::now() + Duration::from_secs(60);
        while ws.exists() {
            if std::time::Instant::now() > gone {
                panic!(
                    "the scratch workspace is still there 60 s after its task was done: {}\nworker journal:\n{}",
                    crate::rig::sh(&format!("find {} -printf '%p %u %TT\\n' | head -50", ws.display())),
                    crate::rig::journal(&format!("hermes-worker-kanban-{scratch}-run-1.scope"))
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The worktree stays (0.19.0), on the branch recorded for the task; ~0.22 removes it,
        // in its worker's process, after the completion it wrote.
        let wt = repo_dir.join(".worktrees").join(&worktree);
        let until = std::time::Instant::now() + Duration::from_secs(30);
        while wt.join(".git").is_file() != keeps_worktree {
            assert!(
                std::time::Instant::now() < until,
                "{} is a linked worktree: {} 30 s after its task was done\nworker journal:\n{}",
                wt.display(),
                wt.join(".git").is_file(),
                crate::rig::journal(&format!("hermes-worker-kanban-{worktree}-run-1.scope"))
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            t.branch_name.as_deref(),
            Some(format!("wt/{worktree}").as_str())
        );
        assert_eq!(t.workspace_path.as_deref(), Some(wt.to_str().unwrap()));
        if sandboxed {
            // The terminal tool wrote its workspace (a dirty worktree is work: kept); then a
            // `dir:` task, its workspace in a directory the sandbox hides.
            let requests =
                std::fs::read_to_string(d.rig.dir.join("reply.txt.requests")).unwrap_or_default();
            let tail: String = requests
                .match_indices("\"role\": \"tool\"")
                .chain(requests.match_indices("\"role\":\"tool\""))
                .map(|(i, _)| requests[i..].chars().take(1200).collect::<String>())
                .collect::<Vec<_>>()
                .join("\n---\n");
            assert_eq!(
                std::fs::read_to_string(wt.join("made-by-tool"))
                    .ok()
                    .as_deref(),
                Some("ok\n"),
                "the model's requests end with: {tail}\nworkers:\n{}",
                crate::rig::journal(&format!("hermes-worker-kanban-{worktree}-run-1.scope"))
            );
            let dir_ws = d.rig.dir.parent().unwrap().join(format!(
                "dir-{}",
                d.rig.dir.file_name().unwrap().to_string_lossy()
            ));
            std::fs::create_dir_all(&dir_ws).unwrap();
            std::os::unix::fs::chown(&dir_ws, Some(d.rig.uid), None).unwrap();
            let id = create_with(
                bin,
                &d,
                &[],
                "a dir task for a real worker",
                &["--workspace", &format!("dir:{}", dir_ws.display())],
            );
            done(&id);
            assert_eq!(
                std::fs::read_to_string(dir_ws.join("made-by-tool")).unwrap(),
                "ok\n"
            );
            let j = crate::rig::journal("hermes-worker-kanban-*");
            assert_eq!(
                j.matches("the worker runs in its sandbox: a mount namespace")
                    .count(),
                3,
                "{j}"
            );
        }
    }
}

systemd_test!(
    a_real_022_worker_paused_inside_its_model_call_completes_after_resume,
    {
        paused_in_its_model_call(&venv_022(), &hermes_022_bin());
    }
);

systemd_test!(
    a_real_019_worker_paused_inside_its_model_call_completes_after_resume,
    {
        paused_in_its_model_call(&venv(), &hermes_bin());
    }
);

/// A real worker frozen while it waits for its model's answer: the answer arrives while it
/// is frozen (it sits in the socket), nothing of the worker moves, and once resumed the
/// same worker reads it and completes its task, in one run.
fn paused_in_its_model_call(venv: &Path, bin: &Path) {
    let shim = crate::rig::hermes_python_shim_of(venv, bin);
    let d = Dispatcher::with_stub(&shim, "tick_seconds = 3600");
    let port = 40000 + std::process::id() % 20000;
    let reply = d.rig.dir.join("reply.txt");
    std::fs::write(&reply, SCRIPT).unwrap();
    // Held at the model until the test lets it answer.
    let gate = d.rig.dir.join("reply.txt.gate");
    std::fs::write(&gate, "").unwrap();
    let _llm = Llm(Command::new("/usr/bin/python3")
        .arg(repo().join("tests/fixtures/fake_llm.py"))
        .arg(port.to_string())
        .arg(&reply)
        .stdin(Stdio::null())
        .spawn()
        .unwrap());
    let cfg = d.rig.dir.join("config.yaml");
    std::fs::write(
        &cfg,
        format!("model:\n  default: fake\n  provider: custom\n  base_url: http://127.0.0.1:{port}/v1\n  api_key: test\n"),
    )
    .unwrap();
    std::os::unix::fs::chown(&cfg, Some(d.rig.uid), None).unwrap();
    d.install();
    let id = create_with(bin, &d, &[], "paused in its model call", &[]);
    d.start();
    let run = d.wait_running(&id, 0);
    // A real worker's start (its Python, its imports) takes seconds, more under load.
    let inflight = d.rig.dir.join("reply.txt.inflight");
    crate::harness::wait_for(
        "the worker inside its model call",
        Duration::from_secs(120),
        || inflight.exists().then_some(()),
    );
    let unit = format!("hermes-worker-kanban-{id}-run-{run}.scope");
    d.rig.mgr(&["pause", &id]).ok();
    assert!(crate::pause::kernel_frozen(&unit));
    let requests = || {
        std::fs::read_to_string(d.rig.dir.join("reply.txt.requests"))
            .unwrap_or_default()
            .lines()
            .count()
    };
    let asked = requests();
    std::fs::remove_file(&gate).unwrap();
    // The answer is in the frozen worker's socket: it asks nothing more, books nothing.
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(requests(), asked, "a frozen worker asked its model again");
        assert_eq!(d.task(&id).status.as_str(), "running");
    }
    d.rig.mgr(&["resume", &id]).ok();
    let t = crate::harness::wait_for(
        "the resumed worker's verdict",
        Duration::from_secs(120),
        || Some(d.task(&id)).filter(|t| t.status.as_str() == "done"),
    );
    assert_eq!(t.current_run_id, None);
    let runs = d.rig.board().runs(&id).unwrap();
    // One run: the worker that was frozen is the one that finished.
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].outcome.as_deref(), Some("completed"));
    assert_eq!(runs[0].summary.as_deref(), Some("done by a real worker"));
}
