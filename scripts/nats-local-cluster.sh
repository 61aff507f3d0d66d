#!/usr/bin/env bash
# Starts the 3-server JetStream cluster of deploy/nats/local-cluster.conf on 127.0.0.1
# (clients on 4222-4224, routes on 6222-6224, stores under ${1:-/tmp/updraft-nats}) and waits;
# Ctrl-C stops all three. Point dispatchers at it with
#   --set nats.url=nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224 --set topology.replicas=3
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NATS="${UPDRAFT_NATS_SERVER:-$ROOT/.tools/bin/nats-server}"
STORE="${1:-/tmp/updraft-nats}"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
for i in 0 1 2; do
    mkdir -p "$STORE/n$i"
    UPDRAFT_NATS_NAME="n$i" UPDRAFT_NATS_PORT=$((4222 + i)) UPDRAFT_NATS_CLUSTER_PORT=$((6222 + i)) \
    UPDRAFT_NATS_ROUTE0=nats-route://127.0.0.1:6222 UPDRAFT_NATS_ROUTE1=nats-route://127.0.0.1:6223 \
    UPDRAFT_NATS_ROUTE2=nats-route://127.0.0.1:6224 UPDRAFT_NATS_STORE="$STORE/n$i" \
        "$NATS" -c "$ROOT/deploy/nats/local-cluster.conf" > "$STORE/n$i.log" 2>&1 &
    pids+=($!)
done
echo "NATS cluster on nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224 (logs in $STORE)"
wait
