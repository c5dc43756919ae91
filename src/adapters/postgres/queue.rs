//! [`PgCommandQueue`]: the queue as workers see it on Postgres. Claims, lease renewals, ends and
//! the reaper all stamp time with the database's clock, so skew between replicas cannot reap a
//! healthy command, and every write of a running command is fenced by its lease owner.

use std::collections::HashMap;
use std::time::Duration;

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::{PgConnection, PgPool, Row};
use time::OffsetDateTime;
use uuid::Uuid;

use super::audit;
use crate::adapters::sql::{
    COMMAND_COLUMNS, Dialect, LOST_MESSAGE, Sealing, command_from_row, db, lost_audits,
    outbox_insert, qualified, slots_per_project,
};
use crate::domain::audit::AuditContext;
use crate::domain::command::{Command, CommandStatus};
use crate::domain::ids::CommandId;
use crate::ports::{Claim, CommandQueue, Finished, PortError, RenewedLeases};

pub struct PgCommandQueue {
    pool: PgPool,
    sealing: Arc<Sealing>,
}

impl PgCommandQueue {
    pub fn new(pool: PgPool, sealing: Arc<Sealing>) -> Self {
        Self { pool, sealing }
    }
}

/// Gives back the project slots of commands that left `running`, in project id order (the order
/// claims lock project rows in, so the two never deadlock).
async fn free_slots(conn: &mut PgConnection, ended: &[Command]) -> Result<(), PortError> {
    let (projects, counts): (Vec<Uuid>, Vec<i64>) = slots_per_project(ended).into_iter().unzip();
    if projects.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE projects p SET running_commands = p.running_commands - f.freed \
         FROM (SELECT * FROM UNNEST($1::uuid[], $2::bigint[]) AS f(id, freed) ORDER BY id) f \
         WHERE p.id = f.id",
    )
    .bind(projects)
    .bind(counts)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(())
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

