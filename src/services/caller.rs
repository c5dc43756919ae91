//! The authenticated caller of a use case: which key, what it may do, where it came from.

use crate::domain::api_key::{Scope, Scopes};
use crate::domain::audit::AuditContext;
use crate::domain::ids::{ApiKeyId, ProjectId};
use crate::domain::rate_limit::RateLimit;

use super::ServiceError;

#[derive(Debug, Clone)]
pub struct Caller {
    pub key_id: ApiKeyId,
    /// The public part of the key as presented; a rotation changes it, which ends the stream
    /// tokens issued to the key before.
    pub key_prefix: String,
    pub scopes: Scopes,
    /// Projects the key may see; empty means all.
    pub project_ids: Vec<ProjectId>,
    /// The key's own request rate limit; `None` follows the server default.
    pub rate_limit: Option<RateLimit>,
    pub context: AuditContext,
}

impl Caller {
    /// An operator at the server's own command line (`rdev-api keys ...` against the
    /// database): an unrestricted admin holding no key, audited as the system. Its `key_id` is
    /// the nil id, which no key has.
    pub fn operator() -> Self {
        Self {
            key_id: ApiKeyId::from_uuid(uuid::Uuid::nil()),
            key_prefix: String::new(),
            scopes: Scopes::admin(),
            project_ids: vec![],
            rate_limit: None,
            context: AuditContext::system(),
        }
    }

    pub fn require(&self, scope: Scope) -> Result<(), ServiceError> {
        if self.scopes.allows(scope) {
            Ok(())
        } else {
            Err(ServiceError::MissingScope(scope))
        }
    }

    /// Managing keys and reading the audit log need `admin` on a key that is not limited to some
    /// projects: a limited admin could otherwise mint or widen a key beyond its own reach, or
    /// read other projects' audit rows.
    pub fn require_unrestricted_admin(&self) -> Result<(), ServiceError> {
        self.require(Scope::Admin)?;
        if self.project_ids.is_empty() {
            Ok(())
        } else {
            Err(ServiceError::LimitedKey)
        }
    }

    /// Environment values can hold credentials: only admin keys read them; the others see the
    /// names.
    pub fn sees_env_values(&self) -> bool {
        self.scopes.allows(Scope::Admin)
    }

    pub fn can_access(&self, project: ProjectId) -> bool {
        self.project_ids.is_empty() || self.project_ids.contains(&project)
    }

    /// The projects a listing must be restricted to, `None` for all.
    pub fn reach(&self) -> Option<&[ProjectId]> {
        (!self.project_ids.is_empty()).then_some(self.project_ids.as_slice())
    }
}
