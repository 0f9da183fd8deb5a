#!/usr/bin/env bash
# HTTP load against the release binary, every 2xx a durable acknowledgement, with wrk (Debian).
# Each workload runs against a fresh tripline on the shipped rules and templates; afterwards the
# lines and emails on disk are compared with what was acknowledged. Prints one table.
#
#   bench/http.sh [--seconds N] [--connections N] [--only floor,parse,durable,sanitize,...]
#
# floor      bench/floor.rs: a bare axum handler that reads the body and answers 200 (the ceiling
#            of any server on this machine; "of floor" is each workload's share of it)
# parse      the same handler also parsing the body as JSON: what reading any field costs
# durable    the same, appending one line per request to a file, answered once synced (group
#            commit): the ceiling of any server whose 2xx means "on disk", on this disk
# sanitize   generation_failed → training_data.jsonl (shared kit's body, fresh uuid per request)
# threshold  feature_used from 100,000 distinct users → count per user → email at the 5th, once
# mixed      99% $pageview (no rule matches), 1% generation_failed
# reload     sanitize while rules/training_data.toml is rewritten 10 times a second
# sanitize-interval, threshold-interval
#            the same with --durability interval (a 2xx once written to the operating system,
#            synced every 100 ms: a killed process loses nothing, a power loss the last 100 ms)
#
# "acked" is the 2xx answers; "effects" the acked answers whose reply names the rule that fired;
# "written" the lines (or emails) that appeared on disk. A request still in flight when wrk
# stops may be applied without being acknowledged, so written may exceed effects by at most
# the number of connections; it may never be smaller. non2xx and errors must be 0.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECS=10 CONNS=32 ONLY=floor,parse,durable,sanitize,threshold,mixed,reload,sanitize-interval,threshold-interval
while [ $# -gt 0 ]; do
  case $1 in
    --seconds) SECS=$2; shift 2 ;;
    --connections) CONNS=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    *) echo "unknown option $1 (see the top of $0)" >&2; exit 2 ;;
  esac
done
if ! command -v wrk >/dev/null; then
  echo "installing wrk (Debian)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi
cargo build --release --quiet --bin tripline --example floor
TRIPLINE=$ROOT/target/release/tripline
FLOOR=$ROOT/target/release/examples/floor
WORKLOAD=$ROOT/bench/workload
WORK=$(mktemp -d /tmp/tripline-http.XXXXXX)
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
count_emails() { find "$1" -maxdepth 1 -name '*.eml' 2>/dev/null | wc -l; }
metric() { curl -s "$1/metrics" | awk -v m="$2" '$1 == m { print $2 }' | tail -1; }

