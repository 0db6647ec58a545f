#!/bin/bash
# Build hermes-mgr and install it as a service on a Debian 12 host with systemd (as root):
# the binary, hermes-dispatcher.service, hermes-workers.slice, the `hermes` worker user,
# then `systemctl enable --now hermes-dispatcher`. Idempotent. Packages (.deb/.rpm) will
# replace this script.
#   HERMES_HOME_DIR    the Hermes root the dispatcher serves (default: /var/lib/hermes)
#   HERMES_MGR_BINARY  install this binary instead of building one (tests use it); its
#                      hermes-mgr-supervise is taken from the same directory
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
[ "$(cat /proc/1/comm 2>/dev/null)" = systemd ] || { echo "systemd is not PID 1 here; try tests/run-all.sh instead" >&2; exit 1; }
HOME_DIR=${HERMES_HOME_DIR:-/var/lib/hermes}
BIN=${HERMES_MGR_BINARY:-}
if [ -z "$BIN" ]; then
  command -v cargo >/dev/null || { echo "cargo not found: install Rust >= 1.89 (rustup)" >&2; exit 1; }
  cargo build --release --locked
  BIN=target/release/hermes-mgr
fi
install -m 0755 "$BIN" /usr/bin/hermes-mgr
# The run's supervisor: one per live worker, kept small (see src/bin/hermes-mgr-supervise.rs).
install -D -m 0755 "$(dirname "$BIN")/hermes-mgr-supervise" /usr/libexec/hermes-mgr/hermes-mgr-supervise
install -m 0644 units/hermes-dispatcher.service units/hermes-workers.slice /etc/systemd/system/
install -D -m 0644 units/hermes-mgr.sysusers /usr/lib/sysusers.d/hermes-mgr.conf
install -D -m 0644 units/hermes-mgr.tmpfiles.conf /usr/lib/tmpfiles.d/hermes-mgr.conf
for page in man/*.[1-8]; do install -D -m 0644 "$page" "/usr/share/man/man${page##*.}/$(basename "$page")"; done
systemd-sysusers hermes-mgr.conf
systemd-tmpfiles --create hermes-mgr.conf
install -d -o hermes -g hermes -m 0750 "$HOME_DIR"
mkdir -p /etc/systemd/system/hermes-dispatcher.service.d /etc/hermes-mgr
cat > /etc/systemd/system/hermes-dispatcher.service.d/10-hermes-home.conf <<CONF
[Service]
Environment=HERMES_HOME=$HOME_DIR
CONF
[ -e /etc/hermes-mgr/config.toml ] || printf '# See README.md, "Configuration", for every key.\nworker_user = "hermes"\n' > /etc/hermes-mgr/config.toml
systemctl daemon-reload
systemctl enable hermes-dispatcher.service
# Start, or restart an older one (an upgrade): its workers keep running and are adopted.
systemctl restart hermes-dispatcher.service
systemctl --no-pager status hermes-dispatcher.service | head -5
echo "Create a task: sudo -u hermes HERMES_HOME=$HOME_DIR hermes kanban create 'hello' --assignee default"
