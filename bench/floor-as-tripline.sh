#!/usr/bin/env bash
# Lets the shared kit's compare.sh measure a floor (bench/floor.rs) in tripline's place, with the
# kit's own body and load generator: takes `tripline serve`'s arguments, keeps --listen and
# --data, and runs the floor named by FLOOR_MODE (bare or durable; durable appends its lines to
# training_data.jsonl in the data folder, where the kit counts tripline's).
#   FLOOR_MODE=durable ../shared/bench/compare.sh --tripline bench/floor-as-tripline.sh --only tripline
set -euo pipefail
listen="" data=""
while [ $# -gt 0 ]; do
  case $1 in
    --listen) listen=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    *) shift ;;
  esac
done
floor=$(dirname "$0")/../target/release/examples/floor
case ${FLOOR_MODE:-bare} in
  bare) exec "$floor" "$listen" bare ;;
  durable) mkdir -p "$data"; exec "$floor" "$listen" durable "$data/training_data.jsonl" ;;
  *) echo "FLOOR_MODE is bare or durable" >&2; exit 2 ;;
esac
