#!/bin/bash
# Installs what the test suite needs, idempotently, on Debian 12 (run as root):
#   - systemd, dbus, util-linux (unshare/nsenter): the real-systemd sandbox (tests/sdharness)
#   - python3-venv: a venv for the real Hermes CLI
#   - man-db, lintian, rpm: the man page and package checks; cargo-deb and
#     cargo-generate-rpm (crates.io) build the packages
#   - hermes-agent==0.19.0 from PyPI in target/hermes-venv (built with /usr/bin/python3, so
#     that non-root workers can run it too)
#   - the VM tier's Debian 12 guest image (tests/vm/image.sh: qemu-system-x86, mmdebstrap;
#     cached under /var/tmp/hermes-mgr-vm by its recipe)
set -euo pipefail
cd "$(dirname "$0")/.."

HERMES_AGENT_VERSION=0.19.0
VENV=${HERMES_MGR_TEST_VENV:-$PWD/target/hermes-venv}

need_apt=()
for pair in git:git unshare:util-linux nsenter:util-linux dbus-daemon:dbus busctl:systemd journalctl:systemd man:man-db lintian:lintian dpkg-deb:dpkg rpm:rpm; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need_apt+=("${pair#*:}")
done
[ -x /lib/systemd/systemd ] || need_apt+=(systemd)
[ -x /usr/bin/python3 ] || need_apt+=(python3)
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}"
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust >= 1.89 (rustup)" >&2; exit 1; }
# The lint gate of tests/run-all.sh.
for c in rustfmt clippy; do
  cargo "${c/rustfmt/fmt}" --version >/dev/null 2>&1 || rustup component add "$c"
done
# The package builder the packaging tests use (pinned: its maintainer-script output is tested).
if ! cargo deb --version 2>/dev/null | grep -q "3.8.0"; then
  echo "setup: installing cargo-deb 3.8.0"
  cargo install --locked --quiet cargo-deb@3.8.0
fi
if ! cargo generate-rpm --version 2>/dev/null | grep -q "0.21.1"; then
  echo "setup: installing cargo-generate-rpm 0.21.1"
  cargo install --locked --quiet cargo-generate-rpm@0.21.1
fi

marker="$VENV/.hermes-agent-$HERMES_AGENT_VERSION"
if [ ! -e "$marker" ] || [ ! -x "$VENV/bin/hermes" ]; then
  echo "setup: installing hermes-agent==$HERMES_AGENT_VERSION into $VENV"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "hermes-agent==$HERMES_AGENT_VERSION"
  touch "$marker"
fi
# The gateway test runs Hermes' webhook platform, which needs aiohttp (at hermes-agent's own pin).
"$VENV/bin/python" -c 'import aiohttp' 2>/dev/null \
  || "$VENV/bin/pip" install -q --disable-pip-version-check "aiohttp==3.14.1"
# Tests run the venv as other users (nobody) too: the path to it must be traversable.
d=$VENV; while [ "$d" != / ]; do chmod o+x "$d" 2>/dev/null || true; d=$(dirname "$d"); done
tests/vm/image.sh >/dev/null
echo "setup: ok ($("$VENV/bin/hermes" --version 2>/dev/null | head -1))"
