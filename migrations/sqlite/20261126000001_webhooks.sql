-- Webhooks (issue 18): every attempt of a delivery is kept for the delivery log, and deliveries
-- are listed per endpoint newest first.
CREATE TABLE webhook_attempts (
    delivery_id   BLOB NOT NULL REFERENCES webhook_deliveries(id) ON DELETE CASCADE,
    attempt       INTEGER NOT NULL,
    at            TEXT NOT NULL,
    status_code   INTEGER,
    latency_ms    INTEGER NOT NULL,
    error         TEXT,
    PRIMARY KEY (delivery_id, attempt)
);

CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (webhook_id, created_at, id);
