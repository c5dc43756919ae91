//! rdev-bench: builds rdev-api and the anchors, runs every scenario side by side with its anchor
//! several times, and prints one table (figure, anchor, goal, measured, ratio).
//!
//! `cargo run --release -p rdev-bench` for the full run; `--smoke` for tiny sizes in seconds.

mod harness;
mod scenarios;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;

use harness::{Ctx, Row};

#[derive(Debug, Parser)]
#[command(about = "Benchmarks of rdev-api against their anchors")]
struct Args {
    /// Tiny sizes, one run each: checks that every scenario still works (CI).
    #[arg(long)]
    smoke: bool,
    /// Runs of each measurement (the table shows the median with min and max).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Only these scenarios (comma-separated names: http, queue, latency, sse, output, kube, ratelimit, webhooks).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Postgres to create scratch databases in.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let release = !cfg!(debug_assertions);
    build_binaries(&workspace, release).await?;
    let profile = if release { "release" } else { "debug" };
    let target =
        std::env::var("CARGO_TARGET_DIR").map_or_else(|_| workspace.join("target"), PathBuf::from);
    let ctx = Ctx {
        bin_dir: target.join(profile),
        workspace,
        admin_db_url: args.database_url.clone(),
        smoke: args.smoke,
        runs: if args.smoke { 1 } else { args.runs.max(1) },
    };
    let fds = harness::raise_fd_limit(65_536)?;
    eprintln!(
        "machine: {}; profile {profile}; open files {fds}",
        harness::machine()
    );

    let mut rows: Vec<Row> = Vec::new();
    let mut failures = Vec::new();
    for scenario in scenarios::ALL {
        if !args.only.is_empty() && !args.only.iter().any(|o| o == scenario.name) {
            continue;
        }
        eprintln!("\n== {}: {}", scenario.name, scenario.about);
        match (scenario.run)(&ctx).await {
            Ok(mut produced) => rows.append(&mut produced),
            Err(error) => {
                eprintln!("{} failed: {error:#}", scenario.name);
                failures.push(scenario.name);
                rows.push(
                    Row::new(scenario.name, "scenario failed")
                        .measured(format!("{error:#}"))
                        .met(false),
                );
            }
        }
    }
    print_table(&rows, &ctx);
    if !failures.is_empty() {
        bail!("scenarios failed: {}", failures.join(", "));
    }
    Ok(())
}

/// Builds rdev-api and the hello-world anchor with the profile this harness runs in.
async fn build_binaries(workspace: &std::path::Path, release: bool) -> Result<()> {
    let mut args = vec![
        "build",
        "--quiet",
        "-p",
        "rdev-api",
        "-p",
        "rdev-bench",
        "--bins",
    ];
    if release {
        args.push("--release");
    }
    let status = tokio::process::Command::new(env!("CARGO"))
        .args(&args)
        .current_dir(workspace)
        .status()
        .await?;
    if !status.success() {
        bail!("cargo build failed");
    }
    Ok(())
}

fn print_table(rows: &[Row], ctx: &Ctx) {
    println!();
    println!(
        "rdev-bench on {} ({} run{} per figure{})",
        harness::machine(),
        ctx.runs,
        if ctx.runs == 1 { "" } else { "s" },
        if ctx.smoke {
            ", SMOKE sizes: figures are not meaningful"
        } else {
            ""
        }
    );
    println!();
    println!("| # | figure | anchor (same run) | goal | measured | ratio | met |");
    println!("|---|---|---|---|---|---|---|");
    for row in rows {
        let met = match row.met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.scenario, row.figure, row.anchor, row.goal, row.measured, row.ratio, met
        );
    }
}
