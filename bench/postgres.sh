#!/usr/bin/env bash
# tripline on PostgreSQL, in one run (issue 21): PostgreSQL's own commit rate on this disk
# (pgbench, the floor), one instance on PostgreSQL against one on redb (sanitize and threshold),
# and 1, 2 and 3 instances sharing one database (sanitize: total req/s, worst p99). Each tripline
# starts fresh; afterwards what is on disk is compared with what was acknowledged, as in
# bench/http.sh. Uses the throw-away server of scripts/postgres.sh (fsync on, as shipped).
#
#   bench/postgres.sh [--seconds N] [--connections N]
#
# pgbench-1    one client committing a one-row INSERT after another: the latency of a commit
# pgbench      CONNECTIONS clients at once: the commits a second the server groups on this disk
# redb-*       one instance, the embedded store; pg-* one instance on PostgreSQL
# pg-*-xN     N instances on one database (sanitize, threshold), wrk on each with
#             CONNECTIONS/N connections
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECS=10 CONNS=32
while [ $# -gt 0 ]; do
  case $1 in
    --seconds) SECS=$2; shift 2 ;;
    --connections) CONNS=$2; shift 2 ;;
    *) echo "unknown option $1 (see the top of $0)" >&2; exit 2 ;;
  esac
done
if ! command -v wrk >/dev/null; then
  echo "installing wrk (Debian)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi
