//! [`SqliteCommandStore`]: what the API side does with commands on SQLite (submit with the queue
//! limit and idempotency in one transaction, reads, queue positions, cancel requests).

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::{QueryBuilder, Sqlite};
use uuid::Uuid;

use super::{SqliteDatabase, audit, deliveries};
use crate::adapters::sql::{
    COMMAND_COLUMNS, Sealing, command_from_row, db, page, queue_summary, translate,
};
use crate::domain::audit::NewAuditEvent;
use crate::domain::command::{Command, CommandStatus};
use crate::domain::ids::{CommandId, ProjectId};
use crate::ports::{
    Clock, CommandFilter, CommandStore, Page, PortError, QueueSummary, Submission, SubmitOutcome,
};

pub struct SqliteCommandStore {
    db: SqliteDatabase,
    clock: Arc<dyn Clock>,
    sealing: Arc<Sealing>,
}

impl SqliteCommandStore {
    pub fn new(db: SqliteDatabase, clock: Arc<dyn Clock>, sealing: Arc<Sealing>) -> Self {
        Self { db, clock, sealing }
    }
}

#[async_trait]
impl CommandStore for SqliteCommandStore {
    async fn submit(&self, submission: Submission) -> Result<SubmitOutcome, PortError> {
        let Submission {
            command,
            audit: event,
            idempotency,
            max_queued,
            max_queued_per_project,
        } = submission;
        let mut tx = self.db.begin().await?;
        if let Some(idem) = &idempotency {
            sqlx::query(
                "DELETE FROM idempotency_keys WHERE api_key_id = $1 AND key = $2 \
                 AND julianday(created_at) < julianday($3)",
            )
            .bind(idem.api_key.as_uuid())
            .bind(&idem.key)
            .bind(idem.fresh_after)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            let seen: Option<(Uuid, String)> = sqlx::query_as(
                "SELECT command_id, request_hash FROM idempotency_keys WHERE api_key_id = $1 AND key = $2",
            )
            .bind(idem.api_key.as_uuid())
            .bind(&idem.key)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
            if let Some((earlier, hash)) = seen {
                if hash != idem.request_hash {
                    return Err(PortError::IdempotencyMismatch);
                }
                drop(tx);
                return self
                    .get(CommandId::from_uuid(earlier))
                    .await
                    .map(SubmitOutcome::Existing);
            }
        }
        let (queued, in_project): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COALESCE(SUM(project_id = $1), 0) FROM commands WHERE status = 'queued'",
        )
        .bind(command.project_id.as_uuid())
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        if queued as u64 >= max_queued {
            return Ok(SubmitOutcome::QueueFull {
                queued: queued as u64,
            });
        }
        if in_project as u64 >= max_queued_per_project {
            return Ok(SubmitOutcome::ProjectQueueFull {
                queued: in_project as u64,
            });
        }
        sqlx::query(
            "INSERT INTO commands (id, project_id, command, env, priority, timeout_secs, status, \
             submitted_by, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(command.id.as_uuid())
        .bind(command.project_id.as_uuid())
        .bind(command.command.as_str())
        .bind(command.env.to_json())
        .bind(i64::from(command.priority.rank()))
        .bind(i64::from(command.timeout_secs))
        .bind(command.status.as_str())
        .bind(command.submitted_by.map(|k| k.as_uuid()))
        .bind(command.created_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| translate(e, "a command with this id"))?;
        deliveries::write_outbox(&mut tx, &[command.id], self.clock.now()).await?;
        if let Some(idem) = &idempotency {
            sqlx::query(
                "INSERT INTO idempotency_keys (api_key_id, key, request_hash, command_id, created_at) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(idem.api_key.as_uuid())
            .bind(&idem.key)
            .bind(&idem.request_hash)
            .bind(command.id.as_uuid())
            .bind(command.created_at)
            .execute(&mut *tx)
            .await
            .map_err(|e| translate(e, "a request with this Idempotency-Key"))?;
        }
        let head = audit::append(&mut tx, &[event], &self.sealing.key).await?;
        self.sealing.commit(tx, head).await?;
        Ok(SubmitOutcome::Created(command))
    }

    async fn get(&self, id: CommandId) -> Result<Command, PortError> {
        let row = sqlx::query(&format!(
            "SELECT {COMMAND_COLUMNS} FROM commands WHERE id = $1"
        ))
        .bind(id.as_uuid())
        .fetch_one(&self.db.reader)
        .await
        .map_err(db)?;
        command_from_row(&row)
    }

    async fn list(&self, filter: &CommandFilter) -> Result<Page<Command>, PortError> {
        let mut query = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {COMMAND_COLUMNS} FROM commands WHERE 1 = 1"
        ));
        if let Some(project) = filter.project_id {
            query
                .push(" AND project_id = ")
                .push_bind(project.as_uuid());
        }
        if let Some(projects) = &filter.projects {
            if projects.is_empty() {
                return Ok(Page {
                    items: vec![],
                    next_cursor: None,
                });
            }
            push_project_in(&mut query, projects);
        }
        if let Some(status) = filter.status {
            query.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(before) = filter.before {
            // A cursor naming a command out of reach answers like an unknown one: an empty page.
            query
                .push(" AND seq < (SELECT seq FROM commands WHERE id = ")
                .push_bind(before.as_uuid());
            if let Some(projects) = &filter.projects {
                push_project_in(&mut query, projects);
            }
            query.push(")");
        }
        query
            .push(" ORDER BY seq DESC LIMIT ")
            .push_bind(i64::from(filter.limit) + 1);
        let rows = query.build().fetch_all(&self.db.reader).await.map_err(db)?;
        let items = rows
            .iter()
            .map(command_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(page(items, filter.limit, |c| c.id.to_string()))
    }

    async fn position(&self, id: CommandId) -> Result<Option<u64>, PortError> {
        let ahead: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM commands c, \
               (SELECT priority, seq FROM commands WHERE id = $1 AND status = 'queued') me \
             WHERE c.status = 'queued' \
               AND (c.priority > me.priority OR (c.priority = me.priority AND c.seq <= me.seq))",
        )
        .bind(id.as_uuid())
        .fetch_one(&self.db.reader)
        .await
        .map_err(db)?;
        Ok((ahead > 0).then_some(ahead as u64))
    }

