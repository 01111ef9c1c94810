-- The outbox: inbound events and the outbound messages built from them, committed together.
-- Times are unix epoch seconds (REAL).

CREATE TABLE inbound_events (
    id           INTEGER PRIMARY KEY,
    source       TEXT    NOT NULL,
    webhook_id   TEXT    NOT NULL,
    event_type   TEXT    NOT NULL,
    received_at  REAL    NOT NULL,
    headers_json TEXT    NOT NULL,
    body         BLOB,
    status       TEXT    NOT NULL
        CHECK (status IN ('routed', 'ignored', 'unmappable', 'duplicate')),
    reason       TEXT,
    -- Polar keeps webhook-id constant across retries and manual redeliveries.
    UNIQUE (source, webhook_id)
);

CREATE TABLE outbound_messages (
    id              INTEGER PRIMARY KEY,
    event_id        INTEGER NOT NULL REFERENCES inbound_events (id),
    route           TEXT    NOT NULL,
    destination     TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    body            BLOB    NOT NULL,
    status          TEXT    NOT NULL
        CHECK (status IN ('pending', 'inflight', 'delivered', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    created_at      REAL    NOT NULL,
    retry_from_at   REAL    NOT NULL,  -- start of the current retry budget (enqueue or replay)
    next_attempt_at REAL    NOT NULL,
    lease_until     REAL,
    lease_token     TEXT,
    last_status     INTEGER,
    last_error      TEXT,
    delivered_at    REAL,
    updated_at      REAL    NOT NULL,
    -- One payment, one revenue record: the business key is unique per destination.
    UNIQUE (destination, idempotency_key)
);

CREATE INDEX outbound_messages_due ON outbound_messages (destination, status, next_attempt_at);
CREATE INDEX outbound_messages_event ON outbound_messages (event_id);
