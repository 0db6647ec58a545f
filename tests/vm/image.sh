#!/bin/bash
# The VM tier's guest: a Debian 12 root built from Debian's packages alone (mmdebstrap),
# as a qcow2 base image with its kernel and initrd beside it, for booting under qemu
# without a bootloader. Cached under $HERMES_MGR_VM_CACHE (default /var/tmp/hermes-mgr-vm)
# by a hash of this file: a changed recipe is a new image, an unchanged one is reused.
# Prints the image's directory. Needs root (mmdebstrap's root mode, mke2fs -d).
set -euo pipefail
cache=${HERMES_MGR_VM_CACHE:-/var/tmp/hermes-mgr-vm}
key=$(sha256sum "$0" | cut -c1-16)
out=$cache/image-$key
if [[ -f $out/base.qcow2 && -f $out/vmlinuz && -f $out/initrd.img ]]; then
    echo "$out"
    exit 0
fi
need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v mke2fs >/dev/null || need+=(e2fsprogs)
command -v qemu-img >/dev/null || need+=(qemu-utils)
if ((${#need[@]})); then
    # --no-upgrade: this machine may carry a newer qemu-utils from backports that
    # qemu-system-x86 7.2 would otherwise drag back.
    # A fresh machine may have no package lists yet.
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-upgrade --no-install-recommends "${need[@]}" >&2
fi
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
