-- A claim leases a delivery in a column of its own, as on Postgres, instead of moving
-- `next_attempt_at` forward: a redelivery (due at once) then no longer clears a live lease, and
-- a postponed report no longer moves another dispatcher's. Each claim also writes a token that
-- its report carries back; a report applies only while its claim is the delivery's latest.
ALTER TABLE webhook_deliveries ADD COLUMN leased_until TEXT;
ALTER TABLE webhook_deliveries ADD COLUMN lease_token BLOB;
