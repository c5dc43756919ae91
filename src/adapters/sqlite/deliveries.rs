//! [`SqliteDeliveryQueue`]: the webhook outbox on SQLite. The command units write deliveries with
//! [`write_outbox`] inside their transactions; dispatchers claim due ones on the writer
//! connection (claims are serialised there, so no row locks are needed) under a lease
//! (`leased_until`), so a dispatcher that dies gives its claims back when it runs out. Each
//! claim writes a token (`lease_token`) that its report must carry: a late report of a claim
//! that was taken over changes nothing. The Postgres twin, `postgres/deliveries.rs`, keeps the
//! same rules; the contract tests (`tests/contracts.rs`, the `a_late_report_*` and
//! `a_lost_lease_*` ones) pin them together.
//! SQLite's date functions keep milliseconds only, so rows of one millisecond are ordered by
//! `rowid` (insertion order).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::{QueryBuilder, Sqlite, SqliteConnection};
use time::OffsetDateTime;

use super::{SqliteDatabase, audit};
use crate::adapters::sql::{
    DELIVERY_COLUMNS, Dialect, Sealing, attempt_from_row, db, delivery_from_row, outbox_insert,
    page, qualified, translate,
};
use crate::domain::audit::NewAuditEvent;
use crate::domain::ids::CommandId;
use crate::domain::webhook::{
    Attempt, Delivery, DeliveryId, DeliveryStatus, WebhookId, WebhookSecret, WebhookUrl,
};
use crate::ports::{
    AttemptReport, ClaimRequest, Clock, DeliveryFilter, DeliveryQueue, DueDelivery, LeaseToken,
    NextStep, Page, PortError,
};

/// Writes the deliveries of `commands`' new states (one per matching endpoint) inside the
/// caller's transaction.
pub(super) async fn write_outbox(
    conn: &mut SqliteConnection,
    commands: &[CommandId],
    now: OffsetDateTime,
) -> Result<(), PortError> {
    if commands.is_empty() {
        return Ok(());
    }
    let statement = outbox_insert(
        Dialect::Sqlite,
        "(SELECT * FROM commands WHERE id = $1)",
        "$2",
    );
    for id in commands {
        sqlx::query(&statement)
            .bind(id.as_uuid())
            .bind(now)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
    }
    Ok(())
}

pub struct SqliteDeliveryQueue {
    db: SqliteDatabase,
    clock: Arc<dyn Clock>,
    sealing: Arc<Sealing>,
}

impl SqliteDeliveryQueue {
    pub fn new(db: SqliteDatabase, clock: Arc<dyn Clock>, sealing: Arc<Sealing>) -> Self {
        Self { db, clock, sealing }
    }
}

