//! API keys: authenticating requests, and the admin use cases that manage keys.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use serde_json::json;
use time::OffsetDateTime;

use crate::domain::api_key::{
    AllowedIps, ApiKey, KeyName, KeyRejection, PresentedKey, Scopes, loggable_prefix,
};
use crate::domain::audit::{AuditContext, NewAuditEvent, action};
use crate::domain::ids::{ApiKeyId, ProjectId};
use crate::domain::rate_limit::RateLimit;
use crate::ports::{ApiKeyRepository, Clock, PortError};

use super::auth_failures::FailedAuthentications;
use super::{Caller, ServiceError};

/// A validated request for a new key.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub name: KeyName,
    pub scopes: Scopes,
    pub allowed_ips: AllowedIps,
    pub project_ids: Vec<ProjectId>,
    /// `None` follows the server default.
    pub rate_limit: Option<RateLimit>,
    pub expires_at: Option<OffsetDateTime>,
}

/// A validated partial update; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct KeyChanges {
    pub name: Option<KeyName>,
    pub scopes: Option<Scopes>,
    pub allowed_ips: Option<AllowedIps>,
    pub project_ids: Option<Vec<ProjectId>>,
    /// `Some(None)` returns the key to the server default.
    pub rate_limit: Option<Option<RateLimit>>,
    /// `Some(None)` removes the expiry.
    pub expires_at: Option<Option<OffsetDateTime>>,
}

/// A key together with its secret, which is shown once and never stored.
#[derive(Debug, Clone)]
pub struct IssuedKey {
    pub key: ApiKey,
    pub secret: PresentedKey,
}

pub struct ApiKeyService {
    keys: Arc<dyn ApiKeyRepository>,
    clock: Arc<dyn Clock>,
    /// Last use per key, written to the store in batches by [`ApiKeyService::flush_usage`].
    pending_usage: Mutex<HashMap<ApiKeyId, OffsetDateTime>>,
    /// Refused keys, audited in batches by [`ApiKeyService::flush_failures`]; none for the
    /// operator's command line, which authenticates nobody.
    failures: Option<FailedAuthentications>,
}

impl ApiKeyService {
    pub fn new(keys: Arc<dyn ApiKeyRepository>, clock: Arc<dyn Clock>) -> Self {
        Self {
            keys,
            clock,
            pending_usage: Mutex::new(HashMap::new()),
            failures: None,
        }
    }

    /// Audits refused authentications through `failures`.
    pub fn with_failure_audit(mut self, failures: FailedAuthentications) -> Self {
        self.failures = Some(failures);
        self
    }

    /// Turns a presented key (header value) into a caller, or says why not. A refusal is
    /// tallied for the audit log by client address and key prefix.
    pub async fn authenticate(
        &self,
        presented: Option<&str>,
        client: IpAddr,
        context: AuditContext,
    ) -> Result<Caller, ServiceError> {
        let result = self.admit(presented, client, context).await;
        if let (Err(ServiceError::Unauthenticated(reason)), Some(failures)) =
            (&result, &self.failures)
        {
            failures.record(client, presented.map_or("-", loggable_prefix), *reason);
        }
        result
    }

    async fn admit(
        &self,
        presented: Option<&str>,
        client: IpAddr,
        context: AuditContext,
    ) -> Result<Caller, ServiceError> {
        let raw = presented.ok_or(ServiceError::Unauthenticated(KeyRejection::Missing))?;
        let presented = PresentedKey::parse(raw)
            .map_err(|_| ServiceError::Unauthenticated(KeyRejection::Invalid))?;
        let key = self
            .keys
            .find_by_prefix(presented.prefix())
            .await
            .map_err(|e| ServiceError::from_port(e, "API key"))?
            .ok_or(ServiceError::Unauthenticated(KeyRejection::Invalid))?;
        let now = self.clock.now();
        key.admit(&presented, client, now)
            .map_err(ServiceError::Unauthenticated)?;
        Ok(self.caller(key, now, context))
    }

