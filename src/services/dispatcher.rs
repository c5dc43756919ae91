//! The webhook dispatcher, run on every replica: claims due deliveries from the outbox under a
//! lease, signs and sends each one, and reports the attempts in batches. A global bound caps
//! requests in flight; each endpoint has its own bound and circuit breaker, and an endpoint at
//! its bound or with an open circuit is left out of claims, so a dead or slow endpoint holds
//! only its own slots and never delays the others.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::domain::audit::{AuditContext, NewAuditEvent, action};
use crate::domain::webhook::{Attempt, AttemptVerdict, DeliveryId, RetrySchedule, WebhookId};
use crate::ports::{
    AttemptReport, CircuitMetrics, CircuitState, ClaimRequest, Clock, DeliveryQueue, DueDelivery,
    NextStep, OutgoingWebhook, SendError, WebhookMetrics, WebhookSender,
};
use crate::resilience::{
    Backoff, BreakerSettings, CircuitBreaker, Guarded, RetryPolicy, finish_within, retry,
};

pub struct DispatcherPorts {
    pub queue: Arc<dyn DeliveryQueue>,
    pub sender: Arc<dyn WebhookSender>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<dyn WebhookMetrics>,
}

#[derive(Debug, Clone)]
pub struct DispatcherSettings {
    /// Requests in flight on this replica, all endpoints together.
    pub concurrency: usize,
    /// Requests in flight to one endpoint.
    pub per_endpoint: usize,
    /// How long a claim holds a delivery; longer than an attempt can take.
    pub lease: Duration,
    /// How often an idle dispatcher looks for due deliveries.
    pub poll_interval: Duration,
    pub schedule: RetrySchedule,
    pub breaker: BreakerSettings,
    /// How long attempts in flight may finish after the stop; the rest are dropped unreported
    /// (their leases bring them back to a dispatcher).
    pub drain: Duration,
}

/// One endpoint as this replica sees it.
struct Endpoint {
    /// Claimed and not yet finished here.
    claimed: AtomicUsize,
    /// Requests actually in flight.
    slots: Semaphore,
    breaker: CircuitBreaker,
}

/// The breakers report through the dispatcher's own gauge (states per endpoint are counted,
/// never labelled by id), so this sink ignores the per-call notice.
struct Unlabelled;

impl CircuitMetrics for Unlabelled {
    fn circuit_state(&self, _target: &'static str, _state: CircuitState) {}
}

pub struct Dispatcher {
    ports: DispatcherPorts,
    settings: DispatcherSettings,
    endpoints: Mutex<HashMap<WebhookId, Arc<Endpoint>>>,
}

/// Reports written per batch at most.
const REPORT_BATCH: usize = 512;

impl Dispatcher {
    pub fn new(ports: DispatcherPorts, settings: DispatcherSettings) -> Self {
        Self {
            ports,
            settings,
            endpoints: Mutex::new(HashMap::new()),
        }
    }

    fn endpoint(&self, id: WebhookId) -> Arc<Endpoint> {
        self.endpoints
            .lock()
            .expect("endpoint map lock")
            .entry(id)
            .or_insert_with(|| {
                Arc::new(Endpoint {
                    claimed: AtomicUsize::new(0),
                    slots: Semaphore::new(self.settings.per_endpoint),
                    breaker: CircuitBreaker::new(
                        "webhook",
                        self.settings.breaker,
                        Arc::new(Unlabelled),
                    ),
                })
            })
            .clone()
    }

