-- Webhooks (issue 18): every attempt of a delivery is kept for the delivery log, and deliveries
-- are listed per endpoint newest first.
CREATE TABLE webhook_attempts (
    delivery_id   UUID NOT NULL REFERENCES webhook_deliveries(id) ON DELETE CASCADE,
    attempt       BIGINT NOT NULL,
    at            TIMESTAMPTZ NOT NULL,
    status_code   BIGINT,
    latency_ms    BIGINT NOT NULL,
    error         TEXT,
    PRIMARY KEY (delivery_id, attempt)
);

CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (webhook_id, created_at, id);
