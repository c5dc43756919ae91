//! [`SqliteProjectRepository`]: projects on SQLite.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::{QueryBuilder, Sqlite};

use super::{SqliteDatabase, audit};
use crate::adapters::sql::{
    PROJECT_COLUMNS, PROJECT_TAKEN, Sealing, db, project_from_row, project_insert, project_update,
    translate,
};
use crate::domain::audit::NewAuditEvent;
use crate::domain::ids::ProjectId;
use crate::domain::project::Project;
use crate::ports::{PortError, ProjectRepository};

pub struct SqliteProjectRepository {
    db: SqliteDatabase,
    sealing: Arc<Sealing>,
}

impl SqliteProjectRepository {
    pub fn new(db: SqliteDatabase, sealing: Arc<Sealing>) -> Self {
        Self { db, sealing }
    }
}

#[async_trait]
impl ProjectRepository for SqliteProjectRepository {
    async fn insert(&self, project: &Project, event: NewAuditEvent) -> Result<(), PortError> {
        let mut tx = self.db.begin().await?;
        project_insert(project)
            .build()
            .execute(&mut *tx)
            .await
            .map_err(|e| translate(e, PROJECT_TAKEN))?;
        let head = audit::append(&mut tx, &[event], &self.sealing.key).await?;
        self.sealing.commit(tx, head).await
    }

    async fn update(&self, project: &Project, event: NewAuditEvent) -> Result<(), PortError> {
        let mut tx = self.db.begin().await?;
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
        // The single writer connection keeps submits and claims out until this commits.
        let mut tx = self.db.begin().await?;
        let active: Option<i64> = sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM commands \
                     WHERE project_id = $1 AND status IN ('queued', 'running')) \
             FROM projects WHERE id = $1",
        )
        .bind(id.as_uuid())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        match active {
            None => return Err(PortError::NotFound),
            Some(active) if active > 0 => return Err(PortError::ProjectBusy { active }),
            Some(_) => {}
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
        .fetch_one(&self.db.reader)
        .await
        .map_err(db)?;
        project_from_row(&row)
    }

    async fn list(&self, only: Option<&[ProjectId]>) -> Result<Vec<Project>, PortError> {
        let mut query =
            QueryBuilder::<Sqlite>::new(format!("SELECT {PROJECT_COLUMNS} FROM projects"));
        if let Some(only) = only {
            if only.is_empty() {
                return Ok(vec![]);
            }
            query.push(" WHERE id IN (");
            let mut ids = query.separated(", ");
            for id in only {
                ids.push_bind(id.as_uuid());
            }
            query.push(")");
        }
        query.push(" ORDER BY name");
        let rows = query.build().fetch_all(&self.db.reader).await.map_err(db)?;
        rows.iter().map(project_from_row).collect()
    }
}
