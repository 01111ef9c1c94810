-- The insert path's indexes (the SQLite migration 0008 says why; docs/performance.md, "The
-- insert path's indexes", has the audit). The same indexes as SQLite after it.

DROP INDEX outbound_messages_idempotency;
DROP INDEX inbound_events_webhook;

DROP INDEX outbound_messages_refund;
CREATE INDEX outbound_messages_refund ON outbound_messages (refund_id)
    WHERE refund_id IS NOT NULL;

DROP INDEX outbound_messages_revenue;
DROP INDEX outbound_messages_delivered;
CREATE INDEX outbound_messages_revenue ON outbound_messages
    (status, delivered_at, event_kind, currency, amount_minor, attributed)
    WHERE delivered_at IS NOT NULL;

DROP INDEX outbound_messages_status_amount;
CREATE INDEX outbound_messages_status_amount ON outbound_messages
    (status, event_kind, currency, amount_minor, id)
    WHERE status != 'delivered';
