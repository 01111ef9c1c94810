-- The revenue ledger's view of Polar (the SQLite migration 0007 says why): what the last
-- reconciliation runs read from Polar's API, so the ledger never asks Polar a second time.
-- (Numbered after the console's 0003; the two are independent.)

CREATE TABLE polar_snapshot (
    kind        TEXT             NOT NULL CHECK (kind IN ('order', 'refund', 'dispute')),
    polar_id    TEXT             NOT NULL,
    created_at  DOUBLE PRECISION NOT NULL,
    status      TEXT             NOT NULL,
    data        BYTEA            NOT NULL,
    fetched_at  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (kind, polar_id)
);

CREATE INDEX polar_snapshot_created ON polar_snapshot (created_at);
