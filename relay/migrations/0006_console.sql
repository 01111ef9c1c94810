-- The operator console (docs/console.md).
-- 1. Search and revenue read fields of a message's body without parsing JSON per row: the
--    mapping extracts them once at ingest into these columns (null where the body has none).
--    Rows written before this migration are backfilled below, parsed once, here.
ALTER TABLE outbound_messages ADD COLUMN order_id TEXT;
ALTER TABLE outbound_messages ADD COLUMN payment_ref TEXT;
ALTER TABLE outbound_messages ADD COLUMN refund_id TEXT;
ALTER TABLE outbound_messages ADD COLUMN event_kind TEXT;
ALTER TABLE outbound_messages ADD COLUMN amount_minor INTEGER;
ALTER TABLE outbound_messages ADD COLUMN currency TEXT;
ALTER TABLE outbound_messages ADD COLUMN attributed INTEGER;

UPDATE outbound_messages SET
    order_id = json_extract(CAST(body AS TEXT), '$.orderId'),
    payment_ref = json_extract(CAST(body AS TEXT), '$.providerPaymentId'),
    refund_id = json_extract(CAST(body AS TEXT), '$.refundId'),
    event_kind = json_extract(CAST(body AS TEXT), '$.event'),
    amount_minor = CASE WHEN json_type(CAST(body AS TEXT), '$.amount') = 'integer'
        THEN json_extract(CAST(body AS TEXT), '$.amount') END,
    currency = upper(json_extract(CAST(body AS TEXT), '$.currency')),
    -- As the mapping decides (relay/models.py BodyFacts): an empty id ("" is what a checkout
    -- sends for a missing one), false or 0 is no attribution.
    attributed = CASE
        WHEN coalesce(json_extract(CAST(body AS TEXT), '$.attribution.faSessionId'), '')
            NOT IN ('', 0)
        OR coalesce(json_extract(CAST(body AS TEXT), '$.attribution.faAttributionToken'), '')
            NOT IN ('', 0)
        THEN 1 ELSE 0 END
WHERE json_valid(CAST(body AS TEXT)) AND json_type(CAST(body AS TEXT)) = 'object';

-- Search: each id the search box takes, found by index.
CREATE INDEX outbound_messages_order ON outbound_messages (order_id);
CREATE INDEX outbound_messages_payment ON outbound_messages (payment_ref);
CREATE INDEX outbound_messages_refund ON outbound_messages (refund_id);
CREATE INDEX outbound_messages_idempotency ON outbound_messages (idempotency_key);
CREATE INDEX inbound_events_webhook ON inbound_events (webhook_id);
-- The list, newest first, by status / destination / route; the dead-letter view by amount.
CREATE INDEX outbound_messages_status_id ON outbound_messages (status, id);
CREATE INDEX outbound_messages_dest_id ON outbound_messages (destination, id);
CREATE INDEX outbound_messages_route_id ON outbound_messages (route, id);
CREATE INDEX outbound_messages_status_amount ON outbound_messages (status, amount_minor, id);
-- Time filters find their id range here (ids grow with created_at, the insert time).
CREATE INDEX outbound_messages_created ON outbound_messages (created_at);
-- Revenue delivered today / 7 days, read from the index alone.
CREATE INDEX outbound_messages_revenue ON outbound_messages
    (status, delivered_at, event_kind, currency, amount_minor, attributed);

-- 2. Every delivery attempt, written in the same transaction as its outcome.
CREATE TABLE message_attempts (
    id               INTEGER PRIMARY KEY,
    message_id       INTEGER NOT NULL,
    attempt          INTEGER NOT NULL,
    at               REAL    NOT NULL,
    outcome          TEXT    NOT NULL CHECK (outcome IN ('delivered', 'retry', 'dead')),
    http_status      INTEGER,
    error_kind       TEXT,
    duration_s       REAL    NOT NULL,
    response_snippet TEXT    NOT NULL DEFAULT ''
);
CREATE INDEX message_attempts_message ON message_attempts (message_id, attempt);
-- The overview's chart: attempts per minute over the last hour, from the index alone.
CREATE INDEX message_attempts_at ON message_attempts (at, outcome, message_id);

-- Each destination's last success and last failed attempt, for the overview (written with the
-- outcomes; apart from destination_state, whose rows are pause overrides).
CREATE TABLE destination_activity (
    destination     TEXT PRIMARY KEY,
    last_success_at REAL,
    last_error      TEXT,
    last_error_at   REAL
);

-- 3. What operators did on the console.
CREATE TABLE console_audit (
    id      INTEGER PRIMARY KEY,
    at      REAL    NOT NULL,
    actor   TEXT    NOT NULL,
    action  TEXT    NOT NULL,
    target  TEXT    NOT NULL,
    detail  TEXT,
    count   INTEGER NOT NULL
);

-- 4. Bulk replays by filter, run in the background by the relay whose console started them.
CREATE TABLE console_jobs (
    id           INTEGER PRIMARY KEY,
    kind         TEXT    NOT NULL,
    filter_query TEXT    NOT NULL,
    actor        TEXT    NOT NULL,
    status       TEXT    NOT NULL
        CHECK (status IN ('running', 'done', 'cancelled', 'failed', 'interrupted')),
    total        INTEGER NOT NULL,
    done         INTEGER NOT NULL DEFAULT 0,
    last_id      INTEGER,  -- keyset position: the batch after it comes next
    upper_id     INTEGER NOT NULL,  -- messages created after the job started are not in it
    owner        TEXT    NOT NULL,
    heartbeat_at REAL    NOT NULL,
    created_at   REAL    NOT NULL,
    updated_at   REAL    NOT NULL,
    error        TEXT
);
