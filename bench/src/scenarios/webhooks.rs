//! Scenario 8: webhook deliveries/s on Postgres. rdev-api's dispatcher (claim with `SKIP
//! LOCKED` under a lease, sign, send through the SSRF-guarded reqwest client's per-endpoint bound
//! and breaker, report each attempt in batches) drains N pending deliveries to a minimal axum
//! receiver in this process; the anchor is a plain reqwest loop posting the same signed payloads
//! to the same receiver with the same concurrency, with no database at all.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rdev_api::adapters::postgres::PgDatabase;
use rdev_api::adapters::sql::Sealing;
use rdev_api::adapters::telemetry::Metrics;
use rdev_api::adapters::webhook::{HttpWebhookSender, SenderSettings};
use rdev_api::domain::audit::{AuditContext, AuditKey, NewAuditEvent, action};
use rdev_api::domain::webhook::{
    DeliveryId, EventFilter, RetrySchedule, Webhook, WebhookId, WebhookSecret, WebhookUrl,
};
use rdev_api::ports::clock::SystemClock;
use rdev_api::ports::{Clock, OutgoingWebhook, SendError, WebhookEndpoints, WebhookSender};
use rdev_api::resilience::BreakerSettings;
use rdev_api::services::dispatcher::{Dispatcher, DispatcherPorts, DispatcherSettings};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Scenario;
use crate::harness::{Ctx, PgDb, Row, Spread, machine_busy, own_busy};

/// A drain's rate, and the CPU it took per delivery: the machine's (all processes, all cores)
/// and this process's (dispatcher or loop, and the receiver).
struct Drained {
    per_sec: f64,
    cpu_us: f64,
    own_cpu_us: f64,
}

/// Where a drain starts: the clocks [`Drained::since`] reads again.
struct Start {
    at: Instant,
    machine: Duration,
    own: Duration,
}

impl Start {
    fn now() -> Result<Start> {
        Ok(Start {
            at: Instant::now(),
            machine: machine_busy()?,
            own: own_busy(),
        })
    }
}

impl Drained {
    fn since(n: u64, start: &Start) -> Result<Drained> {
        let elapsed = start.at.elapsed().as_secs_f64();
        let per_delivery = |busy: Duration| busy.as_secs_f64() * 1e6 / n as f64;
        Ok(Drained {
            per_sec: n as f64 / elapsed,
            cpu_us: per_delivery(machine_busy()?.saturating_sub(start.machine)),
            own_cpu_us: per_delivery(own_busy().saturating_sub(start.own)),
        })
    }
}

pub const SCENARIO: Scenario = Scenario {
    name: "webhooks",
    about: "webhook deliveries/s from the Postgres outbox vs a plain reqwest loop, same receiver",
    run: |ctx| Box::pin(run(ctx)),
};

/// Requests in flight, for both sides.
const CONCURRENCY: usize = 64;

/// A body the size of a command event.
const PAYLOAD: &str = r#"{"type":"command.succeeded","timestamp":"2026-11-26T01:00:00.000000Z","data":{"id":"0193a3c4-0000-7000-8000-000000000000","project_id":"0193a3c4-0000-7000-8000-000000000001","status":"succeeded","exit_code":0,"termination_reason":"exit","error":null,"created_at":"2026-11-26T00:59:59.000000Z","started_at":"2026-11-26T00:59:59.500000Z","finished_at":"2026-11-26T01:00:00.000000Z"}}"#;

/// A receiver that counts requests and answers 204: as little work as a receiver can do.
async fn receiver() -> Result<(String, Arc<AtomicU64>, tokio::task::JoinHandle<()>)> {
    let count = Arc::new(AtomicU64::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let counter = count.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |_body: bytes::Bytes| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::Relaxed);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, count, task))
}

/// A sender that answers 204 at once and sends nothing: with it, the machine's CPU per delivery is
/// the database's (claims and reports) and the dispatcher's alone. A real delivery costs that
/// plus about what one request of the plain loop costs, on the same cores; so where the cores are
/// the limit, 0.5x of the plain loop needs this cost to be no more than the plain loop's.
struct Unsent(Arc<AtomicU64>);

#[async_trait::async_trait]
impl WebhookSender for Unsent {
    async fn send(&self, _request: &OutgoingWebhook) -> Result<u16, SendError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(204)
    }

    async fn check_destination(&self, _url: &WebhookUrl) -> Result<(), SendError> {
        Ok(())
    }
}

