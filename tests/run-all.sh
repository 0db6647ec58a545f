#!/bin/bash
# The whole test suite, on a fresh Debian 12 machine, as root: installs what it needs
# (tests/setup.sh), builds, and runs every test, including those that boot a real,
# isolated systemd (tests/sdharness) and drive the real `hermes kanban` CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/setup.sh
cargo build --locked --all-targets
cargo test --locked --all-targets
