//! Scenario 7: the cost of one rate-limit decision in each adapter, in process.
//!
//! - In memory: decisions over 1,000 keys from two tasks (the machine's two cores), against
//!   governor's keyed GCRA limiter doing the same number of checks on the same keys: the
//!   cheapest in-memory limiter there is.
//! - Postgres: decisions per second with 16 concurrent tasks over 1,000 keys and on one hot
//!   key, against `SELECT 1` on the same pool with the same concurrency: a decision is one
//!   round trip, so that is its floor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use governor::{DefaultKeyedRateLimiter, Quota};
use rdev_api::adapters::memory::MemoryRateLimiter;
use rdev_api::adapters::postgres::PgDatabase;
use rdev_api::adapters::sql::Sealing;
use rdev_api::adapters::telemetry::Metrics;
use rdev_api::domain::audit::AuditKey;
use rdev_api::domain::ids::ApiKeyId;
use rdev_api::domain::rate_limit::RateLimit;
use rdev_api::ports::RateLimiter;
use rdev_api::ports::clock::SystemClock;

use super::Scenario;
use crate::harness::{Ctx, PgDb, Row, Spread, percentile};

pub const SCENARIO: Scenario = Scenario {
    name: "ratelimit",
    about: "one rate-limit decision: in memory vs governor, Postgres vs SELECT 1",
    run: |ctx| Box::pin(run(ctx)),
};

const KEYS: usize = 1_000;
const PG_CONCURRENCY: usize = 16;

/// A limit no decision here reaches, so every one is an admission that writes.
fn unreached() -> RateLimit {
    RateLimit::parse("1000000000/60s").expect("a valid limit")
}

