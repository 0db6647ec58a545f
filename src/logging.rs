//! Logs: structured journald entries when journald is there, stderr otherwise.
//!
//! Fields are lower-case in the code and upper-case in the journal (`hermes_kanban_task` →
//! `HERMES_KANBAN_TASK=`), without tracing-journald's `F_` prefix, so that
//! `journalctl HERMES_KANBAN_TASK=t_5e0db6b2` shows a task's whole story and
//! `journalctl UNIT=<scope>` the dispatcher's lines about one worker.

use std::sync::atomic::{AtomicBool, Ordering};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

static TO_JOURNAL: AtomicBool = AtomicBool::new(false);

/// Whether `init` sent the logs to journald (else they go to stderr).
pub fn to_journal() -> bool {
    TO_JOURNAL.load(Ordering::Relaxed)
}

/// Install the subscriber. Journald when stderr is connected to it (`$JOURNAL_STREAM`, as
/// under systemd) or when asked; stderr otherwise. Level from `$HERMES_MGR_LOG` (`info`).
pub fn init(identifier: &str) {
    let filter =
        EnvFilter::try_from_env("HERMES_MGR_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let to_journal = std::env::var_os("JOURNAL_STREAM").is_some()
        || std::env::var_os("HERMES_MGR_LOG_JOURNAL").is_some();
    if to_journal {
        if let Ok(layer) = tracing_journald::layer() {
            let layer = layer
                .with_field_prefix(None)
                .with_syslog_identifier(identifier.to_string());
            if tracing_subscriber::registry()
                .with(filter)
                .with(layer)
                .try_init()
                .is_ok()
            {
                TO_JOURNAL.store(true, Ordering::Relaxed);
            }
            return;
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
