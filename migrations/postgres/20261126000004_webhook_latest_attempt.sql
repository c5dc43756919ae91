-- A delivery's latest attempt lives in its own row (`attempts` is its number, `last_*` its
-- outcome, `last_attempt_at` its time); `webhook_attempts` keeps the earlier ones. A delivery
-- that succeeds at its first attempt, the common case, then costs no attempt row: that insert,
-- its primary-key entry and its foreign-key check were a third of the database's work per
-- delivery (docs/benchmarks.md, scenario 8).
ALTER TABLE webhook_deliveries ADD COLUMN last_attempt_at TIMESTAMPTZ;

UPDATE webhook_deliveries d SET last_attempt_at = a.at
FROM webhook_attempts a WHERE a.delivery_id = d.id AND a.attempt = d.attempts;

DELETE FROM webhook_attempts a USING webhook_deliveries d
WHERE a.delivery_id = d.id AND a.attempt = d.attempts;
