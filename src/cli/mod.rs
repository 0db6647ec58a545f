//! The `hermes-mgr` command line: the only module that knows clap. It parses, calls the
//! library, and renders; rendering is split from printing so it can be tested.

mod render;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use crate::board::{self, Board, NewTask, OpenMode, Resolver};
use crate::config::Config;

/// Exit codes: 0 ok, 1 error, 2 usage (clap's own).
pub const EXIT_ERROR: u8 = 1;

#[derive(Debug, Parser)]
#[command(
    name = "hermes-mgr",
    version,
    about = "Run Hermes Agent's kanban workers in systemd scopes",
    long_about = "hermes-mgr manages the tasks of a Hermes Agent kanban board (the same kanban.db that \
                  `hermes kanban` uses) and runs each worker in its own transient systemd scope.",
    after_help = "The board is found as `hermes kanban` finds it: --db, else $HERMES_KANBAN_DB, else the \
                  board (--board, $HERMES_KANBAN_BOARD, <root>/kanban/current) under $HERMES_KANBAN_HOME, \
                  $HERMES_HOME or ~/.hermes."
)]
pub struct Cli {
    /// Use this kanban.db file.
    #[arg(long, global = true, value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// Use this board (slug) under the Hermes root.
    #[arg(long, global = true, value_name = "SLUG")]
    pub board: Option<String>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Configuration file [default: /etc/hermes-mgr/config.toml].
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a task (ready, or todo while a parent is not done).
    Add {
        /// The task's title.
        title: String,
        /// Longer description for the worker.
        #[arg(long)]
        body: Option<String>,
        /// The Hermes profile that works on it.
        #[arg(long)]
        assignee: Option<String>,
        /// Higher runs first.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i64,
        /// A task that must be done first (repeatable).
        #[arg(long = "parent", value_name = "ID")]
        parents: Vec<String>,
        /// Wall-clock limit per run: seconds, or 30s, 30m, 2h.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        max_runtime: Option<i64>,
        /// Consecutive failures before the task is blocked (gave_up).
        #[arg(long, value_name = "N")]
        max_retries: Option<i64>,
        /// Who created it (default: $USER).
        #[arg(long)]
        created_by: Option<String>,
        /// Return the existing task instead of a duplicate when this key is taken.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// List tasks, highest priority first.
    List {
        /// Only tasks in this status.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(board::Status::KNOWN))]
        status: Option<String>,
        /// Only tasks of this assignee.
        #[arg(long)]
        assignee: Option<String>,
    },
    /// Show one task with its runs and events.
    Show { id: String },
    /// Block a task for a human (or, with --kind dependency, park it as todo).
    Block {
        id: String,
        /// Why it is blocked.
        reason: Option<String>,
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(board::BLOCK_KINDS))]
        kind: Option<String>,
    },
    /// Unblock a blocked task (ready, or todo while a parent is open).
    Unblock { id: String },
    /// Release a claimed task back to ready (upstream's reclaim).
    Requeue {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Mark a task done.
    Complete {
        id: String,
        /// What the task produced.
        #[arg(long)]
        result: Option<String>,
        /// A short summary (defaults to --result).
        #[arg(long)]
        summary: Option<String>,
        /// Structured hand-off facts, as a JSON object.
        #[arg(long, value_name = "JSON")]
        metadata: Option<String>,
    },
    /// Claim ready tasks and start each worker in its own systemd scope.
    Dispatch {
        /// One pass, like `hermes kanban dispatch` (the daemon is `hermes-mgr dispatcher`).
        #[arg(long, required = true)]
        once: bool,
        /// Start at most N workers (never more than max_spawn live ones).
        #[arg(long, value_name = "N")]
        max: Option<usize>,
    },
    /// Stop a task's worker (SIGTERM, then SIGKILL after the timeout); the task is blocked
    /// until `hermes-mgr unblock`.
    Stop {
        #[arg(required_unless_present = "all")]
        id: Option<String>,
        /// Stop every running task's worker.
        #[arg(long, conflicts_with = "id")]
        all: bool,
        /// Seconds between SIGTERM and SIGKILL [default: stop_timeout_seconds].
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
        timeout: Option<u64>,
    },
    /// Run the dispatcher daemon in the foreground (what hermes-dispatcher.service runs).
    Dispatcher,
    /// What runs, where, how healthy, and why the last one failed.
    Status {
        /// At most this many tasks of each status per board; with --json, every running one
        /// (the table says how many more run).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Refresh every 2 seconds until interrupted.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
    },
    /// The worker's output: the journal of its scope (or upstream's kanban/logs/<task>.log).
    Logs {
        id: String,
        /// Follow new output.
        #[arg(short, long)]
        follow: bool,
        /// This run instead of the current or latest one.
        #[arg(long, value_name = "N")]
        run: Option<i64>,
    },
    /// Check what the dispatcher needs; one line per check, non-zero exit when one fails.
    Doctor,
    /// Shell completions.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Internal: print the hermes-mgr(1) man page (roff), generated from these definitions.
    #[command(hide = true)]
    Manpage,
    /// Internal: the first process of a worker scope (started by hermes-mgr itself).
    #[command(hide = true)]
    Supervise,
}

