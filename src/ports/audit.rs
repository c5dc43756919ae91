//! The audit log: appended to by the other repositories inside their transactions, read here.

use async_trait::async_trait;
use time::OffsetDateTime;

use super::{Page, PortError};
use crate::domain::audit::{AuditEvent, AuditHead, ChainReport, ExpectedHead, NewAuditEvent};
use crate::domain::ids::ApiKeyId;

#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub actor: Option<ApiKeyId>,
    pub action: Option<String>,
    pub target_id: Option<String>,
    pub since: Option<OffsetDateTime>,
    pub until: Option<OffsetDateTime>,
    /// Return events with a sequence number below this (newest first paging).
    pub before_seq: Option<i64>,
    pub limit: u32,
}

#[async_trait]
pub trait AuditLog: Send + Sync {
    /// Appends an event that has no other change to go with (a pod restart happens outside the
    /// database).
    async fn append(&self, event: NewAuditEvent) -> Result<(), PortError>;
    /// Newest first.
    async fn list(&self, filter: &AuditFilter) -> Result<Page<AuditEvent>, PortError>;
    /// Walks the whole chain.
    async fn verify(&self, head: Option<ExpectedHead>) -> Result<ChainReport, PortError>;
}

/// Where the chain's head is published outside the database after each append, so a deleted
/// tail can be detected against it.
pub trait AuditHeads: Send + Sync {
    fn published(&self, head: AuditHead);
}
