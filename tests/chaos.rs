//! Chaos with three replicas on one Postgres of the test's own: a replica is killed with
//! SIGKILL while it runs commands and dispatches webhooks, the database is stopped and started
//! under load, and 1,000 SSE clients connect and drop at once. Afterwards nothing is lost or
//! run twice, every command is final (the killed replica's ones `lost`), every webhook event
//! reached its receiver at least once, the audit chain verifies, and the surviving replica's
//! stream gauge and memory are back where they were.

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use support::own_postgres::OwnPostgres;
use support::{ADMIN_KEY, ServerProcess, TestDb, TestServer, eventually, sample};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SHORT_COMMANDS: usize = 30;
const DOOMED_COMMANDS: usize = 3;
const SSE_CLIENTS: usize = 1000;

fn replica_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("RDEV_LEASE_SECS", "5"),
        ("RDEV_POLL_INTERVAL_MS", "100"),
        ("RDEV_WORKERS", "8"),
        ("RDEV_MAX_SSE_CONNECTIONS", "5000"),
        ("RDEV_MAX_SSE_PER_KEY", "5000"),
        ("RDEV_AUDIT_KEY", "chaos-test-audit-key"),
        ("RDEV_DRAIN_DELAY_SECS", "0"),
        // The receiver is on 127.0.0.1; a killed replica's claimed deliveries return after a
        // lease of three timeouts and a second.
        ("RDEV_WEBHOOK_ALLOW_PRIVATE", "true"),
        ("RDEV_WEBHOOK_TIMEOUT_SECS", "2"),
        ("RDEV_WEBHOOK_POLL_MS", "100"),
        ("RDEV_WEBHOOK_RETRY_SCHEDULE", "1s,1s,2s,2s,5s,5s,10s"),
    ]
}

/// `(event type, command id)` of every webhook request received.
type Received = Arc<Mutex<BTreeSet<(String, String)>>>;

/// A webhook receiver that records what it gets.
async fn webhook_receiver() -> (String, Received) {
    let received = Arc::new(Mutex::new(BTreeSet::new()));
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |axum::extract::State(seen): axum::extract::State<Received>,
                 body: String| async move {
                    let event: Value = serde_json::from_str(&body).unwrap();
                    seen.lock().unwrap().insert((
                        event["type"].as_str().unwrap().to_owned(),
                        event["data"]["id"].as_str().unwrap().to_owned(),
                    ));
                    axum::http::StatusCode::NO_CONTENT
                },
            ),
        )
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received)
}