    /// Endpoints left out of the next claim, and the breaker gauge on the way.
    fn skipped(&self) -> Vec<WebhookId> {
        let endpoints = self.endpoints.lock().expect("endpoint map lock");
        let (mut closed, mut open, mut half_open) = (0, 0, 0);
        let mut skip = Vec::new();
        for (id, endpoint) in endpoints.iter() {
            let claimed = endpoint.claimed.load(Ordering::Acquire);
            let state = endpoint.breaker.state();
            match state {
                CircuitState::Closed => closed += 1,
                CircuitState::Open => open += 1,
                CircuitState::HalfOpen => half_open += 1,
            }
            // Its slots full and as many again waiting for them.
            let busy = claimed >= 2 * self.settings.per_endpoint;
            // Half open: one probe at a time.
            let waiting =
                state == CircuitState::Open || (state == CircuitState::HalfOpen && claimed > 0);
            if busy || waiting {
                skip.push(*id);
            }
        }
        self.ports.metrics.webhook_circuits(closed, open, half_open);
        skip
    }

    /// Claims and sends until `stop` is cancelled, then lets attempts in flight (and those
    /// claimed and waiting) finish within the drain time and writes their reports.
    ///
    /// Claims run ahead of the senders: up to twice `concurrency` deliveries are claimed at
    /// once, so a claim's round trip never leaves request slots idle. A claimed delivery waits
    /// for its endpoint's slot first and only then for a global one, so the deliveries of a
    /// dead endpoint wait on that endpoint alone.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let (reports, inbox) = mpsc::unbounded_channel();
        let reporter = tokio::spawn(report_loop(self.ports.queue.clone(), inbox));
        let room = Arc::new(Semaphore::new(2 * self.settings.concurrency));
        let sending = Arc::new(Semaphore::new(self.settings.concurrency));
        // Claim when a whole `concurrency` fits: each claim is a statement the database plans,
        // sorts and commits, so small ones cost more in all than the rows they take.
        let batch = u32::try_from(self.settings.concurrency).unwrap_or(u32::MAX);
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            let mut held = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                held = room.clone().acquire_many_owned(batch) => held.expect("never closed"),
            };
            let more = u32::try_from(room.available_permits()).unwrap_or(u32::MAX);
            if let Ok(more) = room.clone().try_acquire_many_owned(more) {
                held.merge(more);
            }
            while tasks.try_join_next().is_some() {}
            let request = ClaimRequest {
                limit: held.num_permits(),
                per_endpoint: self.settings.per_endpoint,
                skip: self.skipped(),
                lease: self.settings.lease,
            };
            let claimed = match self.ports.queue.claim_due(&request).await {
                Ok(claimed) => claimed,
                Err(error) => {
                    tracing::warn!(%error, "cannot claim webhook deliveries");
                    Vec::new()
                }
            };
            // An idle dispatcher polls; one that found work claims again as soon as it has
            // room (a claim may come back short only because of the per-endpoint bound).
            let found = !claimed.is_empty();
            for due in claimed {
                let claim = held.split(1).expect("no more claimed than room held");
                let endpoint = self.endpoint(due.delivery.webhook_id);
                endpoint.claimed.fetch_add(1, Ordering::AcqRel);
                let (this, reports, sending) = (self.clone(), reports.clone(), sending.clone());
                tasks.spawn(async move {
                    let report = this.attempt(&endpoint, &sending, due).await;
                    endpoint.claimed.fetch_sub(1, Ordering::AcqRel);
                    drop(claim);
                    let _ = reports.send(report);
                });
            }
            drop(held);
            if !found {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(self.settings.poll_interval) => {}
                }
            }
        }
        if !finish_within(&mut tasks, self.settings.drain).await {
            tracing::info!(
                in_flight = tasks.len(),
                "webhook attempts still in flight at shutdown are left to their leases"
            );
            tasks.shutdown().await;
        }
        drop(reports);
        let _ = reporter.await;
    }

    /// Sends one delivery through its endpoint's bound and breaker and says what follows.
    async fn attempt(
        &self,
        endpoint: &Endpoint,
        sending: &Semaphore,
        due: DueDelivery,
    ) -> AttemptReport {
        let DueDelivery {
            delivery,
            url,
            secret,
            lease,
        } = due;
        let _slot = endpoint.slots.acquire().await.expect("never closed");
        let _sending = sending.acquire().await.expect("never closed");
        let now = self.ports.clock.now();
        let timestamp = now.unix_timestamp();
        let request = OutgoingWebhook {
            signature: secret.sign(delivery.id, timestamp, delivery.payload.as_bytes()),
            url,
            id: delivery.id,
            timestamp,
            body: delivery.payload,
            traceparent: traceparent(),
        };
        let started = Instant::now();
        let sent = endpoint
            .breaker
            .call(|_: &Result<u16, SendError>| true, async {
                // An answer that is not 2xx counts against the breaker too.
                match self.ports.sender.send(&request).await {
                    Ok(code) if (200..300).contains(&code) || code == 410 => Ok(Ok(code)),
                    other => Err(other),
                }
            })
            .await;
        let latency = started.elapsed();
        let answer = match sent {
            Ok(answered) => answered,
            Err(Guarded::Failed(result)) => result,
            Err(Guarded::Open(open)) => {
                // Not sent: wait for the circuit, without spending an attempt.
                self.ports.metrics.webhook_attempt("circuit_open", latency);
                return AttemptReport {
                    delivery: delivery.id,
                    webhook: delivery.webhook_id,
                    lease,
                    attempt: None,
                    next: NextStep::RetryAt(now + Duration::from_secs(open.retry_in_secs)),
                };
            }
        };
        let number = delivery.attempts + 1;
        let (status_code, error) = match &answer {
            Ok(code) => (Some(*code), None),
            Err(error) => (None, Some(error.to_string())),
        };
        let next = next_step(
            AttemptVerdict::of(status_code),
            Tried {
                delivery: delivery.id,
                webhook: delivery.webhook_id,
                number,
                started: now,
                ended: self.ports.clock.now(),
            },
            &self.settings.schedule,
            rand::random::<f64>(),
        );
        let outcome = outcome(&next, matches!(answer, Err(SendError::Refused(_))));
        self.ports.metrics.webhook_attempt(outcome, latency);
        if outcome != "delivered" {
            tracing::info!(
                delivery = %delivery.id,
                webhook = %delivery.webhook_id,
                attempt = number,
                status = ?status_code,
                error = error.as_deref().unwrap_or(""),
                outcome,
                "webhook attempt not delivered"
            );
        }
        AttemptReport {
            delivery: delivery.id,
            webhook: delivery.webhook_id,
            lease,
            attempt: Some(Attempt {
                number,
                at: now,
                status_code,
                latency_ms: latency.as_millis() as u64,
                error,
            }),
            next,
        }
    }
}

