//! Observability against real peers: spans exported over OTLP/HTTP to a receiver in this test
//! (decoding the protobuf the way a collector does), CPU profiles read by `go tool pprof`, and
//! the cache counters with the staleness bound `CACHE_TTL` sets.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{ADMIN_KEY, Backend, ServerProcess, TestDb, TestServer, problem, test_config};
use tokio::net::TcpListener;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// A span as the receiver got it, with its resource's attributes.
#[derive(Debug, Clone)]
struct Received {
    span: Span,
    resource: Vec<KeyValue>,
}

/// An OTLP/HTTP trace receiver on a random loopback port.
struct Collector {
    endpoint: String,
    spans: Arc<Mutex<Vec<Received>>>,
}

impl Collector {
    async fn start() -> Collector {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(receive))
            .with_state(spans.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Collector { endpoint, spans }
    }

    /// Waits (up to 30 s) for a span that `wanted` accepts.
    async fn span(&self, wanted: impl Fn(&Received) -> bool) -> Received {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(found) = self.spans.lock().unwrap().iter().find(|r| wanted(r)) {
                return found.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no such span among {:#?}",
                self.names()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn names(&self) -> Vec<String> {
        let spans = self.spans.lock().unwrap();
        spans.iter().map(|r| r.span.name.clone()).collect()
    }
}

async fn receive(
    State(spans): State<Arc<Mutex<Vec<Received>>>>,
    body: Bytes,
) -> ([(&'static str, &'static str); 1], Vec<u8>) {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf body");
    let mut spans = spans.lock().unwrap();
    for resource_spans in request.resource_spans {
        let resource = resource_spans
            .resource
            .map(|r| r.attributes)
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                spans.push(Received {
                    span,
                    resource: resource.clone(),
                });
            }
        }
    }
    // An empty ExportTraceServiceResponse.
    ([("content-type", "application/x-protobuf")], Vec::new())
}

async fn get_json(server: &TestServer, path: &str) -> Value {
    server.get(path, ADMIN_KEY).await.json().await.unwrap()
}

fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|a| a.key == key)?.value.as_ref()?;
    match value.value.as_ref()? {
        AnyValue::StringValue(text) => Some(text.clone()),
        AnyValue::IntValue(number) => Some(number.to_string()),
        AnyValue::BoolValue(flag) => Some(flag.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// Export flushed every 100 ms, so the test does not wait the default 5 s.
const FAST_EXPORT: (&str, &str) = ("OTEL_BSP_SCHEDULE_DELAY", "100");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_span_joins_the_callers_trace_and_reaches_the_collector() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let collector = Collector::start().await;
    let process = ServerProcess::start(
        &db,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "rdev-observed"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test"),
            FAST_EXPORT,
        ],
    )
    .await;
    let server = &process.server;
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");

    let response = server
        .client
        .post(server.url("/api/v1/projects"))
        .bearer_auth(ADMIN_KEY)
        .header("traceparent", &traceparent)
        .json(&json!({"name": "traced", "workdir": "/tmp", "executor": "local"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let project: Value = response.json().await.unwrap();

    let trace_id = hex::decode(TRACE_ID).unwrap();
    let parent_id = hex::decode(PARENT_ID).unwrap();
    let received = collector
        .span(|r| r.span.trace_id == trace_id && r.span.name == "POST /api/v1/projects")
        .await;
    let span = &received.span;
    assert_eq!(
        span.parent_span_id, parent_id,
        "the caller's span is the parent"
    );
    assert_eq!(
        attribute(&span.attributes, "http.route").as_deref(),
        Some("/api/v1/projects")
    );
    assert_eq!(
        attribute(&span.attributes, "http.response.status_code").as_deref(),
        Some("201")
    );
    let key_id = attribute(&span.attributes, "rdev.key_id").expect("the key id is recorded");
    assert!(!key_id.is_empty());
    for attribute in &span.attributes {
        let shown = format!("{:?}", attribute.value);
        assert!(!shown.contains(ADMIN_KEY), "a secret in {attribute:?}");
    }
    assert_eq!(
        attribute(&received.resource, "service.name").as_deref(),
        Some("rdev-observed")
    );
    assert_eq!(
        attribute(&received.resource, "deployment.environment").as_deref(),
        Some("test")
    );

    // The audit row of that change carries the trace id, and the sealed chain still verifies.
    let audit: Value = get_json(server, "/api/v1/audit?action=project.created").await;
    let row = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["target_id"] == project["id"])
        .unwrap_or_else(|| panic!("no audit row for the project in {audit}"));
    assert_eq!(row["trace_id"], TRACE_ID);
    let verified: Value = get_json(server, "/api/v1/audit/verify").await;
    assert_eq!(verified["ok"], true, "{verified}");
    // The trace id is sealed into the row's hash: changing it breaks the chain there.
    db.execute(&format!(
        "UPDATE audit_log SET trace_id = '{}' WHERE seq = {}",
        "f".repeat(32),
        row["seq"]
    ))
    .await;
    let tampered: Value = get_json(server, "/api/v1/audit/verify").await;
    assert_eq!(tampered["ok"], false, "{tampered}");
    assert_eq!(tampered["first_broken_seq"], row["seq"]);
    db.execute(&format!(
        "UPDATE audit_log SET trace_id = '{TRACE_ID}' WHERE seq = {}",
        row["seq"]
    ))
    .await;

    // A request without a traceparent starts its own trace, and its audit row names it.
    let response = server
        .post(
            "/api/v1/projects",
            ADMIN_KEY,
            json!({"name": "untraced", "workdir": "/tmp", "executor": "local"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let own = collector
        .span(|r| r.span.name == "POST /api/v1/projects" && r.span.trace_id != trace_id)
        .await;
    assert!(own.span.parent_span_id.is_empty(), "a root span");
    let audit: Value = get_json(server, "/api/v1/audit?action=project.created").await;
    assert!(
        audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|row| row["trace_id"] == hex::encode(&own.span.trace_id)),
        "{audit}"
    );

    // A command leaves its run and its output flushes; a claim while one runs leaves a span.
    let sleeper = server
        .submit(
            project["id"].as_str().unwrap(),
            json!({"command": "sleep 1"}),
        )
        .await;
    let command = server
        .submit(
            project["id"].as_str().unwrap(),
            json!({"command": "echo traced"}),
        )
        .await;
    server
        .wait_for(&command, Some("succeeded"), Duration::from_secs(30))
        .await;
    let run = collector
        .span(|r| {
            r.span.name == "command.execute"
                && attribute(&r.span.attributes, "command").as_deref() == Some(command.as_str())
        })
        .await;
    assert_eq!(
        attribute(&run.span.attributes, "status").as_deref(),
        Some("succeeded")
    );
    let flush = collector
        .span(|r| {
            r.span.name == "output.flush"
                && attribute(&r.span.attributes, "command").as_deref() == Some(command.as_str())
        })
        .await;
    assert_eq!(flush.span.trace_id, run.span.trace_id);
    assert_eq!(flush.span.parent_span_id, run.span.span_id);
    server
        .wait_for(&sleeper, Some("succeeded"), Duration::from_secs(30))
        .await;
    collector
        .span(|r| {
            r.span.name == "queue.claim"
                && attribute(&r.span.attributes, "claimed").is_some_and(|n| n != "0")
        })
        .await;
}

/// An operator who quiets the logs keeps the traces: spans follow their own filter
/// (`RDEV_TRACE_FILTER`) and the sampler, not `RUST_LOG`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_logs_do_not_silence_the_traces() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let collector = Collector::start().await;
    let process = ServerProcess::start(
        &db,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint.as_str()),
            // Warnings only, but for the start-up line the harness waits for.
            ("RUST_LOG", "warn,rdev_api::app=info"),
            FAST_EXPORT,
        ],
    )
    .await;
    let server = &process.server;
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let response = server
        .client
        .get(server.url("/api/v1/me"))
        .bearer_auth(ADMIN_KEY)
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let trace_id = hex::decode(TRACE_ID).unwrap();
    collector
        .span(|r| r.span.trace_id == trace_id && r.span.name == "GET /api/v1/me")
        .await;
    // And the logs are as quiet as asked: nothing at info after the start.
    let started = process.logs.lock().unwrap().len();
    let _ = server.get("/api/v1/me", ADMIN_KEY).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = process.logs.lock().unwrap();
    assert!(
        logs[started..]
            .iter()
            .all(|line| !line.contains("\"INFO\"")),
        "{:?}",
        &logs[started..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_carry_the_trace_id_without_export() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let process = ServerProcess::start(&db, &[]).await;
    let server = &process.server;
    // A refused key is logged inside the request: the line names the caller's trace.
    let response = server
        .client
        .get(server.url("/api/v1/projects"))
        .bearer_auth("rdev_nosuchkey_0123456789abcdefghijklmnopqrstuv")
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::UNAUTHORIZED).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = process.logs.lock().unwrap().iter().any(|line| {
            serde_json::from_str::<Value>(line).is_ok_and(|log| {
                log["message"] == "authentication failed" && log["span"]["trace_id"] == TRACE_ID
            })
        });
        if found {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no log line with the trace id: {:#?}",
            process.logs.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_export_is_off_by_default() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    assert_eq!(test_config(&db).telemetry.otlp_endpoint, None);
    // A receiver on the port an SDK falls back to (4318) would see spans from an exporter
    // that was on without being asked for.
    let Ok(listener) = TcpListener::bind("127.0.0.1:4318").await else {
        support::skipped("port 4318 is taken: cannot watch the default OTLP port");
        return;
    };
    let connections = Arc::new(Mutex::new(0_u32));
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            *counted.lock().unwrap() += 1;
            drop(socket);
        }
    });
    let process = ServerProcess::start(&db, &[FAST_EXPORT]).await;
    for _ in 0..5 {
        let response = process
            .server
            .client
            .get(process.server.url("/api/v1/projects"))
            .bearer_auth(ADMIN_KEY)
            .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(*connections.lock().unwrap(), 0, "nothing was exported");
}

async fn exporting_to(db: &TestDb, endpoint: &str) -> ServerProcess {
    ServerProcess::start(
        db,
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint), FAST_EXPORT],
    )
    .await
}

