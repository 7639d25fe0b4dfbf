#!/usr/bin/env bash
# Load test of the real release binary on loopback with a tiny model (see benches/load.rs).
#   bench/load.sh [sqlite|postgres] [--requests N] [--connections N] [--signups N] [--addresses N]
set -euo pipefail
cd "$(dirname "$0")/.."
db="${1:-sqlite}"; shift || true
ulimit -n 65536 2>/dev/null || true
cargo build --release --quiet
cargo bench --quiet --bench load -- --db "$db" "$@"
