//! Scenario 5: a command writing 1 GiB with one live SSE reader: server RSS growth, ingest rate,
//! and a stream capped at `RDEV_MAX_OUTPUT_BYTES` with one `truncated` and an `end`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures::StreamExt;

use super::Scenario;
use crate::harness::{ADMIN_KEY, Ctx, Row, Server, Spread, SqliteDb};

pub const SCENARIO: Scenario = Scenario {
    name: "output",
    about: "a command writing 1 GiB with one live SSE reader",
    run: |ctx| Box::pin(run(ctx)),
};

struct Measured {
    rss_growth_mib: f64,
    ingest_mb_per_s: f64,
}

async fn once(ctx: &Ctx, bytes: u64, cap: u64) -> Result<Measured> {
    let db = SqliteDb::create()?;
    let server = Server::start(
        ctx,
        &[
            ("DATABASE_URL", db.url.clone()),
            ("RDEV_MAX_OUTPUT_BYTES", cap.to_string()),
        ],
    )
    .await?;
    let project = server.project("loud", 1).await?;
    // Warm-up: one small command through the same path.
    let warm = server.submit(&project, "echo warm").await?;
    follow(&server, &warm).await?;
    let baseline = server.rss_kib()?;

    let started = Instant::now();
    let id = server
        .submit(&project, &format!("head -c {bytes} /dev/zero | tr '\\0' x"))
        .await?;
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(baseline));
    let sampler = {
        let (peak, pid) = (peak.clone(), server.pid);
        tokio::spawn(async move {
            loop {
                if let Ok(rss) = crate::harness::status_kib(pid, "VmRSS:") {
                    peak.fetch_max(rss, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let followed = follow(&server, &id).await?;
    sampler.abort();
    let wall = started.elapsed().as_secs_f64();
    ensure!(
        followed.truncated_events == 1,
        "{} truncated events",
        followed.truncated_events
    );
    ensure!(
        followed.stdout_bytes == cap,
        "streamed {} bytes, cap {cap}",
        followed.stdout_bytes
    );
    ensure!(
        followed.end_status == "succeeded",
        "ended {}",
        followed.end_status
    );
    let command = server.get(&format!("/api/v1/commands/{id}")).await?;
    ensure!(
        command["stdout_bytes"].as_u64() == Some(bytes),
        "stdout_bytes {}",
        command["stdout_bytes"]
    );
    ensure!(
        command["dropped_bytes"].as_u64() == Some(bytes - cap),
        "dropped {}",
        command["dropped_bytes"]
    );
    let stored = server
        .client
        .get(server.url(&format!("/api/v1/commands/{id}/output")))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await?
        .bytes()
        .await?;
    ensure!(stored.len() as u64 == cap, "stored {} bytes", stored.len());
    let growth = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(baseline);
    server.stop().await;
    Ok(Measured {
        rss_growth_mib: growth as f64 / 1024.0,
        ingest_mb_per_s: bytes as f64 / 1e6 / wall,
    })
}

struct Followed {
    stdout_bytes: u64,
    truncated_events: usize,
    end_status: String,
}

async fn follow(server: &Server, id: &str) -> Result<Followed> {
    let mut events = server.events(id).await?;
    let mut followed = Followed {
        stdout_bytes: 0,
        truncated_events: 0,
        end_status: String::new(),
    };
    while let Some(event) = tokio::time::timeout(Duration::from_secs(600), events.next())
        .await
        .context("stream stalled for 600 s")?
    {
        let event = event?;
        match event.event.as_str() {
            "output" => {
                let data: serde_json::Value = serde_json::from_str(&event.data)?;
                followed.stdout_bytes += data["data"].as_str().map_or(0, |s| s.len() as u64);
            }
            "truncated" => followed.truncated_events += 1,
            "end" => {
                let data: serde_json::Value = serde_json::from_str(&event.data)?;
                followed.end_status = data["status"].as_str().unwrap_or_default().to_owned();
                break;
            }
            _ => {}
        }
    }
    Ok(followed)
}

async fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let bytes = ctx.size(1 << 30, 16 << 20);
    let cap = ctx.size(10 << 20, 1 << 20);
    let (mut growth, mut ingest) = (vec![], vec![]);
    for run in 0..ctx.runs {
        let measured = once(ctx, bytes, cap).await?;
        eprintln!(
            "  run {}: RSS growth {:.1} MiB, ingest {:.0} MB/s",
            run + 1,
            measured.rss_growth_mib,
            measured.ingest_mb_per_s
        );
        growth.push(measured.rss_growth_mib);
        ingest.push(measured.ingest_mb_per_s);
    }
    let (growth, ingest) = (Spread::of(&growth), Spread::of(&ingest));
    let size = format!("{} MiB", bytes >> 20);
    Ok(vec![
        Row::new(
            "5",
            &format!("{size} command + 1 SSE reader: server RSS growth"),
        )
        .anchor("Buildkite caps logs at 1 GiB; SSM keeps 24 KB")
        .goal("<= 32 MiB")
        .measured(growth.show("MiB", 1))
        .met(growth.max <= 32.0),
        Row::new("5", &format!("{size} command: ingest rate"))
            .goal(">= 100 MB/s")
            .measured(ingest.show("MB/s", 0))
            .met(ingest.median >= 100.0),
        Row::new("5", "stream capped + 1 truncated + end, stored = cap")
            .goal("exact")
            .measured(format!("{} MiB stored and streamed, every run", cap >> 20))
            .met(true),
    ])
}
