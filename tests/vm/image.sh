#!/bin/bash
# The VM tier's guest: a Debian 12 root built from Debian's packages alone (mmdebstrap),
# as a qcow2 base image with its kernel and initrd beside it, for booting under qemu
# without a bootloader. Cached under $HERMES_MGR_VM_CACHE (default /var/tmp/hermes-mgr-vm)
# by a hash of its recipe: a changed recipe is a new image, an unchanged one is reused.
# Prints the image's directory. Needs root (mmdebstrap's root mode, mke2fs -d).
set -euo pipefail
# The host's tools (the VM tests run them too, so they are checked even for a cached image),
# as one consistent set, each proven to run before the build.
HOST_TOOLS_WHO=tests/vm/image.sh
. "$(dirname "$0")/../../packaging/host-tools.sh"
ensure_tools --no-install-recommends \
    qemu-system-x86_64:qemu-system-x86:--version qemu-img:qemu-utils:--version \
    mmdebstrap:mmdebstrap:--version mke2fs:e2fsprogs:-V
cache=${HERMES_MGR_VM_CACHE:-/var/tmp/hermes-mgr-vm}
# The key hashes the recipe alone (from its marker down), not the host-tools step above.
key=$(sed -n '/^# --- the recipe ---$/,$p' "$0" | sha256sum | cut -c1-16)
out=$cache/image-$key
if [[ -f $out/base.qcow2 && -f $out/vmlinuz && -f $out/initrd.img ]]; then
    echo "$out"
    exit 0
fi
# --- the recipe ---
mkdir -p "$cache"
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
# The guest: systemd as PID 1, D-Bus, a stock Debian kernel (its initrd finds the virtio
# disk), Python for Hermes, sqlite3 for checking boards, and qemu-guest-agent as the
# host's channel (exec with exit codes, file copy) over virtio-serial; rpm, to install
# the .rpm as well.
mmdebstrap --mode=root --variant=apt --quiet \
    --include=systemd-sysv,dbus,udev,linux-image-amd64,initramfs-tools,kmod,procps,python3,sqlite3,qemu-guest-agent,e2fsprogs,util-linux,rpm \
    --customize-hook='echo hermes-vm > "$1/etc/hostname"' \
    --customize-hook='echo "/dev/vda / ext4 defaults,errors=remount-ro 0 1" > "$1/etc/fstab"' \
    --customize-hook='chroot "$1" passwd -d root' \
    --customize-hook='rm -f "$1/etc/machine-id"; touch "$1/etc/machine-id"' \
    --customize-hook='mkdir -p "$1/etc/systemd/journald.conf.d"; printf "[Journal]\nStorage=persistent\n" > "$1/etc/systemd/journald.conf.d/10-vm.conf"' \
    bookworm "$root" http://deb.debian.org/debian >&2
cp -L "$root/vmlinuz" "$work/vmlinuz"
cp -L "$root/initrd.img" "$work/initrd.img"
mke2fs -q -t ext4 -L root -d "$root" "$work/base.raw" 3G
qemu-img convert -q -f raw -O qcow2 "$work/base.raw" "$work/base.qcow2"
mkdir -p "$out"
mv "$work/vmlinuz" "$work/initrd.img" "$out/"
mv "$work/base.qcow2" "$out/base.qcow2"
echo "$out"
