#!/usr/bin/env bash
# Replay throughput and the cost of state, on the release binary and the shipped rules.
#
#   bench/scale.sh [EVENTS]        (default 1000000)
#
# replay    `tripline replay FILE` (dry run, state in memory), 3 times, over EVENTS PostHog events as JSON
#           lines (flat events as in a PostHog export, about 560 bytes each): 70% $pageview (no
#           rule), 20% feature_used by 100,000 users (counted; emails at the 5th), 10%
#           generation_failed (a JSONL line each). Events/s and peak memory.
# keys      `tripline replay --execute-into DIR` over EVENTS feature_used events from EVENTS
#           different users: that many counter keys in a real state database. Its size on disk;
#           then `tripline serve` on that folder takes 10,000 more events over HTTP, and its
#           resident memory is read.
# The event files are made once, under target/bench-data/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
N=${1:-1000000}
cargo build --release --quiet --bin tripline
TRIPLINE=$ROOT/target/release/tripline
DATA=$ROOT/target/bench-data
mkdir -p "$DATA"
WORK=$(mktemp -d /tmp/tripline-scale.XXXXXX)
SERVER=""
trap '[ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; rm -rf "$WORK"' EXIT

mixed=$DATA/mixed-$N.jsonl
distinct=$DATA/distinct-users-$N.jsonl
[ -f "$mixed" ] && [ -f "$distinct" ] || python3 - "$N" "$mixed" "$distinct" <<'EOF'
import json, random, sys
n, mixed, distinct = int(sys.argv[1]), sys.argv[2], sys.argv[3]
rnd = random.Random(6)
common = {"$lib": "web", "$lib_version": "1.255.1", "$os": "Mac OS X", "$browser": "Chrome",
          "$device_type": "Desktop", "$current_url": "https://app.example.com/projects/42/editor",
          "$pathname": "/projects/42/editor", "$session_id": "0197a3e9-1a2b-7c3d-8e4f-5a6b7c8d9e0f",
          "$geoip_country_code": "DE"}
def event(i, name, user, props):
    return json.dumps({"uuid": f"0197a3f2-0000-7000-8000-{i:012x}", "event": name, "distinct_id": user,
                       "timestamp": f"2026-03-01T{i // 3600000 % 24:02d}:{i // 60000 % 60:02d}:{i // 1000 % 60:02d}.{i % 1000:03d}Z",
                       "properties": dict(common, **props)}, separators=(",", ":"))
with open(mixed, "w") as f:
    for i in range(n):
        r = rnd.random()
        user = f"user-{rnd.randrange(100000)}"
        if r < 0.7:
            f.write(event(i, "$pageview", user, {"$referrer": "$direct", "$title": "Editor"}) + "\n")
        elif r < 0.9:
            f.write(event(i, "feature_used", user, {"feature_name": rnd.choice(["export", "share", "layers", "ai", "comments"]),
                                                      "email": f"{user}@example.com"}) + "\n")
        else:
            f.write(event(i, "generation_failed", user, {"failure_reason": "  timeout  ", "model": "floorplan-gen-v2",
                                                          "input_prompt": "generate a floorplan for a 2-bedroom apartment"}) + "\n")
with open(distinct, "w") as f:
    for i in range(n):
        f.write(event(i, "feature_used", f"user-{i}", {"feature_name": "export"}) + "\n")
EOF

# run LOG COMMAND... : wall seconds and peak memory (MB) of one command, from GNU time's format
run() {
  local log=$1; shift
  /usr/bin/time -f 'wall=%e maxrss_kb=%M' -o "$log.time" "$@" >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
  cat "$log.time"
}
[ -x /usr/bin/time ] || { echo "installing GNU time (Debian)" >&2; apt-get install -y -qq time >/dev/null; }

# Three runs, the median quoted: the first read after other work is often slower (page cache
# reclaimed, kernel copy time), which is noise of the machine, not of replay.
echo "== replay (dry run) of $N events, 3 runs" >&2
walls=() rss=0
for _ in 1 2 3; do
  r=$(run "$WORK/replay.log" "$TRIPLINE" replay "$mixed" --rules rules --templates templates)
  walls+=("$(sed -n 's/.*wall=\([^ ]*\).*/\1/p' <<<"$r")")
  m=$(sed -n 's/.*maxrss_kb=\([^ ]*\).*/\1/p' <<<"$r"); [ "$m" -gt "$rss" ] && rss=$m
done
mapfile -t sorted < <(printf '%s\n' "${walls[@]}" | sort -n)
fastest=${sorted[0]} wall=${sorted[1]} slowest=${sorted[2]}
grep -E "events|power-user|training" "$WORK/replay.log" | head -6 >&2

echo "== $N counter keys (replay --execute-into)" >&2
k=$(run "$WORK/keys.log" "$TRIPLINE" replay "$distinct" --rules rules --templates templates --execute-into "$WORK/keys")
kwall=$(sed -n 's/.*wall=\([^ ]*\).*/\1/p' <<<"$k"); krss=$(sed -n 's/.*maxrss_kb=\([^ ]*\).*/\1/p' <<<"$k")
disk_mb=$(du -sm "$WORK/keys" | cut -f1)
db_mb=$(du -sm "$WORK/keys/tripline.redb" | cut -f1)

echo "== serve on those $N keys, 10,000 more events" >&2
port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
TRIPLINE_LOG=warn "$TRIPLINE" serve --listen "127.0.0.1:$port" --rules rules --templates templates \
  --data "$WORK/keys" --rate-limit 1000000 --rate-limit-burst 1000000 >"$WORK/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
idle_rss=$(($(ps -o rss= -p "$SERVER") / 1024))
command -v wrk >/dev/null || { echo "installing wrk (Debian)" >&2; apt-get install -y -qq wrk >/dev/null; }
env RUN="$(date +%s%N)" BODY_FILE="$ROOT/bench/workload/feature_used.json" USERS=1000000 \
  wrk -t1 -c8 -d3s -s bench/workload/load.lua "http://127.0.0.1:$port" >/dev/null
serve_rss=$(($(ps -o rss= -p "$SERVER") / 1024))

echo
echo "$N events, $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ), tripline $(git rev-parse --short HEAD)"
printf '%-44s %14s\n' measure value
printf '%-44s %14.0f\n' "replay dry run: events/s (median of 3)" "$(awk -v n="$N" -v w="$wall" 'BEGIN { print n / w }')"
printf '%-44s %14s\n' "replay dry run: seconds (median of 3)" "$wall"
printf '%-44s %14s\n' "replay dry run: seconds (fastest, slowest)" "$fastest, $slowest"
printf '%-44s %14s\n' "replay dry run: peak memory (MB)" "$((rss / 1024))"
printf '%-44s %14.0f\n' "replay --execute-into, $N keys: events/s" "$(awk -v n="$N" -v w="$kwall" 'BEGIN { print n / w }')"
printf '%-44s %14s\n' "replay --execute-into: peak memory (MB)" "$((krss / 1024))"
printf '%-44s %14s\n' "state database on disk (MB)" "$db_mb"
printf '%-44s %14s\n' "data folder on disk (MB)" "$disk_mb"
printf '%-44s %14s\n' "serve on it, idle: resident memory (MB)" "$idle_rss"
printf '%-44s %14s\n' "serve on it, after 3 s of load: RSS (MB)" "$serve_rss"
