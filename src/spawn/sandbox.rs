//! The worker's sandbox as paths (`spec::Sandbox`): what it may write, what it may not see.
//! Pure; the supervisor's child builds it (`supervise::sandbox`).
//!
//! The rules (README, `hermes-mgr.toml(5)`): the whole system read-only, as systemd's
//! `ProtectSystem=strict` (`/dev` stays writable: `/dev/null`); `/home`, `/root`, `/mnt`,
//! `/media` and `/srv` empty; `/tmp`, `/var/tmp` and `/dev/shm` fresh tmpfs of the worker's
//! own; other tasks' workspaces, other boards and the worker logs not visible. Writable: its
//! workspace, its `TMPDIR`, the Hermes root (the default board's WAL lives beside
//! `kanban.db`, and Hermes writes its sessions, logs and caches there) — with what steers
//! Hermes (`STEERING`, the root's and the run's profile's), other profiles' homes and the
//! Hermes install read-only.
//! Shown read-only where they sit under a hidden directory: the worker user's `HOME` and the
//! Hermes install.

use std::path::{Path, PathBuf};

use super::spec::{Exposed, Hidden, Sandbox};

/// Where a run lives, for its sandbox.
pub struct Where<'a> {
    /// The Hermes root (`HERMES_KANBAN_HOME`): every board, `config.yaml`, the profiles.
    pub root: &'a Path,
    /// The directory of the board's file (the root for the default board).
    pub board_dir: &'a Path,
    /// The run's workspace (`/` for a worktree task: made during the run).
    pub workspace: &'a Path,
    /// A worktree task's repository (its worktree is made there, during the run).
    pub repository: Option<&'a Path>,
    /// The profile's home (`HERMES_HOME`: the root for `default`, `profiles/<name>` else).
    pub profile_home: &'a Path,
    /// The worker user's `HOME`.
    pub home: &'a Path,
    /// The Hermes install the worker runs (a venv), when there is one.
    pub install: Option<&'a Path>,
    /// What steers Hermes under the root and exists now (`steering`).
    pub steering: Vec<PathBuf>,
}

/// Empty and read-only in the sandbox (those that exist).
const HIDDEN: [&str; 5] = ["/home", "/root", "/mnt", "/media", "/srv"];
/// Fresh, writable, the worker's own.
const PRIVATE: [&str; 3] = ["/tmp", "/var/tmp", "/dev/shm"];

/// Where, under the Hermes root and each profile's home, Hermes keeps what steers it — its
/// settings and secrets, and code or jobs that run later outside this worker (plugins, hooks,
/// the gateway's cron jobs, tools it installs, the agent's persona) — and so what a worker
/// must not write. (Found by listing what real 0.19.0 and ~0.22.2 workers write in the root:
/// much else — sessions, logs, memories, caches, skills, `state.db` — is theirs to write.)
pub const STEERING: [&str; 7] = [
    "config.yaml",
    ".env",
    "plugins",
    "hooks",
    "cron",
    "bin",
    "SOUL.md",
];

/// Directories of `STEERING` Hermes makes at a worker's first start: made first (as the
/// board's owner, by the caller) so that the first sandboxed worker cannot fill them.
pub const STEERING_DIRS: [&str; 4] = ["plugins", "hooks", "cron", "bin"];

/// The steering paths that exist of the root (and `kanban/current`, the CLI's board) and of
/// the run's profile home — other profiles' homes are read-only whole (`plan`). Looked at
/// with `symlink_metadata` only (a name in a tree others write is never followed); links are
/// left out (the sandbox refuses them). At most 15 paths, whatever the root holds.
pub fn steering(root: &Path, profile_home: &Path) -> Vec<PathBuf> {
    let mut homes = vec![root];
    if profile_home != root {
        homes.push(profile_home);
    }
    homes
        .iter()
        .flat_map(|h| STEERING.iter().map(move |s| h.join(s)))
        .chain(std::iter::once(root.join("kanban/current")))
        .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| !m.file_type().is_symlink()))
        .collect()
}

