//! The graphile-worker anchor (0.16.6, the newest that runs on this machine's Node 20): its
//! scripts live in `bench/anchors/graphile` and print one JSON line each.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::harness::{Ctx, run_program};

fn dir(ctx: &Ctx) -> PathBuf {
    ctx.workspace.join("bench/anchors/graphile")
}

/// Installs the pinned packages (`npm ci`) when they are missing.
async fn ensure_installed(ctx: &Ctx) -> Result<PathBuf> {
    let dir = dir(ctx);
    if !dir.join("node_modules/graphile-worker").exists() {
        eprintln!("  installing graphile-worker (npm ci)");
        run_program(
            "npm".as_ref(),
            &["ci", "--silent", "--no-audit", "--no-fund"],
            Some(&dir),
        )
        .await
        .context("npm ci in bench/anchors/graphile")?;
    }
    Ok(dir)
}

async fn node(ctx: &Ctx, script: &str, args: &[&str]) -> Result<Value> {
    let dir = ensure_installed(ctx).await?;
    let mut full = vec![script];
    full.extend_from_slice(args);
    let output = run_program("node".as_ref(), &full, Some(&dir)).await?;
    let line = output
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("no JSON from node")?;
    Ok(serde_json::from_str(line)?)
}

/// Jobs per second for `jobs` no-op jobs at `concurrency`.
pub async fn throughput(ctx: &Ctx, database_url: &str, jobs: u64, concurrency: u32) -> Result<f64> {
    let result = node(
        ctx,
        "throughput.js",
        &[
            "--connection",
            database_url,
            "--jobs",
            &jobs.to_string(),
            "--concurrency",
            &concurrency.to_string(),
        ],
    )
    .await?;
    result["jobs_per_sec"].as_f64().context("jobs_per_sec")
}

/// add_job -> task start latency percentiles in ms: (p50, p99).
pub async fn latency(ctx: &Ctx, database_url: &str, samples: u32) -> Result<(f64, f64)> {
    let result = node(
        ctx,
        "latency.js",
        &[
            "--connection",
            database_url,
            "--samples",
            &samples.to_string(),
        ],
    )
    .await?;
    Ok((
        result["p50_ms"].as_f64().context("p50_ms")?,
        result["p99_ms"].as_f64().context("p99_ms")?,
    ))
}
