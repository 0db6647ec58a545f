//! The house's rules, read from the code itself: modules in floors, each using only the
//! floors below it (no circle can come back unnoticed), and each outside crate that talks
//! to a system — the bus, SQLite, the command line — known to one module only.

use std::collections::BTreeSet;
use std::path::Path;

use crate::harness::repo;

/// The modules of `src/`, bottom floor first: each may use only those before it.
const FLOORS: &[&str] = &[
    // Leaves: they use nothing of the crate.
    "text",
    "logging",
    "safe_fs",
    "names",
    "host",
    "record",
    "contract",
    "guard",
    "systemd",
    // Pure policy, and facts from the kernel and the state directory.
    "outcome",
    "admission",
    "transitions",
    "hermes_config",
    "liveness",
    "state_dir",
    "holds",
    // What the daemon counts and gauges, in Prometheus' format.
    "metrics",
    // The board; the configuration that merges Hermes' own.
    "board",
    "config",
    // A run's start, a pass, a stop; what is shown.
    "spawn",
    "dispatch",
    "status",
    // The daemon and the checks; the command line on top.
    "daemon",
    "doctor",
    "cli",
];

/// Each outside crate that talks to a system, and the one module that may name it.
const OWNERS: &[(&str, &str)] = &[
    ("zbus", "systemd"),
    ("rusqlite", "board"),
    ("clap", "cli"),
    ("clap_complete", "cli"),
    ("clap_mangen", "cli"),
    ("prometheus", "metrics"),
];

/// Every source file of the library with the top module it belongs to (`src/lib.rs` and
/// the binaries, which only call in, left out).
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let src = repo().join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    files.sort();
    files
        .into_iter()
        .filter_map(|p| {
            let rel = p.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
            let top = rel
                .split('/')
                .next()
                .unwrap()
                .trim_end_matches(".rs")
                .to_string();
            (top != "lib" && top != "bin").then(|| (top, std::fs::read_to_string(&p).unwrap()))
        })
        .collect()
}

/// The code of a file, comments left out (a comment may name anything).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The crate's top modules `text` uses (`crate::x`).
fn uses(text: &str) -> BTreeSet<String> {
    code(text)
        .split("crate::")
        .skip(1)
        .filter_map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

#[test]
fn every_module_uses_only_the_floors_below_it() {
    let floor = |m: &str| FLOORS.iter().position(|f| *f == m);
    let mut wrong = Vec::new();
    let files = sources();
    for (module, text) in &files {
        let Some(at) = floor(module) else {
            wrong.push(format!(
                "{module} has no floor: add it to FLOORS (and ARCHITECTURE.md)"
            ));
            continue;
        };
        for used in uses(text) {
            if used == *module {
                continue;
            }
            match floor(&used) {
                Some(f) if f < at => {}
                Some(_) => wrong.push(format!("{module} uses {used}, which is not below it")),
                None => wrong.push(format!("{module} uses crate::{used}, which is no module")),
            }
        }
    }
    assert!(files.len() > 40, "{} source files found", files.len());
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_bus_sqlite_and_the_command_line_are_each_one_modules() {
    let mut wrong = Vec::new();
    for (module, text) in sources() {
        let code = code(&text);
        for (krate, owner) in OWNERS {
            let named = [format!("{krate}::"), format!("use {krate};")]
                .iter()
                .any(|n| {
                    code.match_indices(n.as_str()).any(|(i, _)| {
                        // `zbus::` inside `my_zbus::` is not the crate.
                        !code[..i]
                            .chars()
                            .next_back()
                            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                    })
                });
            if named && module != *owner {
                wrong.push(format!("{module} names {krate}, which is {owner}'s alone"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Rooms with one job each stay small: no production file over 700 lines, no production
/// function over 120 (a file's `#[cfg(test)] mod tests` left out). Functions are found by
/// their `fn` line and measured to the brace that closes them.
#[test]
fn no_production_file_over_700_lines_nor_function_over_120() {
    const FILE_MAX: usize = 700;
    const FN_MAX: usize = 120;
    let mut wrong = Vec::new();
    let mut functions = 0;
    for (path, text) in every_source_file() {
        let lines: Vec<&str> = text.lines().collect();
        let end = lines
            .windows(2)
            .position(|w| w[0].starts_with("#[cfg(test)]") && w[1].starts_with("mod tests"))
            .unwrap_or(lines.len());
        if end > FILE_MAX {
            wrong.push(format!(
                "{path}: {end} production lines (at most {FILE_MAX})"
            ));
        }
        let mut i = 0;
        while i < end {
            let Some(name) = fn_name(lines[i]) else {
                i += 1;
                continue;
            };
            let (mut depth, mut opened, mut j) = (0i64, false, i);
            while j < end {
                for c in code(lines[j]).chars() {
                    match c {
                        '{' => (depth, opened) = (depth + 1, true),
                        '}' => depth -= 1,
                        _ => {}
                    }
                }
                // A declaration without a body (a trait's) ends at its `;`.
                if (opened && depth == 0) || (!opened && lines[j].trim_end().ends_with(';')) {
                    break;
                }
                j += 1;
            }
            functions += 1;
            let length = j - i + 1;
            if length > FN_MAX {
                wrong.push(format!(
                    "{path}:{}: fn {name} is {length} lines (at most {FN_MAX})",
                    i + 1
                ));
            }
            i += 1;
        }
    }
    assert!(
        functions > 500,
        "only {functions} functions found: the scan broke"
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Every `.rs` file under `src/`, by its path from the repository.
fn every_source_file() -> Vec<(String, String)> {
    let mut stack = vec![repo().join("src")];
    let mut out = Vec::new();
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p
                    .strip_prefix(repo())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.push((rel, std::fs::read_to_string(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// The function a line starts, if it does: `[pub[(…)]] [const] [async] [unsafe] fn name`.
fn fn_name(line: &str) -> Option<String> {
    let mut rest = line.trim_start();
    loop {
        let before = rest;
        if let Some(r) = rest.strip_prefix("pub") {
            rest = match r.strip_prefix('(') {
                Some(r) => r.split_once(')')?.1,
                None => r,
            }
            .trim_start();
        }
        for word in ["const ", "async ", "unsafe ", "extern \"C\" "] {
            if let Some(r) = rest.strip_prefix(word) {
                rest = r.trim_start();
            }
        }
        if rest == before {
            break;
        }
    }
    let name: String = rest
        .strip_prefix("fn ")?
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty()).then_some(name)
}
