#!/usr/bin/env bash
# HTTP deliveries ([http]): how many queued requests per second the outbox delivers to a local
# endpoint answering 200 at once, against a bare reqwest client in the same run (the floor).
# See bench/deliveries.rs.
#
#   bench/deliveries.sh [REQUESTS=20000] [AT_ONCE=32] [ROUNDS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release --example deliveries
echo "deliveries, $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ), tripline $(git rev-parse --short HEAD)"
target/release/examples/deliveries "${1:-20000}" "${2:-32}" "${3:-3}"
