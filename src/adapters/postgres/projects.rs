//! [`PgProjectRepository`]: projects on Postgres.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::PgPool;
use uuid::Uuid;

use super::audit;
use crate::adapters::sql::{
    PROJECT_COLUMNS, PROJECT_TAKEN, Sealing, db, project_from_row, project_insert, project_update,
    translate,
};
use crate::domain::audit::NewAuditEvent;
use crate::domain::ids::ProjectId;
use crate::domain::project::Project;
use crate::ports::{PortError, ProjectRepository};

pub struct PgProjectRepository {
    pool: PgPool,
    sealing: Arc<Sealing>,
}

impl PgProjectRepository {
    pub fn new(pool: PgPool, sealing: Arc<Sealing>) -> Self {
        Self { pool, sealing }
    }
}

#[async_trait]
impl ProjectRepository for PgProjectRepository {
    async fn insert(&self, project: &Project, event: NewAuditEvent) -> Result<(), PortError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        project_insert(project)
            .build()
            .execute(&mut *tx)
            .await
            .map_err(|e| translate(e, PROJECT_TAKEN))?;
        let head = audit::append(&mut tx, &[event], &self.sealing.key).await?;
        self.sealing.commit(tx, head).await
    }

    async fn update(&self, project: &Project, event: NewAuditEvent) -> Result<(), PortError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let updated = project_update(project)
            .build()
            .execute(&mut *tx)
            .await
            .map_err(|e| translate(e, PROJECT_TAKEN))?;
        if updated.rows_affected() == 0 {
            return Err(PortError::NotFound);
        }
        let head = audit::append(&mut tx, &[event], &self.sealing.key).await?;
        self.sealing.commit(tx, head).await
    }

    async fn delete(&self, id: ProjectId, event: NewAuditEvent) -> Result<(), PortError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        // Locked first, so no submit or claim lands between the check and the delete.
        let locked: Option<Uuid> =
            sqlx::query_scalar("SELECT id FROM projects WHERE id = $1 FOR UPDATE")
                .bind(id.as_uuid())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
        if locked.is_none() {
            return Err(PortError::NotFound);
        }
        let active: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM commands WHERE project_id = $1 AND status IN ('queued', 'running')",
        )
        .bind(id.as_uuid())
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        if active > 0 {
            return Err(PortError::ProjectBusy { active });
        }
        sqlx::query("DELETE FROM projects WHERE id = $1")
            .bind(id.as_uuid())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let head = audit::append(&mut tx, &[event], &self.sealing.key).await?;
        self.sealing.commit(tx, head).await
    }

    async fn get(&self, id: ProjectId) -> Result<Project, PortError> {
        let row = sqlx::query(&format!(
            "SELECT {PROJECT_COLUMNS} FROM projects WHERE id = $1"
        ))
        .bind(id.as_uuid())
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        project_from_row(&row)
    }

    async fn list(&self, only: Option<&[ProjectId]>) -> Result<Vec<Project>, PortError> {
        let only: Option<Vec<Uuid>> = only.map(|ids| ids.iter().map(ProjectId::as_uuid).collect());
        let rows = sqlx::query(&format!(
            "SELECT {PROJECT_COLUMNS} FROM projects \
             WHERE $1::uuid[] IS NULL OR id = ANY($1) ORDER BY name"
        ))
        .bind(only)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(project_from_row).collect()
    }
}
