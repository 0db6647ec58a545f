//! The run's supervisor as a program of its own (`/usr/libexec/hermes-mgr/`): one lives in
//! every worker scope for the run's whole life, and this binary holds only what it needs —
//! its relocated data is ~16 kB where the whole `hermes-mgr` relocates ~320 kB in every
//! process (see `spawn::supervise`).

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(hermes_mgr::spawn::supervise::main())
}
