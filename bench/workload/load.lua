-- wrk script for bench/http.sh: POSTs PostHog webhook bodies and counts what was acknowledged.
-- Based on ../shared/bench/workload/post.lua (same RESULT line), with what the issue's workloads need:
--   BODY_FILE   body with __UUID__ (a fresh uuid per request) and optionally __USER__
--   USERS       __USER__ becomes "u<N>", N uniform in [0, USERS) (default 100000)
--   OTHER_FILE  a second body, sent instead of BODY_FILE for a share OTHER_SHARE (0..1) of requests
--   FIRED       a rule name: RESULT counts the 2xx answers whose "fired" list names it (acked effects)
--   RUN         a number unique to this run (uuids never repeat across runs or threads)
--   AUTH        sent as a bearer token when set
local function read(path)
  local f = assert(io.open(path, "rb")); local s = f:read("*a"); f:close(); return s
end
local main = read(os.getenv("BODY_FILE"))
local other = os.getenv("OTHER_FILE") and read(os.getenv("OTHER_FILE"))
local other_share = tonumber(os.getenv("OTHER_SHARE") or "0")
local users = tonumber(os.getenv("USERS") or "100000")
local fired_rule = os.getenv("FIRED")
local auth = os.getenv("AUTH")
local run = tonumber(os.getenv("RUN") or "0") % 0x100000000

local threads = {}
function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

n, acked, fired = 0, 0, 0  -- globals: done() reads them with thread:get
function init()
  math.randomseed(run + 7919 * id)
end

function request()
  n = n + 1
  local uuid = string.format("%08x-%04x-7000-8000-%012x", run, id, n)
  local body = main
  if other and math.random() < other_share then body = other end
  body = body:gsub("__UUID__", uuid, 1):gsub("__USER__", "u" .. math.random(0, users - 1))
  local headers = { ["Content-Type"] = "application/json" }
  if auth then headers["Authorization"] = "Bearer " .. auth end
  return wrk.format("POST", "/webhook", headers, body)
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    acked = acked + 1
    -- Only the "fired" list: the reply also names rules held back ("suppressed").
    local list = fired_rule and body:match('"fired":%[(.-)%]')
    if list and list:find('"' .. fired_rule .. '"', 1, true) then fired = fired + 1 end
  end
end

function done(summary, latency, requests)
  local total_acked, total_fired = 0, 0
  for _, t in ipairs(threads) do
    total_acked = total_acked + t:get("acked")
    total_fired = total_fired + t:get("fired")
  end
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d rps=%.1f p50_ms=%.3f p99_ms=%.3f p999_ms=%.3f non2xx=%d errors=%d acked=%d fired=%d\n",
    summary.requests, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency:percentile(99.9) / 1000,
    e.status, e.connect + e.read + e.write + e.timeout, total_acked, total_fired))
end