/// One attempt of a delivery, as the policy sees it.
struct Tried {
    delivery: DeliveryId,
    webhook: WebhookId,
    /// Its number: 1 for the first.
    number: u32,
    started: OffsetDateTime,
    /// The next attempt's wait runs from here.
    ended: OffsetDateTime,
}

/// What follows an attempt, from its verdict alone: delivered, the endpoint gone (disabled,
/// audited), or another attempt after the schedule's next wait (`jitter` in [0, 1) spreads it),
/// or failed once the schedule is spent.
fn next_step(
    verdict: AttemptVerdict,
    tried: Tried,
    schedule: &RetrySchedule,
    jitter: f64,
) -> NextStep {
    let Tried {
        delivery,
        webhook,
        number,
        started,
        ended,
    } = tried;
    match verdict {
        AttemptVerdict::Delivered => NextStep::Delivered,
        AttemptVerdict::Gone => NextStep::DisableEndpoint {
            reason: "the endpoint answered 410 Gone".into(),
            audit: Box::new(NewAuditEvent::new(
                &AuditContext::system(),
                started,
                action::WEBHOOK_DISABLED,
                ("webhook", webhook.to_string()),
                json!({"reason": "410 Gone", "delivery_id": delivery.as_uuid()}),
            )),
        },
        AttemptVerdict::Retry => match schedule.next_delay(number, jitter) {
            Some(delay) => NextStep::RetryAt(ended + delay),
            None => NextStep::Failed,
        },
    }
}