    async fn summary(&self, projects: Option<&[ProjectId]>) -> Result<QueueSummary, PortError> {
        let rows = sqlx::query_as(
            "SELECT project_id, priority, status, COUNT(*) FROM commands \
             WHERE status IN ('queued', 'running') GROUP BY project_id, priority, status",
        )
        .fetch_all(&self.db.reader)
        .await
        .map_err(db)?;
        Ok(queue_summary(rows, projects))
    }

    async fn request_cancel(
        &self,
        id: CommandId,
        event: NewAuditEvent,
    ) -> Result<Command, PortError> {
        let mut tx = self.db.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE commands SET \
               status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END, \
               termination_reason = CASE WHEN status = 'queued' THEN 'cancel' ELSE termination_reason END, \
               finished_at = CASE WHEN status = 'queued' THEN $2 ELSE finished_at END, \
               cancel_requested = (status = 'running') \
             WHERE id = $1 AND status IN ('queued', 'running') RETURNING {COMMAND_COLUMNS}"
        ))
        .bind(id.as_uuid())
        .bind(self.clock.now())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        let Some(row) = row else {
            drop(tx);
            let command = self.get(id).await?;
            return Err(PortError::AlreadyEnded(command.status));
        };
        let command = command_from_row(&row)?;
        if command.status == CommandStatus::Cancelled {
            deliveries::write_outbox(&mut tx, &[command.id], self.clock.now()).await?;
        }
        let head = audit::append(&mut tx, &[event], &self.sealing.key).await?;
        self.sealing.commit(tx, head).await?;
        Ok(command)
    }
}

fn push_project_in(query: &mut QueryBuilder<'_, Sqlite>, projects: &[ProjectId]) {
    query.push(" AND project_id IN (");
    let mut ids = query.separated(", ");
    for id in projects {
        ids.push_bind(ProjectId::as_uuid(id));
    }
    query.push(")");
}
