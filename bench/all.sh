#!/usr/bin/env bash
# Every benchmark in one session, one after the other, so their ratios come from the same
# machine state: engine micro-benchmarks, HTTP load, the peers, replay and state scale.
# The tables go to the terminal and to target/bench-report.txt (docs/PERFORMANCE.md quotes one).
#
#   bench/all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
report=target/bench-report.txt
mkdir -p target
{
  echo "# bench/all.sh, $(date -u +%Y-%m-%dT%H:%MZ), tripline $(git rev-parse --short HEAD), $(nproc) cores"
  echo "## bench/engine.sh"; bench/engine.sh
  echo; echo "## bench/http.sh"; bench/http.sh
  echo; echo "## bench/peers.sh"; bench/peers.sh
  echo; echo "## bench/scale.sh"; bench/scale.sh
  echo; echo "## bench/deliveries.sh"; bench/deliveries.sh
  echo; echo "## bench/aggregates.sh"; bench/aggregates.sh
} 2>/dev/null | tee "$report"
echo "written to $report" >&2