/// `300`, `30s`, `30m`, `2h` → seconds (upstream's `--max-runtime` forms).
fn parse_duration(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        _ => (s, 1),
    };
    let n: i64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (use 300, 30s, 30m or 2h)"))?;
    if n <= 0 {
        return Err(format!("{s:?}: a duration must be positive"));
    }
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// Parse arguments, run, and map the result to an exit code. Errors are printed with their
/// whole context chain, because the outermost context says what was attempted and the
/// innermost what failed.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Supervise = cli.command {
        // Single-threaded on purpose: it forks the worker (see spawn::supervise).
        return ExitCode::from(crate::spawn::supervise::main());
    }
    if let Command::Dispatcher = cli.command {
        let opts = crate::daemon::Options {
            config: cli.config.clone(),
            db: cli.db.clone(),
            board: cli.board.clone(),
        };
        return match crate::daemon::main(opts) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("hermes-mgr dispatcher: error: {e:#}");
                ExitCode::from(EXIT_ERROR)
            }
        };
    }
    if matches!(
        cli.command,
        Command::List { .. }
            | Command::Show { .. }
            | Command::Status { .. }
            | Command::Logs { .. }
            | Command::Doctor
            | Command::Completions { .. }
            | Command::Manpage
    ) {
        // Verbs that only print: a reader that goes away (`| head`) ends them quietly, as
        // it ends any Unix tool. Verbs that change state keep Rust's ignored SIGPIPE: they
        // must finish what they started.
        // SAFETY: restoring the default disposition installs no handler.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hermes-mgr: error: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn open(cli: &Cli, mode: OpenMode) -> anyhow::Result<Board> {
    let paths = Resolver::from_env(cli.db.clone(), cli.board.clone()).resolve()?;
    Board::open(&paths, mode).with_context(|| format!("cannot open board {}", paths.db.display()))
}

