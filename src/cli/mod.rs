//! The `hermes-mgr` command line: the only module that knows clap. It parses, calls the
//! library, and renders; rendering is split from printing so it can be tested.

mod logs;
mod render;
mod verbs;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::{Parser, Subcommand};

use crate::board;

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
    /// Pause tasks — each held (nothing starts it again) and its running worker frozen
    /// whole by the cgroup freezer, same processes, same state — or, with no task named, the
    /// board (--board, --db) or every board (--all): no new worker starts there.
    Pause {
        /// Tasks to pause.
        #[arg(conflicts_with = "all")]
        ids: Vec<String>,
        /// Every board of the Hermes root.
        #[arg(long)]
        all: bool,
        /// With a board or --all: also freeze the workers running there.
        #[arg(long)]
        freeze: bool,
    },
    /// Undo a pause: the same tasks, board or every board; the workers it froze go on where
    /// they stopped.
    Resume {
        /// Tasks to resume.
        #[arg(conflicts_with = "all")]
        ids: Vec<String>,
        /// Every board (undoes `pause --all`).
        #[arg(long)]
        all: bool,
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
    /// Print the dispatcher's metrics once, in Prometheus' text format: what it last
    /// gathered (every metrics_interval_seconds) and gives node_exporter and metrics_listen.
    Metrics,
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
                // In the journal already (`daemon::main`), when that is where logs go.
                if !crate::logging::to_journal() {
                    eprintln!("hermes-mgr dispatcher: error: {e:#}");
                }
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
            | Command::Metrics
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

/// One small function per verb; this only picks it.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Supervise | Command::Dispatcher => bail!("not reached: handled in main"),
        Command::Status { limit, watch } => verbs::cmd_status(&cli, limit, watch),
        Command::Logs { id, follow, run } => logs::cmd_logs(&cli, id, follow, run),
        Command::Doctor => verbs::cmd_doctor(&cli),
        Command::Metrics => verbs::cmd_metrics(&cli),
        Command::Manpage => verbs::cmd_manpage(),
        Command::Completions { shell } => verbs::cmd_completions(shell),
        Command::Dispatch { once: _, max } => verbs::cmd_dispatch(&cli, max),
        Command::Stop { id, all, timeout } => verbs::cmd_stop(&cli, id, all, timeout),
        Command::Pause { ids, all, freeze } => verbs::cmd_hold(&cli, ids, *all, *freeze, true),
        Command::Resume { ids, all } => verbs::cmd_hold(&cli, ids, *all, false, false),
        Command::Add { .. } => verbs::cmd_add(&cli),
        Command::List { status, assignee } => verbs::cmd_list(&cli, status, assignee),
        Command::Show { id } => verbs::cmd_show(&cli, id),
        Command::Block { id, reason, kind } => verbs::cmd_block(&cli, id, reason, kind),
        Command::Unblock { id } => verbs::cmd_unblock(&cli, id),
        Command::Requeue { id, reason } => verbs::cmd_requeue(&cli, id, reason),
        Command::Complete {
            id,
            result,
            summary,
            metadata,
        } => verbs::cmd_complete(&cli, id, result, summary, metadata),
    }
}
