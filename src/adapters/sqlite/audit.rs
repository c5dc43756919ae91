//! [`SqliteAuditLog`]: the hash-chained audit log on SQLite. Appends happen inside the
//! transaction of the change they record ([`append`]); the single writer connection serialises
//! them.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::{QueryBuilder, Sqlite, SqliteConnection};

use super::SqliteDatabase;
use crate::adapters::sql::{
    AUDIT_COLUMNS, KEYED_CHAIN_MARKER, Sealing, VERIFY_PAGE, audit_from_row, audit_insert, db,
    page, reseal, seal_audits, verify_chain,
};
use crate::domain::audit::{
    AuditEvent, AuditHead, AuditKey, ChainReport, ChainVerifier, ExpectedHead, NewAuditEvent,
};
use crate::ports::{AuditFilter, AuditLog, Page, PortError};

/// Appends `events` to the chain inside the caller's write transaction.
pub(super) async fn append(
    conn: &mut SqliteConnection,
    events: &[NewAuditEvent],
    key: &AuditKey,
) -> Result<Option<AuditHead>, PortError> {
    if events.is_empty() {
        return Ok(None);
    }
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
    conn: &mut SqliteConnection,
    key: &AuditKey,
) -> Result<(), PortError> {
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

pub struct SqliteAuditLog {
    db: SqliteDatabase,
    sealing: Arc<Sealing>,
}

impl SqliteAuditLog {
    pub fn new(db: SqliteDatabase, sealing: Arc<Sealing>) -> Self {
        Self { db, sealing }
    }
}

#[async_trait]
impl AuditLog for SqliteAuditLog {
    async fn append(&self, event: NewAuditEvent) -> Result<(), PortError> {
        let mut tx = self.db.begin().await?;
        let head = append(&mut tx, &[event], &self.sealing.key).await?;
        self.sealing.commit(tx, head).await
    }

    async fn list(&self, filter: &AuditFilter) -> Result<Page<AuditEvent>, PortError> {
        let mut query = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_log WHERE 1 = 1"
        ));
        if let Some(actor) = filter.actor {
            query
                .push(" AND actor_key_id = ")
                .push_bind(actor.as_uuid());
        }
        if let Some(action) = &filter.action {
            query.push(" AND action = ").push_bind(action.clone());
        }
        if let Some(target) = &filter.target_id {
            query.push(" AND target_id = ").push_bind(target.clone());
        }
        if let Some(since) = filter.since {
            query
                .push(" AND julianday(at) >= julianday(")
                .push_bind(since)
                .push(")");
        }
        if let Some(until) = filter.until {
            query
                .push(" AND julianday(at) < julianday(")
                .push_bind(until)
                .push(")");
        }
        if let Some(before) = filter.before_seq {
            query.push(" AND seq < ").push_bind(before);
        }
        query
            .push(" ORDER BY seq DESC LIMIT ")
            .push_bind(i64::from(filter.limit) + 1);
        let rows = query.build().fetch_all(&self.db.reader).await.map_err(db)?;
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
            .fetch_all(&self.db.reader)
            .await
            .map_err(db)?;
            rows.iter().map(audit_from_row).collect()
        })
        .await
    }
}
