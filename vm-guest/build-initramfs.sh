#!/bin/sh
# Builds a tiny initramfs for usernet's VM tests: busybox-static, the virtio network
# modules of the installed Debian kernel, init (beside this script) as /init and udhcpc.script
# as udhcpc's script. Usage: build-initramfs.sh OUTDIR [--with-ssh AUTHORIZED_KEY_FILE]
# Writes OUTDIR/initramfs.cpio and prints "KERNEL=<path to vmlinuz>" on stdout.
#
# --with-ssh adds OpenSSH's sshd (Debian's openssh-server; Debian 12's dropbear has no
# direct-streamlocal, which gvproxy's -forward-sock needs) with a fresh host key, root
# logging in with the given public key only, and socat for a Unix-socket server: /init
# starts both when they are there.
set -eu
out=$1
ssh_key=
if [ "${2:-}" = --with-ssh ]; then
    ssh_key=$3
fi
here=$(cd "$(dirname "$0")" && pwd)

# Copies a program and the shared libraries it loads into the image.
with_libs() {
    cp "$1" "$root$1"
    for lib in $(ldd "$1" | sed -n 's/.*=> \(\/[^ ]*\) .*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) .*/\1/p'); do
        mkdir -p "$root$(dirname "$lib")"
        [ -e "$root$lib" ] || cp -L "$lib" "$root$lib"
    done
}

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

if [ -n "$ssh_key" ]; then
    for tool in /usr/sbin/sshd /usr/bin/socat /usr/bin/ssh-keygen; do
        [ -x "$tool" ] || { echo "$tool not found (install openssh-server, openssh-client and socat)" >&2; exit 1; }
    done
    mkdir -p "$root/usr/sbin" "$root/usr/bin" "$root/etc/ssh" "$root/root/.ssh" "$root/run/sshd" "$root/var/empty"
    with_libs /usr/sbin/sshd
    with_libs /usr/bin/socat
    ssh-keygen -q -t ed25519 -N "" -f "$root/etc/ssh/ssh_host_ed25519_key"
    cp "$ssh_key" "$root/root/.ssh/authorized_keys"
    chmod 700 "$root/root" "$root/root/.ssh"
    chmod 600 "$root/root/.ssh/authorized_keys"
    printf 'root:*:0:0:root:/root:/bin/sh\nsshd:*:100:65534::/run/sshd:/bin/false\n' > "$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
    cat > "$root/etc/ssh/sshd_config" <<'CONF'
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AllowStreamLocalForwarding yes
StrictModes no
PidFile /run/sshd.pid
CONF
fi

(cd "$root" && find . | sort | "$busybox" cpio -o -H newc 2>/dev/null) > "$out/initramfs.cpio"
rm -rf "$root"
echo "KERNEL=$kernel"
