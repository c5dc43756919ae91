//! Rate limits at the HTTP edge: the per-address guard against key guessing, and the IETF
//! `RateLimit-*` headers of a key's decision.
//!
//! - [`AuthFailureGuard`] counts failed and missing authentications per client address
//!   (governor's GCRA, `RDEV_AUTH_FAILURE_LIMIT`). An address past its budget is refused with 429
//!   before its key is looked up, so guessing costs neither a database query nor a hash. IPv6
//!   clients are counted per /64, the block one subscriber usually holds.
//! - A [`DecisionSlot`] travels in the request's extensions from the route layer to the auth
//!   step, which fills it with the key's [`RateDecision`]; the route layer then writes the
//!   headers onto whatever response the handler made.
//!
//! Headers: the `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` generation of
//! draft-ietf-httpapi-ratelimit-headers (up to -06), with `RateLimit-Policy: <limit>;w=<secs>`.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::response::Response;
use governor::middleware::StateInformationMiddleware;
use governor::{DefaultKeyedRateLimiter, Quota};
use moka::sync::Cache;

use crate::domain::rate_limit::{RateDecision, RateLimit, ceil_secs};

pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// Addresses tracked before idle ones are swept out of the failure counter.
const MAX_TRACKED: usize = 100_000;
/// Failures between two looks at the counter's size: a sweep walks every address, so an
/// attacker with many addresses must not trigger one per request.
const SWEEP_EVERY: usize = 4_096;

/// Failed authentications per client address.
pub struct AuthFailureGuard {
    failures: DefaultKeyedRateLimiter<IpAddr, StateInformationMiddleware>,
    refill: Duration,
    failures_seen: AtomicUsize,
    /// Addresses out of budget, until when. An entry lives one refill interval at most: by then
    /// the address may try once more.
    blocked: Cache<IpAddr, Instant>,
}

impl AuthFailureGuard {
    /// At most `budget.limit()` failures at once, refilled evenly over `budget.window()`.
    pub fn new(budget: RateLimit) -> Self {
        let burst = u32::try_from(budget.limit())
            .ok()
            .and_then(NonZeroU32::new)
            .unwrap_or(NonZeroU32::MAX);
        let refill = budget.window() / burst.get();
        let quota = Quota::with_period(refill)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst);
        Self {
            failures: DefaultKeyedRateLimiter::keyed(quota)
                .with_middleware::<StateInformationMiddleware>(),
            refill,
            failures_seen: AtomicUsize::new(0),
            blocked: Cache::builder()
                .max_capacity(MAX_TRACKED as u64)
                .time_to_live(refill + Duration::from_secs(1))
                .build(),
        }
    }

    /// `Err(wait)` when `client` used up its failures: refuse before looking at its key.
    pub async fn check(&self, client: IpAddr) -> Result<(), Duration> {
        let Some(until) = self.blocked.get(&counted_as(client)) else {
            return Ok(());
        };
        match until.checked_duration_since(Instant::now()) {
            Some(wait) if !wait.is_zero() => Err(wait),
            _ => Ok(()),
        }
    }

    /// Counts one failed or missing authentication from `client`.
    pub async fn failed(&self, client: IpAddr) {
        let net = counted_as(client);
        // Blocked as soon as the budget is spent, so exactly the budget reaches key lookups.
        let until = match self.failures.check_key(&net) {
            Ok(state) if state.remaining_burst_capacity() > 0 => None,
            Ok(_) => Some(Instant::now() + self.refill),
            Err(not_until) => Some(not_until.earliest_possible()),
        };
        if let Some(until) = until {
            self.blocked.insert(net, until);
        }
        let seen = self.failures_seen.fetch_add(1, Ordering::Relaxed);
        if seen.is_multiple_of(SWEEP_EVERY) && self.failures.len() > MAX_TRACKED {
            self.failures.retain_recent();
            self.failures.shrink_to_fit();
        }
    }
}

/// The address a client is counted under: IPv4 as is, IPv6 by its /64.
fn counted_as(client: IpAddr) -> IpAddr {
    match client.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

/// Where the auth step leaves the key's rate decision for the route layer.
#[derive(Debug, Clone, Default)]
pub struct DecisionSlot(Arc<OnceLock<RateDecision>>);

impl DecisionSlot {
    /// Puts an empty slot into the request, for the auth step to fill.
    pub fn attach(request: &mut Request) -> Self {
        let slot = Self::default();
        request.extensions_mut().insert(slot.clone());
        slot
    }

    pub fn fill(&self, decision: RateDecision) {
        // One authentication per request; a second one would carry the same key's later count.
        let _ = self.0.set(decision);
    }

    /// Writes the decision's headers, when the request was authenticated.
    pub fn write_headers(&self, response: &mut Response) {
        if let Some(decision) = self.0.get() {
            write_headers(decision, response.headers_mut());
        }
    }
}

/// The `RateLimit-*` headers of a decision, and `Retry-After` when it refused.
pub fn write_headers(decision: &RateDecision, headers: &mut HeaderMap) {
    let rate = decision.rate;
    headers.insert(RATELIMIT_LIMIT, HeaderValue::from(rate.limit()));
    headers.insert(RATELIMIT_REMAINING, HeaderValue::from(decision.remaining));
    headers.insert(
        RATELIMIT_RESET,
        HeaderValue::from(ceil_secs(decision.reset)),
    );
    if let Ok(policy) =
        HeaderValue::try_from(format!("{};w={}", rate.limit(), rate.window().as_secs()))
    {
        headers.insert(RATELIMIT_POLICY, policy);
    }
    if !decision.admitted {
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from(ceil_secs(decision.retry_after).max(1)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_are_counted_per_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(counted_as(a), counted_as(b));
        assert_ne!(counted_as(a), counted_as(other));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(counted_as(mapped), "10.1.2.3".parse::<IpAddr>().unwrap());
    }

    #[tokio::test]
    async fn an_address_is_refused_once_its_failures_are_spent() {
        let guard = AuthFailureGuard::new(RateLimit::parse("3/60s").unwrap());
        let attacker: IpAddr = "192.0.2.1".parse().unwrap();
        let bystander: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            assert!(guard.check(attacker).await.is_ok());
            guard.failed(attacker).await;
        }
        // The budget is spent: the address waits for a refill before its next key is looked at.
        let wait = guard.check(attacker).await.unwrap_err();
        assert!(wait <= Duration::from_secs(20), "{wait:?}");
        assert!(guard.check(bystander).await.is_ok());
    }
}
