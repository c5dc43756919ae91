//! The embedded SQLite backend: one writer connection (SQLite allows one writer at a time, so
//! queueing writes in the pool is cheaper than retrying `SQLITE_BUSY`) and a pool of readers on
//! the WAL. Commands claim and wake up within this one process.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};

use crate::domain::audit::truncate_to_micros;
use crate::domain::command::{Command, OutputChunk};
use crate::domain::ids::CommandId;
use crate::ports::{Claim, Finished, OutputProgress, PortError};

use super::sql::{COMMAND_COLUMNS, command_from_row, db, push_output_insert, sql_repositories};

pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `url` and applies the migrations.
    pub async fn connect(url: &str) -> Result<Self, sqlx::Error> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.read_only(true))
            .await?;
        Ok(Self { writer, reader })
    }

    fn reader(&self) -> &SqlitePool {
        &self.reader
    }

    fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    async fn begin(&self) -> Result<Transaction<'static, Sqlite>, PortError> {
        self.writer.begin().await.map_err(db)
    }

    /// Claims step by step inside one write transaction; the single writer connection makes
    /// the steps atomic, so claims are serialised and take commands strictly in order.
    async fn claim_batch(
        &self,
        owner: &str,
        lease: std::time::Duration,
        limit: usize,
    ) -> Result<Vec<Claim>, PortError> {
        let mut claimed = Vec::new();
        for _ in 0..8 {
            if claimed.len() >= limit {
                break;
            }
            let mut tx = self.begin().await?;
            let project: Option<uuid::Uuid> = sqlx::query_scalar(
                "SELECT c.project_id FROM commands c JOIN projects p ON p.id = c.project_id \
                 WHERE c.status = 'queued' AND p.running_commands < p.max_concurrency \
                 ORDER BY c.priority DESC, c.seq LIMIT 1",
            )
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
            let Some(project) = project else { break };
            let free: Option<i64> = sqlx::query_scalar(
                "SELECT max_concurrency - running_commands FROM projects WHERE id = $1",
            )
            .bind(project)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
            let take = free.unwrap_or(0).min((limit - claimed.len()) as i64);
            if take <= 0 {
                tx.rollback().await.map_err(db)?;
                continue;
            }
            let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
                "SELECT id FROM commands WHERE project_id = $1 AND status = 'queued' \
             ORDER BY priority DESC, seq LIMIT $2",
            )
            .bind(project)
            .bind(take)
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;
            if ids.is_empty() {
                tx.rollback().await.map_err(db)?;
                continue;
            }
            sqlx::query(
                "UPDATE projects SET running_commands = running_commands + $2 WHERE id = $1",
            )
            .bind(project)
            .bind(ids.len() as i64)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            let now = truncate_to_micros(time::OffsetDateTime::now_utc());
            let lease_until = now + lease;
            let mut update = sqlx::QueryBuilder::<Sqlite>::new(
                "UPDATE commands SET status = 'running', started_at = ",
            );
            update
                .push_bind(now)
                .push(", lease_owner = ")
                .push_bind(owner)
                .push(", lease_expires_at = ")
                .push_bind(lease_until)
                .push(" WHERE id IN (");
            let mut list = update.separated(", ");
            for id in &ids {
                list.push_bind(*id);
            }
            update.push(format!(") RETURNING {COMMAND_COLUMNS}"));
            let rows = update.build().fetch_all(&mut *tx).await.map_err(db)?;
            let mut commands = rows
                .iter()
                .map(command_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            tx.commit().await.map_err(db)?;
            // Start them in claim order.
            commands.sort_by_key(|c| ids.iter().position(|id| *id == c.id.as_uuid()));
            claimed.extend(commands.into_iter().map(|command| Claim {
                command,
                lease_until,
            }));
        }
        Ok(claimed)
    }

    /// Writes the final state of each running command of the batch; returns those it changed.
    async fn mark_finished(
        tx: &mut Transaction<'static, Sqlite>,
        batch: &[&Finished],
    ) -> Result<HashMap<CommandId, Command>, PortError> {
        let mut ended = HashMap::with_capacity(batch.len());
        for item in batch {
            let outcome = &item.outcome;
            let row = sqlx::query(&format!(
                "UPDATE commands SET status = $2, exit_code = $3, termination_reason = $4, error = $5, \
                 finished_at = $6, stdout_bytes = $7, stderr_bytes = $8, dropped_bytes = $9, \
                 truncated = $10, last_seq = $11, lease_owner = NULL, lease_expires_at = NULL \
                 WHERE id = $1 AND status = 'running' RETURNING {COMMAND_COLUMNS}"
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
            .fetch_optional(&mut **tx)
            .await
            .map_err(db)?;
            if let Some(row) = row {
                let command = command_from_row(&row)?;
                ended.insert(command.id, command);
            }
        }
        Ok(ended)
    }

    /// Stores a batch of output and the progress in one transaction.
    async fn append_output(
        &self,
        command: CommandId,
        chunks: &[OutputChunk],
        progress: OutputProgress,
    ) -> Result<(), PortError> {
        let mut tx = self.begin().await?;
        if !chunks.is_empty() {
            let mut insert = sqlx::QueryBuilder::<Sqlite>::new("");
            push_output_insert(&mut insert, command, chunks);
            insert.build().execute(&mut *tx).await.map_err(db)?;
        }
        sqlx::query(
            "UPDATE commands SET last_seq = $2, stdout_bytes = $3, stderr_bytes = $4, \
             dropped_bytes = $5, truncated = $6 WHERE id = $1",
        )
        .bind(command.as_uuid())
        .bind(progress.last_seq)
        .bind(progress.stdout_bytes)
        .bind(progress.stderr_bytes)
        .bind(progress.dropped_bytes)
        .bind(progress.truncated)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    /// True when the database answers.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.reader).await.is_ok()
    }

    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }
}

// The single writer connection already serialises audit appends.
sql_repositories!(
    SqliteStore,
    Sqlite,
    audit_lock = "SELECT 1",
    row_lock = "",
    time = "julianday"
);
