//! Scenario 3: submit -> first output byte over SSE on an idle server with the local executor,
//! on both backends; the anchor is graphile-worker's add_job -> task start on the same Postgres.

use std::time::Duration;

use anyhow::Result;

use super::{Scenario, graphile};
use crate::harness::{Ctx, PgDb, Row, Server, SqliteDb, percentile};

pub const SCENARIO: Scenario = Scenario {
    name: "latency",
    about: "submit -> first output byte on SSE, local executor, idle server",
    run: |ctx| Box::pin(run(ctx)),
};

/// Milliseconds from the submit request to the first `output` event, per sample.
async fn samples(ctx: &Ctx, database_url: String, count: usize) -> Result<Vec<f64>> {
    let server = Server::start(ctx, &[("DATABASE_URL", database_url)]).await?;
    let project = server.project("latency", 4).await?;
    let mut measured = Vec::with_capacity(count);
    for index in 0..count + 5 {
        let elapsed = server.submit_to_first_output(&project, "echo x").await?;
        // The first five warm up connections and caches.
        if index >= 5 {
            measured.push(elapsed);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
    measured.sort_by(f64::total_cmp);
    Ok(measured)
}

async fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let count = ctx.size(300, 10);
    let pg = PgDb::create(&ctx.admin_db_url).await?;
    let anchor_db = PgDb::create(&ctx.admin_db_url).await?;
    let anchor = graphile::latency(ctx, &anchor_db.url, count as u32).await;
    let anchor_text = match &anchor {
        Ok((p50, p99)) => format!(
            "graphile-worker add_job->start p50 {p50:.2} ms, p99 {p99:.2} ms (4 ms published)"
        ),
        Err(error) => format!("graphile-worker unavailable: {error:#}"),
    };
    let sqlite = SqliteDb::create()?;
    let mut rows = Vec::new();
    for (backend, url) in [("SQLite", sqlite.url.clone()), ("Postgres", pg.url.clone())] {
        let sorted = samples(ctx, url, count).await?;
        let (p50, p99) = (percentile(&sorted, 50.0), percentile(&sorted, 99.0));
        eprintln!(
            "  {backend}: p50 {p50:.2} ms, p99 {p99:.2} ms over {} samples",
            sorted.len()
        );
        let mut p50_row = Row::new("3", &format!("submit -> first SSE output, {backend}, p50"))
            .anchor(anchor_text.clone())
            .goal("<= 5 ms")
            .measured(format!("{p50:.2} ms"))
            .met(p50 <= 5.0);
        let mut p99_row = Row::new("3", &format!("submit -> first SSE output, {backend}, p99"))
            .anchor(anchor_text.clone())
            .goal("<= 20 ms")
            .measured(format!("{p99:.2} ms"))
            .met(p99 <= 20.0);
        if let Ok((a50, a99)) = anchor {
            p50_row = p50_row.ratio(p50 / a50);
            p99_row = p99_row.ratio(p99 / a99);
        }
        rows.push(p50_row);
        rows.push(p99_row);
    }
    Ok(rows)
}
