//! Read-through caches in front of the key and project repositories (TTL = `CACHE_TTL`). A write
//! through a wrapper drops its entry at once and tells the other replicas (a [`ChangeNotices`]
//! hint), whose caches drop theirs when it arrives ([`ChangeListener`]); the TTL bounds
//! staleness only when hints are lost (the bus down). Each lookup counts as a hit or a miss in
//! `rdev_cache_requests_total{cache,result}`.
//!
//! A miss reads the store, then fills the cache; a change that lands in between (a revocation
//! on another replica) must not be undone by that fill. Every drop bumps a [`Generation`], and a
//! fill keeps its entry only if no drop happened since its read began.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Counts the drops of a cache, so that a fill can tell whether one happened during its read.
#[derive(Debug, Default)]
struct Generation(AtomicU64);

impl Generation {
    fn now(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Called before an entry is dropped.
    fn advance(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }

    /// Inserts what was read since `read_at`, then takes it out again if a drop came in between
    /// (a drop after the insert removes the entry itself).
    fn fill<K, V>(&self, cache: &Cache<K, V>, read_at: u64, key: K, value: V)
    where
        K: std::hash::Hash + Eq + Send + Sync + Clone + 'static,
        V: Clone + Send + Sync + 'static,
    {
        cache.insert(key.clone(), value);
        if self.now() != read_at {
            cache.invalidate(&key);
        }
    }
}

pub struct CachedApiKeys {
    inner: Arc<dyn ApiKeyRepository>,
    /// By prefix; `None` remembers that no key has it.
    by_prefix: Cache<String, Option<ApiKey>>,
    generation: Generation,
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
            generation: Generation::default(),
            notices,
            metrics,
        }
    }

    fn forget(&self, key: &ApiKey) {
        self.generation.advance();
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
            self.generation.advance();
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
        let read_at = self.generation.now();
        let found = self.inner.find_by_prefix(prefix).await?;
        self.generation
            .fill(&self.by_prefix, read_at, prefix.to_owned(), found.clone());
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
    generation: Generation,
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
            generation: Generation::default(),
            notices,
            metrics,
        }
    }

    fn forget(&self, id: ProjectId) {
        self.generation.advance();
        self.by_id.invalidate(&id);
        self.notices.announce_change(Changed::Project(id));
    }
}

impl ChangeListener for CachedProjects {
    fn changed(&self, change: Changed) {
        if let Changed::Project(id) = change {
            self.generation.advance();
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
        let read_at = self.generation.now();
        let project = self.inner.get(id).await?;
        self.generation
            .fill(&self.by_id, read_at, id, project.clone());
        Ok(project)
    }

    async fn list(&self, only: Option<&[ProjectId]>) -> Result<Vec<Project>, PortError> {
        self.inner.list(only).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::sync::Semaphore;

    use super::*;
    use crate::domain::project::{EnvVars, ExecutorKind, ProjectName, Workdir};

    #[test]
    fn a_fill_that_read_before_a_drop_keeps_nothing() {
        let cache: Cache<u32, &str> = Cache::new(10);
        let generation = Generation::default();
        let read_at = generation.now();
        generation.fill(&cache, read_at, 1, "fresh");
        assert_eq!(cache.get(&1), Some("fresh"));
        let read_at = generation.now();
        generation.advance();
        cache.invalidate(&1);
        generation.fill(&cache, read_at, 1, "stale");
        assert_eq!(cache.get(&1), None);
    }

    /// A store whose reads wait for a permit, holding what they read meanwhile.
    struct SlowStore {
        project: Mutex<Project>,
        reads: Semaphore,
    }

    #[async_trait]
    impl ProjectRepository for SlowStore {
        async fn insert(&self, _: &Project, _: NewAuditEvent) -> Result<(), PortError> {
            unreachable!("not written here")
        }
        async fn update(&self, project: &Project, _: NewAuditEvent) -> Result<(), PortError> {
            *self.project.lock().unwrap() = project.clone();
            Ok(())
        }
        async fn delete(&self, _: ProjectId, _: NewAuditEvent) -> Result<(), PortError> {
            unreachable!("not written here")
        }
        async fn get(&self, _: ProjectId) -> Result<Project, PortError> {
            let read = self.project.lock().unwrap().clone();
            self.reads.acquire().await.expect("open").forget();
            Ok(read)
        }
        async fn list(&self, _: Option<&[ProjectId]>) -> Result<Vec<Project>, PortError> {
            unreachable!("not listed here")
        }
    }

    struct Quiet;

    impl ChangeNotices for Quiet {
        fn announce_change(&self, _: Changed) {}
    }

    impl CacheMetrics for Quiet {
        fn cache_lookup(&self, _: &'static str, _: bool) {}
    }

    /// A lookup reads the project, a change notice (another replica moved it) arrives while
    /// the lookup is under way, and only then does the lookup fill the cache: the next lookup
    /// must read the store again, not get what the first one read.
    #[tokio::test]
    async fn a_refill_racing_a_change_notice_does_not_bring_back_the_old_project() {
        let now = OffsetDateTime::now_utc();
        let project = Project {
            id: ProjectId::new(),
            name: ProjectName::parse("raced".into()).unwrap(),
            description: String::new(),
            target: None,
            workdir: Workdir::parse("/tmp".into()).unwrap(),
            env: EnvVars::default(),
            max_concurrency: 1,
            default_timeout_secs: 60,
            executor: ExecutorKind::Local,
            created_at: now,
            updated_at: now,
        };
        let store = Arc::new(SlowStore {
            project: Mutex::new(project.clone()),
            reads: Semaphore::new(0),
        });
        let cached = Arc::new(CachedProjects::new(
            store.clone(),
            Duration::from_secs(600),
            Arc::new(Quiet),
            Arc::new(Quiet),
        ));
        let lookup = tokio::spawn({
            let cached = cached.clone();
            async move { cached.get(project.id).await.unwrap() }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Meanwhile, on another replica: the project moves to kube, and the notice arrives.
        store.project.lock().unwrap().executor = ExecutorKind::Kube;
        cached.changed(Changed::Project(project.id));
        store.reads.add_permits(1);
        assert_eq!(lookup.await.unwrap().executor, ExecutorKind::Local);
        store.reads.add_permits(1);
        let next = cached.get(project.id).await.unwrap();
        assert_eq!(next.executor, ExecutorKind::Kube, "not the raced read");
    }
}