    /// A caller for key `id` whose possession was proven another way (a stream token, issued
    /// while the key had the public part `prefix`: a key rotated since is refused).
    pub async fn authenticate_as(
        &self,
        id: ApiKeyId,
        prefix: &str,
        client: IpAddr,
        context: AuditContext,
    ) -> Result<Caller, ServiceError> {
        let key = self
            .keys
            .get(id)
            .await
            .ok()
            .filter(|key| key.prefix == prefix)
            .ok_or(ServiceError::Unauthenticated(KeyRejection::Invalid))?;
        let now = self.clock.now();
        key.usable(client, now)
            .map_err(ServiceError::Unauthenticated)?;
        Ok(self.caller(key, now, context))
    }

    fn caller(&self, key: ApiKey, now: OffsetDateTime, context: AuditContext) -> Caller {
        self.pending_usage
            .lock()
            .expect("usage map lock is never poisoned")
            .insert(key.id, now);
        Caller {
            key_id: key.id,
            key_prefix: key.prefix,
            scopes: key.scopes,
            project_ids: key.project_ids,
            rate_limit: key.rate_limit,
            context: AuditContext {
                actor: Some(key.id),
                ..context
            },
        }
    }

    /// Writes the pending `last_used_at` values in one batch.
    pub async fn flush_usage(&self) -> Result<(), PortError> {
        let batch: Vec<_> = std::mem::take(
            &mut *self
                .pending_usage
                .lock()
                .expect("usage map lock is never poisoned"),
        )
        .into_iter()
        .collect();
        if batch.is_empty() {
            return Ok(());
        }
        self.keys.record_usage(&batch).await
    }

    /// Writes the tallied refusals to the audit log, one row per client address and key prefix.
    pub async fn flush_failures(&self) -> Result<(), PortError> {
        match &self.failures {
            Some(failures) => failures.flush().await,
            None => Ok(()),
        }
    }

