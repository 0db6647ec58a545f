//! The run's supervisor as a program of its own (`/usr/libexec/hermes-mgr/`): one lives in
//! every worker scope for the run's whole life, and this binary holds only what it needs —
//! its relocated data is ~16 kB where the whole `hermes-mgr` relocates ~320 kB in every
//! process (see `spawn::supervise`).
//!
//! Without Rust's `main` wrapper: one is started per run, and the wrapper's start-up (the
//! main thread's stack bounds, read from `/proc/self/maps`, for a stack-overflow handler)
//! was a tenth of the supervisor's own start. What it does that the supervisor needs is
//! done here: SIGPIPE ignored (a report to a dispatcher that died must fail, not kill the
//! run's supervisor), and a panic ends the process with 101, as under the wrapper. (A test
//! build keeps the wrapper: the test harness is its `main`.)
#![cfg_attr(not(test), no_main)]

#[cfg(not(test))]
#[no_mangle]
pub extern "C" fn main(_argc: std::ffi::c_int, _argv: *const *const std::ffi::c_char) -> i32 {
    // SAFETY: setting a signal's disposition in this single-threaded process.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    match std::panic::catch_unwind(hermes_mgr::spawn::supervise::main) {
        Ok(code) => i32::from(code),
        Err(_) => 101,
    }
}