/// The boards a verb over "everything" shows: the one `--db`/`--board` (or the
/// environment) pins, else the current board and every other board of the root, as the
/// dispatcher serves them. A board that cannot be opened is skipped with a warning; the
/// current one must open.
fn open_all(cli: &Cli, mode: OpenMode) -> anyhow::Result<Vec<Board>> {
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
fn open_with_task(cli: &Cli, id: &str, mode: OpenMode) -> anyhow::Result<Board> {
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

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Explain why a transition did not apply, from the task's current status.
fn refused(b: &Board, id: &str, verb: &str, allowed: &str) -> anyhow::Error {
    match b.task(id) {
        Ok(Some(t)) => anyhow::anyhow!(
            "cannot {verb} task {id}: it is {}; only {allowed} tasks can be",
            t.status
        ),
        Ok(None) => board::BoardError::NoSuchTask(id.to_string()).into(),
        Err(e) => e.into(),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
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

/// One small function per verb; this only picks it.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Supervise | Command::Dispatcher => bail!("not reached: handled in main"),
        Command::Status { limit, watch } => cmd_status(&cli, limit, watch),
        Command::Logs { id, follow, run } => cmd_logs(&cli, id, follow, run),
        Command::Doctor => cmd_doctor(&cli),
        Command::Manpage => cmd_manpage(),
        Command::Completions { shell } => cmd_completions(shell),
        Command::Dispatch { once: _, max } => cmd_dispatch(&cli, max),
        Command::Stop { id, all, timeout } => cmd_stop(&cli, id, all, timeout),
        Command::Add { .. } => cmd_add(&cli),
        Command::List { status, assignee } => cmd_list(&cli, status, assignee),
        Command::Show { id } => cmd_show(&cli, id),
        Command::Block { id, reason, kind } => cmd_block(&cli, id, reason, kind),
        Command::Unblock { id } => cmd_unblock(&cli, id),
        Command::Requeue { id, reason } => cmd_requeue(&cli, id, reason),
        Command::Complete {
            id,
            result,
            summary,
            metadata,
        } => cmd_complete(&cli, id, result, summary, metadata),
    }
}

/// `status`: what runs, where, how healthy (`--watch` repaints every 2 s).
fn cmd_status(cli: &Cli, limit: &usize, watch: &bool) -> anyhow::Result<()> {
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

/// `logs`: the worker's output.
fn cmd_logs(cli: &Cli, id: &str, follow: &bool, run: &Option<i64>) -> anyhow::Result<()> {
    let b = open_with_task(cli, id, OpenMode::Inspect)?;
    logs(&b, id, *run, *follow)
}

/// `doctor`: one line per check; fails when one does.
fn cmd_doctor(cli: &Cli) -> anyhow::Result<()> {
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

/// `manpage`: hermes-mgr(1) from the CLI itself.
fn cmd_manpage() -> anyhow::Result<()> {
    use clap::CommandFactory;
    clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
    Ok(())
}

/// `completions`: shell completions.
fn cmd_completions(shell: &clap_complete::Shell) -> anyhow::Result<()> {
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
fn cmd_dispatch(cli: &Cli, max: &Option<usize>) -> anyhow::Result<()> {
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
        crate::dispatch::once(&b, &sd, &cfg, max, None).await
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

/// `stop`: end a task's worker, saying which signal it took.
fn cmd_stop(
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
fn cmd_add(cli: &Cli) -> anyhow::Result<()> {
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
fn cmd_list(cli: &Cli, status: &Option<String>, assignee: &Option<String>) -> anyhow::Result<()> {
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
fn cmd_show(cli: &Cli, id: &str) -> anyhow::Result<()> {
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
fn cmd_block(
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
fn cmd_unblock(cli: &Cli, id: &str) -> anyhow::Result<()> {
    let b = open_with_task(cli, id, OpenMode::MustExist)?;
    let Some(to) = b.unblock(id)? else {
        return Err(refused(&b, id, "unblock", "blocked or scheduled"));
    };
    report(cli, id, &to, "Unblocked")
}

/// `requeue` (upstream's reclaim).
fn cmd_requeue(cli: &Cli, id: &str, reason: &Option<String>) -> anyhow::Result<()> {
    let b = open_with_task(cli, id, OpenMode::MustExist)?;
    if !b.requeue(id, reason.as_deref())? {
        return Err(refused(&b, id, "requeue", "running (claimed)"));
    }
    report(cli, id, "ready", "Requeued")
}

/// `complete`.
fn cmd_complete(
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
    if !b.complete(
        id,
        result.as_deref(),
        summary.as_deref(),
        meta.as_ref(),
        None,
    )? {
        return Err(refused(&b, id, "complete", "running, ready or blocked"));
    }
    // Then what upstream's completion does for a scratch workspace (its own code).
    if let (Ok(cfg), Ok(task)) = (Config::load(cli.config.as_deref()), b.require_task(id)) {
        let done = runtime().map_err(|e| format!("{e:#}")).and_then(|rt| {
            rt.block_on(crate::spawn::after_complete(&b, &cfg, &task, meta.as_ref()))
        });
        if let Err(e) = done {
            eprintln!("hermes-mgr: note: the scratch workspace of {id} was left as it is: {e}");
        }
    }
    report(cli, id, "done", "Completed")
}

fn report(cli: &Cli, id: &str, status: &str, verb: &str) -> anyhow::Result<()> {
    if cli.json {
        print_json(&json!({"id": id, "status": status}))
    } else {
        println!("{verb} {id} ({status})");
        Ok(())
    }
}

/// `logs`: the journal of the run's scope; upstream's log file when the journal has none.
/// Either way every line passes `render::clean_output`: it is the worker's text.
fn logs(b: &Board, id: &str, run: Option<i64>, follow: bool) -> anyhow::Result<()> {
    let task = b.require_task(id)?;
    let run = match run {
        Some(r) => r,
        None => match task.current_run_id.or(b.last_run(id)?.map(|r| r.id)) {
            Some(r) => r,
            None => bail!("task {id} has never run; there is no output yet"),
        },
    };
    if !b.runs(id)?.iter().any(|r| r.id == run) {
        bail!("task {id} has no run {run}; `hermes-mgr show {id}` lists its runs");
    }
    let unit = crate::names::worker_scope(&b.paths().slug, id, run);
    let mut j = std::process::Command::new("journalctl");
    j.args(["--no-pager", "-o", "cat", "-u", &unit]);
    let has_journal = journal_has_entries(&unit);
    let file = b
        .paths()
        .logs
        .join(format!("{}.log", crate::names::file_component(id)));
    let mut out = std::io::stdout().lock();
    if !has_journal {
        // Upstream's log, read as the board's owner: it sits in the tree workers write.
        let opened = crate::safe_fs::as_user(b.owner(), || {
            crate::safe_fs::open_regular(&file, crate::safe_fs::Access::Read)
        })?;
        match opened {
            Ok(f) => return relay(std::io::BufReader::new(f), &mut out, follow),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow::Error::new(e).context("the worker log")),
        }
    }
    if follow {
        j.arg("--follow");
    }
    let mut child = j
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("run journalctl")?;
    let piped = child.stdout.take().context("journalctl's output")?;
    let r = relay(std::io::BufReader::new(piped), &mut out, false);
    let _ = child.kill();
    let _ = child.wait();
    r
}

/// Whether the journal holds any line of `unit`: its first byte is enough (a run's whole
/// journal may be gigabytes, and one line of it as long as the worker made it).
fn journal_has_entries(unit: &str) -> bool {
    use std::io::Read;
    let Ok(mut child) = std::process::Command::new("journalctl")
        .args(["--no-pager", "-q", "-o", "cat", "-n", "1", "-u", unit])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        return false;
    };
    let mut byte = [0u8; 1];
    let any = child
        .stdout
        .take()
        .is_some_and(|mut o| matches!(o.read(&mut byte), Ok(1)));
    let _ = child.kill();
    let _ = child.wait();
    any
}

/// A line longer than this is relayed in pieces of this size: the worker decides how long
/// its lines are (a 64 GiB sparse log is one line of zeros), the reader's memory does not.
const RELAY_PIECE: u64 = 64 * 1024;

/// Copy lines through `clean_output`; with `follow`, keep reading what is appended. A
/// closed stdout (`| head`) ends it quietly.
fn relay(
    mut from: impl std::io::BufRead,
    out: &mut impl std::io::Write,
    follow: bool,
) -> anyhow::Result<()> {
    use std::io::{BufRead, Read};
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = from
            .by_ref()
            .take(RELAY_PIECE)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            if !follow {
                break;
            }
            let _ = out.flush();
            std::thread::sleep(std::time::Duration::from_millis(250));
            continue;
        }
        match out.write_all(render::clean_output(&line).as_bytes()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            r => r?,
        }
    }
    match out.flush() {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}