source scripts/postgres.sh
[ -n "${TRIPLINE_TEST_POSTGRES:-}" ] || { echo "no PostgreSQL: nothing to measure" >&2; exit 1; }
SERVER=$TRIPLINE_TEST_POSTGRES
BASE=${SERVER%/*}
cargo build --release --quiet --bin tripline
TRIPLINE=$ROOT/target/release/tripline
WORKLOAD=$ROOT/bench/workload
WORK=$(mktemp -d /tmp/tripline-pg.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
  stop_test_postgres
}
trap cleanup EXIT

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<" $2"; }
count_lines() { cat "$@" 2>/dev/null | wc -l; }
count_emails() { find "$@" -maxdepth 1 -name '*.eml' 2>/dev/null | wc -l; }
sql() { "$TRIPLINE_TEST_PGBIN/psql" "$1" -X -q -A -t -c "$2"; }

# start NAME STORE -> adds to URLS and DIRS: a fresh tripline on a free port
URLS=() DIRS=()
start() {
  local name=$1 store=$2 port dir
  port=$(free_port)
  dir=$WORK/$name
  mkdir -p "$dir/data"
  TRIPLINE_LOG=warn "$TRIPLINE" serve --listen "127.0.0.1:$port" --rules "$ROOT/rules" \
    --templates "$ROOT/templates" --data "$dir/data" --store "$store" \
    --rate-limit 1000000 --rate-limit-burst 1000000 >"$dir/log" 2>&1 &
  PIDS+=("$!")
  for _ in $(seq 1 100); do
    if curl -s -o /dev/null -X POST --data-binary @"$WORKLOAD/no_match.json" "http://127.0.0.1:$port/webhook"; then
      URLS+=("http://127.0.0.1:$port") DIRS+=("$dir")
      return
    fi
    sleep 0.1
  done
  echo "$name did not start; its log:" >&2
  cat "$dir/log" >&2
  exit 1
}
stop_all() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  PIDS=() URLS=() DIRS=()
}
new_database() {
  local name=bench_$1
  sql "$SERVER" "DROP DATABASE IF EXISTS $name" >/dev/null
  sql "$SERVER" "CREATE DATABASE $name" >/dev/null
  echo "$BASE/$name"
}

# load SECONDS BODY CONNECTIONS [VAR=VALUE...]: wrk on every instance at once, CONNECTIONS in
# all; prints one RESULT line: the sums, and the worst of each latency.
load() {
  local secs=$1 body=$2 conns=$3; shift 3
  local n=${#URLS[@]} out=() loads=() i
  for i in $(seq 0 $((n - 1))); do
    out+=("$WORK/wrk.$i")
    env RUN="$(date +%s%N)$i" BODY_FILE="$WORKLOAD/$body" "$@" \
      wrk -t$((n == 1 ? 2 : 1)) -c$((conns / n)) -d"${secs}s" --latency -s "$WORKLOAD/load.lua" \
      "${URLS[$i]}" | sed -n 's/^RESULT //p' >"$WORK/wrk.$i" &
    loads+=("$!")
  done
  wait "${loads[@]}"
  awk '{ for (i = 1; i <= NF; i++) { split($i, kv, "="); k = kv[1]; v = kv[2];
           if (k ~ /_ms$/) { if (v > m[k]) m[k] = v } else s[k] += v } }
       END { printf "rps=%s p50_ms=%s p99_ms=%s p999_ms=%s non2xx=%d errors=%d acked=%d fired=%d\n",
             s["rps"], m["p50_ms"], m["p99_ms"], m["p999_ms"], s["non2xx"], s["errors"], s["acked"], s["fired"] }' "${out[@]}"
}

ROWS=()
FLOOR=""
row() {
  local name=$1 res=$2 written=$3 notes=$4 verdict=ok share=-
  local rps effects non2xx errors
  rps=$(field rps "$res"); effects=$(field fired "$res")
  non2xx=$(field non2xx "$res"); errors=$(field errors "$res")
  if [ "$non2xx" != 0 ] || [ "$errors" != 0 ] || [ "$written" -lt "$effects" ] ||
     [ "$written" -gt $((effects + CONNS)) ]; then verdict=FAIL; fi
  [ -n "$FLOOR" ] && share=$(awk -v a="$rps" -v b="$FLOOR" 'BEGIN { printf "%.0f%%", 100 * a / b }')
  ROWS+=("$(printf '%-18s %9.0f %7s %7s %8s %6s %6s %8s %8s %8s %5s %9s  %s' "$name" "$rps" \
    "$(field p50_ms "$res")" "$(field p99_ms "$res")" "$(field p999_ms "$res")" "$non2xx" "$errors" \
    "$(field acked "$res")" "$effects" "$written" "$verdict" "$share" "$notes")")
  echo "${ROWS[-1]}" >&2
}

# The floor: PostgreSQL's commits a second on this disk.
echo "== pgbench" >&2
PGB=$(new_database pgbench)
sql "$PGB" "CREATE TABLE commits (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())"
echo "INSERT INTO commits DEFAULT VALUES;" >"$WORK/commit.sql"
for clients in 1 "$CONNS"; do
  tps=$("$TRIPLINE_TEST_PGBIN/pgbench" -n -c "$clients" -j $((clients > 1 ? 2 : 1)) -T "$SECS" \
    -f "$WORK/commit.sql" "$PGB" 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
  name=pgbench; [ "$clients" = 1 ] && name=pgbench-1
  ROWS+=("$(printf '%-18s %9.0f %7s %7s %8s %6s %6s %8s %8s %8s %5s %9s  %s' "$name" "$tps" - - - - - - - - - - \
    "commits/s, $clients client(s), one-row INSERT each")")
  echo "${ROWS[-1]}" >&2
  [ "$clients" = "$CONNS" ] && FLOOR=$tps
done

# One instance, each store, the same two workloads.
for store in redb postgres; do
  for w in sanitize threshold; do
    name=${store/postgres/pg}-$w
    echo "== $name" >&2
    url=redb; [ "$store" = postgres ] && url=$(new_database "${name//-/_}")
    start "$name" "$url"
    dir=${DIRS[0]}
    if [ "$w" = sanitize ]; then
      load 2 generation_failed.json "$CONNS" >/dev/null
      sleep 1
      before=$(count_lines "$dir/data/training_data.jsonl")
      res=$(load "$SECS" generation_failed.json "$CONNS" FIRED=training-data)
      sleep 1
      row "$name" "$res" $(($(count_lines "$dir/data/training_data.jsonl") - before)) ""
    else
      load 2 feature_used.json "$CONNS" >/dev/null
      sleep 2
      before=$(count_emails "$dir/data/outbox")
      res=$(load "$SECS" feature_used.json "$CONNS" USERS=100000 FIRED=power-user-discount)
      sleep 3
      row "$name" "$res" $(($(count_emails "$dir/data/outbox") - before)) ""
    fi
    stop_all
  done
done

# 1, 2 and 3 instances on one database: sanitize (every batch writes one shared file) and
# threshold (every batch counts per user).
for w in sanitize threshold; do
  for n in 1 2 3; do
    name=pg-$w-x$n
    echo "== $name" >&2
    url=$(new_database "${w}_x$n")
    for i in $(seq 1 "$n"); do start "$name-$i" "$url"; done
    files=() outboxes=()
    for d in "${DIRS[@]}"; do
      files+=("$d/data/training_data.jsonl") outboxes+=("$d/data/outbox")
    done
    if [ "$w" = sanitize ]; then
      load 2 generation_failed.json "$CONNS" >/dev/null
      sleep 1
      before=$(count_lines "${files[@]}")
      res=$(load "$SECS" generation_failed.json "$CONNS" FIRED=training-data)
      sleep 2
      written=$(($(count_lines "${files[@]}") - before))
    else
      load 2 feature_used.json "$CONNS" >/dev/null
      sleep 2
      before=$(count_emails "${outboxes[@]}")
      res=$(load "$SECS" feature_used.json "$CONNS" USERS=100000 FIRED=power-user-discount)
      sleep 3
      written=$(($(count_emails "${outboxes[@]}") - before))
    fi
    conflicts=0
    for u in "${URLS[@]}"; do
      c=$(curl -s "$u/metrics" | awk '$1 == "tripline_batches_conflicted_total" { print $2 }')
      conflicts=$((conflicts + ${c:-0}))
    done
    row "$name" "$res" "$written" "$conflicts batches run again"
    stop_all
  done
done

echo
echo "wrk, $CONNS connections in all, ${SECS}s, on $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ), tripline $(git rev-parse --short HEAD), PostgreSQL $("$TRIPLINE_TEST_PGBIN/postgres" --version | awk '{print $3}')"
printf '%-18s %9s %7s %7s %8s %6s %6s %8s %8s %8s %5s %9s  %s\n' workload req/s p50_ms p99_ms p99.9_ms non2xx errors \
  acked effects written check "of commits" notes
printf '%s\n' "${ROWS[@]}"