/// 50 requests, each answered well within `bound`, while the collector is dead.
async fn requests_stay_fast(server: &TestServer, bound: Duration) {
    let started = Instant::now();
    for _ in 0..50 {
        let response = server.get("/api/v1/projects", ADMIN_KEY).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    let took = started.elapsed();
    assert!(took < bound, "50 requests took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_does_not_slow_requests() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    // A collector that accepts connections and never answers: each export hangs until the
    // exporter's 10 s timeout.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let held = accepted.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            held.lock().unwrap().push(socket);
        }
    });
    let process = ServerProcess::start(
        &db,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            FAST_EXPORT,
            ("RDEV_DRAIN_DELAY_SECS", "0"),
        ],
    )
    .await;
    // Far below the 10 s one hung export takes: no request waits on the exporter.
    requests_stay_fast(&process.server, Duration::from_secs(8)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while accepted.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the exporter never tried");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    requests_stay_fast(&process.server, Duration::from_secs(8)).await;

    // Nor does it hold the process at exit (no drain delay here): the last flush, stuck behind
    // the hung export (10 s timeout), is abandoned within seconds.
    let mut process = process;
    let pid = process.child.id().unwrap() as i32;
    // SAFETY: kill(2) with a pid of our own child and a valid signal number.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let stopping = Instant::now();
    let exited = tokio::time::timeout(Duration::from_secs(30), process.child.wait())
        .await
        .expect("the server exits")
        .unwrap();
    assert!(exited.success(), "{exited:?}");
    assert!(
        stopping.elapsed() < Duration::from_secs(6),
        "exit took {:?}",
        stopping.elapsed()
    );

    // A closed port: the exporter's connections are refused at once; requests go on.
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let endpoint = format!("http://{closed}");
    let process = exporting_to(&db, &endpoint).await;
    requests_stay_fast(&process.server, Duration::from_secs(8)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_otel_setting_stops_the_server_naming_it() {
    for (name, value) in [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
        ("OTEL_TRACES_SAMPLER", "sometimes"),
        ("OTEL_TRACES_SAMPLER_ARG", "2"),
    ] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_rdev-api"))
            .env("DATABASE_URL", "sqlite::memory:")
            .env("RDEV_LISTEN_ADDR", "127.0.0.1:0")
            .env(name, value)
            .output()
            .await
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(name), "{name}: {stderr}");
    }
}

