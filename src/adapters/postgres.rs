//! The Postgres backend for several replicas: one pool shared by a unit per port
//! ([`PgApiKeyRepository`], [`PgProjectRepository`], [`PgAuditLog`], [`PgCommandStore`],
//! [`PgCommandQueue`], [`PgOutputStore`], [`PgRateLimiter`]) and the `LISTEN/NOTIFY` relay in [`notify`]. The queue
//! is claimed with row locks and `SKIP LOCKED`, audit appends are serialised with an advisory
//! lock, and leases run on the database's clock.

pub mod api_keys;
pub mod audit;
pub mod commands;
pub mod deliveries;
pub mod notify;
pub mod output;
pub mod projects;
pub mod queue;
pub mod rate_limit;
pub mod secrets;
pub mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};

pub use api_keys::PgApiKeyRepository;
pub use audit::PgAuditLog;
pub use commands::PgCommandStore;
pub use deliveries::PgDeliveryQueue;
pub use notify::PgRelay;
pub use output::PgOutputStore;
pub use projects::PgProjectRepository;
pub use queue::PgCommandQueue;
pub use rate_limit::PgRateLimiter;
pub use secrets::PgSharedSecrets;
pub use webhooks::PgWebhookEndpoints;

use crate::adapters::sql::{Sealing, StoreError};
use crate::ports::Clock;

/// The connection pool, migrated.
#[derive(Clone)]
pub struct PgDatabase {
    pool: PgPool,
    sealing: Arc<Sealing>,
}

impl PgDatabase {
    /// Connects and applies the migrations (sqlx takes an advisory lock, so replicas starting
    /// together migrate once).
    pub async fn connect(
        url: &str,
        max_connections: u32,
        sealing: Arc<Sealing>,
    ) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        let mut tx = pool.begin().await?;
        audit::seal_with_key(&mut tx, &sealing.key).await?;
        tx.commit().await?;
        Ok(Self { pool, sealing })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn api_keys(&self) -> PgApiKeyRepository {
        PgApiKeyRepository::new(self.pool.clone(), self.sealing.clone())
    }

    pub fn projects(&self) -> PgProjectRepository {
        PgProjectRepository::new(self.pool.clone(), self.sealing.clone())
    }

    pub fn audit_log(&self) -> PgAuditLog {
        PgAuditLog::new(self.pool.clone(), self.sealing.clone())
    }

    pub fn command_store(&self, clock: Arc<dyn Clock>) -> PgCommandStore {
        PgCommandStore::new(self.pool.clone(), clock, self.sealing.clone())
    }

    pub fn command_queue(&self) -> PgCommandQueue {
        PgCommandQueue::new(self.pool.clone(), self.sealing.clone())
    }

    pub fn output_store(&self) -> PgOutputStore {
        PgOutputStore::new(self.pool.clone())
    }

    /// The rate limiter on the database clock, or on `clock` when one is given (tests).
    pub fn rate_limiter(&self, clock: Option<Arc<dyn Clock>>) -> PgRateLimiter {
        PgRateLimiter::new(self.pool.clone(), clock)
    }

    pub fn webhook_endpoints(&self) -> PgWebhookEndpoints {
        PgWebhookEndpoints::new(self.pool.clone(), self.sealing.clone())
    }

    pub fn delivery_queue(&self) -> PgDeliveryQueue {
        PgDeliveryQueue::new(self.pool.clone(), self.sealing.clone())
    }

    pub fn shared_secrets(&self) -> PgSharedSecrets {
        PgSharedSecrets::new(self.pool.clone())
    }

    /// True when the database answers.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
