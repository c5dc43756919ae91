//! The Postgres backend for several replicas: the queue is claimed with `FOR UPDATE SKIP
//! LOCKED`, audit appends are serialised with an advisory lock, and replicas tell each other
//! about new work, cancels, status changes and stored output through `LISTEN/NOTIFY` on one
//! channel. NOTIFY is only a hint (coalesced by the bus); the tables stay the source of truth.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};
use tokio_util::sync::CancellationToken;

use crate::domain::audit::truncate_to_micros;
use crate::domain::command::{Command, CommandStatus, OutputChunk};
use crate::domain::ids::CommandId;
use crate::ports::{Claim, Finished, OutputProgress, PortError, Relay, RemoteHint, RemoteInbox};

use super::sql::{COMMAND_COLUMNS, command_from_row, db, push_output_insert, sql_repositories};

const CHANNEL: &str = "rdev_events";
const HINTS_PER_NOTIFY: usize = 60;

pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects and applies the migrations (sqlx takes an advisory lock, so replicas starting
    /// together migrate once).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, sqlx::Error> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(Self { pool })
    }

    fn reader(&self) -> &PgPool {
        &self.pool
    }

    fn writer(&self) -> &PgPool {
        &self.pool
    }

    async fn begin(&self) -> Result<Transaction<'static, Postgres>, PortError> {
        self.pool.begin().await.map_err(db)
    }

    /// Claims in one statement (one round trip): pick the project of the best claimable
    /// command, lock its row (`FOR NO KEY UPDATE`: claims within a project are serialised, so
    /// its commands go strictly in order, while submits' foreign-key checks are not blocked), take up to `limit` of its free slots with its best queued commands
    /// (`SKIP LOCKED`), and mark them running.
    async fn claim_batch(
        &self,
        owner: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Claim>, PortError> {
        // started_at is the database's clock when the claim took effect: this statement may wait
        // for a project's row lock (or a pool connection), and a start stamped before the wait
        // could precede the end of the command whose slot it took.
        let lease_until = truncate_to_micros(time::OffsetDateTime::now_utc()) + lease;
        let rows = sqlx::query(&format!(
            "WITH slot AS ( \
                 SELECT p.id, GREATEST(LEAST(p.max_concurrency - p.running_commands, $1), 0) AS free \
                 FROM projects p \
                 WHERE p.id = (SELECT c.project_id FROM commands c JOIN projects q ON q.id = c.project_id \
                               WHERE c.status = 'queued' AND q.running_commands < q.max_concurrency \
                               ORDER BY c.priority DESC, c.seq LIMIT 1) \
                 FOR NO KEY UPDATE OF p \
             ), picked AS ( \
                 SELECT c.id, c.priority, c.seq FROM commands c \
                 WHERE c.project_id = (SELECT id FROM slot) AND c.status = 'queued' \
                 ORDER BY c.priority DESC, c.seq LIMIT (SELECT free FROM slot) \
                 FOR UPDATE OF c SKIP LOCKED \
             ), bump AS ( \
                 UPDATE projects SET running_commands = running_commands + (SELECT COUNT(*) FROM picked) \
                 WHERE id = (SELECT id FROM slot) \
             ) \
             UPDATE commands SET status = 'running', started_at = clock_timestamp(), lease_owner = $2, lease_expires_at = $3 \
             FROM picked WHERE commands.id = picked.id \
             RETURNING {}, picked.priority AS claim_priority, picked.seq AS claim_seq",
            COMMAND_COLUMNS
                .split(", ")
                .map(|c| format!("commands.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .bind(limit as i64)
        .bind(owner)
        .bind(lease_until)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let mut claimed: Vec<(i64, i64, Claim)> = rows
            .iter()
            .map(|row| {
                let command = command_from_row(row)?;
                let priority: i64 = sqlx::Row::try_get(row, "claim_priority").map_err(db)?;
                let seq: i64 = sqlx::Row::try_get(row, "claim_seq").map_err(db)?;
                Ok((
                    priority,
                    seq,
                    Claim {
                        command,
                        lease_until,
                    },
                ))
            })
            .collect::<Result<_, PortError>>()?;
        // Start them in claim order.
        claimed.sort_by_key(|(priority, seq, _)| (std::cmp::Reverse(*priority), *seq));
        Ok(claimed.into_iter().map(|(_, _, claim)| claim).collect())
    }

    /// Writes the final states of a batch in one statement; returns the commands it changed
    /// (those still running).
    async fn mark_finished(
        tx: &mut Transaction<'static, Postgres>,
        batch: &[&Finished],
    ) -> Result<HashMap<CommandId, Command>, PortError> {
        if batch.is_empty() {
            return Ok(HashMap::new());
        }
        let column =
            |f: fn(&Finished) -> Option<i64>| batch.iter().map(|i| f(i)).collect::<Vec<_>>();
        let rows = sqlx::query(&format!(
            "UPDATE commands c SET status = v.status, exit_code = v.exit_code, \
             termination_reason = v.reason, error = v.error, finished_at = v.finished_at, \
             stdout_bytes = v.stdout_bytes, stderr_bytes = v.stderr_bytes, \
             dropped_bytes = v.dropped_bytes, truncated = v.truncated, last_seq = v.last_seq, \
             lease_owner = NULL, lease_expires_at = NULL \
             FROM UNNEST($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::text[], \
                         $6::timestamptz[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bool[], $11::bigint[]) \
                  AS v(id, status, exit_code, reason, error, finished_at, stdout_bytes, stderr_bytes, \
                       dropped_bytes, truncated, last_seq) \
             WHERE c.id = v.id AND c.status = 'running' RETURNING {}",
            COMMAND_COLUMNS
                .split(", ")
                .map(|c| format!("c.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .bind(batch.iter().map(|i| i.id.as_uuid()).collect::<Vec<_>>())
        .bind(batch.iter().map(|i| i.outcome.status.as_str()).collect::<Vec<_>>())
        .bind(column(|i| i.outcome.exit_code.map(i64::from)))
        .bind(batch.iter().map(|i| i.outcome.reason.as_str()).collect::<Vec<_>>())
        .bind(batch.iter().map(|i| i.outcome.error.clone()).collect::<Vec<_>>())
        .bind(batch.iter().map(|i| i.outcome.finished_at).collect::<Vec<_>>())
        .bind(column(|i| Some(i.outcome.stdout_bytes)))
        .bind(column(|i| Some(i.outcome.stderr_bytes)))
        .bind(column(|i| Some(i.outcome.dropped_bytes)))
        .bind(batch.iter().map(|i| i.outcome.truncated).collect::<Vec<_>>())
        .bind(column(|i| Some(i.outcome.last_seq)))
        .fetch_all(&mut **tx)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|row| command_from_row(row).map(|command| (command.id, command)))
            .collect()
    }

    /// Stores a batch of output and the progress in one statement (one round trip: this is on
    /// the path from a process's first byte to its followers).
    async fn append_output(
        &self,
        command: CommandId,
        chunks: &[OutputChunk],
        progress: OutputProgress,
    ) -> Result<(), PortError> {
        let mut query = sqlx::QueryBuilder::<Postgres>::new("");
        if !chunks.is_empty() {
            query.push("WITH stored AS (");
            push_output_insert(&mut query, command, chunks);
            query.push(") ");
        }
        query
            .push("UPDATE commands SET last_seq = ")
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
            .push_bind(command.as_uuid());
        query.build().execute(&self.pool).await.map_err(db)?;
        Ok(())
    }

    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub fn relay(&self, origin: String) -> PgRelay {
        PgRelay {
            pool: self.pool.clone(),
            origin,
        }
    }

    /// Listens for other replicas' hints and hands them to `inbox` until `shutdown`.
    pub fn listen(&self, origin: String, inbox: Arc<dyn RemoteInbox>, shutdown: CancellationToken) {
        let pool = self.pool.clone();
        tokio::spawn(async move {
            loop {
                match listen_once(&pool, &origin, inbox.as_ref(), &shutdown).await {
                    Ok(()) => return,
                    Err(error) => {
                        tracing::warn!(%error, "LISTEN connection failed; retrying (the poll fallback covers the gap)");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            }
        });
    }
}

async fn listen_once(
    pool: &PgPool,
    origin: &str,
    inbox: &dyn RemoteInbox,
    shutdown: &CancellationToken,
) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    loop {
        let notification = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            received = listener.recv() => received?,
        };
        match serde_json::from_str::<Envelope>(notification.payload()) {
            Ok(envelope) if envelope.origin != origin => {
                for hint in envelope.hints {
                    inbox.deliver(hint.into_hint());
                }
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "ignoring a malformed notification"),
        }
    }
}

/// Sends hints with `pg_notify`, one notification per batch.
pub struct PgRelay {
    pool: PgPool,
    origin: String,
}

#[async_trait]
impl Relay for PgRelay {
    async fn send(&self, hints: Vec<RemoteHint>) {
        // NOTIFY payloads are limited to 8000 bytes; a hint takes under 100.
        let payloads: Vec<String> = hints
            .chunks(HINTS_PER_NOTIFY)
            .map(|chunk| {
                let envelope = Envelope {
                    origin: self.origin.clone(),
                    hints: chunk.iter().map(WireHint::from).collect(),
                };
                serde_json::to_string(&envelope).expect("hints always serialize")
            })
            .collect();
        if let Err(error) =
            sqlx::query("SELECT pg_notify($1, payload) FROM UNNEST($2::text[]) AS payload")
                .bind(CHANNEL)
                .bind(payloads)
                .execute(&self.pool)
                .await
        {
            tracing::warn!(%error, "NOTIFY failed; other replicas fall back to polling");
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    #[serde(rename = "o")]
    origin: String,
    #[serde(rename = "h")]
    hints: Vec<WireHint>,
}

/// The NOTIFY payload form of a hint: short keys, since payloads are limited to 8000 bytes.
#[derive(Serialize, Deserialize)]
#[serde(tag = "k")]
enum WireHint {
    #[serde(rename = "o")]
    Stored { c: CommandId, s: i64 },
    #[serde(rename = "s")]
    Status { c: CommandId, s: CommandStatus },
    #[serde(rename = "x")]
    Cancel { c: CommandId },
    #[serde(rename = "w")]
    Work,
}

impl From<&RemoteHint> for WireHint {
    fn from(hint: &RemoteHint) -> Self {
        match *hint {
            RemoteHint::Stored { command, last_seq } => WireHint::Stored {
                c: command,
                s: last_seq,
            },
            RemoteHint::Status { command, status } => WireHint::Status {
                c: command,
                s: status,
            },
            RemoteHint::Cancel { command } => WireHint::Cancel { c: command },
            RemoteHint::Work => WireHint::Work,
        }
    }
}

impl WireHint {
    fn into_hint(self) -> RemoteHint {
        match self {
            WireHint::Stored { c, s } => RemoteHint::Stored {
                command: c,
                last_seq: s,
            },
            WireHint::Status { c, s } => RemoteHint::Status {
                command: c,
                status: s,
            },
            WireHint::Cancel { c } => RemoteHint::Cancel { command: c },
            WireHint::Work => RemoteHint::Work,
        }
    }
}

sql_repositories!(
    PgStore,
    Postgres,
    audit_lock = "SELECT pg_advisory_xact_lock(7262011)",
    row_lock = "FOR UPDATE",
    time = ""
);
