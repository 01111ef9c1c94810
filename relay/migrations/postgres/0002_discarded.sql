-- A new terminal state: `discarded`, set by an operator on a dead message (the SQLite
-- migration 0005 says why). When and why are recorded with it.

ALTER TABLE outbound_messages DROP CONSTRAINT outbound_messages_status_check;
ALTER TABLE outbound_messages ADD CONSTRAINT outbound_messages_status_check
    CHECK (status IN ('pending', 'inflight', 'delivered', 'dead', 'discarded'));
ALTER TABLE outbound_messages ADD COLUMN discarded_at DOUBLE PRECISION;
ALTER TABLE outbound_messages ADD COLUMN discard_reason TEXT;