async fn metric(server: &TestServer, name: &str) -> f64 {
    sample(&server.metrics().await, name).unwrap_or_else(|| panic!("{name} in /metrics"))
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

async fn statuses(server: &TestServer, ids: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for id in ids {
        out.push(
            server.command(id).await["status"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    out
}

/// Opens an SSE stream with a bare socket and waits for its response head.
async fn open_stream(address: &str, path: &str) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {ADMIN_KEY}\r\nAccept: text/event-stream\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200", "the stream opens");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_ride_out_a_kill_a_database_restart_and_a_stream_surge() {
    let Some(postgres) = OwnPostgres::start() else {
        return;
    };
    let db = TestDb::at(&postgres.url());
    let env = replica_env();

    // The doomed replica starts alone, so the long commands are surely its own.
    let mut doomed = ServerProcess::start(&db, &env).await;
    let project = doomed
        .server
        .create_project("chaos", json!({"max_concurrency": 64}))
        .await;
    let (hook_url, received) = webhook_receiver().await;
    let hook = doomed
        .server
        .post(
            "/api/v1/webhooks",
            ADMIN_KEY,
            json!({"url": hook_url, "events": ["*"]}),
        )
        .await;
    assert_eq!(hook.status(), 201, "{}", hook.text().await.unwrap());
    let mut long_running = Vec::new();
    for i in 0..DOOMED_COMMANDS {
        long_running.push(
            doomed
                .server
                .submit(
                    &project,
                    json!({"command": format!("echo doomed-{i}; sleep 60; echo never")}),
                )
                .await,
        );
    }
    for id in &long_running {
        doomed
            .server
            .wait_for(id, Some("running"), Duration::from_secs(20))
            .await;
    }
    let first = ServerProcess::start(&db, &env).await;
    let second = ServerProcess::start(&db, &env).await;
    let replicas = [&first.server, &second.server];

    // Load: short commands submitted round robin while the faults happen.
    let mut short = Vec::new();
    for i in 0..SHORT_COMMANDS {
        let command = format!("echo start-{i}; sleep 1; echo done-{i}");
        short.push(
            replicas[i % 2]
                .submit(&project, json!({"command": command}))
                .await,
        );
    }
    doomed.child.start_kill().unwrap();
    doomed.child.wait().await.unwrap();

    tokio::time::sleep(Duration::from_millis(500)).await;
    postgres.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    postgres.start_server();

    // 1,000 streams open on one replica and drop at once.
    let watched = first
        .server
        .submit(&project, json!({"command": "sleep 15"}))
        .await;
    first
        .server
        .wait_for(&watched, Some("running"), Duration::from_secs(30))
        .await;
    let pid = first.child.id().unwrap();
    let streams_before = metric(&first.server, "rdev_sse_connections_active").await;
    let rss_before = rss_kib(pid);
    let address = first.server.base.trim_start_matches("http://").to_owned();
    let path = format!("/api/v1/commands/{watched}/events");
    let mut streams = Vec::with_capacity(SSE_CLIENTS);
    for _ in 0..SSE_CLIENTS {
        streams.push(open_stream(&address, &path).await);
    }
    let open = metric(&first.server, "rdev_sse_connections_active").await;
    assert!(
        open >= streams_before + SSE_CLIENTS as f64,
        "{open} streams open"
    );
    let rss_surge = rss_kib(pid);
    drop(streams);
    eventually(
        Duration::from_secs(20),
        "the stream gauge returns to its value before the surge",
        || async { metric(&first.server, "rdev_sse_connections_active").await <= streams_before },
    )
    .await;

    // Everything ends: short commands succeed exactly once, the killed replica's are lost.
    let all: Vec<String> = short
        .iter()
        .chain(&long_running)
        .chain([&watched])
        .cloned()
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let now = statuses(&first.server, &all).await;
        if now
            .iter()
            .all(|s| !matches!(s.as_str(), "queued" | "running"))
        {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let logs = first.logs.lock().unwrap().join("\n");
            panic!("not every command ended: {now:?}\n{logs}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut succeeded = 0;
    for (i, id) in short.iter().enumerate() {
        let command = first.server.command(id).await;
        let output = first
            .server
            .get(&format!("/api/v1/commands/{id}/output"), ADMIN_KEY)
            .await
            .text()
            .await
            .unwrap();
        let whole = format!("start-{i}\ndone-{i}\n");
        match command["status"].as_str().unwrap() {
            // Ran exactly once, all output kept.
            "succeeded" => {
                succeeded += 1;
                assert_eq!(output, whole, "{command}");
            }
            // Claimed by the killed replica: ended, never run again elsewhere.
            "lost" => assert!(whole.starts_with(&output), "{output:?} of {command}"),
            other => panic!("{other}: {command}"),
        }
    }
    assert!(succeeded >= SHORT_COMMANDS / 2, "{succeeded} succeeded");
    for id in &long_running {
        let command = first.server.command(id).await;
        assert_eq!(command["status"], "lost", "{command}");
    }
    // Every event of every command reached the receiver at least once: queued, started for
    // those that ran, and the final one.
    let mut expected = BTreeSet::new();
    for id in &all {
        let command = first.server.command(id).await;
        let status = command["status"].as_str().unwrap().to_owned();
        expected.insert(("command.queued".to_owned(), id.clone()));
        if !command["started_at"].is_null() {
            expected.insert(("command.started".to_owned(), id.clone()));
        }
        expected.insert((format!("command.{status}"), id.clone()));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let missing: Vec<_> = expected
            .difference(&received.lock().unwrap())
            .cloned()
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "webhook events never delivered: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let verified: Value = second
        .server
        .get("/api/v1/audit/verify", ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(verified["ok"], true, "{verified}");

    // Memory taken by the surge is given back (jemalloc returns dirty pages within seconds).
    let allowance = (rss_surge.saturating_sub(rss_before)) / 2 + 16 * 1024;
    eventually(
        Duration::from_secs(30),
        &format!(
            "RSS back near {rss_before} KiB (surge {rss_surge} KiB, now {} KiB)",
            rss_kib(pid)
        ),
        || async { rss_kib(pid) <= rss_before + allowance },
    )
    .await;
}
