//! Read-through caches in front of the key and project repositories (TTL = `CACHE_TTL`). A write
//! through a wrapper drops its entry at once and tells the other replicas (a [`ChangeNotices`]
//! hint), whose caches drop theirs when it arrives ([`ChangeListener`]); the TTL bounds
//! staleness only when hints are lost (the bus down). Each lookup counts as a hit or a miss in
//! `rdev_cache_requests_total{cache,result}`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
// The synchronous cache: a hit is a plain call on the request path, no future to build or poll.
use moka::sync::Cache;
use time::OffsetDateTime;

use crate::domain::api_key::ApiKey;
use crate::domain::audit::NewAuditEvent;
use crate::domain::ids::{ApiKeyId, ProjectId};
use crate::domain::project::Project;
use crate::ports::{
    ApiKeyRepository, CacheMetrics, ChangeListener, ChangeNotices, Changed, PortError,
    ProjectRepository,
};

const MAX_ENTRIES: u64 = 10_000;

pub struct CachedApiKeys {
    inner: Arc<dyn ApiKeyRepository>,
    /// By prefix; `None` remembers that no key has it.
    by_prefix: Cache<String, Option<ApiKey>>,
    notices: Arc<dyn ChangeNotices>,
    metrics: Arc<dyn CacheMetrics>,
}

impl CachedApiKeys {
    pub fn new(
        inner: Arc<dyn ApiKeyRepository>,
        ttl: Duration,
        notices: Arc<dyn ChangeNotices>,
        metrics: Arc<dyn CacheMetrics>,
    ) -> Self {
        Self {
            inner,
            by_prefix: Cache::builder()
                .max_capacity(MAX_ENTRIES)
                .time_to_live(ttl)
                .build(),
            notices,
            metrics,
        }
    }

    fn forget(&self, key: &ApiKey) {
        self.by_prefix.invalidate(&key.prefix);
        forget_key(&self.by_prefix, key.id);
        self.notices.announce_change(Changed::ApiKey(key.id));
    }
}

/// Drops every entry of key `id`: after a rotation the old prefix must stop working too.
fn forget_key(by_prefix: &Cache<String, Option<ApiKey>>, id: ApiKeyId) {
    let stale: Vec<_> = by_prefix
        .iter()
        .filter(|(_, cached)| cached.as_ref().is_some_and(|k| k.id == id))
        .map(|(prefix, _)| prefix)
        .collect();
    for prefix in stale {
        by_prefix.invalidate(prefix.as_str());
    }
}

impl ChangeListener for CachedApiKeys {
    fn changed(&self, change: Changed) {
        if let Changed::ApiKey(id) = change {
            forget_key(&self.by_prefix, id);
        }
    }
}

#[async_trait]
impl ApiKeyRepository for CachedApiKeys {
    async fn insert(&self, key: &ApiKey, audit: NewAuditEvent) -> Result<(), PortError> {
        self.inner.insert(key, audit).await?;
        self.forget(key);
        Ok(())
    }

    async fn save(&self, key: &ApiKey, audit: NewAuditEvent) -> Result<(), PortError> {
        self.inner.save(key, audit).await?;
        self.forget(key);
        Ok(())
    }

    async fn find_by_prefix(&self, prefix: &str) -> Result<Option<ApiKey>, PortError> {
        if let Some(cached) = self.by_prefix.get(prefix) {
            self.metrics.cache_lookup("api_key", true);
            return Ok(cached);
        }
        self.metrics.cache_lookup("api_key", false);
        let found = self.inner.find_by_prefix(prefix).await?;
        self.by_prefix.insert(prefix.to_owned(), found.clone());
        Ok(found)
    }

    async fn get(&self, id: ApiKeyId) -> Result<ApiKey, PortError> {
        self.inner.get(id).await
    }

    async fn list(&self) -> Result<Vec<ApiKey>, PortError> {
        self.inner.list().await
    }

    async fn is_empty(&self) -> Result<bool, PortError> {
        self.inner.is_empty().await
    }

    async fn record_usage(&self, used: &[(ApiKeyId, OffsetDateTime)]) -> Result<(), PortError> {
        self.inner.record_usage(used).await
    }
}

pub struct CachedProjects {
    inner: Arc<dyn ProjectRepository>,
    by_id: Cache<ProjectId, Project>,
    notices: Arc<dyn ChangeNotices>,
    metrics: Arc<dyn CacheMetrics>,
}

impl CachedProjects {
    pub fn new(
        inner: Arc<dyn ProjectRepository>,
        ttl: Duration,
        notices: Arc<dyn ChangeNotices>,
        metrics: Arc<dyn CacheMetrics>,
    ) -> Self {
        Self {
            inner,
            by_id: Cache::builder()
                .max_capacity(MAX_ENTRIES)
                .time_to_live(ttl)
                .build(),
            notices,
            metrics,
        }
    }

    fn forget(&self, id: ProjectId) {
        self.by_id.invalidate(&id);
        self.notices.announce_change(Changed::Project(id));
    }
}

impl ChangeListener for CachedProjects {
    fn changed(&self, change: Changed) {
        if let Changed::Project(id) = change {
            self.by_id.invalidate(&id);
        }
    }
}

#[async_trait]
impl ProjectRepository for CachedProjects {
    async fn insert(&self, project: &Project, audit: NewAuditEvent) -> Result<(), PortError> {
        self.inner.insert(project, audit).await
    }

    async fn update(&self, project: &Project, audit: NewAuditEvent) -> Result<(), PortError> {
        self.inner.update(project, audit).await?;
        self.forget(project.id);
        Ok(())
    }

    async fn delete(&self, id: ProjectId, audit: NewAuditEvent) -> Result<(), PortError> {
        self.inner.delete(id, audit).await?;
        self.forget(id);
        Ok(())
    }

    async fn get(&self, id: ProjectId) -> Result<Project, PortError> {
        if let Some(project) = self.by_id.get(&id) {
            self.metrics.cache_lookup("project", true);
            return Ok(project);
        }
        self.metrics.cache_lookup("project", false);
        let project = self.inner.get(id).await?;
        self.by_id.insert(id, project.clone());
        Ok(project)
    }

    async fn list(&self, only: Option<&[ProjectId]>) -> Result<Vec<Project>, PortError> {
        self.inner.list(only).await
    }
}
