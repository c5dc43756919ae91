//! [`PgAuditLog`]: the hash-chained audit log on Postgres. Appends happen inside the transaction
//! of the change they record ([`append`]); an advisory lock serialises them across replicas.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::{PgConnection, PgPool};

use crate::adapters::sql::{
    AUDIT_COLUMNS, KEYED_CHAIN_MARKER, Sealing, VERIFY_PAGE, audit_from_row, audit_insert, db,
    page, reseal, seal_audits, verify_chain,
};
use crate::domain::audit::{
    AuditEvent, AuditHead, AuditKey, ChainReport, ChainVerifier, ExpectedHead, NewAuditEvent,
};
use crate::ports::{AuditFilter, AuditLog, Page, PortError};

/// Any constant works; it only has to be the same on every replica.
const AUDIT_LOCK: i64 = 7_262_011;

/// Appends `events` to the chain inside the caller's transaction. The advisory lock (held until
/// commit) makes reading the last hash and inserting atomic with respect to every other appender.
pub(super) async fn append(
    conn: &mut PgConnection,
    events: &[NewAuditEvent],
    key: &AuditKey,
) -> Result<Option<AuditHead>, PortError> {
    if events.is_empty() {
        return Ok(None);
    }
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(AUDIT_LOCK)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    let last: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await
            .map_err(db)?;
    let sealed = seal_audits(last, events, key);
    audit_insert(&sealed)
        .build()
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(sealed.last().map(|event| AuditHead {
        seq: event.seq,
        hash: event.hash.clone(),
    }))
}

/// Moves a chain written before the key existed onto the key, once: checks its unkeyed hashes,
/// rewrites every row's `prev_hash` and `hash`, and leaves a marker. A chain that does not
/// verify is left as it is (and `/audit/verify` reports it).
pub(super) async fn seal_with_key(
    conn: &mut PgConnection,
    key: &AuditKey,
) -> Result<(), PortError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(AUDIT_LOCK)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    let keyed: Option<String> =
        sqlx::query_scalar("SELECT value FROM shared_secrets WHERE name = $1")
            .bind(KEYED_CHAIN_MARKER)
            .fetch_optional(&mut *conn)
            .await
            .map_err(db)?;
    if keyed.is_some() {
        return Ok(());
    }
    let rows = sqlx::query(&format!(
        "SELECT {AUDIT_COLUMNS} FROM audit_log ORDER BY seq"
    ))
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    let events = rows
        .iter()
        .map(audit_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let Some(resealed) = reseal(&events, key) else {
        tracing::error!(
            "the audit chain does not verify with its old unkeyed hashes; it is not moved onto RDEV_AUDIT_KEY"
        );
        return Ok(());
    };
    for event in &resealed {
        sqlx::query("UPDATE audit_log SET prev_hash = $2, hash = $3 WHERE seq = $1")
            .bind(event.seq)
            .bind(&event.prev_hash)
            .bind(&event.hash)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
    }
    sqlx::query("INSERT INTO shared_secrets (name, value) VALUES ($1, 'hmac-sha256')")
        .bind(KEYED_CHAIN_MARKER)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    if !resealed.is_empty() {
        tracing::info!(
            rows = resealed.len(),
            "audit chain moved onto RDEV_AUDIT_KEY"
        );
    }
    Ok(())
}

pub struct PgAuditLog {
    pool: PgPool,
    sealing: Arc<Sealing>,
}

impl PgAuditLog {
    pub fn new(pool: PgPool, sealing: Arc<Sealing>) -> Self {
        Self { pool, sealing }
    }
}

#[async_trait]
impl AuditLog for PgAuditLog {
    async fn append(&self, event: NewAuditEvent) -> Result<(), PortError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let head = append(&mut tx, &[event], &self.sealing.key).await?;
        self.sealing.commit(tx, head).await
    }

    async fn list(&self, filter: &AuditFilter) -> Result<Page<AuditEvent>, PortError> {
        let rows = sqlx::query(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_log \
             WHERE ($1::uuid IS NULL OR actor_key_id = $1) AND ($2::text IS NULL OR action = $2) \
               AND ($3::text IS NULL OR target_id = $3) AND ($4::timestamptz IS NULL OR at >= $4) \
               AND ($5::timestamptz IS NULL OR at < $5) AND ($6::bigint IS NULL OR seq < $6) \
             ORDER BY seq DESC LIMIT $7"
        ))
        .bind(filter.actor.map(|a| a.as_uuid()))
        .bind(filter.action.as_deref())
        .bind(filter.target_id.as_deref())
        .bind(filter.since)
        .bind(filter.until)
        .bind(filter.before_seq)
        .bind(i64::from(filter.limit) + 1)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let items = rows
            .iter()
            .map(audit_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(page(items, filter.limit, |e| e.seq.to_string()))
    }

    async fn verify(&self, head: Option<ExpectedHead>) -> Result<ChainReport, PortError> {
        let verifier = ChainVerifier::keyed(self.sealing.key.clone(), head);
        verify_chain(verifier, |after| async move {
            let rows = sqlx::query(&format!(
                "SELECT {AUDIT_COLUMNS} FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2"
            ))
            .bind(after)
            .bind(VERIFY_PAGE)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
            rows.iter().map(audit_from_row).collect()
        })
        .await
    }
}