/// `go`, or `None` (skipped with a note; a failure under `CI=true`).
fn go_tool() -> Option<()> {
    let found = std::process::Command::new("go")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some(());
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("`go` is missing under CI=true (apt-get install golang-go)");
    }
    support::skipped("`go` is missing (apt-get install golang-go)");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_tool_pprof_reads_the_cpu_profile() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let process = ServerProcess::start(&db, &[("RDEV_TRUSTED_PROXIES", "127.0.0.1/32")]).await;
    let server = &process.server;

    // Some work to sample while the profile is taken.
    let load = {
        let server = TestServer::detached(server.base.clone());
        tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(2);
            while Instant::now() < until {
                let _ = server.get("/api/v1/projects", ADMIN_KEY).await;
            }
        })
    };
    let profiling = {
        let client = server.client.clone();
        let url = server.url("/debug/pprof/profile?seconds=2");
        tokio::spawn(async move { client.get(url).send().await.unwrap() })
    };
    // One at a time: a second request while the first samples is refused.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let busy = server
        .client
        .get(server.url("/debug/pprof/profile?seconds=1"))
        .send()
        .await
        .unwrap();
    problem(busy, StatusCode::CONFLICT).await;
    load.await.unwrap();
    let response = profiling.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let profile = response.bytes().await.unwrap();
    assert!(profile.len() > 50);

    // Bounded, and the heap profile's access rule.
    for seconds in ["0", "61", "x"] {
        let response = server
            .client
            .get(server.url(&format!("/debug/pprof/profile?seconds={seconds}")))
            .send()
            .await
            .unwrap();
        problem(response, StatusCode::BAD_REQUEST).await;
    }
    let forwarded = server
        .client
        .get(server.url("/debug/pprof/profile?seconds=1"))
        .header("X-Forwarded-For", "203.0.113.7")
        .send()
        .await
        .unwrap();
    problem(forwarded, StatusCode::UNAUTHORIZED).await;
    let admin = server
        .client
        .get(server.url("/debug/pprof/profile?seconds=1"))
        .header("X-Forwarded-For", "203.0.113.7")
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), StatusCode::OK);

    if go_tool().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cpu.pb");
    std::fs::write(&path, &profile).unwrap();
    let output = std::process::Command::new("go")
        .args(["tool", "pprof", "-top"])
        .arg(&path)
        .env("HOME", dir.path())
        .env("PPROF_TMPDIR", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "go tool pprof: {stderr}");
    assert!(stdout.contains("Type: cpu"), "{stdout}");
    assert!(stdout.contains("flat"), "{stdout}");
}

