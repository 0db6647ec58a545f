//! hermes-mgr: a Linux-native worker manager for Hermes Agent's kanban board.
//!
//! The daemon, the CLI and the tests share this library. See `ARCHITECTURE.md` for the
//! module map and the invariants.

pub mod admission;
pub mod board;
pub mod cli;
pub mod config;
pub mod contract;
pub mod daemon;
pub mod dispatch;
pub mod doctor;
pub mod guard;
pub mod hermes_config;
pub mod holds;
pub mod host;
pub mod liveness;
pub mod logging;
pub mod metrics;
pub mod names;
pub mod outcome;
pub mod record;
pub mod safe_fs;
pub mod spawn;
pub mod state_dir;
pub mod status;
pub mod systemd;
pub mod text;
pub mod transitions;
