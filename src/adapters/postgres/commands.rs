//! [`PgCommandStore`]: what the API side does with commands on Postgres (submit with the queue
//! limit and idempotency in one transaction, reads, queue positions, cancel requests).

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::PgPool;
use uuid::Uuid;

use super::audit;
use crate::adapters::sql::{
    COMMAND_COLUMNS, Dialect, Sealing, command_from_row, db, outbox_insert, page, queue_summary,
    translate,
};
use crate::domain::audit::NewAuditEvent;
use crate::domain::command::Command;
use crate::domain::ids::{CommandId, ProjectId};
use crate::ports::{
    Clock, CommandFilter, CommandStore, Page, PortError, QueueSummary, Submission, SubmitOutcome,
};

pub struct PgCommandStore {
    pool: PgPool,
    clock: Arc<dyn Clock>,
    sealing: Arc<Sealing>,
}

impl PgCommandStore {
    pub fn new(pool: PgPool, clock: Arc<dyn Clock>, sealing: Arc<Sealing>) -> Self {
        Self {
            pool,
            clock,
            sealing,
        }
    }
}

#[async_trait]
impl CommandStore for PgCommandStore {
    async fn submit(&self, submission: Submission) -> Result<SubmitOutcome, PortError> {
        let Submission {
            command,
            audit: event,
            idempotency,
            max_queued,
            max_queued_per_project,
        } = submission;
        let mut tx = self.pool.begin().await.map_err(db)?;
        if let Some(idem) = &idempotency {
            sqlx::query(
                "DELETE FROM idempotency_keys WHERE api_key_id = $1 AND key = $2 AND created_at < $3",
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
        // The queue limits are checked by the insert itself, and the webhook outbox is written
        // by the same statement: one round trip on the submit path.
        let inserted: i64 = sqlx::query_scalar(&format!(
            "WITH ins AS (INSERT INTO commands (id, project_id, command, env, priority, timeout_secs, \
             status, submitted_by, created_at) SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 \
             WHERE (SELECT COUNT(*) FROM commands WHERE status = 'queued') < $10 \
               AND (SELECT COUNT(*) FROM commands WHERE status = 'queued' AND project_id = $2) < $11 \
             RETURNING *), hooks AS ({}) SELECT COUNT(*) FROM ins",
            outbox_insert(Dialect::Postgres, "ins", "clock_timestamp()")
        ))
        .bind(command.id.as_uuid())
        .bind(command.project_id.as_uuid())
        .bind(command.command.as_str())
        .bind(command.env.to_json())
        .bind(i64::from(command.priority.rank()))
        .bind(i64::from(command.timeout_secs))
        .bind(command.status.as_str())
        .bind(command.submitted_by.map(|k| k.as_uuid()))
        .bind(command.created_at)
        .bind(i64::try_from(max_queued).unwrap_or(i64::MAX))
        .bind(i64::try_from(max_queued_per_project).unwrap_or(i64::MAX))
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| translate(e, "a command with this id"))?;
        if inserted == 0 {
            let (queued, in_project): (i64, i64) = sqlx::query_as(
                "SELECT COUNT(*), COUNT(*) FILTER (WHERE project_id = $1) FROM commands \
                 WHERE status = 'queued'",
            )
            .bind(command.project_id.as_uuid())
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
            return Ok(if queued as u64 >= max_queued {
                SubmitOutcome::QueueFull {
                    queued: queued as u64,
                }
            } else {
                SubmitOutcome::ProjectQueueFull {
                    queued: in_project as u64,
                }
            });
        }
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
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        command_from_row(&row)
    }

    async fn list(&self, filter: &CommandFilter) -> Result<Page<Command>, PortError> {
        let projects: Option<Vec<Uuid>> = filter
            .projects
            .as_ref()
            .map(|ids| ids.iter().map(ProjectId::as_uuid).collect());
        let rows = sqlx::query(&format!(
            "SELECT {COMMAND_COLUMNS} FROM commands \
             WHERE ($1::uuid IS NULL OR project_id = $1) AND ($2::uuid[] IS NULL OR project_id = ANY($2)) \
               AND ($3::text IS NULL OR status = $3) \
               AND ($4::uuid IS NULL OR seq < (SELECT seq FROM commands WHERE id = $4 \
                 AND ($2::uuid[] IS NULL OR project_id = ANY($2)))) \
             ORDER BY seq DESC LIMIT $5"
        ))
        .bind(filter.project_id.map(|p| p.as_uuid()))
        .bind(projects)
        .bind(filter.status.map(|s| s.as_str()))
        .bind(filter.before.map(|c| c.as_uuid()))
        .bind(i64::from(filter.limit) + 1)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
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
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        Ok((ahead > 0).then_some(ahead as u64))
    }

    async fn summary(&self, projects: Option<&[ProjectId]>) -> Result<QueueSummary, PortError> {
        let rows = sqlx::query_as(
            "SELECT project_id, priority, status, COUNT(*) FROM commands \
             WHERE status IN ('queued', 'running') GROUP BY project_id, priority, status",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        Ok(queue_summary(rows, projects))
    }

    async fn request_cancel(
        &self,
        id: CommandId,
        event: NewAuditEvent,
    ) -> Result<Command, PortError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let row = sqlx::query(&format!(
            "WITH changed AS (UPDATE commands SET \
               status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END, \
               termination_reason = CASE WHEN status = 'queued' THEN 'cancel' ELSE termination_reason END, \
               finished_at = CASE WHEN status = 'queued' THEN $2 ELSE finished_at END, \
               cancel_requested = (status = 'running') \
             WHERE id = $1 AND status IN ('queued', 'running') RETURNING {COMMAND_COLUMNS}), \
             hooks AS ({}) SELECT * FROM changed",
            outbox_insert(
                Dialect::Postgres,
                "(SELECT * FROM changed WHERE status = 'cancelled')",
                "clock_timestamp()"
            )
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
        let head = audit::append(&mut tx, &[event], &self.sealing.key).await?;
        self.sealing.commit(tx, head).await?;
        Ok(command)
    }
}
