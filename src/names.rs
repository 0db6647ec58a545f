//! Names: of the boards' default, of profiles (and their homes), of units and of files,
//! built from task data. A task id
//! comes from whoever wrote the board, so it is untrusted: it must not be able to name
//! another unit, escape the `hermes-worker-` prefix, or exceed systemd's length limit. A
//! leaf: it imports nothing of the crate.

use std::path::{Path, PathBuf};

/// The board a root has without `--board` (upstream's `DEFAULT_BOARD`).
pub const DEFAULT_BOARD: &str = "default";

/// systemd's `UNIT_NAME_MAX` (256 with the NUL).
const UNIT_NAME_MAX: usize = 255;

/// Escape `s` for use inside a unit name. Only `[A-Za-z0-9_]` pass through; every other
/// byte — `-` included, so that the `-run-` separator cannot be forged — becomes `\xNN`,
/// the form `systemd-escape` uses and `systemctl` accepts.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// FNV-1a, 64 bit: a stable short digest for ids too long to spell out.
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// `escape(task)` in at most `max` bytes: when longer, cut (never inside an `\xNN`) and
/// suffixed with a digest of the whole id, so that distinct ids keep distinct names.
fn escaped_within(task: &str, max: usize) -> String {
    let mut esc = escape(task);
    if esc.len() > max {
        let digest = format!("_{:016x}", fnv1a(task));
        let mut cut = max - digest.len();
        while cut > 0 && esc[..cut].rfind('\\').is_some_and(|i| i + 4 > cut) {
            cut -= 1;
        }
        esc.truncate(cut);
        esc.push_str(&digest);
    }
    esc
}

/// A board's slug inside a name: at most this many bytes once escaped.
const SLUG_MAX: usize = 64;

/// `hermes-worker-kanban-<task>-run-<run>.scope` on the default board, upstream's naming
/// (HEAD's `_restart_safe_worker_argv`); `hermes-worker-kanban-<board>-<task>-run-<run>.scope`
/// on any other, because task and run ids are only unique within a board. Neither escaped
/// part contains a `-`, so the two shapes cannot be mistaken for each other. An id whose
/// escaped form would push the name past systemd's limit is cut and suffixed with a digest
/// of the whole id, so the name stays unique per task and deterministic (re-adoption finds
/// the unit again by name).
pub fn worker_scope(board: &str, task: &str, run: i64) -> String {
    let tail = format!("-run-{run}.scope");
    let head = if board == DEFAULT_BOARD {
        "hermes-worker-kanban-".to_string()
    } else {
        format!("hermes-worker-kanban-{}-", escaped_within(board, SLUG_MAX))
    };
    let esc = escaped_within(task, UNIT_NAME_MAX - head.len() - tail.len());
    format!("{head}{esc}{tail}")
}

/// Whether a unit has the shape of `board`'s worker scopes (`worker_scope`): a filter before
/// the board is asked about a scope, so that a reconcile of many boards does not ask each
/// board about every board's scopes. The board's escaped name is made once, here, not once
/// per unit.
pub fn worker_scopes_of(board: &str) -> impl Fn(&str) -> bool {
    let board = (board != DEFAULT_BOARD).then(|| format!("{}-", escaped_within(board, SLUG_MAX)));
    move |unit| {
        let Some((head, _)) = unit
            .strip_prefix("hermes-worker-kanban-")
            .and_then(|r| r.rsplit_once("-run-"))
        else {
            return false;
        };
        match &board {
            None => !head.contains('-'),
            Some(b) => head
                .strip_prefix(b.as_str())
                .is_some_and(|task| !task.contains('-')),
        }
    }
}

/// The run id a worker scope's name ends in (`…-run-<run>.scope`, `worker_scope`'s
/// shape); whose run it is, the board says: the name is only a candidate until
/// `worker_scope` of that run's task gives it back.
pub fn run_of_worker_scope(unit: &str) -> Option<i64> {
    unit.strip_suffix(".scope")
        .and_then(|u| u.rsplit_once("-run-"))
        .and_then(|(_, n)| n.parse::<i64>().ok())
}

/// `hermes-kanban-decompose-<task>.service` (`-<board>-` before the task off the default
/// board): the transient service of one triage decomposition.
pub fn decompose_service(board: &str, task: &str) -> String {
    let tail = ".service";
    let head = if board == DEFAULT_BOARD {
        "hermes-kanban-decompose-".to_string()
    } else {
        format!(
            "hermes-kanban-decompose-{}-",
            escaped_within(board, SLUG_MAX)
        )
    };
    let esc = escaped_within(task, UNIT_NAME_MAX - head.len() - tail.len());
    format!("{head}{esc}{tail}")
}

