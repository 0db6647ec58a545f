//! The metrics as an operator's Prometheus sees them: a real Prometheus (Debian's) scrapes the
//! daemon's endpoint and a real node_exporter reading the daemon's textfile, in the sandbox,
//! and PromQL counts what the board did through both — a run completed, one crashed, one
//! blocked; `promtool check metrics` passes on `hermes-mgr metrics` and on the textfile; the
//! shipped alert rules pass `promtool test rules`.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{repo, wait_for};
use crate::rig::{sh, Dispatcher};
use crate::systemd_test;

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on 127.0.0.1:`port`: the status line and the body; `None` when nothing answers.
fn get(port: u16, path: &str) -> Option<(String, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_string(), body.to_string()))
}

/// Percent-encode a PromQL expression for a query string.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant PromQL query: each result's labels and value.
fn query(port: u16, q: &str) -> Vec<(Value, f64)> {
    let Some((status, body)) = get(port, &format!("/api/v1/query?query={}", encode(q))) else {
        return Vec::new();
    };
    assert!(status.contains("200"), "{q}: {status}: {body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["metric"].clone(),
                r["value"][1].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

/// `promtool check metrics` on `text`: its complaints, none when it passes.
fn promtool_check(text: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; tests/setup.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

/// Start Debian's node_exporter in the sandbox with only its textfile collector, reading
/// `dir`; its port.
fn start_node_exporter(dir: &Path) -> u16 {
    let port = free_port();
    sh(&format!(
        "systemd-run --unit=node-exporter-test --collect /usr/bin/prometheus-node-exporter --collector.disable-defaults --collector.textfile --collector.textfile.directory={} --web.listen-address=127.0.0.1:{port}",
        dir.display()
    ));
    wait_for("node_exporter to answer", Duration::from_secs(60), || {
        get(port, "/metrics").filter(|(s, _)| s.contains("200"))
    });
    port
}

/// Start Debian's Prometheus in the sandbox, scraping every second the daemon's endpoint, as
/// the README's example job does (`hermes-mgr`), and node_exporter (`node`); its own port.
fn start_prometheus(dir: &Path, target: u16, node: u16) -> u16 {
    let port = free_port();
    std::fs::create_dir_all(dir).unwrap();
    let cfg = dir.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: hermes-mgr\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n  - job_name: node\n    static_configs:\n      - targets: ['127.0.0.1:{node}']\n"
        ),
    )
    .unwrap();
    sh(&format!(
        "systemd-run --unit=prometheus-test --collect /usr/bin/prometheus --config.file={} --storage.tsdb.path={} --web.listen-address=127.0.0.1:{port}",
        cfg.display(),
        dir.join("tsdb").display()
    ));
    wait_for("Prometheus to answer", Duration::from_secs(60), || {
        get(port, "/-/ready").filter(|(s, _)| s.contains("200"))
    });
    port
}

systemd_test!(
    prometheus_scrapes_the_daemon_and_counts_what_the_board_did,
    {
        let target = free_port();
        let textfile = Path::new("/var/tmp/hermes-mgr-textfile");
        std::fs::create_dir_all(textfile).unwrap();
        let d = Dispatcher::new(&format!(
        "metrics_listen = \"127.0.0.1:{target}\"\nmetrics_interval_seconds = 1\nmetrics_textfile_dir = {textfile:?}\n"
    ));
        d.install();
        d.start();
        let (done, crashed, blocked) = (
            d.rig.add("completes"),
            d.rig.add("crashes"),
            d.rig.add("blocks"),
        );
        for (id, what) in [
            (&done, "complete"),
            (&crashed, "exit 1"),
            (&blocked, "block"),
        ] {
            let run = d.wait_running(id, 0);
            d.command(id, run, what);
        }
        // The crashed task is requeued and runs again: one live worker.
        d.wait_running(&crashed, 1);
        d.wait_task("done", |t| t.status.as_str() == "done", &done);
        d.wait_task("blocked", |t| t.status.as_str() == "blocked", &blocked);

        let node = start_node_exporter(textfile);
        let prom = start_prometheus(&d.rig.dir.join("prom"), target, node);
        let want = |q: &str, expected: &[(&str, f64)]| {
            wait_for(
                &format!("{q} to be {expected:?}"),
                Duration::from_secs(60),
                || {
                    let got = query(prom, q);
                    let all = expected.iter().all(|(label, v)| {
                        got.iter().any(|(m, x)| {
                            x == v
                                && label
                                    .split_once('=')
                                    .is_none_or(|(k, want)| m[k].as_str() == Some(want))
                        })
                    });
                    (all && got.len() == expected.len()).then_some(got)
                },
            )
        };
        want(
            "sum by (outcome) (hermes_mgr_runs_ended_total{job=\"hermes-mgr\"})",
            &[
                ("outcome=completed", 1.0),
                ("outcome=crashed", 1.0),
                ("outcome=blocked", 1.0),
            ],
        );
        want(
            "hermes_mgr_tasks{job=\"hermes-mgr\",board=\"default\"} > 0",
            &[
                ("status=done", 1.0),
                ("status=blocked", 1.0),
                ("status=running", 1.0),
            ],
        );
        want(
            "sum(hermes_mgr_live_workers{job=\"hermes-mgr\"})",
            &[("", 1.0)],
        );
        want(
            "hermes_mgr_breaker_trips_total{job=\"hermes-mgr\"}",
            &[("board=default", 0.0)],
        );
        want(
            "hermes_mgr_start_seconds_count{job=\"hermes-mgr\"}",
            &[("", 4.0)],
        );
        want(
            "hermes_mgr_booking_seconds_count{job=\"hermes-mgr\"}",
            &[("", 3.0)],
        );
        want("hermes_mgr_estop{job=\"hermes-mgr\"}", &[("", 0.0)]);
        want(
            "hermes_mgr_board_paused{job=\"hermes-mgr\"}",
            &[("board=default", 0.0)],
        );

        // The same counts through node_exporter's textfile collector, which took the file
        // without a parse error.
        want(
            "sum by (outcome) (hermes_mgr_runs_ended_total{job=\"node\"})",
            &[
                ("outcome=completed", 1.0),
                ("outcome=crashed", 1.0),
                ("outcome=blocked", 1.0),
            ],
        );
        want("node_textfile_scrape_error{job=\"node\"}", &[("", 0.0)]);

        // What `hermes-mgr metrics` prints, and the textfile node_exporter would read, are
        // Prometheus' text format, clean by promtool's lint.
        let printed = d.rig.mgr(&["metrics"]).ok().stdout;
        assert!(printed.contains("hermes_mgr_build_info{"), "{printed}");
        promtool_check(&printed).unwrap_or_else(|e| panic!("promtool: {e}\n{printed}"));
        let file = std::fs::read_to_string(textfile.join("hermes-mgr.prom")).unwrap();
        promtool_check(&file).unwrap_or_else(|e| panic!("promtool: {e}\n{file}"));
        assert!(
            file.contains("hermes_mgr_runs_ended_total{board=\"default\",outcome=\"crashed\"} 1"),
            "{file}"
        );

        // The endpoint answers only GET of its path.
        let (status, _) = get(target, "/nothing").unwrap();
        assert!(status.contains("404"), "{status}");
        sh("systemctl stop prometheus-test node-exporter-test");
    }
);

// Without a daemon there is nothing to print, and it says so.
systemd_test!(metrics_without_a_dispatcher_says_where_it_looked, {
    let d = Dispatcher::new("");
    let out = d.rig.mgr(&["metrics"]);
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr
            .contains("no metrics at /run/hermes-mgr-test/metrics.prom")
            && out.stderr.contains("while it runs"),
        "{}",
        out.stderr
    );
});

#[test]
fn the_shipped_alert_rules_pass_their_promtool_tests() {
    let dir = repo().join("packaging/prometheus");
    for args in [
        &["check", "rules", "hermes-mgr-rules.yml"][..],
        &["test", "rules", "hermes-mgr-rules.test.yml"],
    ] {
        let o = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool (Debian's prometheus package; tests/setup.sh installs it)");
        assert!(
            o.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}