# start NAME -> sets URL, PID, DIR; a fresh tripline (or the floor) on a free port.
start() {
  local name=$1 port
  port=$(free_port)
  DIR=$WORK/$name
  mkdir -p "$DIR/data"
  cp -r "$ROOT/rules" "$DIR/rules"
  if [ "$name" = floor ] || [ "$name" = parse ]; then
    "$FLOOR" "127.0.0.1:$port" "${name/floor/bare}" >"$DIR/log" 2>&1 &
  elif [ "$name" = durable ]; then
    "$FLOOR" "127.0.0.1:$port" durable "$DIR/data/lines" >"$DIR/log" 2>&1 &
  else
    local durability=sync
    [[ $name == *-interval ]] && durability=interval
    TRIPLINE_LOG=warn "$TRIPLINE" serve --listen "127.0.0.1:$port" --rules "$DIR/rules" \
      --templates "$ROOT/templates" --data "$DIR/data" --durability "$durability" \
      --rate-limit 1000000 --rate-limit-burst 1000000 >"$DIR/log" 2>&1 &
  fi
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

# load SECONDS BODY [VAR=VALUE...] -> prints wrk's RESULT line
load() {
  local secs=$1 body=$2; shift 2
  env RUN="$(date +%s%N)" BODY_FILE="$WORKLOAD/$body" "$@" \
    wrk -t2 -c"$CONNS" -d"${secs}s" --latency -s "$WORKLOAD/load.lua" "$URL" | sed -n 's/^RESULT //p'
}

wait_outbox_empty() {
  for _ in $(seq 1 300); do
    [ "$(metric "$URL" tripline_outbox_pending)" = 0 ] && return
    sleep 0.1
  done
}

ROWS=()
FLOOR_RPS=""
# row NAME RESULT WRITTEN CHECK_NOTES
row() {
  local name=$1 res=$2 written=$3 notes=$4
  local rps acked effects non2xx errors verdict=ok share="-"
  rps=$(field rps "$res"); acked=$(field acked "$res"); effects=$(field fired "$res")
  non2xx=$(field non2xx "$res"); errors=$(field errors "$res")
  if [ "$name" = floor ]; then effects=- written=-; FLOOR_RPS=$rps
  elif [ "$name" = parse ]; then effects=- written=-
  elif [ "$name" = durable ]; then effects=$acked
    [ "$non2xx" = 0 ] && [ "$errors" = 0 ] && [ "$written" -ge "$acked" ] || verdict=FAIL
  elif [ "$non2xx" != 0 ] || [ "$errors" != 0 ] || [ "$written" -lt "$effects" ] ||
       [ "$written" -gt $((effects + CONNS)) ]; then verdict=FAIL
  fi
  if [ -n "$FLOOR_RPS" ] && [ "$name" != floor ]; then
    share=$(awk -v a="$rps" -v b="$FLOOR_RPS" 'BEGIN { printf "%.0f%%", 100 * a / b }')
  fi
  ROWS+=("$(printf '%-18s %9.0f %7s %7s %8s %6s %6s %8s %8s %8s %5s %8s  %s' "$name" "$rps" \
    "$(field p50_ms "$res")" "$(field p99_ms "$res")" "$(field p999_ms "$res")" "$non2xx" "$errors" \
    "$acked" "$effects" "$written" "$verdict" "$share" "$notes")")
  echo "${ROWS[-1]}" >&2
}

stop() { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }
rss_mb() { echo $(($(ps -o rss= -p "$PID" | tr -d ' ') / 1024)); }

IFS=, read -ra WANT <<<"$ONLY"
for w in "${WANT[@]}"; do
  echo "== $w" >&2
  case $w in
    floor)
      start floor
      load 2 generation_failed.json >/dev/null
      res=$(load "$SECS" generation_failed.json)
      row floor "$res" 0 "rss $(rss_mb)MB"
      stop ;;
    parse | durable)
      start "$w"
      load 2 generation_failed.json >/dev/null
      before=$(count_lines "$DIR/data/lines")
      res=$(load "$SECS" generation_failed.json)
      row "$w" "$res" $(($(count_lines "$DIR/data/lines") - before)) "rss $(rss_mb)MB"
      stop ;;
    sanitize | reload | sanitize-interval)
      start "$w"
      out=$DIR/data/training_data.jsonl
      load 2 generation_failed.json >/dev/null
      sleep 1
      before=$(count_lines "$out")
      reloads_before=$(metric "$URL" 'tripline_rules_reloads_total{result="ok"}')
      writer=""
      if [ "$w" = reload ]; then
        ( i=0; while :; do
            i=$((i + 1))
            sed "s/^description = .*/description = \"rewritten by bench\/http.sh, version $i\"/" \
              "$ROOT/rules/training_data.toml" >"$DIR/rules/.training_data.toml.tmp"
            mv "$DIR/rules/.training_data.toml.tmp" "$DIR/rules/training_data.toml"
            sleep 0.1
          done ) &
        writer=$!
      fi
      res=$(load "$SECS" generation_failed.json FIRED=training-data)
      [ -n "$writer" ] && { kill "$writer"; wait "$writer" 2>/dev/null || true; }
      sleep 1
      notes="rss $(rss_mb)MB"
      if [ "$w" = reload ]; then
        reloads=$(awk -v a="$(metric "$URL" 'tripline_rules_reloads_total{result="ok"}')" -v b="${reloads_before:-0}" 'BEGIN { print a - b }')
        failed=$(metric "$URL" 'tripline_rules_reloads_total{result="failed"}')
        notes="$notes, $reloads reloads, ${failed:-0} failed"
      fi
      row "$w" "$res" $(($(count_lines "$out") - before)) "$notes"
      stop ;;
    threshold | threshold-interval)
      start "$w"
      outbox=$DIR/data/outbox
      load 2 feature_used.json >/dev/null
      wait_outbox_empty
      before=$(count_emails "$outbox")
      res=$(load "$SECS" feature_used.json USERS=100000 FIRED=power-user-discount)
      sleep 1
      wait_outbox_empty
      written=$(($(count_emails "$outbox") - before))
      total=$(count_emails "$outbox")
      distinct=$(find "$outbox" -maxdepth 1 -name '*.eml' -exec grep -h '^To: ' {} + | sort -u | wc -l)
      once=ok; [ "$distinct" = "$total" ] || once="FAIL: $total emails to $distinct addresses"
      row "$w" "$res" "$written" "rss $(rss_mb)MB, email once per user: $once"
      stop ;;
    mixed)
      start mixed
      out=$DIR/data/training_data.jsonl
      load 2 no_match.json OTHER_FILE="$WORKLOAD/generation_failed.json" OTHER_SHARE=0.01 >/dev/null
      sleep 1
      before=$(count_lines "$out")
      res=$(load "$SECS" no_match.json OTHER_FILE="$WORKLOAD/generation_failed.json" OTHER_SHARE=0.01 FIRED=training-data)
      sleep 1
      row mixed "$res" $(($(count_lines "$out") - before)) "rss $(rss_mb)MB"
      stop ;;
    *) echo "unknown workload $w" >&2; exit 2 ;;
  esac
done

echo
echo "wrk -t2 -c$CONNS -d${SECS}s on $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ), tripline $(git rev-parse --short HEAD)"
printf '%-18s %9s %7s %7s %8s %6s %6s %8s %8s %8s %5s %8s  %s\n' workload req/s p50_ms p99_ms p99.9_ms non2xx errors \
  acked effects written check "of floor" notes
printf '%s\n' "${ROWS[@]}"
