-- Each claim of a delivery writes a token of its own, which the dispatcher's report carries
-- back: a report applies only while its claim is the delivery's latest. A dispatcher whose
-- lease ran out, and whose delivery another one claimed since, can then neither report over
-- the new owner (even with the same attempt number) nor clear its lease (a postponed report).
-- No index holds the column, so claims stay heap-only updates. Rows claimed by a replica of the
-- version before (NULL) are reported as that version did until they are claimed again.
ALTER TABLE webhook_deliveries ADD COLUMN lease_token UUID;
