-- [aggregate] counts (see store/aggregates.rs): per rule, day (days since 0001-01-01) and
-- group, the events, conversions and users of that day (a postcard-encoded DayRow with its
-- sketch); the users of each row exactly, by the hash they are counted by, up to 10,000 a row;
-- each person's group per rule; and how long each rule keeps its counts.
CREATE TABLE aggregate_days (
    rule text NOT NULL,
    day integer NOT NULL,
    grp text NOT NULL,
    row_data bytea NOT NULL,
    PRIMARY KEY (rule, day, grp)
);
CREATE TABLE aggregate_users (
    rule text NOT NULL,
    day integer NOT NULL,
    hash bigint NOT NULL,
    grp text NOT NULL,
    PRIMARY KEY (rule, day, hash, grp)
);
CREATE INDEX aggregate_users_by_hash ON aggregate_users (hash);
CREATE TABLE aggregate_members (
    who text NOT NULL,
    rule text NOT NULL,
    grp text NOT NULL,
    converted integer,
    last_day integer NOT NULL,
    PRIMARY KEY (who, rule)
);
CREATE INDEX aggregate_members_by_day ON aggregate_members (rule, last_day);
CREATE TABLE aggregate_rules (
    rule text PRIMARY KEY,
    keep_days integer NOT NULL
);
