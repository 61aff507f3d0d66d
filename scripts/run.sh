#!/usr/bin/env bash
# The run command: set up what is missing, build the release binaries, and start a whole
# local cluster (its own nats-server, a dispatcher, eight node-agents with the in-memory
# driver, a demo workload). Extra arguments go to `updraft up` (see `--help`).
# Ctrl-C stops everything and removes the temporary state (unless --data-dir was given).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/scripts/setup.sh"
export PATH="$ROOT/.tools/bin:$PATH"
export UPDRAFT_NATS_SERVER="${UPDRAFT_NATS_SERVER:-$ROOT/.tools/bin/nats-server}"
cd "$ROOT"
cargo build --release --locked --bins
exec "$ROOT/target/release/updraft" up "$@"
