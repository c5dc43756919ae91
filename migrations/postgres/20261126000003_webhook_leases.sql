-- A claim leases a delivery in its own column, which no index holds, instead of moving
-- `next_attempt_at` (indexed) forward: the claim is then a heap-only (HOT) update, with no new
-- entry in any of the three indexes, where it used to write three. The free space per page
-- that HOT needs is kept by the fill factor (new pages only; old ones fill as they turn over).
ALTER TABLE webhook_deliveries ADD COLUMN leased_until TIMESTAMPTZ;
ALTER TABLE webhook_deliveries SET (fillfactor = 70);
