-- Operator controls: pausing destinations, and the indexes retention and filters need.

CREATE TABLE destination_state (
    destination TEXT PRIMARY KEY,
    paused      INTEGER NOT NULL CHECK (paused IN (0, 1)),
    updated_at  REAL    NOT NULL
);

-- Retention prunes delivered messages by age; filters list events by time and type.
CREATE INDEX outbound_messages_delivered ON outbound_messages (status, delivered_at);
CREATE INDEX inbound_events_received ON inbound_events (received_at);
CREATE INDEX inbound_events_status ON inbound_events (status, received_at);

-- /readyz writes here: a real write, synced, proves the database takes commits right now.
CREATE TABLE relay_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