/// The attempt's label in `rdev_webhook_deliveries_total{outcome}`.
fn outcome(next: &NextStep, refused: bool) -> &'static str {
    match next {
        _ if refused => "refused",
        NextStep::Delivered => "delivered",
        NextStep::DisableEndpoint { .. } => "gone",
        NextStep::RetryAt(_) => "retry",
        NextStep::Failed => "failed",
    }
}

/// A batch of reports is written every half second, 20 times, before it is given up.
const REPORT_RETRY: RetryPolicy = RetryPolicy {
    backoff: Backoff {
        first: Duration::from_millis(500),
        max: Duration::from_millis(500),
    },
    tries: Some(20),
    for_at_most: None,
};

/// Writes reports in batches as they come; a failed write is retried (for about 10 s, a
/// database failover), then given up: the leases bring those deliveries back, and they are sent
/// again (at least once).
async fn report_loop(
    queue: Arc<dyn DeliveryQueue>,
    mut inbox: mpsc::UnboundedReceiver<AttemptReport>,
) {
    let mut batch = Vec::with_capacity(REPORT_BATCH);
    while inbox.recv_many(&mut batch, REPORT_BATCH).await > 0 {
        let reported = retry(
            REPORT_RETRY,
            || queue.report(&batch),
            |error, _| {
                tracing::warn!(%error, reports = batch.len(), "cannot record webhook attempts; retrying");
                true
            },
        )
        .await;
        if let Err(error) = reported {
            tracing::error!(%error, reports = batch.len(), "gave up recording webhook attempts; their deliveries will be sent again");
        }
        batch.clear();
    }
}

/// A W3C `traceparent` for one attempt: a fresh trace, sampled.
fn traceparent() -> String {
    let trace: u128 = rand::random::<u128>() | 1;
    let span: u64 = rand::random::<u64>() | 1;
    format!("00-{trace:032x}-{span:016x}-01")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tried(number: u32) -> (Tried, OffsetDateTime) {
        let started = OffsetDateTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let ended = started + Duration::from_secs(2);
        let tried = Tried {
            delivery: DeliveryId::new(),
            webhook: WebhookId::new(),
            number,
            started,
            ended,
        };
        (tried, ended)
    }

    #[test]
    fn the_next_step_follows_the_verdict_and_the_schedule() {
        let schedule = RetrySchedule::new(vec![Duration::from_secs(5), Duration::from_secs(30)]);
        let (first, ended) = tried(1);
        assert!(matches!(
            next_step(AttemptVerdict::Delivered, first, &schedule, 0.5),
            NextStep::Delivered
        ));
        // The middle of the jitter is the schedule's own wait, counted from the attempt's end.
        let (first, _) = tried(1);
        let NextStep::RetryAt(at) = next_step(AttemptVerdict::Retry, first, &schedule, 0.5) else {
            panic!("a retry");
        };
        assert_eq!(at, ended + Duration::from_secs(5));
        let (last, _) = tried(3);
        assert!(matches!(
            next_step(AttemptVerdict::Retry, last, &schedule, 0.5),
            NextStep::Failed
        ));
        let (gone, _) = tried(1);
        let webhook = gone.webhook;
        let NextStep::DisableEndpoint { reason, audit } =
            next_step(AttemptVerdict::Gone, gone, &schedule, 0.5)
        else {
            panic!("the endpoint is disabled");
        };
        assert!(reason.contains("410"));
        assert_eq!(audit.target_id, webhook.to_string());
    }

    #[test]
    fn a_refused_destination_is_labelled_so_whatever_follows() {
        assert_eq!(outcome(&NextStep::Failed, true), "refused");
        assert_eq!(outcome(&NextStep::Failed, false), "failed");
        assert_eq!(outcome(&NextStep::Delivered, false), "delivered");
    }
}
