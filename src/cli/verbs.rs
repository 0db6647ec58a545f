//! One function per verb: open what it needs, call the library, render.

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::{render, Cli, Command};
use crate::board::{self, Board, NewTask, OpenMode, Resolver};
use crate::config::Config;

pub(super) fn open(cli: &Cli, mode: OpenMode) -> anyhow::Result<Board> {
    let paths = Resolver::from_env(cli.db.clone(), cli.board.clone()).resolve()?;
    Board::open(&paths, mode).with_context(|| format!("cannot open board {}", paths.db.display()))
}

/// The boards a verb over "everything" shows: the one `--db`/`--board` (or the
/// environment) pins, else the current board and every other board of the root, as the
/// dispatcher serves them. A board that cannot be opened is skipped with a warning; the
/// current one must open.
pub(super) fn open_all(cli: &Cli, mode: OpenMode) -> anyhow::Result<Vec<Board>> {
    let res = Resolver::from_env(cli.db.clone(), cli.board.clone());
    let first = open(cli, mode)?;
    if res.pinned() {
        return Ok(vec![first]);
    }
    let mut out = vec![];
    for paths in res.served_boards() {
        if paths.slug == first.paths().slug {
            continue;
        }
        match Board::open(&paths, mode) {
            Ok(b) => out.push(b),
            Err(board::BoardError::Missing { .. }) => {}
            Err(e) => eprintln!("hermes-mgr: warning: board {} skipped: {e}", paths.slug),
        }
    }
    out.insert(0, first);
    Ok(out)
}

/// The board that holds task `id`: the pinned or current board, else the first other board
/// of the root that has it (task ids are random, so one board has it). `--board` narrows.
pub(super) fn open_with_task(cli: &Cli, id: &str, mode: OpenMode) -> anyhow::Result<Board> {
    let res = Resolver::from_env(cli.db.clone(), cli.board.clone());
    let first = open(cli, mode)?;
    if res.pinned() || first.task(id)?.is_some() {
        return Ok(first);
    }
    for paths in res.served_boards() {
        if paths.slug == first.paths().slug {
            continue;
        }
        if let Ok(b) = Board::open(&paths, OpenMode::Inspect) {
            if b.task(id).ok().flatten().is_some() {
                drop(b);
                return Board::open(&paths, mode)
                    .with_context(|| format!("cannot open board {}", paths.db.display()));
            }
        }
    }
    Ok(first)
}

pub(super) fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Explain why a transition did not apply, from the task's current status.
pub(super) fn refused(b: &Board, id: &str, verb: &str, allowed: &str) -> anyhow::Error {
    match b.task(id) {
        Ok(Some(t)) => anyhow::anyhow!(
            "cannot {verb} task {id}: it is {}; only {allowed} tasks can be",
            t.status
        ),
        Ok(None) => board::BoardError::NoSuchTask(id.to_string()).into(),
        Err(e) => e.into(),
    }
}

pub(super) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
}

async fn systemd() -> anyhow::Result<crate::systemd::Systemd> {
    crate::systemd::Systemd::connect()
        .await
        .context("hermes-mgr needs systemd as PID 1 and the system bus")
}

/// `status`: what runs, where, how healthy (`--watch` repaints every 2 s).
pub(super) fn cmd_status(cli: &Cli, limit: &usize, watch: &bool) -> anyhow::Result<()> {
    let cfg = Config::load(cli.config.as_deref())?;
    let boards = open_all(cli, OpenMode::Inspect)?;
    let rt = runtime()?;
    // The service's own word on itself; no bus (a container, a user's laptop): none. One
    // connection for every repaint of `--watch`.
    let sd = rt.block_on(async {
        tokio::time::timeout(
            std::time::Duration::from_secs(2),
            crate::systemd::Systemd::connect(),
        )
        .await
        .ok()?
        .ok()
    });
    loop {
        // A table of 10,000 live workers helps nobody and costs seconds of kernel reads;
        // a script asked for all of them.
        let limits = crate::status::Limits {
            running: if cli.json { usize::MAX } else { *limit },
            others: *limit,
        };
        let mut snap = crate::status::snapshot_all(&boards, &cfg, limits)?;
        if let Some(sd) = &sd {
            snap.dispatcher_status = rt
                .block_on(sd.status_text("hermes-dispatcher.service"))
                .ok()
                .flatten()
                .filter(|t| !t.is_empty());
        }
        if cli.json {
            return print_json(&snap);
        }
        use std::io::IsTerminal;
        let tty = std::io::stdout().is_terminal();
        let text = render::status(&snap, tty && std::env::var_os("NO_COLOR").is_none());
        if !*watch {
            print!("{text}");
            return Ok(());
        }
        // Repaint in place: home, clear below.
        print!("\x1b[H\x1b[J{text}");
        use std::io::Write;
        std::io::stdout().flush()?;
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
}

/// `doctor`: one line per check; fails when one does.
pub(super) fn cmd_doctor(cli: &Cli) -> anyhow::Result<()> {
    let cfg = Config::load(cli.config.as_deref());
    let paths = Resolver::from_env(cli.db.clone(), cli.board.clone()).resolve()?;
    let checks = runtime()?.block_on(crate::doctor::run(&paths, cfg));
    if cli.json {
        print_json(&checks)?;
    } else {
        print!("{}", render::doctor(&checks));
    }
    if checks.iter().any(|c| c.level == crate::doctor::Level::Fail) {
        bail!("some checks failed; see the fix on each failing line");
    }
    Ok(())
}

/// `metrics`: what the dispatcher last wrote to its state directory — its counters live in
/// it, so this prints its word, and says so when that word is old.
pub(super) fn cmd_metrics(cli: &Cli) -> anyhow::Result<()> {
    let cfg = Config::load(cli.config.as_deref())?;
    let path = crate::state_dir::metrics_path(&cfg.state_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "no metrics at {}: the dispatcher writes them while it runs (systemctl status hermes-dispatcher)",
            path.display()
        ),
        Err(e) => bail!("read {}: {e}", path.display()),
    };
    let age = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .unwrap_or_default()
        .as_secs();
    let every = cfg.metrics_interval_seconds;
    if age > 3 * every + 5 {
        eprintln!(
            "hermes-mgr: warning: these metrics were written {age} s ago (the dispatcher writes them every {every} s): is it running?"
        );
    }
    print!("{text}");
    Ok(())
}