#[async_trait]
impl DeliveryQueue for SqliteDeliveryQueue {
    async fn claim_due(&self, request: &ClaimRequest) -> Result<Vec<DueDelivery>, PortError> {
        if request.limit == 0 {
            return Ok(vec![]);
        }
        let now = self.clock.now();
        let mut tx = self.db.begin().await?;
        let mut query = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {}, w.url, w.secret FROM webhook_deliveries d \
             JOIN webhooks w ON w.id = d.webhook_id \
             WHERE d.status = 'pending' AND w.enabled AND julianday(d.next_attempt_at) <= julianday(",
            qualified(DELIVERY_COLUMNS, "d")
        ));
        query
            .push_bind(now)
            .push(") AND (d.leased_until IS NULL OR julianday(d.leased_until) <= julianday(")
            .push_bind(now)
            .push("))");
        if !request.skip.is_empty() {
            query.push(" AND d.webhook_id NOT IN (");
            let mut ids = query.separated(", ");
            for id in &request.skip {
                ids.push_bind(id.as_uuid());
            }
            query.push(")");
        }
        query
            .push(" ORDER BY julianday(d.next_attempt_at), d.rowid LIMIT ")
            .push_bind(i64::try_from(request.limit.saturating_mul(4)).unwrap_or(i64::MAX));
        let rows = query.build().fetch_all(&mut *tx).await.map_err(db)?;
        let lease = LeaseToken::new();
        let mut per_endpoint: HashMap<WebhookId, usize> = HashMap::new();
        let mut due = Vec::new();
        for row in &rows {
            let delivery = delivery_from_row(row)?;
            let taken = per_endpoint.entry(delivery.webhook_id).or_default();
            if *taken >= request.per_endpoint {
                continue;
            }
            *taken += 1;
            let url: String = sqlx::Row::try_get(row, "url").map_err(db)?;
            let secret: String = sqlx::Row::try_get(row, "secret").map_err(db)?;
            due.push(DueDelivery {
                delivery,
                url: WebhookUrl::from_trusted(url),
                secret: WebhookSecret::parse(secret).map_err(PortError::backend)?,
                lease,
            });
            if due.len() == request.limit {
                break;
            }
        }
        let lease_until = now + request.lease;
        for item in &due {
            sqlx::query(
                "UPDATE webhook_deliveries SET leased_until = $2, lease_token = $3 WHERE id = $1",
            )
            .bind(item.delivery.id.as_uuid())
            .bind(lease_until)
            .bind(lease.as_uuid())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(due)
    }

    async fn report(&self, reports: &[AttemptReport]) -> Result<(), PortError> {
        if reports.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.begin().await?;
        let mut events = Vec::new();
        for report in reports {
            let Some(attempt) = &report.attempt else {
                if let NextStep::RetryAt(at) = &report.next {
                    sqlx::query(
                        "UPDATE webhook_deliveries SET next_attempt_at = $2, leased_until = NULL \
                         WHERE id = $1 AND status = 'pending' AND lease_token = $3",
                    )
                    .bind(report.delivery.as_uuid())
                    .bind(at)
                    .bind(report.lease.as_uuid())
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                }
                continue;
            };
            // A report of the delivery's latest claim applies unless the delivery is delivered
            // already or holds a newer attempt; one of an earlier claim (its lease ran out and
            // another dispatcher took the delivery over) writes nothing. Among reports of one
            // number, the one that applies is the one the log keeps.
            sqlx::query(
                "INSERT INTO webhook_attempts (delivery_id, attempt, at, status_code, latency_ms, error) \
                 SELECT $1, $2, $3, $4, $5, $6 \
                 WHERE EXISTS (SELECT 1 FROM webhook_deliveries WHERE id = $1 AND lease_token = $7) \
                 ON CONFLICT (delivery_id, attempt) DO UPDATE SET at = excluded.at, \
                   status_code = excluded.status_code, latency_ms = excluded.latency_ms, \
                   error = excluded.error \
                 WHERE EXISTS (SELECT 1 FROM webhook_deliveries WHERE id = $1 \
                               AND attempts <= $2 AND status <> 'delivered')",
            )
            .bind(report.delivery.as_uuid())
            .bind(i64::from(attempt.number))
            .bind(attempt.at)
            .bind(attempt.status_code.map(i64::from))
            .bind(i64::try_from(attempt.latency_ms).unwrap_or(i64::MAX))
            .bind(attempt.error.as_deref())
            .bind(report.lease.as_uuid())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            let (status, next, delivered) = match &report.next {
                NextStep::Delivered => (DeliveryStatus::Delivered, None, Some(attempt.at)),
                NextStep::RetryAt(at) => (DeliveryStatus::Pending, Some(*at), None),
                NextStep::Failed | NextStep::DisableEndpoint { .. } => {
                    (DeliveryStatus::Failed, None, None)
                }
            };
            sqlx::query(
                "UPDATE webhook_deliveries SET status = $2, attempts = $3, \
                 next_attempt_at = $4, leased_until = NULL, last_status_code = $5, \
                 last_latency_ms = $6, last_error = $7, delivered_at = COALESCE($8, delivered_at) \
                 WHERE id = $1 AND attempts <= $3 AND status <> 'delivered' AND lease_token = $9",
            )
            .bind(report.delivery.as_uuid())
            .bind(status.as_str())
            .bind(i64::from(attempt.number))
            .bind(next)
            .bind(attempt.status_code.map(i64::from))
            .bind(i64::try_from(attempt.latency_ms).unwrap_or(i64::MAX))
            .bind(attempt.error.as_deref())
            .bind(delivered)
            .bind(report.lease.as_uuid())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            if let NextStep::DisableEndpoint { reason, audit } = &report.next {
                sqlx::query(
                    "UPDATE webhooks SET enabled = FALSE, disabled_reason = $2, updated_at = $3 \
                     WHERE id = $1 AND enabled",
                )
                .bind(report.webhook.as_uuid())
                .bind(reason)
                .bind(attempt.at)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                events.push(NewAuditEvent::clone(audit));
            }
        }
        let head = audit::append(&mut tx, &events, &self.sealing.key).await?;
        self.sealing.commit(tx, head).await
    }

