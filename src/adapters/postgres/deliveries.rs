//! [`PgDeliveryQueue`]: the webhook outbox on Postgres. The command units write deliveries in
//! their own statements (see `outbox_insert`); dispatchers on every replica claim due ones with
//! `FOR UPDATE SKIP LOCKED` under a lease (`leased_until`, on the database's clock), so a
//! replica that dies mid-attempt gives its claims back when the lease runs out. Each claim
//! writes a token (`lease_token`) that its report must carry: a late report of a claim that
//! was taken over changes nothing. The SQLite twin, `sqlite/deliveries.rs`, keeps the same
//! rules; the contract tests (`tests/contracts.rs`, the `a_late_report_*` and
//! `a_lost_lease_*` ones) pin them together.

use async_trait::async_trait;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use std::sync::Arc;

use super::audit;
use crate::adapters::sql::{
    DELIVERY_COLUMNS, Sealing, attempt_from_row, db, delivery_from_row, page, qualified, translate,
};
use crate::domain::audit::NewAuditEvent;
use crate::domain::webhook::{
    Attempt, Delivery, DeliveryId, DeliveryStatus, WebhookId, WebhookSecret, WebhookUrl,
};
use crate::ports::{
    AttemptReport, ClaimRequest, DeliveryFilter, DeliveryQueue, DueDelivery, LeaseToken, NextStep,
    Page, PortError,
};

pub struct PgDeliveryQueue {
    pool: PgPool,
    sealing: Arc<Sealing>,
}

impl PgDeliveryQueue {
    pub fn new(pool: PgPool, sealing: Arc<Sealing>) -> Self {
        Self { pool, sealing }
    }
}

