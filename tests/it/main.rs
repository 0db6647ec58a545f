//! One integration-test binary: `cargo test --test it`.

mod harness;

mod board;
mod cli;
mod interop;
mod scope;
mod worker;
