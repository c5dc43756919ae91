//! [`PgWebhookEndpoints`]: webhook endpoints on Postgres, each change with its audit event.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::{PgPool, Postgres};

use super::audit;
use crate::adapters::sql::{
    Sealing, WEBHOOK_COLUMNS, WEBHOOK_TAKEN, db, translate, webhook_from_row, webhook_insert,
    webhook_update,
};
use crate::domain::audit::NewAuditEvent;
use crate::domain::webhook::{Webhook, WebhookId};
use crate::ports::{PortError, WebhookEndpoints};

pub struct PgWebhookEndpoints {
    pool: PgPool,
    sealing: Arc<Sealing>,
}

impl PgWebhookEndpoints {
    pub fn new(pool: PgPool, sealing: Arc<Sealing>) -> Self {
        Self { pool, sealing }
    }
}

#[async_trait]
impl WebhookEndpoints for PgWebhookEndpoints {
    async fn insert(&self, webhook: &Webhook, event: NewAuditEvent) -> Result<(), PortError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        webhook_insert::<Postgres>(webhook)
            .build()
            .execute(&mut *tx)
            .await
            .map_err(|e| translate(e, WEBHOOK_TAKEN))?;
        let head = audit::append(&mut tx, &[event], &self.sealing.key).await?;
        self.sealing.commit(tx, head).await
    }

    async fn save(&self, webhook: &Webhook, event: NewAuditEvent) -> Result<(), PortError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let updated = webhook_update::<Postgres>(webhook)
            .build()
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        if updated.rows_affected() == 0 {
            return Err(PortError::NotFound);
        }
        let head = audit::append(&mut tx, &[event], &self.sealing.key).await?;
        self.sealing.commit(tx, head).await
    }

    async fn delete(&self, id: WebhookId, event: NewAuditEvent) -> Result<(), PortError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let deleted = sqlx::query("DELETE FROM webhooks WHERE id = $1")
            .bind(id.as_uuid())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        if deleted.rows_affected() == 0 {
            return Err(PortError::NotFound);
        }
        let head = audit::append(&mut tx, &[event], &self.sealing.key).await?;
        self.sealing.commit(tx, head).await
    }

    async fn get(&self, id: WebhookId) -> Result<Webhook, PortError> {
        let row = sqlx::query(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE id = $1"
        ))
        .bind(id.as_uuid())
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        webhook_from_row(&row)
    }

    async fn list(&self) -> Result<Vec<Webhook>, PortError> {
        let rows = sqlx::query(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(webhook_from_row).collect()
    }
}