/// `hermes-mgr-upstream-<task>-<pid>.scope`: where `hermes-mgr complete`, run by root, runs
/// upstream's after-completion of `task` (`pid`: the process it holds there).
pub fn upstream_scope(task: &str, pid: u32) -> String {
    let head = "hermes-mgr-upstream-";
    let tail = format!("-{pid}.scope");
    let esc = escaped_within(task, UNIT_NAME_MAX - head.len() - tail.len());
    format!("{head}{esc}{tail}")
}

/// The file name of a run's exit record: `<task>-run-<run>.json` on the default board,
/// `<board>.<task>-run-<run>.json` on others (a plain id has no `.`, an escaped one neither).
pub fn run_record(board: &str, task: &str, run: i64) -> String {
    if board == DEFAULT_BOARD {
        format!("{}-run-{run}.json", file_component(task))
    } else {
        format!(
            "{}{}-run-{run}.json",
            record_prefix(board),
            component_within(task, 150)
        )
    }
}

/// What the names of `board`'s exit records start with (`run_record`).
pub fn record_prefix(board: &str) -> String {
    if board == DEFAULT_BOARD {
        String::new()
    } else {
        format!("{}.", escaped_within(board, SLUG_MAX))
    }
}

/// The board's task and run an exit record's file name names, if it is one of `board`'s:
/// a candidate given back only when `run_record` makes the very same name of it.
pub fn record_of(board: &str, name: &str) -> Option<(String, i64)> {
    let rest = name.strip_prefix(&record_prefix(board))?;
    let (task, run) = rest.strip_suffix(".json")?.rsplit_once("-run-")?;
    let run = run.parse::<i64>().ok()?;
    (run_record(board, task, run) == name).then(|| (task.to_string(), run))
}

/// A single, bounded file-name component for `task`: the id itself when it is plain
/// (`t_5e0db6b2`), else its escaped form, cut and digested like a unit name. A hostile id
/// (`../../etc`) can name neither a parent directory nor a path of several components.
pub fn file_component(task: &str) -> String {
    component_within(task, 200)
}

fn component_within(task: &str, max: usize) -> String {
    let plain = !task.is_empty()
        && task.len() <= max
        && task
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        return task.to_string();
    }
    if task.is_empty() {
        return "_".into();
    }
    escaped_within(task, max)
}

/// `hermes-tmpdir-<name>.service`: the one-shot that removes a run's TMPDIR its supervisor
/// left (`<name>`: the directory's own name, escaped and bounded).
pub fn tmpdir_service(dir_name: &str) -> String {
    let (head, tail) = ("hermes-tmpdir-", ".service");
    format!(
        "{head}{}{tail}",
        escaped_within(dir_name, UNIT_NAME_MAX - head.len() - tail.len())
    )
}

/// The glob that matches every worker scope, for `ListUnitsByPatterns`.
pub const WORKER_SCOPE_GLOB: &str = "hermes-worker-kanban-*.scope";

/// systemd's own validity rule for unit names (`unit_name_is_valid`), used to check ours.
pub fn is_valid(name: &str) -> bool {
    let Some((prefix, suffix)) = name.rsplit_once('.') else {
        return false;
    };
    !prefix.is_empty()
        && !suffix.is_empty()
        && name.len() <= UNIT_NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":-_.\\@".contains(&b))
}

/// How many child slices worker scopes are spread over.
pub const WORKER_SLICES: u64 = 64;

/// The slice a worker scope goes into: one of `WORKER_SLICES` children of the configured
/// slice (`hermes-workers-07.slice` under `hermes-workers.slice`, whose budgets cover them
/// all), chosen by a stable digest of the scope's name. systemd 252 walks every sibling of
/// a unit's slice each time a unit starts in it (`unit_add_siblings_to_cgroup_realize_queue`),
/// so one flat slice made each start cost O(live workers): 10,000 live took PID 1 from
/// ~100 to ~12 starts/s. The root slice has no parent to share budgets with: kept flat.
pub fn worker_slice(slice: &str, unit: &str) -> String {
    match slice
        .strip_suffix(".slice")
        .filter(|s| !s.is_empty() && *s != "-")
    {
        Some(stem) => format!("{stem}-{:02}.slice", fnv1a(unit) % WORKER_SLICES),
        None => slice.to_string(),
    }
}

