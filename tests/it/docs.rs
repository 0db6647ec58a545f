//! The documentation cannot drift from the code: man pages render cleanly and match the
//! clap definitions, every config key is documented, every path ARCHITECTURE.md names exists.

use std::process::Command;

use crate::harness::{mgr_bin, repo};

#[test]
fn man_pages_render_without_warnings() {
    for page in [
        "man/hermes-mgr.1",
        "man/hermes-dispatcher.8",
        "man/hermes-mgr.toml.5",
    ] {
        let o = Command::new("man")
            .args(["--warnings", "-l"])
            .arg(repo().join(page))
            .env("MANWIDTH", "80")
            .output()
            .expect("man");
        assert!(
            o.status.success(),
            "{page}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            o.stderr.is_empty(),
            "{page} warns: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!o.stdout.is_empty());
    }
}

#[test]
fn the_committed_hermes_mgr_1_is_generated_from_the_cli() {
    let o = Command::new(mgr_bin()).arg("manpage").output().unwrap();
    let committed = std::fs::read(repo().join("man/hermes-mgr.1")).unwrap();
    assert!(
        o.stdout == committed,
        "man/hermes-mgr.1 is stale: run `hermes-mgr manpage > man/hermes-mgr.1`"
    );
}

#[test]
fn every_config_key_is_documented() {
    let cfg = toml::to_string(&hermes_mgr::config::Config {
        memory_max_bytes: Some(1),
        tasks_max: Some(1),
        cpu_quota_percent: Some(1),
        default_assignee: Some("x".into()),
        metrics_listen: Some("127.0.0.1:9469".into()),
        admit_memory_pressure_percent: Some(1.0),
        admit_cpu_pressure_percent: Some(1.0),
        admit_io_pressure_percent: Some(1.0),
        admit_memory_available_bytes: Some(1),
        pools: [(
            "build".to_string(),
            hermes_mgr::config::Pool {
                profiles: vec!["x".into()],
                max_workers: Some(1),
                memory_max_bytes: Some(1),
                memory_per_worker_bytes: Some(1),
                cpu_quota_percent: Some(1),
                cpu_weight: Some(1),
                tasks_max: Some(1),
                admit_memory_pressure_percent: Some(1.0),
                admit_cpu_pressure_percent: Some(1.0),
                admit_io_pressure_percent: Some(1.0),
            },
        )]
        .into(),
        ..Default::default()
    })
    .unwrap();
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let man5 = std::fs::read_to_string(repo().join("man/hermes-mgr.toml.5")).unwrap();
    for key in cfg.lines().filter_map(|l| {
        // A table (`[pools.build]`) is documented by its key (`pools`).
        l.strip_prefix('[')
            .and_then(|t| t.split(['.', ']']).next())
            .or_else(|| l.split_once(" = ").map(|(k, _)| k.trim()))
    }) {
        assert!(
            readme.contains(&format!("`{key}`")),
            "README.md does not document {key}"
        );
        assert!(
            man5.contains(key),
            "hermes-mgr.toml(5) does not document {key}"
        );
    }
}

#[test]
fn every_path_architecture_md_names_exists() {
    let text = std::fs::read_to_string(repo().join("ARCHITECTURE.md")).unwrap();
    let mut checked = 0;
    for chunk in text.split('`').skip(1).step_by(2) {
        let looks_like_path = (chunk.starts_with("src/")
            || chunk.starts_with("tests/")
            || chunk.starts_with("units/")
            || chunk.starts_with("bench/"))
            && !chunk.contains(' ')
            && !chunk.contains('<');
        if looks_like_path {
            assert!(
                repo().join(chunk.trim_end_matches('/')).exists(),
                "ARCHITECTURE.md names {chunk}, which does not exist"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 5,
        "found only {checked} paths: the check itself broke"
    );
}

/// The code map names every module under `src/` (with its files), and nothing else.
#[test]
fn architecture_md_maps_every_module_and_only_those() {
    let text = std::fs::read_to_string(repo().join("ARCHITECTURE.md")).unwrap();
    let map = text
        .split("## Code map")
        .nth(1)
        .and_then(|t| t.split("\n## ").next())
        .expect("ARCHITECTURE.md has a code map");
    // Rows: | `board` (`mod`, `model`, …) | … ; `a`, `b`, `c` (`mod`, …) | … — module names
    // are the backticked words of the first column, files the parenthesised ones after each.
    let mut named = std::collections::BTreeSet::new();
    for row in map.lines().filter(|l| l.starts_with("| `")) {
        let first = row.split('|').nth(1).unwrap();
        let mut module = String::new();
        let mut depth = 0;
        for (i, part) in first.split('`').enumerate() {
            depth += part.matches('(').count() as i32 - part.matches(')').count() as i32;
            if i % 2 == 1 {
                if depth == 0 {
                    module = part.to_string();
                    named.insert(module.clone());
                } else {
                    named.insert(format!("{module}/{part}"));
                }
            }
        }
    }
    let mut actual = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(repo().join("src")).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        if p.is_dir() {
            if name == "bin" {
                continue;
            }
            actual.insert(name.clone());
            for f in std::fs::read_dir(&p).unwrap() {
                let f = f.unwrap().path();
                actual.insert(format!(
                    "{name}/{}",
                    f.file_stem().unwrap().to_string_lossy()
                ));
            }
        } else if name != "lib" {
            actual.insert(name);
        }
    }
    assert_eq!(
        named, actual,
        "ARCHITECTURE.md's code map and src/ disagree (left: the map, right: src/)"
    );
}