/// `manpage`: hermes-mgr(1) from the CLI itself.
pub(super) fn cmd_manpage() -> anyhow::Result<()> {
    use clap::CommandFactory;
    clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
    Ok(())
}

/// `completions`: shell completions.
pub(super) fn cmd_completions(shell: &clap_complete::Shell) -> anyhow::Result<()> {
    use clap::CommandFactory;
    clap_complete::generate(
        *shell,
        &mut Cli::command(),
        "hermes-mgr",
        &mut std::io::stdout(),
    );
    Ok(())
}

/// `dispatch --once`: one pass, under the root-wide dispatcher lock.
pub(super) fn cmd_dispatch(cli: &Cli, max: &Option<usize>) -> anyhow::Result<()> {
    let cfg = Config::load(cli.config.as_deref())?;
    let b = open(cli, OpenMode::MustExist)?;
    // One dispatcher per board: a running daemon (ours or Hermes' gateway) already is one.
    let life = b.paths().dispatcher_lock();
    if let Some(dir) = life.parent() {
        b.make_dir(dir)?;
    }
    let _life = board::lock::FileLock::acquire_or_held(&life, b.owner())
        .with_context(|| format!("open {}", life.display()))?
        .with_context(|| format!("another dispatcher holds {} (hermes-dispatcher.service or a Hermes gateway); it dispatches already", life.display()))?;
    // A host-wide cap (0.22's `max_in_progress`) counts the other boards' running tasks.
    let room = crate::dispatch::caps::of(&cfg).host.map(|host| {
        let res = Resolver::from_env(cli.db.clone(), cli.board.clone());
        let elsewhere: usize = res
            .served_boards()
            .iter()
            .filter(|p| p.slug != b.paths().slug)
            .filter_map(|p| Board::open(p, OpenMode::Inspect).ok())
            .filter_map(|o| o.count("running").ok())
            .map(|n| usize::try_from(n).unwrap_or(0))
            .sum();
        host.saturating_sub(elsewhere)
    });
    let max = match (*max, room) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let (report, _started) = runtime()?.block_on(async {
        let sd = systemd().await?;
        let pool_faults = crate::dispatch::pools::apply(&sd, &cfg).await;
        for (pool, why) in &pool_faults {
            eprintln!("warning: pool {pool}: {why}: none of its tasks is started");
        }
        crate::dispatch::once(&b, &sd, &cfg, max, None, &pool_faults, &Default::default()).await
    })?;
    if cli.json {
        print_json(&report)?;
    } else {
        print!("{}", render::pass(&report));
    }
    if let Some(p) = &report.estop {
        bail!("{}", crate::hermes_config::estop_text(p));
    }
    if let Some(u) = report.unbooked.first() {
        bail!(
            "task {} run {} failed to start ({}) and the board would not record it ({}); run `hermes-mgr dispatch --once` again",
            u.task_id, u.run_id, u.error, u.why
        );
    }
    Ok(())
}

/// The boards a `pause` or `resume` without tasks means: every board, or the one named.
fn held_boards(cli: &Cli, all: bool) -> anyhow::Result<Vec<Board>> {
    if all {
        return open_all(cli, OpenMode::MustExist);
    }
    if cli.board.is_none() && cli.db.is_none() {
        bail!("name tasks, a board (--board SLUG) or --all");
    }
    Ok(vec![open(cli, OpenMode::MustExist)?])
}

