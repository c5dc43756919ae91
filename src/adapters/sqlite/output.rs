//! [`SqliteOutputStore`]: stored command output on SQLite.

use async_trait::async_trait;
use sqlx::{QueryBuilder, Sqlite};

use super::SqliteDatabase;
use crate::adapters::sql::{chunk_from_row, db, push_output_insert};
use crate::domain::command::OutputChunk;
use crate::domain::ids::CommandId;
use crate::ports::{OutputProgress, OutputStore, PortError};

pub struct SqliteOutputStore {
    db: SqliteDatabase,
}

impl SqliteOutputStore {
    pub fn new(db: SqliteDatabase) -> Self {
        Self { db }
    }
}

#[async_trait]
impl OutputStore for SqliteOutputStore {
    /// The progress UPDATE is the fence: it matches only while the command runs under `owner`,
    /// and the chunks are inserted in the same write transaction only if it did.
    async fn append(
        &self,
        command: CommandId,
        owner: &str,
        chunks: &[OutputChunk],
        progress: OutputProgress,
    ) -> Result<(), PortError> {
        let mut tx = self.db.begin().await?;
        let fenced_in = sqlx::query(
            "UPDATE commands SET last_seq = $2, stdout_bytes = $3, stderr_bytes = $4, \
             dropped_bytes = $5, truncated = $6 WHERE id = $1 AND status = 'running' AND lease_owner = $7",
        )
        .bind(command.as_uuid())
        .bind(progress.last_seq)
        .bind(progress.stdout_bytes)
        .bind(progress.stderr_bytes)
        .bind(progress.dropped_bytes)
        .bind(progress.truncated)
        .bind(owner)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        if fenced_in.rows_affected() == 0 {
            return Err(PortError::LeaseLost);
        }
        if !chunks.is_empty() {
            let mut insert = QueryBuilder::<Sqlite>::new("");
            push_output_insert(&mut insert, command, chunks, "TRUE");
            insert.build().execute(&mut *tx).await.map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    async fn read_after(
        &self,
        command: CommandId,
        after: i64,
        limit: u32,
    ) -> Result<Vec<OutputChunk>, PortError> {
        let rows = sqlx::query(
            "SELECT seq, stream, data FROM command_output \
             WHERE command_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(command.as_uuid())
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.db.reader)
        .await
        .map_err(db)?;
        rows.iter().map(chunk_from_row).collect()
    }
}
