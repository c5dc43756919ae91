//! Request rate limits: every authenticated request counts once against its key's limit (the
//! key's own, else the server default) before its use case runs.

use std::sync::Arc;

use crate::domain::rate_limit::{RateDecision, RateLimit};
use crate::ports::RateLimiter;

use super::{Caller, ServiceError};

pub struct RequestLimits {
    limiter: Arc<dyn RateLimiter>,
    default: RateLimit,
}

impl RequestLimits {
    pub fn new(limiter: Arc<dyn RateLimiter>, default: RateLimit) -> Self {
        Self { limiter, default }
    }

    /// Counts one request of `caller`: the decision to show the client, or `RateLimited` past
    /// the limit.
    pub async fn admit(&self, caller: &Caller) -> Result<RateDecision, ServiceError> {
        let rate = caller.rate_limit.unwrap_or(self.default);
        let decision = self
            .limiter
            .hit(caller.key_id, rate)
            .await
            .map_err(|e| ServiceError::from_port(e, "rate limit"))?;
        if decision.admitted {
            Ok(decision)
        } else {
            Err(ServiceError::RateLimited(decision))
        }
    }
}