/// `pause` (`hold`) and `resume` (not `hold`): tasks (held and their workers frozen, or
/// undone), else a board or every board.
pub(super) fn cmd_hold(
    cli: &Cli,
    ids: &[String],
    all: bool,
    freeze: bool,
    hold: bool,
) -> anyhow::Result<()> {
    use crate::dispatch::pause;
    let cfg = Config::load(cli.config.as_deref())?;
    if ids.is_empty() {
        let boards = held_boards(cli, all)?;
        let r = runtime()?.block_on(async {
            let sd = systemd().await?;
            if hold {
                pause::pause_boards(&boards, &sd, &cfg, all, freeze).await
            } else {
                pause::resume_boards(&boards, &sd, &cfg, all).await
            }
        })?;
        return if cli.json {
            print_json(&r)
        } else {
            println!("{}", render::boards_paused(&r, hold));
            Ok(())
        };
    }
    if freeze {
        bail!("--freeze is for a board or --all: a paused task's worker is always frozen");
    }
    let reports = runtime()?.block_on(async {
        let sd = systemd().await?;
        let mut out = Vec::new();
        for id in ids {
            let b = open_with_task(cli, id, OpenMode::MustExist)?;
            out.push(if hold {
                pause::pause_task(&b, &sd, &cfg, id).await?
            } else {
                pause::resume_task(&b, &sd, &cfg, id).await?
            });
        }
        anyhow::Ok(out)
    })?;
    if cli.json {
        return print_json(&reports);
    }
    for r in &reports {
        println!("{}", render::task_paused(r, hold));
    }
    Ok(())
}

/// `stop`: end a task's worker, saying which signal it took.
pub(super) fn cmd_stop(
    cli: &Cli,
    id: &Option<String>,
    all: &bool,
    timeout: &Option<u64>,
) -> anyhow::Result<()> {
    let cfg = Config::load(cli.config.as_deref())?;
    let boards = match (id, all) {
        (Some(id), _) => vec![open_with_task(cli, id, OpenMode::MustExist)?],
        (None, true) => open_all(cli, OpenMode::MustExist)?,
        (None, false) => bail!("name a task, or --all"),
    };
    let mut work: Vec<(&Board, String)> = Vec::new();
    for b in &boards {
        match id {
            Some(id) => work.push((b, id.clone())),
            None => work.extend(b.running_tasks()?.into_iter().map(|t| (b, t.id))),
        }
    }
    let reports = runtime()?.block_on(async {
        let sd = systemd().await?;
        let mut out = Vec::new();
        for (b, id) in &work {
            out.push(crate::dispatch::stop::stop(b, &sd, &cfg, id, *timeout).await?);
        }
        anyhow::Ok(out)
    })?;
    if cli.json {
        return match (id, reports.as_slice()) {
            (Some(_), [one]) => print_json(one),
            _ => print_json(&reports),
        };
    }
    if reports.is_empty() {
        println!("No running task.");
    }
    for r in &reports {
        println!("{}", render::stopped(r));
    }
    Ok(())
}

/// `add`: create a task.
pub(super) fn cmd_add(cli: &Cli) -> anyhow::Result<()> {
    let Command::Add {
        title,
        body,
        assignee,
        priority,
        parents,
        max_runtime,
        max_retries,
        created_by,
        idempotency_key,
    } = &cli.command
    else {
        bail!("not reached: add without its arguments");
    };
    let b = open(cli, OpenMode::CreateIfMissing)?;
    let new = NewTask {
        title: title.clone(),
        body: body.clone(),
        assignee: assignee.clone(),
        priority: *priority,
        parents: parents.clone(),
        max_runtime_seconds: *max_runtime,
        max_retries: *max_retries,
        created_by: created_by.clone().or_else(|| std::env::var("USER").ok()),
        tenant: None,
        idempotency_key: idempotency_key.clone(),
    };
    let id = b.create(&new).context("cannot create the task")?;
    let task = b.require_task(&id)?;
    if cli.json {
        print_json(&render::task_json(&task, &b.parents(&id)?))
    } else {
        println!("Created {id} ({})", task.status);
        Ok(())
    }
}

/// `list`: tasks, highest priority first.
pub(super) fn cmd_list(
    cli: &Cli,
    status: &Option<String>,
    assignee: &Option<String>,
) -> anyhow::Result<()> {
    let b = open(cli, OpenMode::Inspect)?;
    let tasks = b.list(status.as_deref(), assignee.as_deref())?;
    if cli.json {
        print_json(&tasks)
    } else {
        print!("{}", render::task_table(&tasks));
        Ok(())
    }
}

