#!/usr/bin/env bash
# Soak test of crash safety: runs the SIGKILL round of tests/durability.rs many times, in both
# durability modes (`sync`, then `interval`: there nothing acknowledged may be lost either, and
# "from the journal" marks a round where acknowledged batches not yet synced were run again).
# Each round sends 400 distinct events from 8 concurrent clients, kills the server with SIGKILL
# once a third is acknowledged, restarts it, re-sends every event not acknowledged (as PostHog
# would), and checks that every event is in the JSONL file exactly once, that the counter equals
# the number of distinct events, and that no email was sent twice. "kept them" marks a round
# where lines were written before the kill and not yet recorded (found whole at start, and kept).
#
#   bench/crash_soak.sh [ROUNDS]      (default 50)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-50}
TRIPLINE_CRASH_ROUNDS=$rounds cargo test --release --test durability sigkill -- --nocapture 2>&1 \
  | grep -E "crash round|kept them|from the journal|test result|panicked"
