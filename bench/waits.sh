#!/usr/bin/env bash
# Pending waits ([wait]) under load, with the release binary, wrk and the shipped rules plus one
# waiting rule (checkout_started → wait, per cart, unless order_completed → a JSONL line).
#
#   bench/waits.sh [--seconds N] [--pending N] [--due N]
#
# 1. pending   N waits (100,000) pending for an hour: the service's memory (RSS) and the
#              database's size on disk, before and after.
# 2. sanitize  the sanitize workload of bench/http.sh (wrk -t2 -c32) on a service with no waits
#              and on the one holding the N pending waits, alternated twice; the ratio of the
#              medians is the cost of the pending waits.
# 3. due       N waits (10,000) coming due in the same second while the sanitize load runs:
#              how long from their deadline (plus the 1 s grace) until the last one's line is
#              written, and /webhook's p50/p99 meanwhile, against the same load with no waits due.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECS=10 PENDING=100000 DUE=10000 CONNS=32
while [ $# -gt 0 ]; do
  case $1 in
    --seconds) SECS=$2; shift 2 ;;
    --pending) PENDING=$2; shift 2 ;;
    --due) DUE=$2; shift 2 ;;
    *) echo "unknown option $1 (see the top of $0)" >&2; exit 2 ;;
  esac
done
if ! command -v wrk >/dev/null; then
  echo "installing wrk (Debian)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi
cargo build --release --quiet --bin tripline
TRIPLINE=$ROOT/target/release/tripline
WORKLOAD=$ROOT/bench/workload
WORK=$(mktemp -d /tmp/tripline-waits.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<" $2"; }
count_lines() { if [ -f "$1" ]; then wc -l <"$1"; else echo 0; fi; }
rss_mb() { echo $(($(ps -o rss= -p "$1" | tr -d ' ') / 1024)); }
db_mb() { du -m "$1/data/tripline.redb" | cut -f1; }

# start NAME WAIT_FOR -> sets URL, PID, DIR: a fresh tripline whose waiting rule waits WAIT_FOR.
start() {
  local name=$1 wait_for=$2 port
  port=$(free_port)
  DIR=$WORK/$name
  mkdir -p "$DIR/data"
  cp -r "$ROOT/rules" "$DIR/rules"
  cat >"$DIR/rules/bench_wait.toml" <<RULE
name = "bench-abandoned"
[when]
event = "checkout_started"
[wait]
for = "$wait_for"
same = ["distinct_id", "properties.cart_id"]
unless = { event = "order_completed" }
[jsonl]
file = "waits.jsonl"
fields = { cart = "properties.cart_id" }
RULE
  TRIPLINE_LOG=warn "$TRIPLINE" serve --listen "127.0.0.1:$port" --rules "$DIR/rules" \
    --templates "$ROOT/templates" --data "$DIR/data" --wait-grace 1s \
    --rate-limit 1000000 --rate-limit-burst 1000000 >"$DIR/log" 2>&1 &
  PID=$!
  PIDS+=("$PID")
  URL=http://127.0.0.1:$port
  for _ in $(seq 1 100); do
    if curl -s -o /dev/null -X POST --data-binary @"$WORKLOAD/no_match.json" "$URL/webhook" 2>/dev/null; then return; fi
    sleep 0.1
  done
  echo "$name did not start; its log:" >&2
  cat "$DIR/log" >&2
  exit 1
}

# sanitize SECONDS -> wrk's RESULT line for the sanitize workload against $URL
sanitize() {
  env RUN="$(date +%s%N)" BODY_FILE="$WORKLOAD/generation_failed.json" FIRED=training-data \
    wrk -t2 -c"$CONNS" -d"${1}s" --latency -s "$WORKLOAD/load.lua" "$URL" | sed -n 's/^RESULT //p'
}

post_checkouts() { python3 "$WORKLOAD/post_checkouts.py" "$URL" "$1" "$2" "$WORKLOAD/generation_failed.json"; }