async fn dispatcher_per_sec(
    ctx: &Ctx,
    url: &str,
    sender: Arc<dyn WebhookSender>,
    received: &AtomicU64,
    n: u64,
) -> Result<Drained> {
    let db = PgDb::create(&ctx.admin_db_url).await?;
    let metrics = Arc::new(Metrics::new()?);
    let sealing = Arc::new(Sealing {
        key: AuditKey::new(b"bench".to_vec()),
        heads: metrics.clone(),
    });
    let store = PgDatabase::connect(&db.url, 16, sealing).await?;
    let now = SystemClock.now();
    let webhook = Webhook {
        id: WebhookId::new(),
        url: WebhookUrl::parse(url, true).map_err(|e| anyhow::anyhow!("{e}"))?,
        events: EventFilter::All,
        project_id: None,
        description: String::new(),
        secret: WebhookSecret::generate(&mut rand::rng()),
        enabled: true,
        disabled_reason: None,
        created_at: now,
        updated_at: now,
    };
    let audit = NewAuditEvent::new(
        &AuditContext::system(),
        now,
        action::WEBHOOK_CREATED,
        ("webhook", webhook.id.to_string()),
        serde_json::json!({}),
    );
    store.webhook_endpoints().insert(&webhook, audit).await?;
    let pool = sqlx::PgPool::connect(&db.url).await?;
    // Time-ordered ids, as the outbox writes them (`DeliveryId::new`): random ones would land
    // every primary-key entry on a random index page.
    let ids: Vec<uuid::Uuid> = (0..n).map(|_| DeliveryId::new().as_uuid()).collect();
    sqlx::query(
        "INSERT INTO webhook_deliveries (id, webhook_id, event_type, payload, status, attempts, \
         next_attempt_at, created_at) \
         SELECT id, $1, 'command.succeeded', $2, 'pending', 0, now(), now() \
         FROM UNNEST($3::uuid[]) AS id",
    )
    .bind(webhook.id.as_uuid())
    .bind(PAYLOAD)
    .bind(&ids)
    .execute(&pool)
    .await?;
    sqlx::query("VACUUM ANALYZE webhook_deliveries")
        .execute(&pool)
        .await?;

    let dispatcher = Arc::new(Dispatcher::new(
        DispatcherPorts {
            queue: Arc::new(store.delivery_queue()),
            sender,
            clock: Arc::new(SystemClock),
            metrics,
        },
        DispatcherSettings {
            concurrency: CONCURRENCY,
            per_endpoint: CONCURRENCY,
            lease: Duration::from_secs(31),
            poll_interval: Duration::from_millis(20),
            schedule: RetrySchedule::standard(),
            breaker: BreakerSettings {
                failure_threshold: 5,
                open_for: Duration::from_secs(30),
            },
            drain: Duration::from_secs(5),
        },
    ));
    let before = received.load(Ordering::Relaxed);
    let stop = CancellationToken::new();
    let start = Start::now()?;
    let task = tokio::spawn(dispatcher.run(stop.clone()));
    let deadline = start.at + Duration::from_secs(600);
    // Counting the table while it drains would cost the database more than the dispatcher
    // does: wait for the receiver's count first, then for the last reports (the partial index
    // of pending deliveries is nearly empty by then).
    while received.load(Ordering::Relaxed) - before < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {n} received after 600 s",
            received.load(Ordering::Relaxed) - before
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    loop {
        let pending: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM webhook_deliveries WHERE status = 'pending'")
                .fetch_one(&pool)
                .await?;
        if pending == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{pending} of {n} still pending after 600 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drained = Drained::since(n, &start)?;
    stop.cancel();
    task.await.context("dispatcher")?;
    let got = received.load(Ordering::Relaxed) - before;
    anyhow::ensure!(got >= n, "the receiver got {got} of {n}: deliveries lost");
    if got > n {
        eprintln!("  ({} duplicate deliveries)", got - n);
    }
    let delivered: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM webhook_deliveries WHERE status = 'delivered'")
            .fetch_one(&pool)
            .await?;
    anyhow::ensure!(
        delivered as u64 == n,
        "{delivered} of {n} recorded as delivered"
    );
    // Each delivered at its first attempt, recorded in its own row (earlier attempts would be
    // in `webhook_attempts`).
    let first_try: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM webhook_deliveries \
         WHERE attempts = 1 AND last_attempt_at IS NOT NULL AND last_status_code = 204",
    )
    .fetch_one(&pool)
    .await?;
    anyhow::ensure!(
        first_try as u64 == n,
        "{first_try} of {n} recorded as delivered at the first attempt"
    );
    pool.close().await;
    store.close().await;
    Ok(drained)
}

