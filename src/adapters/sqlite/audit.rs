//! [`SqliteAuditLog`]: the hash-chained audit log on SQLite. Appends happen inside the
//! transaction of the change they record ([`append`]); the single writer connection serialises
//! them.

use async_trait::async_trait;
use sqlx::{QueryBuilder, Sqlite, SqliteConnection};

use super::SqliteDatabase;
use crate::adapters::sql::{
    AUDIT_COLUMNS, VERIFY_PAGE, audit_from_row, audit_insert, db, page, seal_audits, verify_chain,
};
use crate::domain::audit::{AuditEvent, ChainReport, NewAuditEvent};
use crate::ports::{AuditFilter, AuditLog, Page, PortError};

/// Appends `events` to the chain inside the caller's write transaction.
pub(super) async fn append(
    conn: &mut SqliteConnection,
    events: &[NewAuditEvent],
) -> Result<(), PortError> {
    if events.is_empty() {
        return Ok(());
    }
    let last: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await
            .map_err(db)?;
    let sealed = seal_audits(last, events);
    audit_insert(&sealed)
        .build()
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(())
}

pub struct SqliteAuditLog {
    db: SqliteDatabase,
}

impl SqliteAuditLog {
    pub fn new(db: SqliteDatabase) -> Self {
        Self { db }
    }
}

#[async_trait]
impl AuditLog for SqliteAuditLog {
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

    async fn verify(&self) -> Result<ChainReport, PortError> {
        verify_chain(|after| async move {
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
