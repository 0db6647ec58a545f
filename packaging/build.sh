#!/bin/bash
# Build the release binary and both packages:
#   target/debian/hermes-mgr_<version>-1_amd64.deb   (cargo-deb)
#   target/generate-rpm/hermes-mgr-<version>-1.x86_64.rpm   (cargo-generate-rpm)
# Installs its own packagers when they are missing (cargo-deb 3.8.0, cargo-generate-rpm 0.21.1,
# from crates.io; the same pins as tests/setup.sh). Needs Rust >= 1.89 (rustup).
set -euo pipefail
cd "$(dirname "$0")/.."
HOST_TOOLS_WHO=packaging/build.sh
. packaging/host-tools.sh
ensure_packagers
cargo build --release --locked
cargo deb --no-build --locked
cargo generate-rpm
ls -1 target/debian/*.deb target/generate-rpm/*.rpm