/// Nanoseconds per decision of the memory adapter, `per_task` decisions on each of 2 tasks.
async fn memory_ns(per_task: usize) -> Result<f64> {
    let limiter = Arc::new(MemoryRateLimiter::new(Arc::new(SystemClock)));
    let keys: Arc<Vec<ApiKeyId>> = Arc::new((0..KEYS).map(|_| ApiKeyId::new()).collect());
    let started = Instant::now();
    let tasks: Vec<_> = (0..2)
        .map(|task| {
            let (limiter, keys) = (limiter.clone(), keys.clone());
            tokio::spawn(async move {
                for n in 0..per_task {
                    let key = keys[(n * 7 + task) % KEYS];
                    limiter.hit(key, unreached()).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(started.elapsed().as_nanos() as f64 / (2 * per_task) as f64)
}

/// Nanoseconds per check of governor's keyed limiter, the same pattern.
async fn governor_ns(per_task: usize) -> Result<f64> {
    let quota = Quota::per_second(std::num::NonZeroU32::MAX);
    let limiter = Arc::new(DefaultKeyedRateLimiter::<ApiKeyId>::keyed(quota));
    let keys: Arc<Vec<ApiKeyId>> = Arc::new((0..KEYS).map(|_| ApiKeyId::new()).collect());
    let started = Instant::now();
    let tasks: Vec<_> = (0..2)
        .map(|task| {
            let (limiter, keys) = (limiter.clone(), keys.clone());
            tokio::spawn(async move {
                for n in 0..per_task {
                    let _ = limiter.check_key(&keys[(n * 7 + task) % KEYS]);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await?;
    }
    Ok(started.elapsed().as_nanos() as f64 / (2 * per_task) as f64)
}

/// Operations per second and latencies (ms, sorted) of `op` from 16 tasks for `duration`.
async fn pg_rate<F, Fut>(duration: Duration, op: F) -> Result<(f64, Vec<f64>)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let op = Arc::new(op);
    let started = Instant::now();
    let tasks: Vec<_> = (0..PG_CONCURRENCY)
        .map(|task| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = task;
                while started.elapsed() < duration {
                    let one = Instant::now();
                    op(n).await?;
                    latencies.push(one.elapsed().as_secs_f64() * 1000.0);
                    n += PG_CONCURRENCY;
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    Ok((rate, all))
}

async fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let per_task = ctx.size(500_000, 5_000);
    let (mut memory, mut governor) = (vec![], vec![]);
    for run in 0..ctx.runs {
        let g = governor_ns(per_task).await?;
        let m = memory_ns(per_task).await?;
        eprintln!(
            "  run {}: memory {m:.0} ns/decision; governor {g:.0} ns/check",
            run + 1
        );
        memory.push(m);
        governor.push(g);
    }

    let db = PgDb::create(&ctx.admin_db_url).await?;
    let sealing = Arc::new(Sealing {
        key: AuditKey::new(b"bench".to_vec()),
        heads: Arc::new(Metrics::new()?),
    });
    let store = PgDatabase::connect(&db.url, PG_CONCURRENCY as u32, sealing).await?;
    let limiter = Arc::new(store.rate_limiter(None));
    let pool = store.pool().clone();
    let keys: Arc<Vec<ApiKeyId>> = Arc::new((0..KEYS).map(|_| ApiKeyId::new()).collect());
    let hot = ApiKeyId::new();
    let duration = Duration::from_secs(ctx.size(5, 1));
    let (mut select, mut spread_keys, mut one_key) = (vec![], vec![], vec![]);
    let (mut select_p99, mut keys_p99, mut one_p99) = (vec![], vec![], vec![]);
    for run in 0..ctx.runs {
        let pool = pool.clone();
        let (s, s_lat) = pg_rate(duration, move |_| {
            let pool = pool.clone();
            async move {
                sqlx::query("SELECT 1").execute(&pool).await?;
                Ok(())
            }
        })
        .await?;
        let (limiter_k, keys_k) = (limiter.clone(), keys.clone());
        let (k, k_lat) = pg_rate(duration, move |n| {
            let (limiter, key) = (limiter_k.clone(), keys_k[n % KEYS]);
            async move {
                limiter.hit(key, unreached()).await?;
                Ok(())
            }
        })
        .await?;
        let limiter_h = limiter.clone();
        let (h, h_lat) = pg_rate(duration, move |_| {
            let limiter = limiter_h.clone();
            async move {
                limiter.hit(hot, unreached()).await?;
                Ok(())
            }
        })
        .await?;
        eprintln!(
            "  run {}: SELECT 1 {s:.0}/s; decisions over {KEYS} keys {k:.0}/s; one key {h:.0}/s",
            run + 1
        );
        select.push(s);
        spread_keys.push(k);
        one_key.push(h);
        select_p99.push(percentile(&s_lat, 99.0));
        keys_p99.push(percentile(&k_lat, 99.0));
        one_p99.push(percentile(&h_lat, 99.0));
    }
    store.close().await;

    let (m, g) = (Spread::of(&memory), Spread::of(&governor));
    let (s, k, h) = (
        Spread::of(&select),
        Spread::of(&spread_keys),
        Spread::of(&one_key),
    );
    let (sp, kp, hp) = (
        Spread::of(&select_p99),
        Spread::of(&keys_p99),
        Spread::of(&one_p99),
    );
    let memory_ratio = m.median / g.median;
    let keys_ratio = k.median / s.median;
    let hot_ratio = h.median / s.median;
    Ok(vec![
        Row::new("7", "rate-limit decision, in memory, 2 tasks, 1000 keys")
            .anchor(format!("governor keyed check {}", g.show("ns", 0)))
            .goal("<= 1 us")
            .measured(m.show("ns", 0))
            .ratio(memory_ratio)
            .met(m.median <= 1_000.0),
        Row::new("7", "rate-limit decisions/s, Postgres, 16 tasks, 1000 keys")
            .anchor(format!(
                "SELECT 1 {} (p99 {})",
                s.show("/s", 0),
                sp.show("ms", 2)
            ))
            .goal(">= 0.5x SELECT 1")
            .measured(format!("{} (p99 {})", k.show("/s", 0), kp.show("ms", 2)))
            .ratio(keys_ratio)
            .met(keys_ratio >= 0.5),
        Row::new("7", "rate-limit decisions/s, Postgres, 16 tasks, one key")
            .anchor("(same SELECT 1)")
            .goal("- (one row lock: serial)")
            .measured(format!("{} (p99 {})", h.show("/s", 0), hp.show("ms", 2)))
            .ratio(hot_ratio),
    ])
}
