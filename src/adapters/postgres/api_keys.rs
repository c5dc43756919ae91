//! [`PgApiKeyRepository`]: API keys and their address allowlists on Postgres.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};
use time::OffsetDateTime;
use uuid::Uuid;

use super::audit;
use crate::adapters::sql::{
    KEY_COLUMNS, KEY_TAKEN, Sealing, db, group_allowed_ips, key_from_row, key_insert,
    project_ids_json, translate,
};
use crate::domain::api_key::ApiKey;
use crate::domain::audit::NewAuditEvent;
use crate::domain::ids::ApiKeyId;
use crate::ports::{ApiKeyRepository, PortError};

pub struct PgApiKeyRepository {
    pool: PgPool,
    sealing: Arc<Sealing>,
}

impl PgApiKeyRepository {
    pub fn new(pool: PgPool, sealing: Arc<Sealing>) -> Self {
        Self { pool, sealing }
    }

    async fn write_allowed_ips(conn: &mut PgConnection, key: &ApiKey) -> Result<(), PortError> {
        let cidrs: Vec<String> = key
            .allowed_ips
            .as_slice()
            .iter()
            .map(ToString::to_string)
            .collect();
        sqlx::query("DELETE FROM api_key_allowed_ips WHERE api_key_id = $1")
            .bind(key.id.as_uuid())
            .execute(&mut *conn)
            .await
            .map_err(db)?;
        sqlx::query(
            "INSERT INTO api_key_allowed_ips (api_key_id, cidr) SELECT $1, UNNEST($2::text[])",
        )
        .bind(key.id.as_uuid())
        .bind(cidrs)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn with_allowed_ips(&self, row: Option<PgRow>) -> Result<Option<ApiKey>, PortError> {
        let Some(row) = row else { return Ok(None) };
        let id: Uuid = row.try_get("id").map_err(db)?;
        let ips: Vec<String> =
            sqlx::query_scalar("SELECT cidr FROM api_key_allowed_ips WHERE api_key_id = $1")
                .bind(id)
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
        key_from_row(&row, &ips).map(Some)
    }
}

#[async_trait]
impl ApiKeyRepository for PgApiKeyRepository {
    async fn insert(&self, key: &ApiKey, event: NewAuditEvent) -> Result<(), PortError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        key_insert(key)
            .build()
            .execute(&mut *tx)
            .await
            .map_err(|e| translate(e, KEY_TAKEN))?;
        Self::write_allowed_ips(&mut tx, key).await?;
        let head = audit::append(&mut tx, &[event], &self.sealing.key).await?;
        self.sealing.commit(tx, head).await
    }

    async fn save(&self, key: &ApiKey, event: NewAuditEvent) -> Result<(), PortError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let updated = sqlx::query(
            "UPDATE api_keys SET name = $2, prefix = $3, secret_hash = $4, scopes = $5, \
             project_ids = $6, expires_at = $7, revoked_at = COALESCE(revoked_at, $8), \
             rate_limit = $9 WHERE id = $1",
        )
        .bind(key.id.as_uuid())
        .bind(key.name.as_str())
        .bind(&key.prefix)
        .bind(key.secret_hash.as_str())
        .bind(key.scopes.to_csv())
        .bind(project_ids_json(key))
        .bind(key.expires_at)
        .bind(key.revoked_at)
        .bind(key.rate_limit.map(|rate| rate.to_string()))
        .execute(&mut *tx)
        .await
        .map_err(|e| translate(e, KEY_TAKEN))?;
        if updated.rows_affected() == 0 {
            return Err(PortError::NotFound);
        }
        Self::write_allowed_ips(&mut tx, key).await?;
        let head = audit::append(&mut tx, &[event], &self.sealing.key).await?;
        self.sealing.commit(tx, head).await
    }

    async fn find_by_prefix(&self, prefix: &str) -> Result<Option<ApiKey>, PortError> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE prefix = $1"
        ))
        .bind(prefix)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        self.with_allowed_ips(row).await
    }

    async fn get(&self, id: ApiKeyId) -> Result<ApiKey, PortError> {
        let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"))
            .bind(id.as_uuid())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        self.with_allowed_ips(row).await?.ok_or(PortError::NotFound)
    }

    async fn list(&self) -> Result<Vec<ApiKey>, PortError> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let ips = group_allowed_ips(
            sqlx::query_as("SELECT api_key_id, cidr FROM api_key_allowed_ips")
                .fetch_all(&self.pool)
                .await
                .map_err(db)?,
        );
        rows.iter()
            .map(|row| {
                let id: Uuid = row.try_get("id").map_err(db)?;
                key_from_row(row, ips.get(&id).map_or(&[][..], Vec::as_slice))
            })
            .collect()
    }

    async fn is_empty(&self) -> Result<bool, PortError> {
        let any: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_keys)")
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        Ok(!any)
    }

    async fn record_usage(&self, used: &[(ApiKeyId, OffsetDateTime)]) -> Result<(), PortError> {
        sqlx::query(
            "UPDATE api_keys k SET last_used_at = u.at \
             FROM UNNEST($1::uuid[], $2::timestamptz[]) AS u(id, at) \
             WHERE k.id = u.id AND (k.last_used_at IS NULL OR k.last_used_at < u.at)",
        )
        .bind(used.iter().map(|(id, _)| id.as_uuid()).collect::<Vec<_>>())
        .bind(used.iter().map(|(_, at)| *at).collect::<Vec<_>>())
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }
}