echo "== 1. $PENDING pending waits" >&2
start plain "1 hour"; PLAIN_URL=$URL; PLAIN_PID=$PID
start waiting "1 hour"; WAITING_URL=$URL; WAITING_PID=$PID; WAITING_DIR=$DIR
rss0=$(rss_mb "$PID"); db0=$(db_mb "$DIR")
t0=$(date +%s.%N)
post_checkouts "$PENDING" pending
t1=$(date +%s.%N)
sleep 1
pending=$(curl -s "$URL/metrics" | awk '$1 == "tripline_waits_pending{rule=\"bench-abandoned\"}" { print $2 }')
rss1=$(rss_mb "$PID"); db1=$(db_mb "$DIR")
printf 'pending waits: %s, started in %.1f s; RSS %s MB -> %s MB; database %s MB -> %s MB (%.0f bytes per wait)\n' \
  "$pending" "$(echo "$t1 - $t0" | bc)" "$rss0" "$rss1" "$db0" "$db1" \
  "$(echo "($db1 - $db0) * 1048576 / $PENDING" | bc)"

echo "== 2. sanitize with and without $PENDING pending waits" >&2
URL=$PLAIN_URL; sanitize 2 >/dev/null
URL=$WAITING_URL; sanitize 2 >/dev/null
plain=() waiting=()
for round in 1 2; do
  URL=$PLAIN_URL; r=$(sanitize "$SECS"); plain+=("$(field rps "$r")"); echo "round $round plain   $r" >&2
  URL=$WAITING_URL; r=$(sanitize "$SECS"); waiting+=("$(field rps "$r")"); echo "round $round waiting $r" >&2
done
printf 'sanitize req/s, no waits: %s; with %s pending waits: %s; ratio of the means %.3f\n' \
  "${plain[*]}" "$PENDING" "${waiting[*]}" \
  "$(echo "(${waiting[0]} + ${waiting[1]}) / (${plain[0]} + ${plain[1]})" | bc -l)"
printf 'RSS after the load: no waits %s MB, with waits %s MB\n' "$(rss_mb "$PLAIN_PID")" "$(rss_mb "$WAITING_PID")"
kill "$PLAIN_PID" "$WAITING_PID"

echo "== 3. $DUE waits due at once, under the sanitize load" >&2
start baseline "1 hour"
sanitize 2 >/dev/null
base=$(sanitize 20)
kill "$PID"
start due "15 seconds"
sanitize 2 >/dev/null
posted=$(date +%s.%N)
post_checkouts "$DUE" due
out=$DIR/data/waits.jsonl
( sanitize 20 >"$DIR/wrk" ) &
WRK=$!
first="" last=""
while [ "$(count_lines "$out")" -lt "$DUE" ]; do
  [ -z "$first" ] && [ "$(count_lines "$out")" -gt 0 ] && first=$(date +%s.%N)
  sleep 0.05
done
last=$(date +%s.%N)
wait "$WRK"
due=$(cat "$DIR/wrk")
late=$(curl -s "$URL/metrics" | awk '$1 == "tripline_wait_lateness_seconds_sum" { s = $2 } $1 == "tripline_wait_lateness_seconds_count" { c = $2 } END { if (c) printf "%.2f", s / c }')
printf '%s waits posted; first line %.1f s and last %.1f s after the first post (the first deadline plus grace is 16 s after it); mean lateness %s s\n' \
  "$DUE" "$(echo "$first - $posted" | bc)" "$(echo "$last - $posted" | bc)" "$late"
printf '/webhook under sanitize load (20 s): no waits due: %s req/s p50 %s ms p99 %s ms; %s due meanwhile: %s req/s p50 %s ms p99 %s ms\n' \
  "$(field rps "$base")" "$(field p50_ms "$base")" "$(field p99_ms "$base")" \
  "$DUE" "$(field rps "$due")" "$(field p50_ms "$due")" "$(field p99_ms "$due")"
