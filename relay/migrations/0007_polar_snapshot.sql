-- The revenue ledger's view of Polar: the orders, refunds and lost disputes the last
-- reconciliation runs read from Polar's API, kept so that `relay ledger`, the console and the
-- ledger gauge never walk Polar's API a second time. A cache of Polar's data, not revenue:
-- the outbox alone says what was sent. `data` is Polar's object as JSON, with the fields of
-- `log.redact` (customer PII) replaced, so the routes can map it again.
-- (Numbered after the console's 0006; the two are independent.)

CREATE TABLE polar_snapshot (
    kind        TEXT    NOT NULL CHECK (kind IN ('order', 'refund', 'dispute')),
    polar_id    TEXT    NOT NULL,
    created_at  REAL    NOT NULL,
    status      TEXT    NOT NULL,
    data        BLOB    NOT NULL,
    fetched_at  REAL    NOT NULL,
    PRIMARY KEY (kind, polar_id)
);

CREATE INDEX polar_snapshot_created ON polar_snapshot (created_at);
