-- The request id of the webhook that produced an event follows its messages into delivery
-- logs, so one grep finds a payment's whole path.
ALTER TABLE inbound_events ADD COLUMN request_id TEXT;
ALTER TABLE outbound_messages ADD COLUMN request_id TEXT;
