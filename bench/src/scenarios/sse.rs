//! Scenario 4: 10,000 idle SSE subscribers on one replica (server RSS), then a 100,000-line
//! command fanned out live to 100 subscribers, each of which must see every line in order.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Scenario;
use crate::harness::{ADMIN_KEY, Ctx, Row, Server, SqliteDb, tcp_socket_kib};

pub const SCENARIO: Scenario = Scenario {
    name: "sse",
    about: "10,000 idle SSE subscribers; 100,000 lines fanned out to 100 subscribers",
    run: |ctx| Box::pin(run(ctx)),
};

/// Opens a raw HTTP/1.1 SSE connection and waits for its first event: the cheapest client, so
/// the measurement is the server's.
async fn idle_subscriber(address: &str, path: &str) -> Result<TcpStream> {
    let mut stream = TcpStream::connect(address).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {ADMIN_KEY}\r\nAccept: text/event-stream\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buffer = [0u8; 2048];
    let mut seen = Vec::new();
    while !seen.windows(13).any(|w| w == b"event: status") {
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buffer)).await??;
        ensure!(n > 0, "closed before the first event");
        seen.extend_from_slice(&buffer[..n]);
        ensure!(
            seen.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&seen)
        );
    }
    Ok(stream)
}

async fn sse_gauge(server: &Server) -> Result<i64> {
    let metrics = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("rdev_sse_connections_active "))
        .and_then(|v| v.parse().ok())
        .context("rdev_sse_connections_active")
}

async fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let subscribers: usize = ctx.size(10_000, 200);
    let db = SqliteDb::create()?;
    let server = Server::start(
        ctx,
        &[
            ("DATABASE_URL", db.url.clone()),
            ("RDEV_MAX_SSE_CONNECTIONS", "20000".into()),
            ("RDEV_MAX_SSE_PER_KEY", "20000".into()),
        ],
    )
    .await?;
    let project = server.project("watched", 4).await?;
    let idle = server.submit(&project, "sleep 3600").await?;
    let address = server.base.trim_start_matches("http://").to_owned();
    let path = format!("/api/v1/commands/{idle}/events");
    // One stream opened and closed first, so the baseline includes the code paths' first use.
    drop(idle_subscriber(&address, &path).await?);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = server.rss_kib()?;
    let socket_baseline = tcp_socket_kib()?;

    let started = Instant::now();
    let mut open = Vec::with_capacity(subscribers);
    for batch in (0..subscribers).collect::<Vec<_>>().chunks(250) {
        let connecting = batch.iter().map(|_| idle_subscriber(&address, &path));
        for stream in futures::future::join_all(connecting).await {
            open.push(stream?);
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = server.rss_kib()?;
    let sockets = tcp_socket_kib()?.saturating_sub(socket_baseline);
    let gauge = sse_gauge(&server).await?;
    ensure!(
        gauge == subscribers as i64,
        "gauge {gauge} with {subscribers} open"
    );
    let per_subscriber = rss.saturating_sub(baseline) as f64 / subscribers as f64;
    eprintln!(
        "  {subscribers} idle subscribers in {connect_secs:.1} s: RSS {:.1} MiB ({per_subscriber:.2} KiB each above {:.1} MiB), kernel TCP buffers {:.1} MiB",
        rss as f64 / 1024.0,
        baseline as f64 / 1024.0,
        sockets as f64 / 1024.0
    );
    drop(open);
    let deadline = Instant::now() + Duration::from_secs(30);
    while sse_gauge(&server).await? != 0 {
        ensure!(Instant::now() < deadline, "SSE gauge did not return to 0");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server
        .client
        .post(server.url(&format!("/api/v1/commands/{idle}/cancel")))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await?;

    let fanout = fan_out(ctx, &server, &project).await?;
    server.stop().await;

    Ok(vec![
        Row::new(
            "4",
            &format!("{subscribers} idle SSE subscribers: server RSS"),
        )
        .anchor("~7 KiB per idle subscriber (task-per-subscriber Rust server, published)")
        .goal("<= 100 MiB (80 MiB the longer aim)")
        .measured(format!(
            "{:.1} MiB ({per_subscriber:.2} KiB/subscriber; kernel socket buffers {:.1} MiB apart)",
            rss as f64 / 1024.0,
            sockets as f64 / 1024.0
        ))
        .ratio(per_subscriber / 7.0)
        .met(ctx.smoke || rss <= 100 * 1024),
        fanout,
    ])
}

/// Starts a gated command, attaches the subscribers, opens the gate, and checks every stream.
async fn fan_out(ctx: &Ctx, server: &Server, project: &str) -> Result<Row> {
    let lines: usize = ctx.size(100_000, 2_000);
    let readers: usize = ctx.size(100, 10);
    let gate =
        std::env::temp_dir().join(format!("rdev-bench-gate-{}", uuid::Uuid::new_v4().simple()));
    let id = server
        .submit(
            project,
            &format!(
                "while [ ! -f {g} ]; do sleep 0.01; done; rm -f {g}; seq 1 {lines}",
                g = gate.display()
            ),
        )
        .await?;
    let mut tasks = Vec::with_capacity(readers);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(readers);
    for _ in 0..readers {
        let mut events = server.events(&id).await?;
        let ready = ready_tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut text = String::new();
            let mut announced = false;
            while let Some(event) = events.next().await {
                let event = event?;
                match event.event.as_str() {
                    "status" if !announced => {
                        announced = true;
                        let _ = ready.send(()).await;
                    }
                    "output" => {
                        let data: serde_json::Value = serde_json::from_str(&event.data)?;
                        text.push_str(data["data"].as_str().unwrap_or_default());
                    }
                    "end" => return anyhow::Ok(text),
                    _ => {}
                }
            }
            anyhow::bail!("stream ended without end")
        }));
    }
    for _ in 0..readers {
        ready_rx.recv().await.context("a reader never started")?;
    }
    let started = Instant::now();
    std::fs::write(&gate, b"")?;
    let expected: String = (1..=lines).map(|i| format!("{i}\n")).collect();
    let mut complete = 0;
    for task in tasks {
        let text = tokio::time::timeout(Duration::from_secs(600), task).await???;
        if text == expected {
            complete += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "  fan-out: {complete}/{readers} readers got all {lines} lines in order, {secs:.1} s"
    );
    Ok(Row::new(
        "4",
        &format!("{lines}-line command fanned out to {readers} subscribers"),
    )
    .goal("every line, in order, to all")
    .measured(format!(
        "{complete}/{readers} complete and in order, {secs:.1} s"
    ))
    .met(complete == readers))
}