/// `show`: the task, its runs, its events and its output's tail.
pub(super) fn cmd_show(cli: &Cli, id: &str) -> anyhow::Result<()> {
    let b = open_with_task(cli, id, OpenMode::Inspect)?;
    let task = b.require_task(id)?;
    let (parents, children, runs, events) =
        (b.parents(id)?, b.children(id)?, b.runs(id)?, b.events(id)?);
    if cli.json {
        print_json(
            &json!({"task": task, "parents": parents, "children": children, "runs": runs, "events": events}),
        )
    } else {
        print!(
            "{}",
            render::show(
                &b.paths().slug,
                &task,
                &parents,
                &children,
                &runs,
                &events,
                board::now()
            )
        );
        // The tail of the current or latest run's output, from its scope's journal.
        if let Some(run) = runs.last() {
            let unit = crate::names::worker_scope(&b.paths().slug, id, run.id);
            let journal = std::process::Command::new("journalctl")
                .args(["--no-pager", "-o", "cat", "-n", "10", "-u", &unit])
                .stderr(std::process::Stdio::null())
                .output();
            if let Ok(o) = journal {
                let tail = String::from_utf8_lossy(&o.stdout);
                if o.status.success() && !tail.trim().is_empty() {
                    println!("\nOutput of run {} (journalctl -u {unit}):", run.id);
                    for l in tail.lines() {
                        println!("  {}", render::clean(l));
                    }
                }
            }
        }
        Ok(())
    }
}

/// `block`.
pub(super) fn cmd_block(
    cli: &Cli,
    id: &str,
    reason: &Option<String>,
    kind: &Option<String>,
) -> anyhow::Result<()> {
    let b = open_with_task(cli, id, OpenMode::MustExist)?;
    let to = b.block(id, reason.as_deref(), kind.as_deref(), None)?;
    let Some(to) = to else {
        return Err(refused(&b, id, "block", "running or ready"));
    };
    report(cli, id, &to, "Blocked")
}

/// `unblock`.
pub(super) fn cmd_unblock(cli: &Cli, id: &str) -> anyhow::Result<()> {
    let b = open_with_task(cli, id, OpenMode::MustExist)?;
    let Some(to) = b.unblock(id)? else {
        return Err(refused(&b, id, "unblock", "blocked or scheduled"));
    };
    report(cli, id, &to, "Unblocked")
}

/// `requeue` (upstream's reclaim).
pub(super) fn cmd_requeue(cli: &Cli, id: &str, reason: &Option<String>) -> anyhow::Result<()> {
    let b = open_with_task(cli, id, OpenMode::MustExist)?;
    if !b.requeue(id, reason.as_deref())? {
        return Err(refused(&b, id, "requeue", "running (claimed)"));
    }
    report(cli, id, "ready", "Requeued")
}

/// `complete`.
pub(super) fn cmd_complete(
    cli: &Cli,
    id: &str,
    result: &Option<String>,
    summary: &Option<String>,
    metadata: &Option<String>,
) -> anyhow::Result<()> {
    let meta: Option<Value> = match metadata {
        Some(m) => {
            let v: Value = serde_json::from_str(m).context("--metadata is not valid JSON")?;
            if !v.is_object() {
                bail!("--metadata must be a JSON object, like '{{\"changed_files\": [\"a.rs\"]}}'");
            }
            Some(v)
        }
        None => None,
    };
    let b = open_with_task(cli, id, OpenMode::MustExist)?;
    // A verdict is written even when the configuration cannot be read (its children are
    // then promoted by upstream's default limit, as upstream's own `complete` does).
    let cfg = Config::load(cli.config.as_deref());
    let failure_limit = cfg
        .as_ref()
        .map_or(board::DEFAULT_FAILURE_LIMIT, |c| c.failure_limit);
    if !b.complete(
        id,
        result.as_deref(),
        summary.as_deref(),
        meta.as_ref(),
        None,
        failure_limit,
    )? {
        return Err(refused(&b, id, "complete", "running, ready or blocked"));
    }
    // Then what upstream's completion does for a scratch workspace (its own code).
    if let (Ok(cfg), Ok(task)) = (cfg, b.require_task(id)) {
        let done = runtime().map_err(|e| format!("{e:#}")).and_then(|rt| {
            rt.block_on(crate::spawn::after_complete(&b, &cfg, &task, meta.as_ref()))
        });
        if let Err(e) = done {
            eprintln!("hermes-mgr: note: the scratch workspace of {id} was left as it is: {e}");
        }
    }
    report(cli, id, "done", "Completed")
}

pub(super) fn report(cli: &Cli, id: &str, status: &str, verb: &str) -> anyhow::Result<()> {
    if cli.json {
        print_json(&json!({"id": id, "status": status}))
    } else {
        println!("{verb} {id} ({status})");
        Ok(())
    }
}
