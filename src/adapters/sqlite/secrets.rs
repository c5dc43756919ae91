//! [`SqliteSharedSecrets`]: secrets shared by the replicas, in the `shared_secrets` table.

use super::SqliteDatabase;
use async_trait::async_trait;

use crate::adapters::sql::db;
use crate::ports::{PortError, SharedSecrets};

pub struct SqliteSharedSecrets {
    db: SqliteDatabase,
}

impl SqliteSharedSecrets {
    pub fn new(db: SqliteDatabase) -> Self {
        Self { db }
    }
}

#[async_trait]
impl SharedSecrets for SqliteSharedSecrets {
    async fn get_or_insert(&self, name: &str, candidate: &str) -> Result<String, PortError> {
        sqlx::query("INSERT INTO shared_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(candidate)
            .execute(&self.db.writer)
            .await
            .map_err(db)?;
        sqlx::query_scalar("SELECT value FROM shared_secrets WHERE name = $1")
            .bind(name)
            .fetch_one(&self.db.writer)
            .await
            .map_err(db)
    }
}