/// The sandbox of a run at `w`.
pub fn plan(w: &Where) -> Sandbox {
    let kanban = w.root.join("kanban");
    let mut hidden: Vec<Hidden> = HIDDEN
        .iter()
        .map(|p| (PathBuf::from(p), false))
        .chain(PRIVATE.iter().map(|p| (PathBuf::from(p), true)))
        .chain(
            // Other tasks' workspaces, other boards, other tasks' logs.
            ["workspaces", "boards", "logs"]
                .iter()
                .map(|d| (kanban.join(d), false)),
        )
        .map(|(path, writable)| Hidden { path, writable })
        .collect();
    let mut exposed = vec![
        Exposed {
            path: w.root.to_path_buf(),
            writable: true,
        },
        // Other profiles' homes (their settings, sessions, memories): read-only; its own
        // profile's home writable again below.
        Exposed {
            path: w.root.join("profiles"),
            writable: false,
        },
        Exposed {
            path: w.profile_home.to_path_buf(),
            writable: true,
        },
        Exposed {
            path: w.board_dir.to_path_buf(),
            writable: true,
        },
        Exposed {
            path: w.workspace.to_path_buf(),
            writable: true,
        },
    ];
    exposed.extend(w.repository.map(|p| Exposed {
        path: p.to_path_buf(),
        writable: true,
    }));
    exposed.extend([Exposed {
        path: w.home.to_path_buf(),
        writable: false,
    }]);
    exposed.extend(w.install.map(|p| Exposed {
        path: p.to_path_buf(),
        writable: false,
    }));
    exposed.extend(w.steering.iter().map(|p| Exposed {
        path: p.clone(),
        writable: false,
    }));
    // A path shown writable is never hidden again, nor shown twice; the workspace wins.
    exposed.dedup_by(|a, b| a.path == b.path);
    let mut seen = std::collections::HashSet::new();
    exposed.retain(|e| seen.insert(e.path.clone()));
    hidden.retain(|h| !exposed.iter().any(|e| e.path == h.path));
    // What would only show the system again is not shown: `/` itself (a worktree task's
    // workspace until its worktree is made), or a path shown read-only outside every hidden
    // directory and every writable one (it is read-only where it is).
    exposed.retain(|e| e.path != Path::new("/"));
    let under = |p: &Path, dirs: &[&Path]| dirs.iter().any(|d| p != *d && p.starts_with(d));
    let hidden_dirs: Vec<&Path> = hidden.iter().map(|h| h.path.as_path()).collect();
    let writable_dirs: Vec<&Path> = exposed
        .iter()
        .filter(|x| x.writable)
        .map(|x| x.path.as_path())
        .collect();
    let keep: Vec<bool> = exposed
        .iter()
        .map(|e| e.writable || under(&e.path, &hidden_dirs) || under(&e.path, &writable_dirs))
        .collect();
    let mut keep = keep.into_iter();
    exposed.retain(|_| keep.next().unwrap_or(false));
    Sandbox { hidden, exposed }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(s: &Sandbox) -> Vec<(String, bool)> {
        s.exposed
            .iter()
            .map(|e| (e.path.display().to_string(), e.writable))
            .collect()
    }

    #[test]
    fn a_sandbox_writes_its_workspace_and_the_root_and_not_what_steers_hermes() {
        let root = Path::new("/home/ann/.hermes");
        let w = Where {
            root,
            board_dir: root,
            workspace: &root.join("kanban/workspaces/t_1"),
            repository: None,
            profile_home: root,
            home: Path::new("/home/ann"),
            install: Some(Path::new("/home/ann/.hermes/hermes-agent")),
            steering: vec![root.join("config.yaml")],
        };
        let s = plan(&w);
        let hidden: Vec<(String, bool)> = s
            .hidden
            .iter()
            .map(|h| (h.path.display().to_string(), h.writable))
            .collect();
        assert_eq!(
            hidden,
            [
                ("/home", false),
                ("/root", false),
                ("/mnt", false),
                ("/media", false),
                ("/srv", false),
                ("/tmp", true),
                ("/var/tmp", true),
                ("/dev/shm", true),
                ("/home/ann/.hermes/kanban/workspaces", false),
                ("/home/ann/.hermes/kanban/boards", false),
                ("/home/ann/.hermes/kanban/logs", false),
            ]
            .map(|(p, w)| (p.to_string(), w))
        );
        assert_eq!(
            shown(&s),
            [
                ("/home/ann/.hermes", true),
                ("/home/ann/.hermes/profiles", false),
                ("/home/ann/.hermes/kanban/workspaces/t_1", true),
                ("/home/ann", false),
                ("/home/ann/.hermes/hermes-agent", false),
                ("/home/ann/.hermes/config.yaml", false),
            ]
            .map(|(p, w)| (p.to_string(), w))
        );
    }

    #[test]
    fn what_the_system_shows_read_only_anyway_is_not_shown_again() {
        // The Debian package's layout: the root in /var/lib, Hermes in /opt, a worktree
        // task's repository in /srv (its workspace, `/` until its worktree is made), another
        // board.
        let root = Path::new("/var/lib/hermes");
        let w = Where {
            root,
            board_dir: &root.join("kanban/boards/ops"),
            workspace: Path::new("/"),
            repository: Some(Path::new("/srv/repo")),
            profile_home: &root.join("profiles/coder"),
            home: root,
            install: Some(Path::new("/opt/hermes")),
            steering: vec![],
        };
        let s = plan(&w);
        assert_eq!(
            shown(&s),
            [
                ("/var/lib/hermes", true),
                ("/var/lib/hermes/profiles", false),
                ("/var/lib/hermes/profiles/coder", true),
                ("/var/lib/hermes/kanban/boards/ops", true),
                ("/srv/repo", true),
            ]
            .map(|(p, w)| (p.to_string(), w))
        );
        assert!(s.hidden.iter().any(|h| h.path == Path::new("/srv")));
    }
}
