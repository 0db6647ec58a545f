#!/bin/bash
# Try hermes-mgr without touching this system (as root, no systemd needed on the host):
# boots the project's isolated systemd sandbox (tests/sdharness: own namespaces, overlay
# root, private /run and /tmp), installs the .deb inside, starts hermes-dispatcher, creates
# three demo tasks with stub workers -- one succeeds, one crashes and is retried until the
# breaker blocks it, one runs until it is stopped -- then shows `hermes-mgr status` and the
# journal, and tears the sandbox down.
#   DEB=path/to/hermes-mgr.deb   use this package instead of building one
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (the sandbox needs namespaces)" >&2; exit 1; }
if [ -z "${DEB:-}" ]; then
  packaging/build.sh >/dev/null
  DEB=$(ls -1t target/debian/*.deb | head -1)
fi
DEB=$(readlink -f "$DEB")
STATE=$(mktemp -d /var/tmp/hermes-mgr-demo.XXXXXX)
trap 'tests/sdharness/stop-systemd.sh "$STATE" >/dev/null 2>&1 || true; rm -rf "$STATE"' EXIT
tests/sdharness/boot-systemd.sh "$STATE" > "$STATE/boot.out"
PID=$(sed -n 's/^SDH_PID=//p' "$STATE/boot.out")
inside() { nsenter -t "$PID" -a -- env --chdir=/ "$@"; }

inside bash -s "$DEB" <<'SANDBOX'
set -euo pipefail
deb=$1
# The sandbox's systemd searches /etc/systemd/system but not /usr/lib/systemd/system, and
# the machine image forbids service starts from maintainer scripts (policy-rc.d): undo both.
rm -f /usr/sbin/policy-rc.d
dpkg-deb --fsys-tarfile "$deb" | tar -x -C / ./usr/lib/systemd/system/
cp /usr/lib/systemd/system/hermes-dispatcher.service /usr/lib/systemd/system/hermes-workers.slice /etc/systemd/system/
systemctl daemon-reload
echo "== apt install ./$(basename "$deb")"
dpkg -i "$deb" | tail -2
# A stub worker: its task's body says what to do.
cat > /var/lib/hermes/demo-worker.sh <<'WORKER'
#!/bin/sh
what=$(hermes-mgr show "$HERMES_KANBAN_TASK" | sed -n 's/^  demo: //p')
echo "demo worker for $HERMES_KANBAN_TASK: $what"
case "$what" in
  succeed) exec hermes-mgr complete "$HERMES_KANBAN_TASK" --summary "done by the demo worker" ;;
  crash) echo "something went wrong" >&2; exit 1 ;;
  *) exec sleep 3600 ;;
esac
WORKER
chmod 0755 /var/lib/hermes/demo-worker.sh
printf 'worker_user = "hermes"\nhermes_bin = "/var/lib/hermes/demo-worker.sh"\nstop_timeout_seconds = 5\n' > /etc/hermes-mgr/config.toml
systemctl reload hermes-dispatcher
export HERMES_HOME=/var/lib/hermes
mgr() { runuser -u hermes -- env HERMES_HOME=/var/lib/hermes hermes-mgr "$@"; }
ok=$(mgr add "Summarise the logs" --assignee default --body "demo: succeed" --json | sed -n 's/.*"id": "\(t_[0-9a-f]*\)".*/\1/p')
bad=$(mgr add "Flaky integration" --assignee default --body "demo: crash" --json | sed -n 's/.*"id": "\(t_[0-9a-f]*\)".*/\1/p')
long=$(mgr add "Long research" --assignee default --body "demo: run" --json | sed -n 's/.*"id": "\(t_[0-9a-f]*\)".*/\1/p')
# Wait (at most 20 s) until the three have played out: done, blocked by the breaker, running.
for _ in $(seq 100); do
  [ "$(hermes-mgr list --status done --json | grep -c "\"$ok\"")" = 1 ] \
    && [ "$(hermes-mgr list --status blocked --json | grep -c "\"$bad\"")" = 1 ] \
    && [ "$(hermes-mgr list --status running --json | grep -c "\"$long\"")" = 1 ] && break
  sleep 0.2
done
echo; echo "== hermes-mgr status"; hermes-mgr status
echo; echo "== hermes-mgr stop $long"; hermes-mgr stop "$long"
echo; echo "== hermes-mgr status"; hermes-mgr status
echo; echo "== hermes-mgr show $bad"; hermes-mgr show "$bad" | sed -n '/^Runs/,$p'
echo; echo "== journalctl -u 'hermes-worker-kanban-*'"; journalctl --no-pager -o short -u 'hermes-worker-kanban-*' | tail -n 12
echo; echo "== journalctl -u hermes-dispatcher"; journalctl --no-pager -o cat -u hermes-dispatcher | tail -n 12
SANDBOX
