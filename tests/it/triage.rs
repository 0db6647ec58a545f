//! Triage auto-decompose as upstream's gateway runs it, done by hermes-dispatcher: upstream's
//! own `hermes kanban decompose` in a transient service per task, its LLM a small
//! OpenAI-compatible server on loopback (`tests/fixtures/fake_llm.py`: a fake, because no
//! model can run here; Hermes' auxiliary client, prompt parsing and board writes are real).
//! The children it creates run under hermes-dispatcher; the toggle takes effect without a
//! restart.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::boards::{board, complete, create_on, hermes, wait_running};
use crate::harness::{repo, wait_for};
use crate::rig::{journal, Dispatcher, SERVICE};
use crate::systemd_test;

struct FakeLlm(Child);

impl FakeLlm {
    fn start(port: u32, reply: &std::path::Path) -> FakeLlm {
        FakeLlm(
            Command::new("/usr/bin/python3")
                .arg(repo().join("tests/fixtures/fake_llm.py"))
                .arg(port.to_string())
                .arg(reply)
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const REPLY: &str = r#"{"fanout": true, "tasks": [
  {"title": "child one", "body": "first", "assignee": "default", "parents": []},
  {"title": "child two", "body": "second", "assignee": "default", "parents": [0]}]}"#;

fn write_config(d: &Dispatcher, port: u32, extra: &str) {
    let path = d.rig.dir.join("config.yaml");
    let tmp = d.rig.dir.join("config.yaml.tmp");
    std::fs::write(
        &tmp,
        format!(
            "auxiliary:\n  kanban_decomposer:\n    base_url: http://127.0.0.1:{port}/v1\n    api_key: test\n    model: fake\n{extra}"
        ),
    )
    .unwrap();
    std::os::unix::fs::chown(&tmp, Some(d.rig.uid), None).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

fn triage(d: &Dispatcher, slug: &str, title: &str) -> String {
    let r = hermes(d, &["--board", slug, "create", title, "--triage", "--json"]);
    r.json()["id"].as_str().unwrap().to_string()
}

/// What the decomposition services wrote.
fn decompose_journal() -> String {
    let o = Command::new("journalctl")
        .args(["--no-pager", "-o", "cat", "-u", "hermes-kanban-decompose-*"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn requests(reply: &std::path::Path) -> usize {
    std::fs::read_to_string(reply.with_extension("txt.requests"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

systemd_test!(
    triage_tasks_are_decomposed_by_hermes_kanban_decompose_and_their_children_run,
    {
        let d = Dispatcher::new("tick_seconds = 3600");
        let port = 30000 + std::process::id() % 20000;
        let reply = d.rig.dir.join("reply.txt");
        std::fs::write(&reply, REPLY).unwrap();
        let _llm = FakeLlm::start(port, &reply);
        // Off first: a triage task waits.
        write_config(&d, port, "kanban:\n  auto_decompose: false\n");
        hermes(&d, &["boards", "create", "research"]);
        d.install_all_boards();
        d.start();
        let root = triage(&d, "research", "a big job");
        // A task created after it on the same board runs: the pass that saw the triage
        // task is over, and it left it alone.
        let plain = create_on(&d, "research", "a plain task");
        let rp = wait_running(&d, "research", &plain);
        assert_eq!(
            board(&d, "research")
                .require_task(&root)
                .unwrap()
                .status
                .as_str(),
            "triage"
        );
        assert_eq!(requests(&reply), 0, "the decomposer ran while turned off");
        complete(&d, "research", &plain, rp);

        // On, in config.yaml, without a restart: it is decomposed, its children run.
        write_config(&d, port, "");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let children = loop {
            let b = board(&d, "research");
            let t = b.require_task(&root).unwrap();
            // The root waits for its children: they are its parents on the board.
            let kids = b.parents(&root).unwrap();
            if t.status.as_str() != "triage" && kids.len() == 2 {
                break kids;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no decomposition within 60 s:\n{}\n{}",
                journal(SERVICE),
                decompose_journal()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(requests(&reply), 1);
        wait_for(
            "the daemon hears the job end",
            Duration::from_secs(20),
            || {
                journal(SERVICE)
                    .contains("triage task decomposed")
                    .then_some(())
            },
        );
        let titles: Vec<String> = children
            .iter()
            .map(|c| board(&d, "research").require_task(c).unwrap().title)
            .collect();
        let first = &children[titles.iter().position(|t| t == "child one").unwrap()];
        let second = &children[titles.iter().position(|t| t == "child two").unwrap()];
        let r1 = wait_running(&d, "research", first);
        complete(&d, "research", first, r1);
        let r2 = wait_running(&d, "research", second);
        complete(&d, "research", second, r2);
        // Then the root itself, its children done.
        let r0 = wait_running(&d, "research", &root);
        complete(&d, "research", &root, r0);
    }
);

systemd_test!(
    a_decomposition_that_fails_leaves_the_task_in_triage_and_is_retried_later,
    {
        let d = Dispatcher::new("tick_seconds = 3600");
        let port = 30000 + (std::process::id() + 7) % 20000;
        let reply = d.rig.dir.join("reply.txt");
        std::fs::write(&reply, "this is not JSON").unwrap();
        let _llm = FakeLlm::start(port, &reply);
        write_config(&d, port, "");
        d.install();
        d.start();
        let root = triage(&d, "default", "the model answers nonsense");
        wait_for("a failed decomposition", Duration::from_secs(60), || {
            journal(SERVICE)
                .contains("the decomposition left the task in triage")
                .then_some(())
        });
        assert_eq!(requests(&reply), 1, "{}", decompose_journal());
        assert_eq!(
            board(&d, "default")
                .require_task(&root)
                .unwrap()
                .status
                .as_str(),
            "triage"
        );
        // Dispatch goes on meanwhile.
        let plain = d.rig.add("not held up by the decomposer");
        let r = d.wait_running(&plain, 0);
        d.command(&plain, r, "complete");
        d.wait_task("done", |t| t.status.as_str() == "done", &plain);
        assert_eq!(
            requests(&reply),
            1,
            "retried at once instead of after a minute"
        );
    }
);

systemd_test!(
    a_decompositions_secrets_are_in_no_unit_property_yet_reach_it,
    {
        // `pass_environment` hands the dispatcher's API keys to workers and decompositions.
        // Before the fix they were the decomposition unit's `Environment=`: any local user
        // read them with `systemctl show`, and in /run/systemd/transient (0644).
        const SECRET: &str = "sk-never-in-a-unit-property";
        let d =
            Dispatcher::new("tick_seconds = 3600\npass_environment = [\"HERMES_TEST_API_KEY\"]");
        // A model that takes the request and never answers: the job stays up to be looked at.
        let port = 30000 + std::process::id() % 20000;
        let _llm = FakeLlm(
            Command::new("/usr/bin/python3")
                .args([
                    "-c",
                    "import socket, sys, time\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('127.0.0.1', int(sys.argv[1])))\ns.listen(16)\ntime.sleep(600)",
                    &port.to_string(),
                ])
                .spawn()
                .unwrap(),
        );
        write_config(&d, port, "");
        d.install();
        std::fs::write(
            "/run/systemd/system/hermes-dispatcher.service.d/60-secret.conf",
            format!("[Service]\nEnvironment=HERMES_TEST_API_KEY={SECRET}\n"),
        )
        .unwrap();
        crate::rig::sh("systemctl daemon-reload");
        d.start();
        triage(&d, "default", "a job with a secret");
        let (unit, pid) = wait_for("the decomposition running", Duration::from_secs(60), || {
            let units = crate::rig::sh(
                "systemctl list-units --no-legend --plain --state=active 'hermes-kanban-decompose-*' | cut -d' ' -f1",
            );
            let unit = units.lines().next()?.trim().to_string();
            let pid = crate::rig::systemctl_show(&unit, "MainPID");
            let pid = pid.trim().strip_prefix("MainPID=")?.parse::<u32>().ok()?;
            (pid > 0).then_some((unit, pid))
        });
        // The job has it…
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        assert!(
            String::from_utf8_lossy(&environ).contains(&format!("HERMES_TEST_API_KEY={SECRET}")),
            "the decomposition did not get its environment"
        );
        // …and no property of its unit, nor the unit's file, says it.
        let shown = Command::new("setpriv")
            .args([
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "systemctl",
                "show",
                &unit,
            ])
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&shown.stdout);
        assert!(shown.contains("EnvironmentFiles="), "{shown}");
        assert!(!shown.contains(SECRET), "{shown}");
        let transient = std::fs::read_to_string(format!("/run/systemd/transient/{unit}")).unwrap();
        assert!(!transient.contains(SECRET), "{transient}");
        // The file systemd read it from is root's alone.
        let file = shown
            .lines()
            .find_map(|l| l.strip_prefix("EnvironmentFiles="))
            .and_then(|l| l.split_whitespace().next())
            .unwrap()
            .to_string();
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&file).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o600), "{file}");
        let dir = std::fs::metadata(std::path::Path::new(&file).parent().unwrap()).unwrap();
        assert_eq!(dir.mode() & 0o777, 0o700);
        // The job ends (stopped here): its file goes with it.
        crate::rig::sh(&format!("systemctl stop {unit}"));
        wait_for("the file removed", Duration::from_secs(20), || {
            (!std::path::Path::new(&file).exists()).then_some(())
        });
    }
);
