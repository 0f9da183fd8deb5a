#!/usr/bin/env bash
# [aggregate]: how fast events are counted, and how long a summary of 90 days over 1,000,000
# people takes, each against a floor measured in the same run. See bench/aggregates.rs.
#
#   bench/aggregates.sh [USERS=1000000] [ROUNDS=5]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release --example aggregates
echo "aggregates, $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ), tripline $(git rev-parse --short HEAD)"
target/release/examples/aggregates "${1:-1000000}" "${2:-5}"
