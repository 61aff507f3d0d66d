#!/usr/bin/env bash
# The test command: set up what is missing (idempotent), then run every test tier.
# Unit, property and integration tests run in parallel; the end-to-end tests (whole clusters
# of real processes) run one at a time, so timing-sensitive faults are not starved of CPU.
# Tests that need nats-server find it on PATH or through UPDRAFT_NATS_SERVER.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/scripts/setup.sh"
export PATH="$ROOT/.tools/bin:$PATH"
export UPDRAFT_NATS_SERVER="${UPDRAFT_NATS_SERVER:-$ROOT/.tools/bin/nats-server}"
cd "$ROOT"
cargo build --workspace --bins --locked
"$ROOT/scripts/check-deploy.sh"
cargo test --workspace --locked --exclude e2e "$@"
cargo test --locked -p e2e "$@" -- --test-threads 1