    /// On an empty database, creates the first admin key: the configured one, or a generated one
    /// that is returned so it can be shown once.
    pub async fn bootstrap(
        &self,
        configured: Option<&str>,
    ) -> Result<Option<PresentedKey>, ServiceError> {
        if !self.keys.is_empty().await? {
            return Ok(None);
        }
        let (secret, generated) = match configured {
            Some(raw) => (
                PresentedKey::parse(raw).map_err(|rule| {
                    ServiceError::Invalid(vec![crate::domain::FieldError::new(
                        "RDEV_BOOTSTRAP_ADMIN_KEY",
                        rule.0,
                    )])
                })?,
                false,
            ),
            None => (PresentedKey::generate(&mut rand::rng()), true),
        };
        let now = self.clock.now();
        let key = ApiKey {
            id: ApiKeyId::new(),
            name: KeyName::parse("bootstrap-admin".into()).expect("constant name is valid"),
            prefix: secret.prefix().to_owned(),
            secret_hash: secret.hash(),
            scopes: Scopes::admin(),
            allowed_ips: AllowedIps::default(),
            project_ids: vec![],
            rate_limit: None,
            created_at: now,
            created_by: None,
            expires_at: None,
            revoked_at: None,
            last_used_at: None,
        };
        let audit = NewAuditEvent::new(
            &AuditContext::system(),
            now,
            action::API_KEY_CREATED,
            ("api_key", key.id.to_string()),
            json!({"name": key.name.as_str(), "scopes": key.scopes.to_csv(), "bootstrap": true}),
        );
        match self.keys.insert(&key, audit).await {
            Ok(()) => Ok(generated.then_some(secret)),
            // Another replica bootstrapped the same empty database at the same moment.
            Err(PortError::AlreadyExists(_)) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    pub async fn create(&self, caller: &Caller, new: NewKey) -> Result<IssuedKey, ServiceError> {
        caller.require_unrestricted_admin()?;
        let secret = PresentedKey::generate(&mut rand::rng());
        let now = self.clock.now();
        if new.expires_at.is_some_and(|at| at <= now) {
            return Err(ServiceError::Invalid(vec![crate::domain::FieldError::new(
                "/expires_at",
                "must be in the future",
            )]));
        }
        let key = ApiKey {
            id: ApiKeyId::new(),
            name: new.name,
            prefix: secret.prefix().to_owned(),
            secret_hash: secret.hash(),
            scopes: new.scopes,
            allowed_ips: new.allowed_ips,
            project_ids: new.project_ids,
            rate_limit: new.rate_limit,
            created_at: now,
            // The acting key; none for an operator working on the database directly.
            created_by: caller.context.actor,
            expires_at: new.expires_at,
            revoked_at: None,
            last_used_at: None,
        };
        let audit = self.audit(caller, action::API_KEY_CREATED, &key);
        self.keys.insert(&key, audit).await?;
        Ok(IssuedKey { key, secret })
    }

    pub async fn list(&self, caller: &Caller) -> Result<Vec<ApiKey>, ServiceError> {
        caller.require_unrestricted_admin()?;
        Ok(self.keys.list().await?)
    }

    pub async fn get(&self, caller: &Caller, id: ApiKeyId) -> Result<ApiKey, ServiceError> {
        caller.require_unrestricted_admin()?;
        self.find(id).await
    }

    /// The caller's own key.
    pub async fn me(&self, caller: &Caller) -> Result<ApiKey, ServiceError> {
        self.find(caller.key_id).await
    }

    pub async fn update(
        &self,
        caller: &Caller,
        id: ApiKeyId,
        changes: KeyChanges,
    ) -> Result<ApiKey, ServiceError> {
        caller.require_unrestricted_admin()?;
        let mut key = self.find(id).await?;
        let before = key.clone();
        if let Some(name) = changes.name {
            key.name = name;
        }
        if let Some(scopes) = changes.scopes {
            key.scopes = scopes;
        }
        if let Some(allowed_ips) = changes.allowed_ips {
            key.allowed_ips = allowed_ips;
        }
        if let Some(project_ids) = changes.project_ids {
            key.project_ids = project_ids;
        }
        if let Some(rate_limit) = changes.rate_limit {
            key.rate_limit = rate_limit;
        }
        if let Some(expires_at) = changes.expires_at {
            key.expires_at = expires_at;
        }
        let mut audit = self.audit(caller, action::API_KEY_UPDATED, &key);
        audit.details["changed"] = key.changes_since(&before).into_value();
        self.keys.save(&key, audit).await?;
        Ok(key)
    }

    /// Revokes a key; revoking twice is harmless and keeps the first time.
    pub async fn revoke(&self, caller: &Caller, id: ApiKeyId) -> Result<ApiKey, ServiceError> {
        caller.require_unrestricted_admin()?;
        let mut key = self.find(id).await?;
        if key.revoked_at.is_none() {
            key.revoked_at = Some(self.clock.now());
            let audit = self.audit(caller, action::API_KEY_REVOKED, &key);
            self.keys.save(&key, audit).await?;
        }
        Ok(key)
    }

    /// Replaces a key's secret: the old one stops working at once on this replica (others within
    /// CACHE_TTL), the new one is shown once.
    pub async fn rotate(&self, caller: &Caller, id: ApiKeyId) -> Result<IssuedKey, ServiceError> {
        caller.require_unrestricted_admin()?;
        let mut key = self.find(id).await?;
        if key.revoked_at.is_some() {
            return Err(ServiceError::KeyRevoked);
        }
        let secret = PresentedKey::generate(&mut rand::rng());
        key.rotate(&secret);
        let audit = self.audit(caller, action::API_KEY_ROTATED, &key);
        self.keys.save(&key, audit).await?;
        Ok(IssuedKey { key, secret })
    }

    async fn find(&self, id: ApiKeyId) -> Result<ApiKey, ServiceError> {
        self.keys
            .get(id)
            .await
            .map_err(|e| ServiceError::from_port(e, "API key"))
    }

    fn audit(&self, caller: &Caller, action: &'static str, key: &ApiKey) -> NewAuditEvent {
        NewAuditEvent::new(
            &caller.context,
            self.clock.now(),
            action,
            ("api_key", key.id.to_string()),
            json!({
                "name": key.name.as_str(),
                "prefix": key.prefix,
                "scopes": key.scopes.to_csv(),
                "allowed_ips": key.allowed_ips.as_slice().iter().map(|n| n.to_string()).collect::<Vec<_>>(),
                "rate_limit": key.rate_limit.map(|rate| rate.to_string()),
            }),
        )
    }
}
