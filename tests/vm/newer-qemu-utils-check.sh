#!/bin/bash
# Proves the VM tier's setup on a machine whose qemu-utils is newer than bookworm's (this
# project's machine image ships bookworm-backports' 10.0.2 without the backports source),
# here and in about three minutes, without waiting for a fresh machine. Not part of the test
# suite: it changes the host's packages (as root), and puts them back.
#
#   1. removes qemu-system-x86, qemu-system-common and qemu-utils;
#   2. installs a stand-in qemu-utils 1:10.0.2+ds-2+deb13u1~bpo12+1 (a qemu-img that answers
#      --version; Breaks bookworm's qemu-system-common, as the real one does);
#   3. runs IMAGE_SH (default tests/vm/image.sh) with an empty cache, and prints its exit code
#      and whether qemu-img runs after it;
#   4. reinstalls the qemu-system-x86 and qemu-utils it found (or bookworm's), of one version.
#
# Usage: tests/vm/newer-qemu-utils-check.sh [IMAGE_SH]   (exit code: IMAGE_SH's)
set -euo pipefail
cd "$(dirname "$0")/../.."
image_sh=$(readlink -f "${1:-tests/vm/image.sh}")
[[ $(id -u) == 0 ]] || { echo "run as root" >&2; exit 1; }
work=$(mktemp -d /var/tmp/newer-qemu-utils.XXXXXX)
before=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
restore() {
    local v=${before:-$(apt-cache policy qemu-system-x86 | awk '$1 == "Candidate:" { print $2 }')}
    echo "== restoring qemu-system-x86 and qemu-utils $v" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --allow-downgrades --no-install-recommends \
        "qemu-system-x86=$v" "qemu-utils=$v" >/dev/null
    rm -rf "$work"
}
trap restore EXIT

echo "== removing Debian's qemu" >&2
DEBIAN_FRONTEND=noninteractive apt-get remove -y -q qemu-system-x86 qemu-system-common qemu-utils >/dev/null
echo "== installing a stand-in qemu-utils 1:10.0.2+ds-2+deb13u1~bpo12+1" >&2
pkg=$work/pkg
mkdir -p "$pkg/DEBIAN" "$pkg/usr/bin"
cat >"$pkg/DEBIAN/control" <<'CONTROL'
Package: qemu-utils
Version: 1:10.0.2+ds-2+deb13u1~bpo12+1
Architecture: amd64
Maintainer: hermes-mgr tests <tests@invalid>
Breaks: qemu-system-common (<< 1:8.0+dfsg-5~)
Replaces: qemu-system-common (<< 1:8.0+dfsg-5~)
Description: stand-in for bookworm-backports' qemu-utils (tests/vm/newer-qemu-utils-check.sh)
CONTROL
printf '#!/bin/sh\necho "qemu-img version 10.0.2 (stand-in)"\n' >"$pkg/usr/bin/qemu-img"
chmod 0755 "$pkg/usr/bin/qemu-img"
dpkg-deb -b -Zgzip "$pkg" "$work/qemu-utils.deb" >/dev/null
dpkg -i "$work/qemu-utils.deb" >/dev/null
qemu-img --version >&2

echo "== $image_sh with an empty cache" >&2
set +e
HERMES_MGR_VM_CACHE=$work/cache "$image_sh" >"$work/image.out" 2>"$work/image.err"
rc=$?
set -e
grep -E 'REMOVED|DOWNGRADED|installing|qemu-utils|not found|does not run' -A1 "$work/image.err" >&2 || true
echo "== $image_sh exited $rc; qemu-img after it: $(qemu-img --version 2>&1 | head -1)" >&2
exit "$rc"
