#!/usr/bin/env bash
# Checks every artifact in deploy/ that this machine can check (run by scripts/test.sh):
#   * NATS configs with `nats-server -t` (the TLS cluster config with throwaway certificates),
#   * systemd units with `systemd-analyze verify` (pointed at the binaries just built).
# deploy/config/*.toml are checked by unit tests (they must parse to exactly the defaults).
# The container files cannot be built here (no container engine); docs/operations.md says so.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NATS="${UPDRAFT_NATS_SERVER:-$ROOT/.tools/bin/nats-server}"
BIN="${UPDRAFT_BIN_DIR:-$ROOT/target/debug}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
log() { printf 'check-deploy: %s\n' "$*" >&2; }

export UPDRAFT_DISPATCHER_PASSWORD=x UPDRAFT_OPERATOR_PASSWORD=x UPDRAFT_SYS_PASSWORD=x
export UPDRAFT_AGENT_1_PASSWORD=x UPDRAFT_AGENT_2_PASSWORD=x
export UPDRAFT_NATS_NAME=n0 UPDRAFT_NATS_PORT=4222 UPDRAFT_NATS_CLUSTER_PORT=6222
export UPDRAFT_NATS_ROUTE0=nats-route://127.0.0.1:6222 UPDRAFT_NATS_ROUTE1=nats-route://127.0.0.1:6223
export UPDRAFT_NATS_ROUTE2=nats-route://127.0.0.1:6224 UPDRAFT_NATS_STORE="$tmp/store"

"$NATS" -t -c "$ROOT/deploy/nats/local-cluster.conf" >/dev/null
"$NATS" -t -c "$ROOT/deploy/nats/server.conf" >/dev/null

# the TLS cluster config, with a throwaway CA and certificates in place of /etc/nats/tls
mkdir -p "$tmp/tls" "$tmp/nats"
( cd "$tmp/tls"
  openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=updraft-test-ca" \
      -keyout ca-key.pem -out ca.pem 2>/dev/null
  for n in server route; do
      openssl req -newkey rsa:2048 -nodes -subj "/CN=nats-1" -keyout "$n-key.pem" -out "$n.csr" 2>/dev/null
      openssl x509 -req -in "$n.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 1 \
          -out "$n.pem" 2>/dev/null
  done )
sed "s#/etc/nats/tls#$tmp/tls#g" "$ROOT/deploy/nats/cluster.conf" > "$tmp/nats/cluster.conf"
cp "$ROOT/deploy/nats/accounts.conf" "$tmp/nats/"
"$NATS" -t -c "$tmp/nats/cluster.conf" >/dev/null
log "nats-server -t: local-cluster.conf, server.conf, cluster.conf (TLS) valid"

if command -v systemd-analyze >/dev/null 2>&1; then
    mkdir -p "$tmp/units"
    for f in "$ROOT"/deploy/systemd/*.service; do
        sed -e "s#/usr/local/bin/updraft-#$BIN/updraft-#" -e "s#/usr/local/bin/nats-server#$NATS#" \
            "$f" > "$tmp/units/$(basename "$f")"
    done
    systemd-analyze verify "$tmp"/units/*.service
    log "systemd-analyze verify: $(cd "$ROOT/deploy/systemd" && echo *.service) valid"
else
    log "systemd-analyze not installed; units not verified"; exit 1
fi
