//! Reading and verifying the audit trail.

use std::sync::Arc;

use crate::domain::audit::{AuditEvent, ChainReport, ExpectedHead};
use crate::ports::{AuditFilter, AuditLog, Page};

use super::{Caller, ServiceError};

pub const MAX_PAGE: u32 = 500;

pub struct AuditService {
    log: Arc<dyn AuditLog>,
}

impl AuditService {
    pub fn new(log: Arc<dyn AuditLog>) -> Self {
        Self { log }
    }

    pub async fn list(
        &self,
        caller: &Caller,
        mut filter: AuditFilter,
    ) -> Result<Page<AuditEvent>, ServiceError> {
        caller.require_unrestricted_admin()?;
        filter.limit = filter.limit.clamp(1, MAX_PAGE);
        Ok(self.log.list(&filter).await?)
    }

    /// Walks the chain; with `head` (published earlier, outside the database), also checks
    /// that the chain still reaches it, which finds rows deleted from its end.
    pub async fn verify(
        &self,
        caller: &Caller,
        head: Option<ExpectedHead>,
    ) -> Result<ChainReport, ServiceError> {
        caller.require_unrestricted_admin()?;
        Ok(self.log.verify(head).await?)
    }
}
