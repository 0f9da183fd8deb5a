#!/usr/bin/env bash
# tripline beside the tools a user would pick instead — Node-RED (npm) and adnanh/webhook
# (Debian) — on the shared "sanitize" workload, in one run, with the ratio to each peer; then the
# two floors of bench/floor.rs in tripline's place through the same kit (bench/floor-as-tripline.sh).
# Uses the team's kit in ../shared/bench (install-peers.sh, then compare.sh).
#
#   bench/peers.sh [--seconds N] [--connections N]      (compare.sh's options)
#
# Two things differ from running the kit by hand, both so tripline is measured doing the work:
# - its post.lua never seeds math.random, so every run sends the same uuids and tripline would
#   skip the measured run's requests as retries of the warm-up's; this runs a seeded copy.
# - tripline's per-source rate limit (1,000 requests/s by default) is raised for the run.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${TRIPLINE_BENCH_KIT:-../shared/bench}
[ -x "$KIT/compare.sh" ] || { echo "the shared bench kit is not at $KIT (set TRIPLINE_BENCH_KIT)" >&2; exit 2; }
"$KIT/install-peers.sh" >&2
cargo build --release --quiet --bin tripline --example floor
copy=$(mktemp -d /tmp/tripline-kit.XXXXXX)
trap 'rm -rf "$copy"' EXIT
cp -r "$KIT/." "$copy/"
chmod -R u+w "$copy"
sed -i 's/^local thread_tag = /math.randomseed(os.time())\nlocal thread_tag = /' "$copy/workload/post.lua"
echo "tripline $(git rev-parse --short HEAD), $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ)"
TRIPLINE_LOG=warn TRIPLINE_RATE_LIMIT=1000000 TRIPLINE_RATE_LIMIT_BURST=1000000 \
  "$copy/compare.sh" --tripline target/release/tripline "$@"
# tripline again with --durability interval (a 2xx once written to the operating system, synced
# every 100 ms), through the same kit.
TRIPLINE_LOG=warn TRIPLINE_RATE_LIMIT=1000000 TRIPLINE_RATE_LIMIT_BURST=1000000 TRIPLINE_DURABILITY=interval \
  "$copy/compare.sh" --tripline target/release/tripline --only tripline "$@" \
  | sed -n "s/^tripline RESULT/tripline-interval RESULT/p"
# The floors in tripline's place, same kit, body and load generator, same session: what any server
# reaches here (bare: reads the body, answers 200), and any server whose 2xx means "on disk"
# (durable: also parses it, appends a line, answers once synced; see bench/floor.rs).
echo
for mode in bare durable; do
  FLOOR_MODE=$mode "$copy/compare.sh" --tripline bench/floor-as-tripline.sh --only tripline "$@" \
    | sed -n "s/^tripline RESULT/floor-$mode RESULT/p"
done
