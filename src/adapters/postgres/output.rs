//! [`PgOutputStore`]: stored command output on Postgres.

use async_trait::async_trait;
use sqlx::{PgPool, Postgres, QueryBuilder};

use crate::adapters::sql::{chunk_from_row, db, push_output_insert};
use crate::domain::command::OutputChunk;
use crate::domain::ids::CommandId;
use crate::ports::{OutputProgress, OutputStore, PortError};

pub struct PgOutputStore {
    pool: PgPool,
}

impl PgOutputStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

#[async_trait]
impl OutputStore for PgOutputStore {
    /// One statement (one round trip: this is on the path from a process's first byte to its
    /// followers). The progress UPDATE is the fence: it locks the command row and matches only
    /// while the command runs under `owner`, and the chunks are inserted only if it matched, so
    /// a reaper's `lost` and an append are strictly ordered.
    async fn append(
        &self,
        command: CommandId,
        owner: &str,
        chunks: &[OutputChunk],
        progress: OutputProgress,
    ) -> Result<(), PortError> {
        let mut query =
            QueryBuilder::<Postgres>::new("WITH fence AS (UPDATE commands SET last_seq = ");
        query
            .push_bind(progress.last_seq)
            .push(", stdout_bytes = ")
            .push_bind(progress.stdout_bytes)
            .push(", stderr_bytes = ")
            .push_bind(progress.stderr_bytes)
            .push(", dropped_bytes = ")
            .push_bind(progress.dropped_bytes)
            .push(", truncated = ")
            .push_bind(progress.truncated)
            .push(" WHERE id = ")
            .push_bind(command.as_uuid())
            .push(" AND status = 'running' AND lease_owner = ")
            .push_bind(owner)
            .push(" RETURNING id)");
        if !chunks.is_empty() {
            query.push(", stored AS (");
            push_output_insert(&mut query, command, chunks, "EXISTS (SELECT 1 FROM fence)");
            query.push(")");
        }
        query.push(" SELECT COUNT(*) FROM fence");
        let fenced_in: i64 = query
            .build_query_scalar()
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        if fenced_in == 0 {
            return Err(PortError::LeaseLost);
        }
        Ok(())
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
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(chunk_from_row).collect()
    }
}
