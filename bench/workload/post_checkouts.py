"""Posts COUNT checkout_started events (one cart each, 100 per body) to URL/webhook over one
keep-alive connection, for bench/waits.sh. The events carry the person of the shared kit's
generation_failed body, so a stored wait is the size of a real one."""
import http.client
import json
import sys
import urllib.parse

url, count, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3]
kit = json.load(open(sys.argv[4]))
person = kit["person"]
target = urllib.parse.urlsplit(url)
conn = http.client.HTTPConnection(target.hostname, target.port)
sent = 0
while sent < count:
    n = min(100, count - sent)
    events = [
        {
            "event": "checkout_started",
            "uuid": f"{prefix}-{sent + i}",
            "distinct_id": f"user_{(sent + i) % 100000}",
            "properties": {"cart_id": f"{prefix}-cart-{sent + i}", "total": 59.9, "$lib": "posthog-js"},
            "person": person,
        }
        for i in range(n)
    ]
    conn.request("POST", "/webhook", json.dumps(events), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    body = reply.read()
    if reply.status != 200:
        sys.exit(f"POST failed: {reply.status} {body[:300]!r}")
    sent += n