#[async_trait]
impl CommandQueue for PgCommandQueue {
    /// One statement: lock the rows of projects with free slots (in id order), take each one's
    /// best `free` queued commands, then keep the best `limit` across projects by priority, then
    /// by how many the project would have running (fewest first: projects with a backlog share
    /// the workers round robin), then by age. A project with nothing queued simply yields no
    /// candidate: asking `EXISTS` of each one scanned the table past every finished command.
    async fn claim(
        &self,
        owner: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Claim>, PortError> {
        let rows = sqlx::query(&format!(
            "WITH open AS ( \
                 SELECT p.id, p.running_commands AS running, \
                        LEAST(p.max_concurrency - p.running_commands, $1) AS free \
                 FROM projects p \
                 WHERE p.running_commands < p.max_concurrency \
                 ORDER BY p.id \
                 FOR NO KEY UPDATE OF p \
             ), candidates AS ( \
                 SELECT best.*, open.running + row_number() OVER ( \
                            PARTITION BY best.project_id ORDER BY best.priority DESC, best.seq) AS load \
                 FROM open CROSS JOIN LATERAL ( \
                     SELECT c.id, c.project_id, c.priority, c.seq FROM commands c \
                     WHERE c.project_id = open.id AND c.status = 'queued' \
                     ORDER BY c.priority DESC, c.seq LIMIT open.free \
                     FOR UPDATE OF c SKIP LOCKED) best \
             ), picked AS ( \
                 SELECT id, project_id, row_number() OVER (ORDER BY priority DESC, load, seq) AS claim_order \
                 FROM candidates ORDER BY priority DESC, load, seq LIMIT $1 \
             ), bump AS ( \
                 UPDATE projects p SET running_commands = p.running_commands + n.taken \
                 FROM (SELECT project_id, COUNT(*) AS taken FROM picked GROUP BY project_id) n \
                 WHERE p.id = n.project_id \
             ), claimed AS ( \
                 UPDATE commands c SET status = 'running', started_at = clock_timestamp(), \
                     lease_owner = $2, lease_expires_at = clock_timestamp() + make_interval(secs => $3::double precision / 1e6) \
                 FROM picked WHERE c.id = picked.id \
                 RETURNING {}, c.lease_expires_at AS lease_until, picked.claim_order \
             ), hooks AS ({}) \
             SELECT * FROM claimed",
            qualified(COMMAND_COLUMNS, "c"),
            outbox_insert(Dialect::Postgres, "claimed", "clock_timestamp()")
        ))
        .bind(limit as i64)
        .bind(owner)
        .bind(micros(lease))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let mut claimed = rows
            .iter()
            .map(|row| {
                let order: i64 = row.try_get("claim_order").map_err(db)?;
                let lease_until: OffsetDateTime = row.try_get("lease_until").map_err(db)?;
                let command = command_from_row(row)?;
                Ok((
                    order,
                    Claim {
                        command,
                        lease_until,
                    },
                ))
            })
            .collect::<Result<Vec<_>, PortError>>()?;
        // Start them in claim order.
        claimed.sort_by_key(|(order, _)| *order);
        Ok(claimed.into_iter().map(|(_, claim)| claim).collect())
    }

    async fn renew_leases(
        &self,
        owner: &str,
        ids: &[CommandId],
        lease: Duration,
    ) -> Result<RenewedLeases, PortError> {
        let wanted: Vec<Uuid> = ids.iter().map(CommandId::as_uuid).collect();
        let rows: Vec<(Uuid, bool)> = sqlx::query_as(
            "UPDATE commands SET lease_expires_at = clock_timestamp() + make_interval(secs => $3::double precision / 1e6) \
             WHERE id = ANY($1) AND lease_owner = $2 AND status = 'running' \
             RETURNING id, cancel_requested",
        )
        .bind(&wanted)
        .bind(owner)
        .bind(micros(lease))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let renewed: HashMap<Uuid, bool> = rows.into_iter().collect();
        let mut report = RenewedLeases::default();
        for id in ids {
            match renewed.get(&id.as_uuid()) {
                Some(true) => report.cancel_requested.push(*id),
                Some(false) => {}
                None => report.lost.push(*id),
            }
        }
        Ok(report)
    }

    async fn finish(
        &self,
        owner: &str,
        batch: &[Finished],
    ) -> Result<Vec<Result<Command, PortError>>, PortError> {
        let allowed: Vec<&Finished> = batch
            .iter()
            .filter(|item| {
                CommandStatus::Running
                    .transition(item.outcome.status)
                    .is_ok()
            })
            .collect();
        let mut tx = self.pool.begin().await.map_err(db)?;
        let ended = mark_finished(&mut tx, owner, &allowed).await?;
        let mut results = Vec::with_capacity(batch.len());
        let mut events = Vec::with_capacity(ended.len());
        for item in batch {
            results.push(
                match CommandStatus::Running.transition(item.outcome.status) {
                    Err(not_an_end) => Err(PortError::backend(not_an_end)),
                    Ok(_) => match ended.get(&item.id) {
                        Some(command) => {
                            events.push(item.audit.clone());
                            Ok(command.clone())
                        }
                        None => Err(PortError::LeaseLost),
                    },
                },
            );
        }
        let ended: Vec<Command> = ended.into_values().collect();
        free_slots(&mut tx, &ended).await?;
        let head = audit::append(&mut tx, &events, &self.sealing.key).await?;
        self.sealing.commit(tx, head).await?;
        Ok(results)
    }

    async fn expire_leases(&self, context: &AuditContext) -> Result<Vec<Command>, PortError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let rows = sqlx::query(&format!(
            "WITH changed AS (UPDATE commands SET status = 'lost', termination_reason = 'lost', \
             finished_at = date_trunc('microseconds', clock_timestamp()), error = $1, \
             lease_owner = NULL, lease_expires_at = NULL \
             WHERE status = 'running' AND lease_expires_at < clock_timestamp() \
             RETURNING {COMMAND_COLUMNS}), hooks AS ({}) SELECT * FROM changed",
            outbox_insert(Dialect::Postgres, "changed", "clock_timestamp()")
        ))
        .bind(LOST_MESSAGE)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let lost = rows
            .iter()
            .map(command_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let mut head = None;
        if let Some(first) = lost.first() {
            let at = first.finished_at.unwrap_or_else(OffsetDateTime::now_utc);
            free_slots(&mut tx, &lost).await?;
            head =
                audit::append(&mut tx, &lost_audits(context, at, &lost), &self.sealing.key).await?;
        }
        self.sealing.commit(tx, head).await?;
        Ok(lost)
    }
}

/// Writes the final states of a batch in one statement, fenced by `owner`; returns the commands
/// it changed (those still running under `owner`'s lease).
async fn mark_finished(
    conn: &mut PgConnection,
    owner: &str,
    batch: &[&Finished],
) -> Result<HashMap<CommandId, Command>, PortError> {
    if batch.is_empty() {
        return Ok(HashMap::new());
    }
    let column = |f: fn(&Finished) -> i64| batch.iter().map(|i| f(i)).collect::<Vec<_>>();
    let rows = sqlx::query(&format!(
        "WITH changed AS (UPDATE commands c SET status = v.status, exit_code = v.exit_code, \
         termination_reason = v.reason, error = v.error, finished_at = v.finished_at, \
         stdout_bytes = v.stdout_bytes, stderr_bytes = v.stderr_bytes, \
         dropped_bytes = v.dropped_bytes, truncated = v.truncated, last_seq = v.last_seq, \
         lease_owner = NULL, lease_expires_at = NULL \
         FROM UNNEST($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::text[], \
                     $6::timestamptz[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bool[], $11::bigint[]) \
              AS v(id, status, exit_code, reason, error, finished_at, stdout_bytes, stderr_bytes, \
                   dropped_bytes, truncated, last_seq) \
         WHERE c.id = v.id AND c.status = 'running' AND c.lease_owner = $12 RETURNING {}), \
         hooks AS ({}) SELECT * FROM changed",
        qualified(COMMAND_COLUMNS, "c"),
        outbox_insert(Dialect::Postgres, "changed", "clock_timestamp()")
    ))
    .bind(batch.iter().map(|i| i.id.as_uuid()).collect::<Vec<_>>())
    .bind(batch.iter().map(|i| i.outcome.status.as_str()).collect::<Vec<_>>())
    .bind(batch.iter().map(|i| i.outcome.exit_code.map(i64::from)).collect::<Vec<_>>())
    .bind(batch.iter().map(|i| i.outcome.reason.as_str()).collect::<Vec<_>>())
    .bind(batch.iter().map(|i| i.outcome.error.clone()).collect::<Vec<_>>())
    .bind(batch.iter().map(|i| i.outcome.finished_at).collect::<Vec<_>>())
    .bind(column(|i| i.outcome.stdout_bytes))
    .bind(column(|i| i.outcome.stderr_bytes))
    .bind(column(|i| i.outcome.dropped_bytes))
    .bind(batch.iter().map(|i| i.outcome.truncated).collect::<Vec<_>>())
    .bind(column(|i| i.outcome.last_seq))
    .bind(owner)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    rows.iter()
        .map(|row| command_from_row(row).map(|command| (command.id, command)))
        .collect()
}
