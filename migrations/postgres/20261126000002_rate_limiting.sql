-- Request rate limits: one row per bucket (an API key) holding the weighted two-window
-- counter, so a decision reads and writes one row under its lock. The table of the init
-- migration (one row per bucket and window) was never written, so it is replaced.
--
-- UNLOGGED: counters are worth no WAL record and no fsync per request. After a Postgres crash
-- (or on a promoted standby) the table starts empty: every key gets a fresh window once.

DROP TABLE rate_limiting;

CREATE UNLOGGED TABLE rate_limiting (
    bucket         TEXT PRIMARY KEY,
    -- Length of the fixed windows, in milliseconds; counts of another length are not carried.
    window_ms      BIGINT NOT NULL,
    -- Start of the current fixed window, in milliseconds since the Unix epoch.
    window_start   BIGINT NOT NULL,
    -- Requests admitted in the current window and in the one before it.
    hits           BIGINT NOT NULL,
    previous_hits  BIGINT NOT NULL
);
