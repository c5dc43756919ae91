//! Scenario 2: queue throughput on Postgres. rdev-api's own worker pool (claim, lease, bus
//! events, finish with its audit row) with a no-op executor drains N queued commands; the anchor,
//! graphile-worker, drains N no-op jobs on the same Postgres.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_trait::async_trait;
use bytes::Bytes;
use rdev_api::adapters::bus::InProcessBus;
use rdev_api::adapters::cache::CachedProjects;
use rdev_api::adapters::postgres::{PgDatabase, PgRelay, notify};
use rdev_api::adapters::sql::Sealing;
use rdev_api::adapters::telemetry::Metrics;
use rdev_api::domain::audit::{AuditContext, AuditKey, NewAuditEvent, action};
use rdev_api::domain::command::OutputStream;
use rdev_api::domain::ids::ProjectId;
use rdev_api::domain::project::{EnvVars, ExecutorKind, Project, ProjectName, Workdir};
use rdev_api::ports::clock::SystemClock;
use rdev_api::ports::{Clock, ExecRequest, Execution, Executor, PortError, ProjectRepository};
use rdev_api::services::worker::{WorkerPool, WorkerPorts, WorkerSettings};
use tokio_util::sync::CancellationToken;

use super::{Scenario, graphile};
use crate::harness::{Ctx, PgDb, Row, Spread};

pub const SCENARIO: Scenario = Scenario {
    name: "queue",
    about: "claims+completions/s of no-op commands on Postgres vs graphile-worker 0.16.6",
    run: |ctx| Box::pin(run(ctx)),
};

const WORKERS: usize = 32;
/// graphile-worker 0.16.6 was fastest at 10-24 here (bench/anchors/graphile/README.md).
const GRAPHILE_CONCURRENCY: u32 = 24;

/// An executor whose processes print nothing and exit 0 at once: what is left is the queue.
struct NoopExecutor;

struct NoopExecution;

#[async_trait]
impl Executor for NoopExecutor {
    async fn start(&self, _: ExecRequest) -> Result<Box<dyn Execution>, PortError> {
        Ok(Box::new(NoopExecution))
    }
}

#[async_trait]
impl Execution for NoopExecution {
    async fn next_output(&mut self) -> Option<(OutputStream, Bytes)> {
        None
    }
    async fn terminate(&mut self, _: Duration) {}
    async fn wait(&mut self) -> Result<Option<i32>, PortError> {
        Ok(Some(0))
    }
}

