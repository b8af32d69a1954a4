#!/bin/sh
# Builds a tiny initramfs for usernet's VM tests: busybox-static, the virtio network
# modules of the installed Debian kernel, init (beside this script) as /init and udhcpc.script
# as udhcpc's script. Usage: build-initramfs.sh OUTDIR
# Writes OUTDIR/initramfs.cpio and prints "KERNEL=<path to vmlinuz>" on stdout.
set -eu
out=$1
here=$(cd "$(dirname "$0")" && pwd)

# A kernel image with a matching /lib/modules directory.
kernel=
kver=
for k in /boot/vmlinuz-*; do
    [ -e "$k" ] || continue
    v=${k#/boot/vmlinuz-}
    if [ -d "/lib/modules/$v/kernel" ]; then
        kernel=$k
        kver=$v
    fi
done
if [ -z "$kernel" ]; then
    echo "no /boot/vmlinuz-* with a matching /lib/modules (install linux-image-cloud-amd64)" >&2
    exit 1
fi
busybox=$(command -v busybox || true)
[ -n "$busybox" ] || { echo "busybox not found (install busybox-static)" >&2; exit 1; }

root="$out/root"
rm -rf "$root"
mkdir -p "$root/bin" "$root/lib/mods" "$root/etc/udhcpc" "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/www"
cp "$busybox" "$root/bin/busybox"
cp "$here/init" "$root/init"
cp "$here/udhcpc.script" "$root/etc/udhcpc/default.script"
chmod 0755 "$root/init" "$root/etc/udhcpc/default.script" "$root/bin/busybox"

# The virtio network modules, in load order; missing ones are built in (or absent).
: > "$root/lib/mods/order"
for m in failover net_failover virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_net; do
    f=$(find "/lib/modules/$kver/kernel" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -n 1)
    [ -n "$f" ] || continue
    case "$f" in
        *.ko.xz) xz -dc "$f" > "$root/lib/mods/$m.ko" ;;
        *.ko.gz) gzip -dc "$f" > "$root/lib/mods/$m.ko" ;;
        *.ko.zst) zstd -qdc "$f" > "$root/lib/mods/$m.ko" ;;
        *) cp "$f" "$root/lib/mods/$m.ko" ;;
    esac
    echo "$m" >> "$root/lib/mods/order"
done

(cd "$root" && find . | sort | "$busybox" cpio -o -H newc 2>/dev/null) > "$out/initramfs.cpio"
rm -rf "$root"
echo "KERNEL=$kernel"