#[async_trait]
impl DeliveryQueue for PgDeliveryQueue {
    /// One statement: lock up to `limit` due rows of enabled endpoints not skipped (oldest due
    /// first, skipping rows other replicas hold), keep at most `per_endpoint` of each endpoint,
    /// and lease them. Each row lock is a write, so no more are locked than can be taken; an
    /// endpoint cut short here is at its bound and the dispatcher's next claim skips it.
    async fn claim_due(&self, request: &ClaimRequest) -> Result<Vec<DueDelivery>, PortError> {
        if request.limit == 0 {
            return Ok(vec![]);
        }
        let skip: Vec<Uuid> = request.skip.iter().map(WebhookId::as_uuid).collect();
        let lease = LeaseToken::new();
        let rows = sqlx::query(&format!(
            "WITH due AS ( \
                 SELECT d.id, d.webhook_id, d.next_attempt_at FROM webhook_deliveries d \
                 JOIN webhooks w ON w.id = d.webhook_id \
                 WHERE d.status = 'pending' AND d.next_attempt_at <= clock_timestamp() \
                   AND (d.leased_until IS NULL OR d.leased_until <= clock_timestamp()) \
                   AND w.enabled AND NOT (d.webhook_id = ANY($1)) \
                 ORDER BY d.next_attempt_at LIMIT $2 \
                 FOR UPDATE OF d SKIP LOCKED \
             ), picked AS ( \
                 SELECT id FROM ( \
                     SELECT id, next_attempt_at, row_number() OVER ( \
                         PARTITION BY webhook_id ORDER BY next_attempt_at) AS nth FROM due) ranked \
                 WHERE nth <= $3 ORDER BY next_attempt_at LIMIT $4 \
             ) \
             UPDATE webhook_deliveries d \
             SET leased_until = clock_timestamp() + make_interval(secs => $5::double precision / 1e6), \
                 lease_token = $6 \
             FROM picked, webhooks w WHERE d.id = picked.id AND w.id = d.webhook_id \
             RETURNING {}, w.url, w.secret",
            qualified(DELIVERY_COLUMNS, "d")
        ))
        .bind(&skip)
        .bind(i64::try_from(request.limit).unwrap_or(i64::MAX))
        .bind(i64::try_from(request.per_endpoint).unwrap_or(i64::MAX))
        .bind(i64::try_from(request.limit).unwrap_or(i64::MAX))
        .bind(i64::try_from(request.lease.as_micros()).unwrap_or(i64::MAX))
        .bind(lease.as_uuid())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|row| {
                let url: String = row.try_get("url").map_err(db)?;
                let secret: String = row.try_get("secret").map_err(db)?;
                Ok(DueDelivery {
                    delivery: delivery_from_row(row)?,
                    url: WebhookUrl::from_trusted(url),
                    secret: WebhookSecret::parse(secret).map_err(PortError::backend)?,
                    lease,
                })
            })
            .collect()
    }

    async fn report(&self, reports: &[AttemptReport]) -> Result<(), PortError> {
        if reports.is_empty() {
            return Ok(());
        }
        let mut ids = Vec::with_capacity(reports.len());
        let mut leases = Vec::with_capacity(reports.len());
        let mut numbers = Vec::with_capacity(reports.len());
        let mut ats = Vec::with_capacity(reports.len());
        let mut codes = Vec::with_capacity(reports.len());
        let mut latencies = Vec::with_capacity(reports.len());
        let mut errors = Vec::with_capacity(reports.len());
        let mut statuses = Vec::with_capacity(reports.len());
        let mut nexts = Vec::with_capacity(reports.len());
        let mut delivered = Vec::with_capacity(reports.len());
        let mut disable = Vec::new();
        let mut events = Vec::new();
        let (mut postponed, mut postponed_to, mut postponed_lease) =
            (Vec::new(), Vec::new(), Vec::new());
        for report in reports {
            let Some(attempt) = &report.attempt else {
                if let NextStep::RetryAt(at) = &report.next {
                    postponed.push(report.delivery.as_uuid());
                    postponed_to.push(*at);
                    postponed_lease.push(report.lease.as_uuid());
                }
                continue;
            };
            ids.push(report.delivery.as_uuid());
            leases.push(report.lease.as_uuid());
            numbers.push(i64::from(attempt.number));
            ats.push(attempt.at);
            codes.push(attempt.status_code.map(i64::from));
            latencies.push(i64::try_from(attempt.latency_ms).unwrap_or(i64::MAX));
            errors.push(attempt.error.clone());
            let (status, next, done) = match &report.next {
                NextStep::Delivered => (DeliveryStatus::Delivered, None, Some(attempt.at)),
                NextStep::RetryAt(at) => (DeliveryStatus::Pending, Some(*at), None),
                NextStep::Failed => (DeliveryStatus::Failed, None, None),
                NextStep::DisableEndpoint { reason, audit } => {
                    disable.push((report.webhook, reason.clone(), attempt.at));
                    events.push(NewAuditEvent::clone(audit));
                    (DeliveryStatus::Failed, None, None)
                }
            };
            statuses.push(status.as_str());
            nexts.push(next);
            delivered.push(done);
        }
        let mut tx = self.pool.begin().await.map_err(db)?;
        if !ids.is_empty() {
            // Per delivery, the newest report of its latest claim (a delivered one first among
            // equal numbers) becomes the latest attempt, unless the delivery is delivered
            // already or holds a newer attempt; the latest it follows moves to
            // `webhook_attempts`, and other reports of that claim go there too, unless their
            // number is the latest's. Reports of an earlier claim (a dispatcher whose lease ran
            // out and was taken over) write nothing. Every sub-statement reads the rows as they
            // were before the statement; the update checks again under its lock.
            sqlx::query(
                "WITH v AS (SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::timestamptz[], \
                     $4::bigint[], $5::bigint[], $6::text[], $7::text[], $8::timestamptz[], $9::timestamptz[], \
                     $10::uuid[]) \
                     AS v(id, attempt, at, code, latency, error, status, next, delivered, lease)), \
                 r AS (SELECT v.*, d.attempts AS latest, d.last_attempt_at AS latest_at, \
                         d.lease_token = v.lease AS holder, \
                         d.last_status_code AS latest_code, d.last_latency_ms AS latest_latency, \
                         d.last_error AS latest_error, \
                         row_number() OVER (PARTITION BY v.id \
                             ORDER BY v.attempt DESC, v.status = 'delivered' DESC) = 1 \
                           AND v.attempt >= d.attempts AND d.status <> 'delivered' \
                           AND d.lease_token = v.lease AS applies \
                     FROM v JOIN webhook_deliveries d ON d.id = v.id), \
                 top AS (SELECT id, MAX(CASE WHEN applies THEN attempt ELSE latest END) AS number \
                     FROM r GROUP BY id), \
                 earlier AS (INSERT INTO webhook_attempts (delivery_id, attempt, at, status_code, latency_ms, error) \
                     SELECT id, latest, latest_at, latest_code, COALESCE(latest_latency, 0), latest_error \
                       FROM r WHERE applies AND latest > 0 AND latest < attempt AND latest_at IS NOT NULL \
                     UNION ALL \
                     SELECT r.id, r.attempt, r.at, r.code, r.latency, r.error FROM r JOIN top USING (id) \
                      WHERE NOT r.applies AND r.holder AND r.attempt <> top.number \
                     ON CONFLICT DO NOTHING) \
                 UPDATE webhook_deliveries d SET status = v.status, attempts = v.attempt, \
                     next_attempt_at = v.next, leased_until = NULL, last_attempt_at = v.at, \
                     last_status_code = v.code, last_latency_ms = v.latency, last_error = v.error, \
                     delivered_at = COALESCE(v.delivered, d.delivered_at) \
                 FROM r v WHERE d.id = v.id AND v.applies \
                   AND v.attempt >= d.attempts AND d.status <> 'delivered' \
                   AND d.lease_token = v.lease",
            )
        .bind(&ids)
        .bind(&numbers)
        .bind(&ats)
        .bind(&codes)
        .bind(&latencies)
        .bind(&errors)
        .bind(&statuses)
        .bind(&nexts)
        .bind(&delivered)
        .bind(&leases)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        }
        if !postponed.is_empty() {
            sqlx::query(
                "UPDATE webhook_deliveries d SET next_attempt_at = v.next, leased_until = NULL \
                 FROM UNNEST($1::uuid[], $2::timestamptz[], $3::uuid[]) AS v(id, next, lease) \
                 WHERE d.id = v.id AND d.status = 'pending' \
                   AND d.lease_token = v.lease",
            )
            .bind(&postponed)
            .bind(&postponed_to)
            .bind(&postponed_lease)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        for (webhook, reason, at) in &disable {
            sqlx::query(
                "UPDATE webhooks SET enabled = FALSE, disabled_reason = $2, updated_at = $3 \
                 WHERE id = $1 AND enabled",
            )
            .bind(webhook.as_uuid())
            .bind(reason)
            .bind(at)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        let head = audit::append(&mut tx, &events, &self.sealing.key).await?;
        self.sealing.commit(tx, head).await
    }

    async fn enqueue(&self, delivery: &Delivery) -> Result<(), PortError> {
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
        .execute(&self.pool)
        .await
        .map_err(|e| translate(e, "a delivery with this id"))?;
        Ok(())
    }

    async fn get(&self, webhook: WebhookId, id: DeliveryId) -> Result<Delivery, PortError> {
        let row = sqlx::query(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = $1 AND webhook_id = $2"
        ))
        .bind(id.as_uuid())
        .bind(webhook.as_uuid())
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        delivery_from_row(&row)
    }

    async fn list(&self, filter: &DeliveryFilter) -> Result<Page<Delivery>, PortError> {
        let rows = sqlx::query(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE webhook_id = $1 \
             AND ($2::uuid IS NULL OR (created_at, id) < \
                  (SELECT created_at, id FROM webhook_deliveries WHERE id = $2)) \
             ORDER BY created_at DESC, id DESC LIMIT $3"
        ))
        .bind(filter.webhook.as_uuid())
        .bind(filter.before.map(|d| d.as_uuid()))
        .bind(i64::from(filter.limit) + 1)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let items = rows
            .iter()
            .map(delivery_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(page(items, filter.limit, |d| d.id.to_string()))
    }

    async fn attempts(&self, id: DeliveryId) -> Result<Vec<Attempt>, PortError> {
        // The earlier attempts, then the latest, which the delivery's own row holds (rows
        // reported before that column existed, or by a replica of the version before, have
        // their latest in `webhook_attempts`).
        let rows = sqlx::query(
            "SELECT attempt, at, status_code, latency_ms, error FROM webhook_attempts \
             WHERE delivery_id = $1 \
             UNION ALL \
             SELECT d.attempts, d.last_attempt_at, d.last_status_code, \
                    COALESCE(d.last_latency_ms, 0), d.last_error FROM webhook_deliveries d \
             WHERE d.id = $1 AND d.attempts > 0 AND d.last_attempt_at IS NOT NULL \
               AND NOT EXISTS (SELECT 1 FROM webhook_attempts a \
                               WHERE a.delivery_id = d.id AND a.attempt = d.attempts) \
             ORDER BY attempt",
        )
        .bind(id.as_uuid())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(attempt_from_row).collect()
    }

    async fn redeliver(&self, webhook: WebhookId, id: DeliveryId) -> Result<Delivery, PortError> {
        let row = sqlx::query(&format!(
            "UPDATE webhook_deliveries \
             SET status = 'pending', next_attempt_at = clock_timestamp() \
             WHERE id = $1 AND webhook_id = $2 RETURNING {DELIVERY_COLUMNS}"
        ))
        .bind(id.as_uuid())
        .bind(webhook.as_uuid())
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        delivery_from_row(&row)
    }
}
