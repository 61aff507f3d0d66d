#!/usr/bin/env bash
# The test command: set up what is missing (idempotent), then run every test tier.
# Tests that need nats-server find it on PATH or through UPDRAFT_NATS_SERVER.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/scripts/setup.sh"
export PATH="$ROOT/.tools/bin:$PATH"
export UPDRAFT_NATS_SERVER="${UPDRAFT_NATS_SERVER:-$ROOT/.tools/bin/nats-server}"
cd "$ROOT"
cargo test --workspace --locked "$@"