/// The anchor: `CONCURRENCY` tasks posting signed payloads with one reqwest client.
async fn plain_loop_per_sec(url: &str, received: &AtomicU64, n: u64) -> Result<Drained> {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .build()?;
    let secret = WebhookSecret::generate(&mut rand::rng());
    let next = Arc::new(AtomicU64::new(0));
    let before = received.load(Ordering::Relaxed);
    let start = Start::now()?;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (client, secret, next, url) =
            (client.clone(), secret.clone(), next.clone(), url.to_owned());
        tasks.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let id = DeliveryId::new();
                let timestamp = SystemClock.now().unix_timestamp();
                let response = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("webhook-id", id.to_string())
                    .header("webhook-timestamp", timestamp.to_string())
                    .header(
                        "webhook-signature",
                        secret.sign(id, timestamp, PAYLOAD.as_bytes()),
                    )
                    .body(PAYLOAD)
                    .send()
                    .await?;
                anyhow::ensure!(response.status().is_success(), "{}", response.status());
                let _ = response.bytes().await;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let drained = Drained::since(n, &start)?;
    let got = received.load(Ordering::Relaxed) - before;
    anyhow::ensure!(got == n, "the receiver got {got} of {n}");
    Ok(drained)
}

async fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let n = ctx.size(100_000, 1_000);
    let (url, received, _receiver) = receiver().await?;
    let sender: Arc<dyn WebhookSender> = Arc::new(HttpWebhookSender::new(SenderSettings {
        connect_timeout: Duration::from_secs(3),
        timeout: Duration::from_secs(10),
        allow_private: true,
        proxy: None,
    })?);
    let unsent = Arc::new(AtomicU64::new(0));
    let (mut ours, mut anchor, mut alone) = (vec![], vec![], vec![]);
    for run in 0..ctx.runs {
        let dispatched = dispatcher_per_sec(ctx, &url, sender.clone(), &received, n).await?;
        let plain = plain_loop_per_sec(&url, &received, n).await?;
        let unsent_only =
            dispatcher_per_sec(ctx, &url, Arc::new(Unsent(unsent.clone())), &unsent, n).await?;
        eprintln!(
            "  run {}: dispatcher {:.0}/s ({:.1} us machine CPU each, {:.1} us in this \
             process), plain reqwest loop {:.0}/s ({:.1} us, {:.1} us), dispatcher sending \
             nothing {:.0}/s ({:.1} us, {:.1} us)",
            run + 1,
            dispatched.per_sec,
            dispatched.cpu_us,
            dispatched.own_cpu_us,
            plain.per_sec,
            plain.cpu_us,
            plain.own_cpu_us,
            unsent_only.per_sec,
            unsent_only.cpu_us,
            unsent_only.own_cpu_us,
        );
        ours.push(dispatched);
        anchor.push(plain);
        alone.push(unsent_only);
    }
    let spread = |all: &[Drained], figure: fn(&Drained) -> f64| {
        Spread::of(&all.iter().map(figure).collect::<Vec<_>>())
    };
    let rate = |all: &[Drained]| spread(all, |d| d.per_sec);
    let cpu = |all: &[Drained]| spread(all, |d| d.cpu_us);
    let (ours_rate, theirs_rate, alone_rate) = (rate(&ours), rate(&anchor), rate(&alone));
    let (ours_cpu, theirs_cpu, alone_cpu) = (cpu(&ours), cpu(&anchor), cpu(&alone));
    let ratio = ours_rate.median / theirs_rate.median;
    Ok(vec![
        Row::new(
            "8",
            &format!(
                "webhook deliveries/s ({n} from the Postgres outbox, c={CONCURRENCY}, none lost)"
            ),
        )
        .anchor(format!(
            "plain reqwest loop, same signed payloads, c={CONCURRENCY}: {}",
            theirs_rate.show("/s", 0)
        ))
        .goal(">= 5,000/s and >= 0.5x the plain loop")
        .measured(ours_rate.show("/s", 0))
        .ratio(ratio)
        .met(ours_rate.median >= 5_000.0 && ratio >= 0.5),
        Row::new(
            "8",
            "machine CPU per delivery (all processes: database, dispatcher or loop, receiver)",
        )
        .anchor(format!("plain reqwest loop {}", theirs_cpu.show("us", 1)))
        .measured(ours_cpu.show("us", 1))
        .ratio(ours_cpu.median / theirs_cpu.median),
        Row::new(
            "8",
            "the same dispatcher with a sender that sends nothing: deliveries/s, CPU per delivery",
        )
        .anchor(format!("plain reqwest loop {}", theirs_rate.show("/s", 0)))
        .goal("0.5x above needs CPU here <= the plain loop's")
        .measured(format!(
            "{}, {} ({} of it in the dispatcher's process)",
            alone_rate.show("/s", 0),
            alone_cpu.show("us", 1),
            spread(&alone, |d| d.own_cpu_us).show("us", 1)
        ))
        .ratio(alone_cpu.median / theirs_cpu.median),
    ])
}