async fn rdev_jobs_per_sec(ctx: &Ctx, jobs: u64) -> Result<f64> {
    let db = PgDb::create(&ctx.admin_db_url).await?;
    let metrics = Arc::new(Metrics::new()?);
    let sealing = Arc::new(Sealing {
        key: AuditKey::new(b"bench".to_vec()),
        heads: metrics.clone(),
    });
    let store = PgDatabase::connect(&db.url, 40, sealing).await?;
    let clock = SystemClock;
    let now = clock.now();
    let project = Project {
        id: ProjectId::new(),
        name: ProjectName::parse("bench".into()).expect("valid name"),
        description: String::new(),
        target: None,
        workdir: Workdir::parse("/tmp".into()).expect("valid workdir"),
        env: EnvVars::default(),
        max_concurrency: 64,
        default_timeout_secs: 60,
        executor: ExecutorKind::Local,
        created_at: now,
        updated_at: now,
    };
    let audit = NewAuditEvent::new(
        &AuditContext::system(),
        now,
        action::PROJECT_CREATED,
        ("project", project.id.to_string()),
        serde_json::json!({}),
    );
    store.projects().insert(&project, audit).await?;
    let pool = sqlx::PgPool::connect(&db.url).await?;
    sqlx::query(
        "INSERT INTO commands (id, project_id, command, env, priority, timeout_secs, status, created_at) \
         SELECT gen_random_uuid(), $1, 'true', '{}', 1, 60, 'queued', now() FROM generate_series(1, $2)",
    )
    .bind(project.id.as_uuid())
    .bind(jobs as i64)
    .execute(&pool)
    .await?;

    let shutdown = CancellationToken::new();
    let bus = InProcessBus::relayed(Arc::new(PgRelay::new(store.pool().clone(), "bench".into())));
    notify::listen(
        store.pool().clone(),
        "bench".into(),
        bus.clone(),
        shutdown.clone(),
    );
    let workers = WorkerPool::new(
        WorkerPorts {
            queue: Arc::new(store.command_queue()),
            // As in the server: projects are read through the cache.
            projects: Arc::new(CachedProjects::new(
                Arc::new(store.projects()),
                Duration::from_secs(30),
                bus.clone(),
                metrics.clone(),
            )),
            output: Arc::new(store.output_store()),
            bus: bus.clone(),
            work: bus,
            clock: Arc::new(SystemClock),
            metrics,
            local: Some(Arc::new(NoopExecutor)),
            kube: None,
        },
        WorkerSettings {
            workers: WORKERS,
            lease: Duration::from_secs(30),
            kill_grace: Duration::from_secs(1),
            max_output_bytes: 1024 * 1024,
            poll_interval: Duration::from_millis(200),
            drain: Duration::from_secs(5),
            claim_batch: WORKERS / 4,
        },
        "bench-replica".into(),
    );
    let started = Instant::now();
    let task = tokio::spawn(workers.run(shutdown.clone()));
    let deadline = started + Duration::from_secs(600);
    loop {
        let done: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM commands WHERE status = 'succeeded'")
                .fetch_one(&pool)
                .await?;
        if done as u64 >= jobs {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {done} of {jobs} commands done after 600 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    shutdown.cancel();
    task.await.context("worker pool")?;
    let not_succeeded: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM commands WHERE status <> 'succeeded'")
            .fetch_one(&pool)
            .await?;
    anyhow::ensure!(
        not_succeeded == 0,
        "{not_succeeded} commands did not succeed"
    );
    pool.close().await;
    store.close().await;
    Ok(jobs as f64 / elapsed)
}

async fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let jobs = ctx.size(50_000, 500);
    let (mut rdev, mut anchor) = (vec![], vec![]);
    let mut anchor_error = None;
    for run in 0..ctx.runs {
        let ours = rdev_jobs_per_sec(ctx, jobs).await?;
        rdev.push(ours);
        let db = PgDb::create(&ctx.admin_db_url).await?;
        match graphile::throughput(ctx, &db.url, jobs, GRAPHILE_CONCURRENCY).await {
            Ok(theirs) => {
                eprintln!(
                    "  run {}: rdev {ours:.0} jobs/s, graphile-worker {theirs:.0} jobs/s",
                    run + 1
                );
                anchor.push(theirs);
            }
            Err(error) => {
                eprintln!(
                    "  run {}: rdev {ours:.0} jobs/s, graphile-worker failed: {error:#}",
                    run + 1
                );
                anchor_error = Some(format!("{error:#}"));
            }
        }
    }
    let ours = Spread::of(&rdev);
    let row = Row::new(
        "2",
        &format!("queue claims+completions/s ({jobs} no-op, {WORKERS} workers)"),
    )
    .goal(">= 1.0x (graphile publishes 15.6k/s unbatched, 184k/s batched)")
    .measured(ours.show("jobs/s", 0));
    let row = if anchor.is_empty() {
        row.anchor(format!(
            "graphile-worker unavailable: {}",
            anchor_error.unwrap_or_default()
        ))
    } else {
        let theirs = Spread::of(&anchor);
        let ratio = ours.median / theirs.median;
        row.anchor(format!(
            "graphile-worker 0.16.6 c={GRAPHILE_CONCURRENCY} {}",
            theirs.show("jobs/s", 0)
        ))
        .ratio(ratio)
        .met(ratio >= 1.0)
    };
    Ok(vec![row])
}