/// The slice of capacity pool `pool` (`config::Pool`): a child of the workers' slice
/// (`hermes-workers-build.slice` under `hermes-workers.slice`). A pool's name starts with a
/// letter, so it is never one of `worker_slice`'s numbered children.
pub fn pool_slice(slice: &str, pool: &str) -> String {
    match slice
        .strip_suffix(".slice")
        .filter(|s| !s.is_empty() && *s != "-")
    {
        Some(stem) => format!("{stem}-{pool}.slice"),
        None => format!("{pool}.slice"),
    }
}

/// The profile a run's worker runs as, for the metrics: its task's assignee, else the
/// default assignee; `other` for what is no profile name.
pub fn profile_of(assignee: Option<&str>, default_assignee: Option<&str>) -> String {
    assignee
        .or(default_assignee)
        .and_then(profile_name)
        .unwrap_or_else(|| "other".into())
}

/// Upstream's profile rule (`normalize_profile_name` + `validate_profile_name`).
pub fn profile_name(assignee: &str) -> Option<String> {
    let p = assignee.trim();
    let p = if p.eq_ignore_ascii_case("default") {
        "default".to_string()
    } else {
        p.to_lowercase()
    };
    let ok = !p.is_empty()
        && p.len() <= 64
        && p.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && (b == b'-' || b == b'_'))
        });
    ok.then_some(p)
}

