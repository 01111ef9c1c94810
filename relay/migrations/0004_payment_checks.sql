-- Routes with `verify_order` confirm the order with Polar's API before delivery; the order id
-- to check is rendered at ingest and kept with the message.
ALTER TABLE outbound_messages ADD COLUMN verify_ref TEXT;