    async fn enqueue(&self, delivery: &Delivery) -> Result<(), PortError> {
        let mut tx = self.db.begin().await?;
        sqlx::query(
            "INSERT INTO webhook_deliveries (id, webhook_id, event_type, payload, status, attempts, \
             next_attempt_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(delivery.id.as_uuid())
        .bind(delivery.webhook_id.as_uuid())
        .bind(&delivery.event_type)
        .bind(&delivery.payload)
        .bind(delivery.status.as_str())
        .bind(i64::from(delivery.attempts))
        .bind(delivery.next_attempt_at)
        .bind(delivery.created_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| translate(e, "a delivery with this id"))?;
        tx.commit().await.map_err(db)
    }

    async fn get(&self, webhook: WebhookId, id: DeliveryId) -> Result<Delivery, PortError> {
        let row = sqlx::query(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = $1 AND webhook_id = $2"
        ))
        .bind(id.as_uuid())
        .bind(webhook.as_uuid())
        .fetch_one(&self.db.reader)
        .await
        .map_err(db)?;
        delivery_from_row(&row)
    }

    async fn list(&self, filter: &DeliveryFilter) -> Result<Page<Delivery>, PortError> {
        let rows = sqlx::query(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d WHERE webhook_id = $1 \
             AND ($2 IS NULL OR (julianday(created_at), rowid) < \
                  (SELECT julianday(created_at), rowid FROM webhook_deliveries WHERE id = $2)) \
             ORDER BY julianday(created_at) DESC, rowid DESC LIMIT $3"
        ))
        .bind(filter.webhook.as_uuid())
        .bind(filter.before.map(|d| d.as_uuid()))
        .bind(i64::from(filter.limit) + 1)
        .fetch_all(&self.db.reader)
        .await
        .map_err(db)?;
        let items = rows
            .iter()
            .map(delivery_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(page(items, filter.limit, |d| d.id.to_string()))
    }

    async fn attempts(&self, id: DeliveryId) -> Result<Vec<Attempt>, PortError> {
        let rows = sqlx::query(
            "SELECT attempt, at, status_code, latency_ms, error FROM webhook_attempts \
             WHERE delivery_id = $1 ORDER BY attempt",
        )
        .bind(id.as_uuid())
        .fetch_all(&self.db.reader)
        .await
        .map_err(db)?;
        rows.iter().map(attempt_from_row).collect()
    }

    async fn redeliver(&self, webhook: WebhookId, id: DeliveryId) -> Result<Delivery, PortError> {
        let mut tx = self.db.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = $3 \
             WHERE id = $1 AND webhook_id = $2 RETURNING {DELIVERY_COLUMNS}"
        ))
        .bind(id.as_uuid())
        .bind(webhook.as_uuid())
        .bind(self.clock.now())
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        delivery_from_row(&row)
    }
}
