//! [`PgRateLimiter`]: the sliding-window counter of every key in the `rate_limiting` table,
//! shared by all replicas. Each decision is one statement: an upsert whose conflict branch reads
//! the bucket's row under its lock, rolls it to the current window and counts the request only
//! when it fits, so concurrent replicas admit exactly the limit between them.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::{PgPool, Row};

use crate::adapters::sql::db;
use crate::domain::ids::ApiKeyId;
use crate::domain::rate_limit::{RateDecision, RateLimit, WindowCounts, epoch_ms};
use crate::ports::{Clock, PortError, RateLimiter};

/// `$1` bucket, `$2` limit, `$3` window (ms), `$4` now (ms since the epoch; NULL for the
/// database clock). The admission test is `WindowCounts::admits_one` in SQL:
/// `previous * (window - elapsed) <= (limit - current - 1) * window`, on the row as rolled to
/// the current window. A refused request changes nothing and reads the row as it was when the
/// statement began (only to say when to come back).
const HIT: &str = "
WITH clock AS (
    SELECT COALESCE($4::bigint,
                    floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) AS now_ms
), fresh AS (
    SELECT now_ms, now_ms - now_ms % $3::bigint AS window_start FROM clock
), decided AS (
    INSERT INTO rate_limiting AS r (bucket, window_ms, window_start, hits, previous_hits)
    SELECT $1, $3, window_start, 1, 0 FROM fresh
    ON CONFLICT (bucket) DO UPDATE SET
        window_ms = EXCLUDED.window_ms,
        window_start = EXCLUDED.window_start,
        previous_hits = CASE
            WHEN r.window_ms <> EXCLUDED.window_ms THEN 0
            WHEN r.window_start = EXCLUDED.window_start THEN r.previous_hits
            WHEN r.window_start = EXCLUDED.window_start - EXCLUDED.window_ms THEN r.hits
            ELSE 0 END,
        hits = CASE
            WHEN r.window_ms = EXCLUDED.window_ms AND r.window_start = EXCLUDED.window_start
            THEN r.hits ELSE 0 END + 1
    WHERE CASE
            WHEN r.window_ms <> EXCLUDED.window_ms THEN 0
            WHEN r.window_start = EXCLUDED.window_start THEN r.previous_hits
            WHEN r.window_start = EXCLUDED.window_start - EXCLUDED.window_ms THEN r.hits
            ELSE 0 END
          * (EXCLUDED.window_ms - ((SELECT now_ms FROM fresh) - EXCLUDED.window_start))
        <= ($2::bigint - 1 - CASE
            WHEN r.window_ms = EXCLUDED.window_ms AND r.window_start = EXCLUDED.window_start
            THEN r.hits ELSE 0 END) * EXCLUDED.window_ms
    RETURNING r.window_start, r.hits, r.previous_hits
)
SELECT fresh.now_ms, TRUE AS admitted, d.window_start, d.hits, d.previous_hits
FROM fresh, decided d
UNION ALL
SELECT fresh.now_ms, FALSE, s.window_start, s.hits, s.previous_hits
FROM fresh LEFT JOIN rate_limiting s ON s.bucket = $1 AND s.window_ms = $3
WHERE NOT EXISTS (SELECT 1 FROM decided)";

pub struct PgRateLimiter {
    pool: PgPool,
    /// `None`: the database's clock, the one every replica shares (as leases do). Tests give a
    /// clock they move.
    clock: Option<Arc<dyn Clock>>,
}

impl PgRateLimiter {
    pub fn new(pool: PgPool, clock: Option<Arc<dyn Clock>>) -> Self {
        Self { pool, clock }
    }
}

#[async_trait]
impl RateLimiter for PgRateLimiter {
    async fn hit(&self, key: ApiKeyId, rate: RateLimit) -> Result<RateDecision, PortError> {
        let now_ms = self.clock.as_ref().map(|clock| epoch_ms(clock.now()));
        let row = sqlx::query(HIT)
            .bind(format!("key:{}", key.as_uuid()))
            .bind(rate.limit() as i64)
            .bind(rate.window_ms() as i64)
            .bind(now_ms)
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        let now_ms: i64 = row.try_get("now_ms").map_err(db)?;
        let admitted: bool = row.try_get("admitted").map_err(db)?;
        let window_start: Option<i64> = row.try_get("window_start").map_err(db)?;
        let counts = match window_start {
            Some(window_start) => WindowCounts {
                window_start,
                current: count(row.try_get("hits").map_err(db)?),
                previous: count(row.try_get("previous_hits").map_err(db)?),
            },
            // Refused while another replica created the row after this statement began: the
            // window is full as far as this request knows.
            None => WindowCounts {
                window_start: rate.window_start(now_ms),
                current: rate.limit(),
                previous: 0,
            },
        };
        Ok(counts.rolled(rate, now_ms).decision(rate, now_ms, admitted))
    }
}

fn count(stored: i64) -> u64 {
    u64::try_from(stored).unwrap_or(0)
}
