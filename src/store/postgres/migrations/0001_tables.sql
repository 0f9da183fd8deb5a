-- tripline's state on PostgreSQL, version 1. Times are the events' own (milliseconds since 1970,
-- `_ms`) or the service's clock (seconds since 1970, `_unix`).

-- Rule state: one row per key of [count] or [limits] (the key is the JSON list
-- [rule, kind, values...]): its counter, its window (event times, a period and its count, or
-- value digests), when the rule last acted, and the day (since 1970) an event last used it.
CREATE TABLE keys (
    key text PRIMARY KEY,
    count bigint NOT NULL,
    times bigint[] NOT NULL,
    acted_ms bigint,
    day bigint NOT NULL,
    -- Whose event made it, when the key holds their distinct id (GET and DELETE /users).
    owner text
);
CREATE INDEX keys_by_day ON keys (day);
CREATE INDEX keys_by_owner ON keys (owner) WHERE owner IS NOT NULL;

-- Event uuids handled, so that a retried delivery has no second effect, on any instance.
CREATE TABLE seen (
    uuid text PRIMARY KEY,
    at_unix bigint NOT NULL
);
CREATE INDEX seen_by_time ON seen (at_unix);

-- Standard Webhooks deliveries handled, by source and webhook-id.
CREATE TABLE delivery_ids (
    source text NOT NULL,
    id text NOT NULL,
    at_unix bigint NOT NULL,
    PRIMARY KEY (source, id)
);
CREATE INDEX delivery_ids_by_time ON delivery_ids (at_unix);

-- Pending waits ([wait], held actions, digests), as JSON.
CREATE TABLE waits (
    key text PRIMARY KEY,
    rule text NOT NULL,
    deadline_ms bigint NOT NULL,
    owner text,
    wait text NOT NULL
);
CREATE INDEX waits_by_deadline ON waits (deadline_ms);
CREATE INDEX waits_by_rule ON waits (rule);
CREATE INDEX waits_by_owner ON waits (owner) WHERE owner IS NOT NULL;

-- How many waits each rule has pending (changed with them, by difference).
CREATE TABLE waiting (
    rule text PRIMARY KEY,
    n bigint NOT NULL
);

-- JSONL output files: the number the next lines get (the row is locked from a batch's first
-- line for the file to its commit, so lines are numbered in commit order); how far the file is
-- written (its length once the lines up to `applied` are in it, in the copy of the data folder
-- `writer`, the last to write it: a row of its own, so that recording it never waits for the
-- batches numbering lines); and the lines committed and not yet in the file.
CREATE TABLE jsonl_files (
    file text PRIMARY KEY,
    next bigint NOT NULL
);
CREATE TABLE jsonl_progress (
    file text PRIMARY KEY,
    len bigint NOT NULL,
    applied bigint NOT NULL,
    writer text NOT NULL
);
CREATE TABLE jsonl_lines (
    file text NOT NULL,
    seq bigint NOT NULL,
    at_ms bigint NOT NULL,
    text text NOT NULL,
    PRIMARY KEY (file, seq)
);

-- Deliveries (emails, HTTP requests) waiting, with the lease of the instance attempting one.
CREATE TABLE outbox (
    id bigint PRIMARY KEY,
    lane text NOT NULL,
    next_attempt_unix bigint NOT NULL,
    -- The instance attempting it, if any: its claim holds while that instance's lease does.
    claimed_by text,
    person text,
    record text NOT NULL
);
CREATE INDEX outbox_due ON outbox (next_attempt_unix, id);
CREATE INDEX outbox_by_person ON outbox (person) WHERE person IS NOT NULL;
-- Finished deliveries: the newest delivered, and the newest failed for good, kept apart.
CREATE TABLE outbox_done (
    id bigint PRIMARY KEY,
    failed boolean NOT NULL,
    person text,
    record text NOT NULL,
    -- Ids are taken in blocks per instance: the newest are the last finished, not the highest.
    done_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX outbox_done_by_kind ON outbox_done (failed, done_at);
CREATE INDEX outbox_done_by_time ON outbox_done (done_at);
CREATE INDEX outbox_done_by_person ON outbox_done (person) WHERE person IS NOT NULL;
-- Delivery ids are taken by instances a block at a time: block n is n * 1000 to n * 1000 + 999.
CREATE SEQUENCE delivery_id_blocks;

-- Events [remember] rules keep, per person and rule, in time order.
CREATE TABLE remembered (
    who text NOT NULL,
    rule text NOT NULL,
    at_ms bigint NOT NULL,
    seq bigserial NOT NULL,
    expires_ms bigint NOT NULL,
    entry text NOT NULL,
    PRIMARY KEY (who, rule, at_ms, seq)
);
CREATE INDEX remembered_by_expiry ON remembered (expires_ms);

-- Why rules did or did not act on an event (GET /explain): the newest 100,000.
CREATE TABLE explained (
    seq bigserial PRIMARY KEY,
    uuid text NOT NULL,
    who text NOT NULL,
    record text NOT NULL
);
CREATE INDEX explained_by_uuid ON explained (uuid);
CREATE INDEX explained_by_who ON explained (who);

-- The instances sharing the database, by the name of their data folder: each renews its lease
-- every few seconds (by the database's clock); the deliveries an instance claimed are anyone's
-- once its lease ran out.
CREATE TABLE instances (
    id text PRIMARY KEY,
    alive_until timestamptz NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);
-- The rules each instance runs: the waits of a rule an instance lacks are left to the instances
-- that run it (a deploy under way), and dropped only once no instance alive in the last ten
-- minutes runs it.
CREATE TABLE instance_rules (
    instance text NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    rule text NOT NULL,
    PRIMARY KEY (instance, rule)
);
