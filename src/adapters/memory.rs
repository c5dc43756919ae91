//! [`MemoryRateLimiter`]: the sliding-window counters of one replica, in memory. No I/O on the
//! request path: a lookup in moka's synchronous cache (no future to build or poll) and a short
//! lock of the key's own counter.
//!
//! Memory is bounded: at most [`MAX_KEYS`] counters, and a counter idle for two of its windows
//! is evicted. Eviction loses nothing, because by then every request it counted has left the
//! sliding window.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::Expiry;
use moka::sync::Cache;

use crate::domain::ids::ApiKeyId;
use crate::domain::rate_limit::{RateDecision, RateLimit, WindowCounts, epoch_ms};
use crate::ports::{Clock, PortError, RateLimiter};

/// Counters kept at most; the least recently used beyond this are dropped.
pub const MAX_KEYS: u64 = 100_000;

/// One key's counter, for one window length.
struct Counter {
    window: Duration,
    counts: Mutex<WindowCounts>,
}

/// Evicts a counter two of its windows after its last use.
struct IdleForTwoWindows;

impl Expiry<ApiKeyId, Arc<Counter>> for IdleForTwoWindows {
    fn expire_after_create(
        &self,
        _key: &ApiKeyId,
        counter: &Arc<Counter>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(counter.window * 2)
    }

    fn expire_after_read(
        &self,
        _key: &ApiKeyId,
        counter: &Arc<Counter>,
        _read_at: Instant,
        _duration_until_expiry: Option<Duration>,
        _last_modified_at: Instant,
    ) -> Option<Duration> {
        Some(counter.window * 2)
    }

    fn expire_after_update(
        &self,
        _key: &ApiKeyId,
        counter: &Arc<Counter>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(counter.window * 2)
    }
}

pub struct MemoryRateLimiter {
    counters: Cache<ApiKeyId, Arc<Counter>>,
    clock: Arc<dyn Clock>,
}

impl MemoryRateLimiter {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            counters: Cache::builder()
                .max_capacity(MAX_KEYS)
                .expire_after(IdleForTwoWindows)
                .build(),
            clock,
        }
    }

    /// Counters held now (after pending evictions ran).
    pub fn len(&self) -> u64 {
        self.counters.run_pending_tasks();
        self.counters.entry_count()
    }

    /// Whether no counter is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn counter(&self, key: ApiKeyId, rate: RateLimit) -> Arc<Counter> {
        let new_counter = || {
            Arc::new(Counter {
                window: rate.window(),
                counts: Mutex::new(WindowCounts::default()),
            })
        };
        let counter = self.counters.get_with(key, new_counter);
        if counter.window == rate.window() {
            return counter;
        }
        // The key's window changed: counts of the old length say nothing about the new one.
        let counter = new_counter();
        self.counters.insert(key, counter.clone());
        counter
    }
}

#[async_trait]
impl RateLimiter for MemoryRateLimiter {
    async fn hit(&self, key: ApiKeyId, rate: RateLimit) -> Result<RateDecision, PortError> {
        let counter = self.counter(key, rate);
        let now_ms = epoch_ms(self.clock.now());
        let mut counts = counter
            .counts
            .lock()
            .expect("a counter lock is never poisoned");
        let (next, decision) = counts.hit(rate, now_ms);
        *counts = next;
        Ok(decision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::clock::SystemClock;

    #[tokio::test]
    async fn a_counter_idle_for_two_windows_is_evicted() {
        let limiter = MemoryRateLimiter::new(Arc::new(SystemClock));
        let rate = RateLimit::parse("5/1s").unwrap();
        let (idle, busy) = (ApiKeyId::new(), ApiKeyId::new());
        limiter.hit(idle, rate).await.unwrap();
        let hourly = RateLimit::parse("5/1h").unwrap();
        limiter.hit(busy, hourly).await.unwrap();
        assert_eq!(limiter.len(), 2);
        // Two one-second windows after its last use, the idle key's counter is gone; the
        // hourly one stays.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        assert_eq!(limiter.len(), 1);
        let again = limiter.hit(idle, rate).await.unwrap();
        assert_eq!(again.remaining, 4, "a fresh window, as before the eviction");
    }
}
