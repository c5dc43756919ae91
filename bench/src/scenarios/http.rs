//! Scenario 1: an authenticated `GET /api/v1/projects/{id}` under 64 connections (wrk), against
//! a bare axum hello-world served the same way.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::Scenario;
use crate::harness::{ADMIN_KEY, Ctx, Row, Server, Spread, SqliteDb, run_program};

pub const SCENARIO: Scenario = Scenario {
    name: "http",
    about: "authenticated GET /api/v1/projects/{id}, 64 connections, vs bare axum hello-world",
    run: |ctx| Box::pin(run(ctx)),
};

struct WrkResult {
    requests_per_sec: f64,
    p99_ms: f64,
}

async fn wrk(ctx: &Ctx, url: &str, auth: bool) -> Result<WrkResult> {
    let duration = format!("{}s", ctx.size(10, 1));
    let connections = ctx.size(64, 8).to_string();
    let header = format!("Authorization: Bearer {ADMIN_KEY}");
    let mut args = vec!["-t2", "-c", &connections, "-d", &duration, "--latency"];
    if auth {
        args.extend(["-H", &header]);
    }
    args.push(url);
    let output = run_program("wrk".as_ref(), &args, None)
        .await
        .context("wrk (apt-get install wrk)")?;
    parse_wrk(&output)
}

fn parse_wrk(output: &str) -> Result<WrkResult> {
    let requests_per_sec = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .context("wrk printed no Requests/sec")?;
    let p99 = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(str::trim)
        .context("wrk printed no 99% latency")?;
    if output.contains("Non-2xx or 3xx responses") {
        bail!("wrk saw error responses:\n{output}");
    }
    Ok(WrkResult {
        requests_per_sec,
        p99_ms: parse_duration_ms(p99)?,
    })
}

fn parse_duration_ms(text: &str) -> Result<f64> {
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else {
        bail!("unknown duration {text}")
    };
    Ok(number.parse::<f64>()? * factor)
}

async fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let mut hello = tokio::process::Command::new(ctx.bin("hello"))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting hello")?;
    let mut hello_out = BufReader::new(hello.stdout.take().context("hello stdout")?).lines();
    let hello_url = format!(
        "http://{}/",
        hello_out.next_line().await?.context("hello address")?
    );

    let db = SqliteDb::create()?;
    let server = Server::start(ctx, &[("DATABASE_URL", db.url.clone())]).await?;
    let project = server.project("bench", 4).await?;
    let rdev_url = server.url(&format!("/api/v1/projects/{project}"));

    // Warm both (caches, connection pools, page faults).
    wrk_warmup(&hello_url, false).await?;
    wrk_warmup(&rdev_url, true).await?;
    let (mut hello_rps, mut hello_p99, mut rdev_rps, mut rdev_p99) =
        (vec![], vec![], vec![], vec![]);
    for run in 0..ctx.runs {
        let h = wrk(ctx, &hello_url, false).await?;
        let r = wrk(ctx, &rdev_url, true).await?;
        eprintln!(
            "  run {}: hello {:.0} req/s p99 {:.2} ms; rdev {:.0} req/s p99 {:.2} ms",
            run + 1,
            h.requests_per_sec,
            h.p99_ms,
            r.requests_per_sec,
            r.p99_ms
        );
        hello_rps.push(h.requests_per_sec);
        hello_p99.push(h.p99_ms);
        rdev_rps.push(r.requests_per_sec);
        rdev_p99.push(r.p99_ms);
    }
    server.stop().await;
    let _ = hello.kill().await;

    let (hr, rr) = (Spread::of(&hello_rps), Spread::of(&rdev_rps));
    let (hp, rp) = (Spread::of(&hello_p99), Spread::of(&rdev_p99));
    let rps_ratio = rr.median / hr.median;
    let p99_ratio = rp.median / hp.median;
    Ok(vec![
        Row::new("1", "authenticated GET req/s")
            .anchor(format!("hello-world {}", hr.show("req/s", 0)))
            .goal(">= 0.8x")
            .measured(rr.show("req/s", 0))
            .ratio(rps_ratio)
            .met(rps_ratio >= 0.8),
        Row::new("1", "authenticated GET p99")
            .anchor(format!("hello-world {}", hp.show("ms", 2)))
            .goal("<= 1.5x")
            .measured(rp.show("ms", 2))
            .ratio(p99_ratio)
            .met(p99_ratio <= 1.5),
    ])
}

async fn wrk_warmup(url: &str, auth: bool) -> Result<()> {
    let header = format!("Authorization: Bearer {ADMIN_KEY}");
    let mut args = vec!["-t1", "-c8", "-d1s"];
    if auth {
        args.extend(["-H", &header]);
    }
    args.push(url);
    run_program("wrk".as_ref(), &args, None).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_output() {
        let sample = "Running 1s test @ http://127.0.0.1:1/\n  Latency Distribution\n     50%  200.00us\n     99%    1.50ms\n  1000 requests in 1.00s, 1.00MB read\nRequests/sec:   1234.50\nTransfer/sec:      1.00MB\n";
        let result = parse_wrk(sample).unwrap();
        assert_eq!(result.requests_per_sec, 1234.5);
        assert_eq!(result.p99_ms, 1.5);
    }
}
