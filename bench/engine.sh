#!/usr/bin/env bash
# Engine micro-benchmarks (criterion, benches/engine.rs), as one table: median time per call and,
# for matching, the cost at N rules as a multiple of the cost at 1 rule (target: <= 1.3x at 10,000).
#
#   bench/engine.sh [CRITERION ARGS...]     e.g. bench/engine.sh --measurement-time 2
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(cargo bench --quiet --bench engine -- "$@" 2>&1) || { echo "$out" >&2; exit 1; }
# criterion prints "name   time:   [low median high]" (the name alone on a line when it is long).
table=$(awk '
  /time:/ {
    name = ($1 == "time:") ? prev : $1
    for (i = 1; i <= NF; i++) if ($i == "time:") { med = $(i + 3); unit = $(i + 4) }
    f = (unit == "ns") ? 1 : (unit == "µs" || unit == "us") ? 1e3 : (unit == "ms") ? 1e6 : 1e9
    printf "%s %.1f\n", name, med * f
  }
  { prev = $1 }' <<<"$out")
echo
echo "criterion medians, $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ), tripline $(git rev-parse --short HEAD)"
printf '%-18s %14s %12s\n' benchmark "ns per call" "x of N=1"
while read -r name ns; do
  group=${name%%/*}
  ratio="-"
  if [ "$group" != "$name" ]; then
    one=$(awk -v g="$group/1" '$1 == g { print $2 }' <<<"$table")
    ratio=$(awk -v a="$ns" -v b="$one" 'BEGIN { printf "%.2f", a / b }')
  fi
  printf '%-18s %14s %12s\n' "$name" "$ns" "$ratio"
done <<<"$table"
