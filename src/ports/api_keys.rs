//! Storage of API keys.

use async_trait::async_trait;
use time::OffsetDateTime;

use super::PortError;
use crate::domain::api_key::ApiKey;
use crate::domain::audit::NewAuditEvent;
use crate::domain::ids::ApiKeyId;

#[async_trait]
pub trait ApiKeyRepository: Send + Sync {
    /// Stores a new key and its audit event in one transaction.
    async fn insert(&self, key: &ApiKey, audit: NewAuditEvent) -> Result<(), PortError>;
    /// Replaces a key's mutable fields (name, scopes, allowlist, expiry, revocation, secret) and
    /// appends the audit event, in one transaction.
    async fn save(&self, key: &ApiKey, audit: NewAuditEvent) -> Result<(), PortError>;
    async fn find_by_prefix(&self, prefix: &str) -> Result<Option<ApiKey>, PortError>;
    async fn get(&self, id: ApiKeyId) -> Result<ApiKey, PortError>;
    async fn list(&self) -> Result<Vec<ApiKey>, PortError>;
    async fn is_empty(&self) -> Result<bool, PortError>;
    /// Records when keys were last used, many at once (usage is batched, not written per request).
    async fn record_usage(&self, used: &[(ApiKeyId, OffsetDateTime)]) -> Result<(), PortError>;
}