/// `HERMES_HOME` of a profile: the root for `default`, `<root>/profiles/<name>` otherwise.
pub fn profile_home(root: &Path, profile: &str) -> PathBuf {
    if profile == "default" {
        root.to_path_buf()
    } else {
        root.join("profiles").join(profile)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_tmpdir_service_is_one_bounded_unit_name_whatever_the_directory() {
        for (dir, want) in [
            (
                "hermes-run.1a9475c1f5986b1761d5a85f",
                Some("hermes-tmpdir-hermes\\x2drun\\x2e1a9475c1f5986b1761d5a85f.service"),
            ),
            ("../../etc", None),
            (&"x".repeat(400), None),
            ("", None),
        ] {
            let n = super::tmpdir_service(dir);
            if let Some(w) = want {
                assert_eq!(n, w);
            }
            assert!(
                n.starts_with("hermes-tmpdir-") && n.ends_with(".service"),
                "{n}"
            );
            assert!(n.len() <= super::UNIT_NAME_MAX, "{n}");
            assert!(!n.contains('/'), "{n}");
        }
        assert_ne!(
            super::tmpdir_service(&"x".repeat(400)),
            super::tmpdir_service(&format!("{}y", "x".repeat(399)))
        );
    }

    #[test]
    fn a_worker_scope_is_of_one_board_only() {
        use super::{worker_scope, worker_scopes_of};
        let rows = [
            ("default", worker_scope("default", "t_ab12", 7), true),
            ("ops", worker_scope("ops", "t_ab12", 7), true),
            ("ops-2", worker_scope("ops-2", "t_ab12", 7), true),
            ("default", worker_scope("ops", "t_ab12", 7), false),
            ("ops", worker_scope("default", "t_ab12", 7), false),
            ("ops", worker_scope("ops-2", "t_ab12", 7), false),
            ("ops-2", worker_scope("ops", "t_ab12", 7), false),
            ("default", worker_scope("default", "a-b", 7), true),
            (
                "default",
                "hermes-kanban-decompose-t_1.service".to_string(),
                false,
            ),
        ];
        for (board, unit, want) in rows {
            assert_eq!(worker_scopes_of(board)(&unit), want, "{board} {unit}");
        }
    }

    #[test]
    fn exit_record_names_are_read_back_only_when_made_so() {
        use super::{record_of, run_record};
        type Row<'a> = (&'a str, String, Option<(&'a str, i64)>);
        let rows: Vec<Row> = vec![
            (
                "default",
                run_record("default", "t_ab12", 7),
                Some(("t_ab12", 7)),
            ),
            ("ops", run_record("ops", "t_ab12", 7), Some(("t_ab12", 7))),
            // Another board's record is not this board's.
            ("default", run_record("ops", "t_ab12", 7), None),
            ("ops", run_record("default", "t_ab12", 7), None),
            ("ops", run_record("ops-2", "t_ab12", 7), None),
            // An escaped id, a pause file, a file being written, junk.
            ("default", run_record("default", "../x", 3), None),
            ("default", "t_ab12-run-7.paused".into(), None),
            ("default", "t_ab12-run-7.json.tmp".into(), None),
            ("default", "t_ab12-run-x.json".into(), None),
            ("default", "-run-1.json".into(), None),
        ];
        for (board, name, want) in rows {
            let got = record_of(board, &name);
            assert_eq!(
                got.as_ref().map(|(t, r)| (t.as_str(), *r)),
                want,
                "{board} {name}"
            );
        }
    }

    use super::*;

    #[test]
    fn a_worker_scope_names_its_run() {
        for (board, task, run) in [
            ("default", "t_1", 7),
            ("b", "x-run-3", 12),
            ("default", "é\u{202e}", 1),
        ] {
            assert_eq!(
                run_of_worker_scope(&worker_scope(board, task, run)),
                Some(run)
            );
        }
        assert_eq!(
            run_of_worker_scope("hermes-worker-kanban-t-run-x.scope"),
            None
        );
        assert_eq!(
            run_of_worker_scope("hermes-worker-kanban-t-run-3.service"),
            None
        );
    }

    #[test]
    fn worker_scopes_are_spread_over_child_slices_of_the_configured_one() {
        let cases = [
            (
                "hermes-workers.slice",
                "hermes-worker-kanban-t_1-run-1.scope",
            ),
            (
                "hermes-workers.slice",
                "hermes-worker-kanban-t_1-run-2.scope",
            ),
            ("a-b.slice", "hermes-worker-kanban-t_1-run-1.scope"),
        ];
        for (slice, unit) in cases {
            let s = worker_slice(slice, unit);
            let stem = slice.trim_end_matches(".slice");
            let n: u64 = s
                .strip_prefix(&format!("{stem}-"))
                .and_then(|r| r.strip_suffix(".slice"))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{s}"));
            assert!(n < WORKER_SLICES, "{s}");
            // Stable: a restarted daemon (or another build) finds the same place.
            assert_eq!(worker_slice(slice, unit), s);
        }
        assert_eq!(worker_slice("-.slice", "x.scope"), "-.slice");
        // Spread: 6,400 runs of one task land in every child slice.
        let used: std::collections::HashSet<String> = (0..6400)
            .map(|r| worker_slice("hermes-workers.slice", &worker_scope("default", "t_1", r)))
            .collect();
        assert_eq!(used.len() as u64, WORKER_SLICES);
    }

    #[test]
    fn upstream_ids_read_naturally() {
        assert_eq!(
            worker_scope("default", "t_5e0db6b2", 1),
            "hermes-worker-kanban-t_5e0db6b2-run-1.scope"
        );
    }

    #[test]
    fn hostile_ids_stay_valid_and_inside_the_prefix() {
        let long = "é".repeat(300);
        for id in [
            "../../etc/passwd",
            "a-run-9.scope x",
            "t\n_\"'$(reboot)",
            "",
            "x.service",
            long.as_str(),
        ] {
            let n = worker_scope("default", id, 7);
            assert!(is_valid(&n), "{n:?} invalid for {id:?}");
            assert!(
                n.starts_with("hermes-worker-kanban-") && n.ends_with("-run-7.scope"),
                "{n}"
            );
            assert_eq!(
                n.matches("-run-").count(),
                1,
                "{n}: separator forged by {id:?}"
            );
            assert!(!n.contains('/') && !n.contains('\n'), "{n}");
        }
    }

    #[test]
    fn file_components_never_leave_their_directory() {
        assert_eq!(file_component("t_5e0db6b2"), "t_5e0db6b2");
        for id in ["..", ".", "../../etc", "a/b", "", &"x/".repeat(300)] {
            let c = file_component(id);
            assert!(
                !c.contains('/') && c != "." && c != ".." && !c.is_empty() && c.len() <= 200,
                "{id:?} -> {c:?}"
            );
        }
    }

    #[test]
    fn long_ids_get_distinct_names() {
        let a = "a".repeat(300);
        let b = format!("{}b", "a".repeat(299));
        assert_ne!(
            worker_scope("default", &a, 1),
            worker_scope("default", &b, 1)
        );
        let slug = "a-".repeat(31) + "a";
        for board in ["default", slug.as_str()] {
            assert!(worker_scope(board, &a, 1).len() <= 255);
            assert!(run_record(board, &a, i64::MAX).len() <= 255);
        }
    }

    #[test]
    fn boards_keep_their_runs_apart() {
        // Task "ops-x" on the default board and task "x" on board "ops" are two runs.
        assert_ne!(
            worker_scope("default", "ops-x", 1),
            worker_scope("ops", "x", 1)
        );
        assert_eq!(
            worker_scope("ops", "t_1", 2),
            "hermes-worker-kanban-ops-t_1-run-2.scope"
        );
        assert_ne!(run_record("default", "ops.x", 1), run_record("ops", "x", 1));
        assert_eq!(run_record("ops", "t_1", 2), "ops.t_1-run-2.json");
    }
}
