//! One integration-test binary: `cargo test --test it`.

#[path = "../common/deb.rs"]
mod deb;
mod harness;
mod rig;

mod admission;
mod attack;
mod board;
mod boards;
mod cli;
mod daemon;
mod docs;
mod faults;
mod full_disk;
mod gateway;
mod interop;
mod layers;
mod metrics;
mod newer_board;
mod newer_hermes;
mod operator;
mod package;
mod parity;
mod pause;
mod pipeline;
mod pools;
mod real_worker;
mod sandbox;
mod scale;
mod scope;
mod settings;
mod soak_found;
mod triage;
mod worker;
