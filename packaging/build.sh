#!/bin/bash
# Build the release binary and both packages:
#   target/debian/hermes-mgr_<version>-1_amd64.deb   (cargo-deb)
#   target/generate-rpm/hermes-mgr-<version>-1.x86_64.rpm   (cargo-generate-rpm)
# Installs its own packagers when they are missing (cargo-deb 3.8.0, cargo-generate-rpm 0.21.1,
# from crates.io; the same pins as tests/setup.sh). Needs Rust >= 1.89 (rustup).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "build.sh: cargo not found; install Rust >= 1.89 (rustup)" >&2; exit 1; }
cargo deb --version 2>/dev/null | grep -q "3.8.0" || cargo install --locked --quiet cargo-deb@3.8.0
cargo generate-rpm --version 2>/dev/null | grep -q "0.21.1" || cargo install --locked --quiet cargo-generate-rpm@0.21.1
cargo build --release --locked
cargo deb --no-build --locked
cargo generate-rpm
ls -1 target/debian/*.deb target/generate-rpm/*.rpm
