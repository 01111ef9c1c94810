-- A new terminal state: `discarded`, set by an operator on a dead message (`relay outbox
-- discard --reason ...`). The message is kept and listed, never sent again, and no longer
-- counts as dead (the dead-letter alert clears). When and why are recorded with it.
-- SQLite cannot change a CHECK constraint in place: the table is rebuilt, same columns in the
-- same order plus the two new ones, and its indexes made again.

CREATE TABLE outbound_messages_new (
    id              INTEGER PRIMARY KEY,
    event_id        INTEGER NOT NULL REFERENCES inbound_events (id),
    route           TEXT    NOT NULL,
    destination     TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    body            BLOB    NOT NULL,
    status          TEXT    NOT NULL
        CHECK (status IN ('pending', 'inflight', 'delivered', 'dead', 'discarded')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    created_at      REAL    NOT NULL,
    retry_from_at   REAL    NOT NULL,
    next_attempt_at REAL    NOT NULL,
    lease_until     REAL,
    lease_token     TEXT,
    last_status     INTEGER,
    last_error      TEXT,
    delivered_at    REAL,
    updated_at      REAL    NOT NULL,
    request_id      TEXT,
    verify_ref      TEXT,
    discarded_at    REAL,
    discard_reason  TEXT,
    UNIQUE (destination, idempotency_key)
);

INSERT INTO outbound_messages_new (id, event_id, route, destination, idempotency_key, body,
    status, attempts, created_at, retry_from_at, next_attempt_at, lease_until, lease_token,
    last_status, last_error, delivered_at, updated_at, request_id, verify_ref)
SELECT id, event_id, route, destination, idempotency_key, body, status, attempts, created_at,
    retry_from_at, next_attempt_at, lease_until, lease_token, last_status, last_error,
    delivered_at, updated_at, request_id, verify_ref
FROM outbound_messages;

DROP TABLE outbound_messages;
ALTER TABLE outbound_messages_new RENAME TO outbound_messages;

CREATE INDEX outbound_messages_due ON outbound_messages (destination, status, next_attempt_at);
CREATE INDEX outbound_messages_event ON outbound_messages (event_id);
CREATE INDEX outbound_messages_delivered ON outbound_messages (status, delivered_at);
