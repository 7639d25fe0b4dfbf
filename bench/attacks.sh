#!/usr/bin/env bash
# Replays launch night's cheap attacks against the real release binary on loopback (tiny model,
# SQLite, default limits) and prints figures: see benches/attacks.rs.
#   bench/attacks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 65536 2>/dev/null || true
cargo build --release --quiet
cargo bench --quiet --bench attacks
