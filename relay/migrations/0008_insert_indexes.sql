-- The insert path's indexes: every index on the outbox is written by every insert, and every
-- index whose key holds `status` twice more (claim, then ack). With 1M delivered rows the
-- ingest ran at 83% of its empty-database rate. docs/performance.md ("The insert path's
-- indexes") has the audit: which query reads each index, and what it costs.

-- 1. Two indexes that repeat a unique one. The search names each destination (source) stored
--    and finds a key (webhook id) on UNIQUE(destination, idempotency_key) (UNIQUE(source,
--    webhook_id)) instead: one index seek per destination, and there are a handful.
DROP INDEX outbound_messages_idempotency;
DROP INDEX inbound_events_webhook;

-- 2. A refund id is on refunds only: the other messages need no entry. `refund_id = ?`
--    implies the index's condition, so the search still uses it.
DROP INDEX outbound_messages_refund;
CREATE INDEX outbound_messages_refund ON outbound_messages (refund_id)
    WHERE refund_id IS NOT NULL;

-- 3. Delivered messages only, keyed by when: delivered_at is set by the ack that makes a
--    message delivered and cleared by a replay, so a message enters this index once, at its
--    ack, and the insert and the claim write nothing here (keyed by status first, the old
--    index took an entry at insert and moved it at claim and at ack). `status` stays in the
--    entry so that the revenue sum is read from the index alone; retention's "delivered
--    before" reads it too, which replaces outbound_messages_delivered (status, delivered_at).
DROP INDEX outbound_messages_revenue;
DROP INDEX outbound_messages_delivered;
CREATE INDEX outbound_messages_revenue ON outbound_messages
    (status, delivered_at, event_kind, currency, amount_minor, attributed)
    WHERE delivered_at IS NOT NULL;

-- 4. The amount index serves the dead-letter triage (largest first) and the dead purchases'
--    sum: messages not delivered. Keyed by status first, it took an entry at insert and moved
--    it at claim and at ack, the ack's landing at a random place among a million delivered
--    amounts. Now a message leaves it at its ack. The queries repeat the condition (SQLite
--    uses a partial index only when a term of the query is the index's condition), and the
--    kind and currency in the entry let the dead purchases be summed from the index alone.
DROP INDEX outbound_messages_status_amount;
CREATE INDEX outbound_messages_status_amount ON outbound_messages
    (status, event_kind, currency, amount_minor, id)
    WHERE status != 'delivered';
