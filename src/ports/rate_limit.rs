//! Request rate limits per API key: one decision per request, counted where every replica that
//! shares the limiter sees it.

use async_trait::async_trait;

use super::PortError;
use crate::domain::ids::ApiKeyId;
use crate::domain::rate_limit::{RateDecision, RateLimit};

#[async_trait]
pub trait RateLimiter: Send + Sync {
    /// Counts one request of `key` against `rate` (a sliding window) if it fits, and says
    /// whether it did. A refused request is not counted.
    async fn hit(&self, key: ApiKeyId, rate: RateLimit) -> Result<RateDecision, PortError>;
}