/// The runbook copies the heap profile out of a pod without the binary: `go tool pprof` must
/// show function names from the profile alone (`-symbolize=none`: it may not look for the
/// binary, which is right here beside the test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heap_profile_names_its_functions() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let process = ServerProcess::start(&db, &[]).await;
    let server = &process.server;
    for _ in 0..50 {
        let _ = server.get("/api/v1/projects", ADMIN_KEY).await;
    }
    let response = server
        .client
        .get(server.url("/debug/pprof/heap"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let profile = response.bytes().await.unwrap();
    if go_tool().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("heap.prof");
    std::fs::write(&path, &profile).unwrap();
    let output = std::process::Command::new("go")
        .args(["tool", "pprof", "-symbolize=none", "-top", "-nodecount=200"])
        .arg(&path)
        .env("HOME", dir.path())
        .env("PPROF_TMPDIR", dir.path())
        .env("PPROF_BINARY_PATH", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "go tool pprof: {stderr}");
    assert!(stdout.contains("inuse_space"), "{stdout}");
    assert!(
        stdout.contains("rdev_api::") || stdout.contains("tokio::"),
        "function names, not addresses: {stdout}"
    );
}

/// `rdev_cache_requests_total{cache,result}` now.
async fn cache_count(server: &TestServer, cache: &str, result: &str) -> u64 {
    let metrics = server.metrics().await;
    let series = format!("rdev_cache_requests_total{{cache=\"{cache}\",result=\"{result}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series} in the metrics"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hits_and_misses_are_counted() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    let project = server.create_project("cached", json!({})).await;
    let (_, key) = server
        .create_key(json!({"name": "reader", "scopes": ["read"]}))
        .await;

    let before = |cache, result| cache_count(&server, cache, result);
    let (key_miss, key_hit) = (
        before("api_key", "miss").await,
        before("api_key", "hit").await,
    );
    let (project_miss, project_hit) = (
        before("project", "miss").await,
        before("project", "hit").await,
    );

    // The new key's first use misses, the next hits; the same for the project.
    for _ in 0..2 {
        let response = server
            .get(&format!("/api/v1/projects/{project}"), &key)
            .await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert!(cache_count(&server, "api_key", "miss").await > key_miss);
    assert!(cache_count(&server, "api_key", "hit").await > key_hit);
    assert!(cache_count(&server, "project", "hit").await > project_hit);
    // The project was cached when it was read after its creation, or is read now.
    assert!(cache_count(&server, "project", "miss").await >= project_miss);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_stops_on_another_replica_within_cache_ttl_without_the_bus() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let ttl = ("CACHE_TTL", "2s");
    let a = ServerProcess::start(&db, &[ttl]).await;
    let b = ServerProcess::start(&db, &[ttl]).await;
    let (key_id, key) = a
        .server
        .create_key(json!({"name": "doomed", "scopes": ["read"]}))
        .await;
    // Replica B caches the key.
    let response = b.server.get("/api/v1/projects", &key).await;
    assert_eq!(response.status(), StatusCode::OK);

    // Revoked behind the servers' backs, so no change notice goes over the bus: only the TTL
    // ends B's cached copy.
    db.execute(&format!(
        "UPDATE api_keys SET revoked_at = now() WHERE id = '{key_id}'"
    ))
    .await;
    let revoked = Instant::now();
    loop {
        let status = b.server.get("/api/v1/projects", &key).await.status();
        if status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert_eq!(status, StatusCode::OK);
        assert!(
            revoked.elapsed() < Duration::from_secs(2) + Duration::from_millis(1500),
            "still accepted {:?} after the revocation, past CACHE_TTL",
            revoked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let misses = cache_count(&b.server, "api_key", "miss").await;
    assert!(
        misses >= 2,
        "the key was read again after its entry expired"
    );
}
