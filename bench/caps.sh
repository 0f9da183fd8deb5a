#!/usr/bin/env bash
# State size and memory of a daily cap over many recipients, on the release binary:
#
#   bench/caps.sh [USERS]        (default 1000000)
#
# `tripline replay --execute-into DIR` of USERS feature_used events, each from a different user,
# through one rule whose actions count against a cap group (at most 1 a day per user, in each
# user's zone from a person property, UTC otherwise): USERS cap keys in a real state database.
# Its size on disk; then `tripline serve` on that folder, its resident memory idle and after
# 3 s of load from 1,000,000 users (wrk).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
N=${1:-1000000}
cargo build --release --quiet --bin tripline
TRIPLINE=$ROOT/target/release/tripline
DATA=$ROOT/target/bench-data
mkdir -p "$DATA"
WORK=$(mktemp -d /tmp/tripline-caps.XXXXXX)
SERVER=""
trap '[ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; rm -rf "$WORK"' EXIT

events=$DATA/capped-users-$N.jsonl
[ -f "$events" ] || python3 - "$N" "$events" <<'PY'
import json, sys
n, path = int(sys.argv[1]), sys.argv[2]
zones = ["Europe/Paris", "America/New_York", "Asia/Tokyo", None]
with open(path, "w") as f:
    for i in range(n):
        person = {"email": f"user-{i}@example.com"}
        if zones[i % 4]:
            person["$geoip_time_zone"] = zones[i % 4]
        f.write(json.dumps({"uuid": f"0197a3f2-0000-7000-9000-{i:012x}", "event": "feature_used",
                            "distinct_id": f"user-{i}", "timestamp": "2026-03-02T10:00:00Z",
                            "properties": {"feature_name": "export"}, "person": {"properties": person}},
                           separators=(",", ":")) + "\n")
PY

mkdir -p "$WORK/rules"
cat >"$WORK/rules/_caps.toml" <<'TOML'
[daily]
at_most = 1
per_period = "day"
timezone = "person.properties.$geoip_time_zone"
TOML
cat >"$WORK/rules/capped.toml" <<'TOML'
name = "capped"
[when]
event = "feature_used"
[limits]
cap_group = "daily"
[jsonl]
file = "capped.jsonl"
fields = { who = "distinct_id" }
TOML

[ -x /usr/bin/time ] || { echo "installing GNU time (Debian)" >&2; apt-get install -y -qq time >/dev/null; }
echo "== $N recipients under a daily cap (replay --execute-into)" >&2
/usr/bin/time -f 'wall=%e maxrss_kb=%M' -o "$WORK/replay.time" \
  "$TRIPLINE" replay "$events" --rules "$WORK/rules" --templates templates --execute-into "$WORK/data" >"$WORK/replay.log" 2>&1 \
  || { cat "$WORK/replay.log" >&2; exit 1; }
wall=$(sed -n 's/.*wall=\([^ ]*\).*/\1/p' "$WORK/replay.time")
rss=$(sed -n 's/.*maxrss_kb=\([^ ]*\).*/\1/p' "$WORK/replay.time")
lines=$(wc -l <"$WORK/data/capped.jsonl")
db_mb=$(du -sm "$WORK/data/tripline.redb" | cut -f1)

echo "== serve on those keys" >&2
port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
TRIPLINE_LOG=warn "$TRIPLINE" serve --listen "127.0.0.1:$port" --rules "$WORK/rules" --templates templates \
  --data "$WORK/data" --rate-limit 1000000 --rate-limit-burst 1000000 >"$WORK/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
idle_rss=$(($(ps -o rss= -p "$SERVER") / 1024))
command -v wrk >/dev/null || { echo "installing wrk (Debian)" >&2; apt-get install -y -qq wrk >/dev/null; }
env RUN="$(date +%s%N)" BODY_FILE="$ROOT/bench/workload/feature_used.json" USERS=1000000 \
  wrk -t1 -c8 -d3s -s bench/workload/load.lua "http://127.0.0.1:$port" >/dev/null
serve_rss=$(($(ps -o rss= -p "$SERVER") / 1024))

echo
echo "$N recipients, $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ), tripline $(git rev-parse --short HEAD)"
printf '%-48s %14s\n' measure value
printf '%-48s %14s\n' "lines written (one per recipient, capped after)" "$lines"
printf '%-48s %14.0f\n' "replay --execute-into: events/s" "$(awk -v n="$N" -v w="$wall" 'BEGIN { print n / w }')"
printf '%-48s %14s\n' "replay --execute-into: peak memory (MB)" "$((rss / 1024))"
printf '%-48s %14s\n' "state database on disk (MB)" "$db_mb"
printf '%-48s %14.0f\n' "bytes per recipient (database / recipients)" "$(awk -v d="$db_mb" -v n="$N" 'BEGIN { print d * 1048576 / n }')"
printf '%-48s %14s\n' "serve on it, idle: resident memory (MB)" "$idle_rss"
printf '%-48s %14s\n' "serve on it, after 3 s of load: RSS (MB)" "$serve_rss"
