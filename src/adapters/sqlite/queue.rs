//! [`SqliteCommandQueue`]: the queue as workers see it on SQLite. Every step runs on the one
//! writer connection, so claims are serialised and need no row locks; leases and ends are fenced
//! by the lease owner all the same, and time comes from the [`Clock`] port.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::SqliteConnection;
use uuid::Uuid;

use super::{SqliteDatabase, audit, deliveries};
use crate::adapters::sql::{
    COMMAND_COLUMNS, LOST_MESSAGE, Sealing, command_from_row, db, lost_audits, slots_per_project,
};
use crate::domain::audit::AuditContext;
use crate::domain::command::{Command, CommandStatus};
use crate::domain::ids::CommandId;
use crate::ports::{Claim, Clock, CommandQueue, Finished, PortError, RenewedLeases};

pub struct SqliteCommandQueue {
    db: SqliteDatabase,
    clock: Arc<dyn Clock>,
    sealing: Arc<Sealing>,
}

impl SqliteCommandQueue {
    pub fn new(db: SqliteDatabase, clock: Arc<dyn Clock>, sealing: Arc<Sealing>) -> Self {
        Self { db, clock, sealing }
    }
}

async fn free_slots(conn: &mut SqliteConnection, ended: &[Command]) -> Result<(), PortError> {
    for (project, freed) in slots_per_project(ended) {
        sqlx::query("UPDATE projects SET running_commands = running_commands - $2 WHERE id = $1")
            .bind(project)
            .bind(freed)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
    }
    Ok(())
}

#[async_trait]
impl CommandQueue for SqliteCommandQueue {
    /// Claims one command at a time inside one write transaction: the best by priority, then by
    /// how many its project has running (fewest first: projects with a backlog share the
    /// workers), then by age; each claim takes a project slot before the next is chosen.
    async fn claim(
        &self,
        owner: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Claim>, PortError> {
        let mut tx = self.db.begin().await?;
        let now = self.clock.now();
        let lease_until = now + lease;
        let mut claimed = Vec::new();
        while claimed.len() < limit {
            let best: Option<(Uuid, Uuid)> = sqlx::query_as(
                "SELECT c.id, c.project_id FROM commands c JOIN projects p ON p.id = c.project_id \
                 WHERE c.status = 'queued' AND p.running_commands < p.max_concurrency \
                 ORDER BY c.priority DESC, p.running_commands, c.seq LIMIT 1",
            )
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
            let Some((id, project)) = best else { break };
            sqlx::query(
                "UPDATE projects SET running_commands = running_commands + 1 WHERE id = $1",
            )
            .bind(project)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            let row = sqlx::query(&format!(
                "UPDATE commands SET status = 'running', started_at = $2, lease_owner = $3, \
                 lease_expires_at = $4 WHERE id = $1 RETURNING {COMMAND_COLUMNS}"
            ))
            .bind(id)
            .bind(now)
            .bind(owner)
            .bind(lease_until)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
            claimed.push(Claim {
                command: command_from_row(&row)?,
                lease_until,
            });
        }
        let started: Vec<CommandId> = claimed.iter().map(|c| c.command.id).collect();
        deliveries::write_outbox(&mut tx, &started, now).await?;
        tx.commit().await.map_err(db)?;
        Ok(claimed)
    }

    async fn renew_leases(
        &self,
        owner: &str,
        ids: &[CommandId],
        lease: Duration,
    ) -> Result<RenewedLeases, PortError> {
        let until = self.clock.now() + lease;
        let mut tx = self.db.begin().await?;
        let mut report = RenewedLeases::default();
        for id in ids {
            let cancel_requested: Option<bool> = sqlx::query_scalar(
                "UPDATE commands SET lease_expires_at = $3 \
                 WHERE id = $1 AND lease_owner = $2 AND status = 'running' RETURNING cancel_requested",
            )
            .bind(id.as_uuid())
            .bind(owner)
            .bind(until)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
            match cancel_requested {
                Some(true) => report.cancel_requested.push(*id),
                Some(false) => {}
                None => report.lost.push(*id),
            }
        }
        tx.commit().await.map_err(db)?;
        Ok(report)
    }

    async fn finish(
        &self,
        owner: &str,
        batch: &[Finished],
    ) -> Result<Vec<Result<Command, PortError>>, PortError> {
        let mut tx = self.db.begin().await?;
        let mut results = Vec::with_capacity(batch.len());
        let mut ended = Vec::new();
        let mut events = Vec::new();
        for item in batch {
            if let Err(not_an_end) = CommandStatus::Running.transition(item.outcome.status) {
                results.push(Err(PortError::backend(not_an_end)));
                continue;
            }
            let outcome = &item.outcome;
            let row = sqlx::query(&format!(
                "UPDATE commands SET status = $2, exit_code = $3, termination_reason = $4, error = $5, \
                 finished_at = $6, stdout_bytes = $7, stderr_bytes = $8, dropped_bytes = $9, \
                 truncated = $10, last_seq = $11, lease_owner = NULL, lease_expires_at = NULL \
                 WHERE id = $1 AND status = 'running' AND lease_owner = $12 RETURNING {COMMAND_COLUMNS}"
            ))
            .bind(item.id.as_uuid())
            .bind(outcome.status.as_str())
            .bind(outcome.exit_code.map(i64::from))
            .bind(outcome.reason.as_str())
            .bind(outcome.error.as_deref())
            .bind(outcome.finished_at)
            .bind(outcome.stdout_bytes)
            .bind(outcome.stderr_bytes)
            .bind(outcome.dropped_bytes)
            .bind(outcome.truncated)
            .bind(outcome.last_seq)
            .bind(owner)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
            match row {
                Some(row) => {
                    let command = command_from_row(&row)?;
                    events.push(item.audit.clone());
                    ended.push(command.clone());
                    results.push(Ok(command));
                }
                None => results.push(Err(PortError::LeaseLost)),
            }
        }
        free_slots(&mut tx, &ended).await?;
        let ids: Vec<CommandId> = ended.iter().map(|c| c.id).collect();
        deliveries::write_outbox(&mut tx, &ids, self.clock.now()).await?;
        let head = audit::append(&mut tx, &events, &self.sealing.key).await?;
        self.sealing.commit(tx, head).await?;
        Ok(results)
    }

    async fn expire_leases(&self, context: &AuditContext) -> Result<Vec<Command>, PortError> {
        let now = self.clock.now();
        let mut tx = self.db.begin().await?;
        let rows = sqlx::query(&format!(
            "UPDATE commands SET status = 'lost', termination_reason = 'lost', finished_at = $1, \
             error = $2, lease_owner = NULL, lease_expires_at = NULL \
             WHERE status = 'running' AND julianday(lease_expires_at) < julianday($1) \
             RETURNING {COMMAND_COLUMNS}"
        ))
        .bind(now)
        .bind(LOST_MESSAGE)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let lost = rows
            .iter()
            .map(command_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        free_slots(&mut tx, &lost).await?;
        let ids: Vec<CommandId> = lost.iter().map(|c| c.id).collect();
        deliveries::write_outbox(&mut tx, &ids, now).await?;
        let head = audit::append(
            &mut tx,
            &lost_audits(context, now, &lost),
            &self.sealing.key,
        )
        .await?;
        self.sealing.commit(tx, head).await?;
        Ok(lost)
    }
}
