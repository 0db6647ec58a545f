#!/bin/bash
# The whole test suite, on a fresh Debian 12 machine, as root: installs what it needs
# (tests/setup.sh), checks formatting and lints, builds, and runs every test, including
# those that boot a real, isolated systemd (tests/sdharness) and drive the real
# `hermes kanban` CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/setup.sh
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
cargo build --locked --all-targets
# --no-fail-fast: one failing test binary must not hide the others (the VM tier runs last).
cargo test --locked --all-targets --no-fail-fast
