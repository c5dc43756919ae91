//! [`PgSharedSecrets`]: secrets shared by the replicas, in the `shared_secrets` table.

use async_trait::async_trait;
use sqlx::PgPool;

use crate::adapters::sql::db;
use crate::ports::{PortError, SharedSecrets};

pub struct PgSharedSecrets {
    pool: PgPool,
}

impl PgSharedSecrets {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

#[async_trait]
impl SharedSecrets for PgSharedSecrets {
    async fn get_or_insert(&self, name: &str, candidate: &str) -> Result<String, PortError> {
        sqlx::query("INSERT INTO shared_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(candidate)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        sqlx::query_scalar("SELECT value FROM shared_secrets WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await
            .map_err(db)
    }
}
