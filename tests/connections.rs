//! The connection layer, spoken to over raw TCP where a client library would hide what matters:
//! the request-head limit (431 problem, clean close), the header read timeout against clients
//! that trickle their head or sit idle, h2c prior knowledge, the socket peer over h2c, the open
//! connection gauge, and graceful shutdown ending event streams. The storage does not matter
//! here, so SQLite only.

mod support;

use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{ADMIN_KEY, Backend, TestDb, TestServer, test_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

async fn connect(server: &TestServer) -> TcpStream {
    TcpStream::connect(server.base.trim_start_matches("http://"))
        .await
        .unwrap()
}

/// A `GET /health` whose head carries one `X-Filler` header of `filler` bytes.
fn request_with_filler(filler: usize) -> Vec<u8> {
    let mut request =
        b"GET /health HTTP/1.1\r\nHost: test\r\nConnection: close\r\nX-Filler: ".to_vec();
    request.resize(request.len() + filler, b'a');
    request.extend_from_slice(b"\r\n\r\n");
    request
}

/// Sends `request` and reads until the server closes; an `Err` means the close was a reset.
async fn exchange(server: &TestServer, request: &[u8]) -> std::io::Result<String> {
    let mut tcp = connect(server).await;
    tcp.write_all(request).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection")?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

fn status_line(answer: &str) -> &str {
    answer.lines().next().unwrap_or_default()
}

fn gauge(metrics: &str, name: &str) -> i64 {
    support::sample(metrics, name).unwrap_or_else(|| panic!("{name} is exported")) as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_over_the_limit_gets_a_431_problem_and_a_clean_close() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let server = TestServer::start(&db).await;

    // 200 KiB of header against the default 64 KiB: the whole answer arrives, then a FIN (a
    // reset would fail `read_to_end` or cut the answer short).
    let answer = exchange(&server, &request_with_filler(200 * 1024))
        .await
        .expect("a clean close, not a reset");
    assert_eq!(
        status_line(&answer),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(
        head.contains("content-type: application/problem+json"),
        "{head}"
    );
    assert!(head.contains("connection: close"), "{head}");
    let problem: Value = serde_json::from_str(body).unwrap();
    assert_eq!(problem["status"], 431);
    assert_eq!(problem["type"], "urn:rdev:problem:header-too-large");

    // Just under the limit is served, and the server is none the worse.
    let answer = exchange(&server, &request_with_filler(60 * 1024))
        .await
        .unwrap();
    assert_eq!(status_line(&answer), "HTTP/1.1 200 OK");
    server.stop().await;

    // The limit is configurable.
    let mut config = test_config(&db);
    config.http.max_request_head_bytes = 16 * 1024;
    let server = TestServer::start_with(config).await;
    let answer = exchange(&server, &request_with_filler(20 * 1024))
        .await
        .unwrap();
    assert_eq!(
        status_line(&answer),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    // A large request body is not a large head.
    let (_, key) = server
        .create_key(json!({"name": "k", "scopes": ["admin"]}))
        .await;
    let big_description = "d".repeat(100 * 1024);
    let response = server
        .post(
            "/api/v1/projects",
            &key,
            json!({"name": "bodied", "description": big_description}),
        )
        .await;
    assert_ne!(
        response.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    assert_eq!(
        server.get("/health", ADMIN_KEY).await.status(),
        StatusCode::OK
    );
    server.stop().await;
}

/// Reads until the peer closes (`Ok(0)` or a reset), failing after `within`; returns how long
/// that took.
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> Duration {
    let from = Instant::now();
    let mut sink = vec![0u8; 16 * 1024];
    loop {
        match tokio::time::timeout(within.saturating_sub(from.elapsed()), tcp.read(&mut sink)).await
        {
            Err(_) => panic!("still open after {within:?}"),
            Ok(Ok(0) | Err(_)) => return from.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

/// `GET /health` on a kept-alive connection; the answer's status line.
async fn health_on(tcp: &mut TcpStream) -> String {
    tcp.write_all(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tcp.read(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_head_is_cut_at_the_header_timeout_and_a_quiet_keep_alive_at_the_idle_timeout() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let mut config = test_config(&db);
    config.http.header_read_timeout_secs = 1;
    config.http.idle_timeout_secs = 3;
    let server = TestServer::start_with(config).await;

    // Slowloris: a header line every 200 ms, never the blank line.
    let mut tcp = connect(&server).await;
    let started = Instant::now();
    tcp.write_all(b"GET /health HTTP/1.1\r\nHost: test\r\n")
        .await
        .unwrap();
    let cut = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if tcp.write_all(b"X-Slow: 1\r\n").await.is_err() {
            break started.elapsed();
        }
        let mut byte = [0u8; 1];
        if let Ok(read) = tokio::time::timeout(Duration::from_millis(1), tcp.read(&mut byte)).await
        {
            // Closed (0) or reset: either way the server let go.
            assert!(!matches!(read, Ok(n) if n > 0), "no answer to a half head");
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "the trickled head was never cut"
        );
    };
    assert!(cut >= Duration::from_millis(900), "cut too early: {cut:?}");

    // A kept-alive connection quiet for longer than the header timeout still serves its next
    // request (a proxy's pooled connection), and is closed after the idle timeout.
    let mut tcp = connect(&server).await;
    assert_eq!(health_on(&mut tcp).await, "HTTP/1.1 200 OK");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        health_on(&mut tcp).await,
        "HTTP/1.1 200 OK",
        "reused after 2 s idle"
    );
    let idle = closed_within(&mut tcp, Duration::from_secs(10)).await;
    assert!(
        idle >= Duration::from_millis(2900),
        "closed too early: {idle:?}"
    );

    // On a kept-alive connection, a head that begins but trickles has the header timeout from
    // its first byte, not the idle timeout.
    let mut tcp = connect(&server).await;
    assert_eq!(health_on(&mut tcp).await, "HTTP/1.1 200 OK");
    tcp.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
    let cut = closed_within(&mut tcp, Duration::from_secs(10)).await;
    assert!(
        cut >= Duration::from_millis(900) && cut < Duration::from_millis(2500),
        "a slow second head is cut at the header timeout: {cut:?}"
    );

    // A connection that never sends a byte is closed at the header timeout too.
    let mut silent = connect(&server).await;
    let cut = closed_within(&mut silent, Duration::from_secs(10)).await;
    assert!(cut < Duration::from_millis(2500), "{cut:?}");

    // An event stream is not idle: it outlives the timeout several times over.
    let project = server.create_project("streamed", json!({})).await;
    let id = server
        .submit(
            &project,
            json!({"command": "echo first; sleep 3; echo last"}),
        )
        .await;
    let mut events = server.events(&id, None).await;
    let mut outputs = Vec::new();
    while let Some(event) = events.next().await {
        if event.event == "output" {
            let data: Value = serde_json::from_str(&event.data).unwrap();
            outputs.push(data["data"].as_str().unwrap_or_default().to_owned());
        }
        if event.event == "end" {
            break;
        }
    }
    assert_eq!(outputs.concat(), "first\nlast\n");
    server.stop().await;
}

/// Open connections other than the one asking (`Connection: close`).
async fn other_connections(server: &TestServer) -> i64 {
    let answer = exchange(
        server,
        b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    gauge(&answer, "rdev_http_connections_active") - 1
}

/// HTTP/2 keeps HTTP/1's two clocks: a client that sends the preface and nothing more is closed
/// at the header timeout, and a connection without a stream at the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_connections_that_say_nothing_are_closed_like_http1_ones() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let mut config = test_config(&db);
    config.http.header_read_timeout_secs = 1;
    config.http.idle_timeout_secs = 3;
    let server = TestServer::start_with(config).await;

    let mut preface_only = connect(&server).await;
    preface_only
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let cut = closed_within(&mut preface_only, Duration::from_secs(10)).await;
    assert!(
        cut >= Duration::from_millis(900) && cut < Duration::from_millis(2500),
        "{cut:?}"
    );

    // A preface in two segments, the second a while later, is still told from HTTP/1: the
    // server answers with its HTTP/2 SETTINGS frame (type 4).
    let mut split = connect(&server).await;
    split.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    split.write_all(b"\r\nSM\r\n\r\n").await.unwrap();
    let mut frame = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), split.read_exact(&mut frame))
        .await
        .expect("an HTTP/2 frame")
        .unwrap();
    assert_eq!(frame[3], 4, "a SETTINGS frame: {frame:?}");
    drop(split);

    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = h2.get(server.url("/health")).send().await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    support::eventually(
        Duration::from_secs(2),
        "only the h2c connection is open",
        || async { other_connections(&server).await == 1 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        other_connections(&server).await,
        1,
        "past the header timeout, within the idle timeout"
    );
    support::eventually(
        Duration::from_secs(8),
        "the idle h2c connection is closed",
        || async { other_connections(&server).await == 0 },
    )
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_is_served_with_the_socket_peer() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let server = TestServer::start(&db).await;
    let (_, inside) = server
        .create_key(json!({"name": "inside", "scopes": ["read"], "allowed_ips": ["127.0.0.0/8"]}))
        .await;
    let (_, outside) = server
        .create_key(json!({"name": "outside", "scopes": ["read"], "allowed_ips": ["10.0.0.0/8"]}))
        .await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let me = |key: String| h2.get(server.url("/api/v1/me")).bearer_auth(key).send();
    let response = me(inside).await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    // The allowlist sees the socket peer over h2c as over HTTP/1.1.
    let response = me(outside).await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    // The heap profile's loopback rule holds too (200, or 503 where profiling is off: never
    // 401, which a missing peer address would give).
    let response = h2
        .get(server.url("/debug/pprof/heap"))
        .send()
        .await
        .unwrap();
    assert_ne!(response.status(), StatusCode::UNAUTHORIZED);

    // The h2c connection is one open connection, and so is each HTTP/1.1 one.
    let metrics = h2
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let before = gauge(&metrics, "rdev_http_connections_active");
    assert!(before >= 1, "{before}");
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut tcp = connect(&server).await;
        tcp.write_all(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0u8; 1024];
        assert!(tcp.read(&mut answer).await.unwrap() > 0);
        held.push(tcp);
    }
    let during = gauge(&server.metrics().await, "rdev_http_connections_active");
    assert!(during >= before + 3, "{before} -> {during}");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = h2
            .get(server.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if gauge(&metrics, "rdev_http_connections_active") <= before {
            break;
        }
        assert!(Instant::now() < deadline, "the gauge did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_ends_open_streams_then_stops_accepting() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let server = TestServer::start(&db).await;
    let address = server.base.trim_start_matches("http://").to_owned();
    let project = server.create_project("drained", json!({})).await;
    let id = server
        .submit(&project, json!({"command": "echo started; sleep 30"}))
        .await;
    let mut events = server.events(&id, None).await;
    // The command is running and its stream open once its first output arrived.
    while events.next().await.unwrap().event != "output" {}

    let stopping = tokio::spawn(server.stop());
    // The stream ends (the server closes it), it is not cut by a reset mid-event.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while events.next().await.is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the stream did not end at shutdown");
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the server stops once its streams ended")
        .unwrap();
    assert!(
        TcpStream::connect(&address).await.is_err(),
        "the listener is closed"
    );
}
