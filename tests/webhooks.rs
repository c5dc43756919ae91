//! Webhooks end to end, with real local receivers (small axum servers in the test): retries
//! after 500s, a receiver that is down and then comes up, `410 Gone`, the SSRF guard at create
//! and at connect time, a black-holed endpoint next to a healthy one, and a server SIGKILLed
//! mid-dispatch. Signatures are checked by the `standardwebhooks` package from PyPI, in a
//! virtualenv under the target directory made on first use.

mod support;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use rdev_api::adapters::webhook::{HttpWebhookSender, SenderSettings};
use rdev_api::domain::webhook::{DeliveryId, WebhookUrl};
use rdev_api::ports::{OutgoingWebhook, SendError, WebhookSender};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::venv::python_venv;
use support::{ADMIN_KEY, Backend, ServerProcess, TestDb, TestServer, eventually, test_config};
use tokio::net::{TcpListener, TcpSocket};
use tokio::process::Command;

/// The verifier, pinned.
const VERIFIER: &str = "standardwebhooks==1.1.0";

/// One request a receiver got.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: String,
    signature: String,
    traceparent: String,
    body: String,
}

impl Received {
    fn payload(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

#[derive(Default)]
struct Script {
    /// Statuses to answer with, in order; 204 once they run out.
    answers: VecDeque<u16>,
    /// Wait this long before answering.
    delay: Duration,
    log: Vec<Received>,
}

/// A webhook receiver on 127.0.0.1.
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    script: Arc<Mutex<Script>>,
}

async fn receive(
    State(script): State<Arc<Mutex<Script>>>,
    headers: HeaderMap,
    body: String,
) -> AxumStatus {
    let header = |name: &str| {
        headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let (status, delay) = {
        let mut script = script.lock().unwrap();
        script.log.push(Received {
            id: header("webhook-id"),
            timestamp: header("webhook-timestamp"),
            signature: header("webhook-signature"),
            traceparent: header("traceparent"),
            body,
        });
        (script.answers.pop_front().unwrap_or(204), script.delay)
    };
    tokio::time::sleep(delay).await;
    AxumStatus::from_u16(status).unwrap()
}

impl Receiver {
    async fn start(answers: &[u16]) -> Receiver {
        Self::serve(TcpListener::bind("127.0.0.1:0").await.unwrap(), answers)
    }

    fn serve(listener: TcpListener, answers: &[u16]) -> Receiver {
        let script = Arc::new(Mutex::new(Script {
            answers: answers.iter().copied().collect(),
            ..Script::default()
        }));
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(script.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { addr, script }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn log(&self) -> Vec<Received> {
        self.script.lock().unwrap().log.clone()
    }

    fn set_delay(&self, delay: Duration) {
        self.script.lock().unwrap().delay = delay;
    }
}

/// Webhook settings for tests: private destinations allowed (receivers are on 127.0.0.1), short
/// retries.
fn config_for(db: &TestDb) -> rdev_api::config::Config {
    let mut config = test_config(db);
    config.webhooks.webhook_allow_private = true;
    config.webhooks.webhook_retry_schedule = vec![Duration::from_millis(200); 4];
    config.webhooks.webhook_poll_ms = 50;
    config.webhooks.webhook_timeout_secs = 2;
    config.webhooks.webhook_breaker_open_secs = 1;
    config
}

async fn create_webhook(server: &TestServer, url: &str, events: &[&str]) -> (String, String) {
    let response = server
        .post(
            "/api/v1/webhooks",
            ADMIN_KEY,
            json!({"url": url, "events": events}),
        )
        .await;
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let secret = body["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"));
    (body["id"].as_str().unwrap().to_owned(), secret)
}

async fn deliveries(server: &TestServer, webhook: &str) -> Vec<Value> {
    let page: Value = server
        .get(
            &format!("/api/v1/webhooks/{webhook}/deliveries?limit=500"),
            ADMIN_KEY,
        )
        .await
        .json()
        .await
        .unwrap();
    page["items"].as_array().unwrap().clone()
}

async fn delivery_log(server: &TestServer, webhook: &str, delivery: &str) -> Value {
    server
        .get(
            &format!("/api/v1/webhooks/{webhook}/deliveries/{delivery}"),
            ADMIN_KEY,
        )
        .await
        .json()
        .await
        .unwrap()
}

async fn retries_after_500s_then_delivers_with_verifiable_signatures(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let server = TestServer::start_with(config_for(&db)).await;
    let receiver = Receiver::start(&[500, 500]).await;
    let (webhook, secret) = create_webhook(&server, &receiver.url(), &["command.succeeded"]).await;
    let project = server.create_project("p", json!({})).await;
    let command = server.submit(&project, json!({"command": "true"})).await;
    server
        .wait_for(&command, Some("succeeded"), Duration::from_secs(20))
        .await;
    eventually(Duration::from_secs(20), "the delivery succeeds", || async {
        deliveries(&server, &webhook)
            .await
            .first()
            .is_some_and(|d| d["status"] == "delivered")
    })
    .await;
    let listed = deliveries(&server, &webhook).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let delivery = &listed[0];
    assert_eq!(delivery["event_type"], "command.succeeded");
    assert_eq!(delivery["attempts"], 3);
    assert_eq!(delivery["last_status_code"], 204);
    let log = delivery_log(&server, &webhook, delivery["id"].as_str().unwrap()).await;
    let codes: Vec<&Value> = log["attempt_log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["status_code"])
        .collect();
    assert_eq!(codes, [&json!(500), &json!(500), &json!(204)], "{log}");

    let got = receiver.log();
    assert_eq!(got.len(), 3);
    assert!(
        got.iter().all(|r| r.id == delivery["id"]),
        "one webhook-id across retries"
    );
    let payload = got[2].payload();
    assert_eq!(payload["type"], "command.succeeded");
    assert_eq!(payload["data"]["id"], command);
    assert_eq!(payload["data"]["exit_code"], 0);
    assert!(
        got.iter()
            .all(|r| r.traceparent.len() == 55 && r.traceparent.starts_with("00-"))
    );
    verify_with_standardwebhooks(&secret, &got).await;

    // A ping goes whatever the filter says, and is signed the same way.
    let ping = server
        .post(
            &format!("/api/v1/webhooks/{webhook}/ping"),
            ADMIN_KEY,
            json!({}),
        )
        .await;
    assert_eq!(ping.status(), StatusCode::ACCEPTED);
    eventually(Duration::from_secs(10), "the ping arrives", || async {
        receiver.log().len() == 4
    })
    .await;
    assert_eq!(receiver.log()[3].payload()["type"], "ping");
    verify_with_standardwebhooks(&secret, &receiver.log()[3..]).await;
    server.stop().await;
}

async fn a_receiver_down_then_up_gets_every_event(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let server = TestServer::start_with(config_for(&db)).await;
    // Bound but not listening: connections are refused, and the port stays ours.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let url = format!("http://{}/hook", socket.local_addr().unwrap());
    let (webhook, _) = create_webhook(&server, &url, &["*"]).await;
    let project = server.create_project("p", json!({})).await;
    let command = server.submit(&project, json!({"command": "true"})).await;
    server
        .wait_for(&command, Some("succeeded"), Duration::from_secs(20))
        .await;
    eventually(
        Duration::from_secs(20),
        "attempts fail while it is down",
        || async {
            let listed = deliveries(&server, &webhook).await;
            listed.len() == 3 && listed.iter().all(|d| d["attempts"].as_u64() >= Some(1))
        },
    )
    .await;
    let failed = deliveries(&server, &webhook).await;
    assert!(
        failed
            .iter()
            .all(|d| d["status"] == "pending" && d["last_error"].is_string())
    );
    let receiver = Receiver::serve(socket.listen(128).unwrap(), &[]);
    eventually(
        Duration::from_secs(20),
        "every event arrives once it is up",
        || async {
            deliveries(&server, &webhook)
                .await
                .iter()
                .all(|d| d["status"] == "delivered")
        },
    )
    .await;
    let mut types: Vec<String> = receiver
        .log()
        .iter()
        .map(|r| r.payload()["type"].as_str().unwrap().to_owned())
        .collect();
    types.sort();
    types.dedup();
    assert_eq!(
        types,
        ["command.queued", "command.started", "command.succeeded"]
    );
    server.stop().await;
}

async fn gone_disables_the_endpoint(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let server = TestServer::start_with(config_for(&db)).await;
    let receiver = Receiver::start(&[410]).await;
    let (webhook, _) = create_webhook(&server, &receiver.url(), &["command.queued"]).await;
    let project = server.create_project("p", json!({})).await;
    server.submit(&project, json!({"command": "true"})).await;
    eventually(
        Duration::from_secs(20),
        "the endpoint is disabled",
        || async {
            let hook: Value = server
                .get(&format!("/api/v1/webhooks/{webhook}"), ADMIN_KEY)
                .await
                .json()
                .await
                .unwrap();
            hook["enabled"] == false
        },
    )
    .await;
    let hook: Value = server
        .get(&format!("/api/v1/webhooks/{webhook}"), ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    assert!(hook["disabled_reason"].as_str().unwrap().contains("410"));
    let listed = deliveries(&server, &webhook).await;
    assert_eq!(listed[0]["status"], "failed");
    // Nothing more is sent, and nothing more is queued for it.
    server.submit(&project, json!({"command": "true"})).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.log().len(), 1);
    assert_eq!(deliveries(&server, &webhook).await.len(), 1);
    let audit: Value = server
        .get("/api/v1/audit?action=webhook.disabled", ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(audit["items"].as_array().unwrap().len(), 1, "{audit}");
    // An admin turns it back on.
    let enabled = server
        .patch(
            &format!("/api/v1/webhooks/{webhook}"),
            ADMIN_KEY,
            json!({"enabled": true}),
        )
        .await;
    let enabled: Value = enabled.json().await.unwrap();
    assert_eq!(enabled["enabled"], true);
    assert!(enabled["disabled_reason"].is_null());
    server.stop().await;
}

both_backends!(
    retries_after_500s_then_delivers_with_verifiable_signatures,
    a_receiver_down_then_up_gets_every_event,
    gone_disables_the_endpoint,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_and_metadata_urls_are_refused_at_create_and_at_connect() {
    let db = TestDb::new(Backend::Sqlite)
        .await
        .expect("SQLite needs no server");
    let mut config = config_for(&db);
    config.webhooks.webhook_allow_private = false;
    let server = TestServer::start_with(config).await;
    let receiver = Receiver::start(&[]).await;
    let port = receiver.addr.port();
    for url in [
        format!("http://127.0.0.1:{port}/hook"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://[::ffff:169.254.169.254]/".to_owned(),
        "http://10.0.0.8/hook".to_owned(),
        "http://100.64.1.1/hook".to_owned(),
        "http://[fd00::1]/hook".to_owned(),
        "http://[::1]/hook".to_owned(),
        "http://0.0.0.0/hook".to_owned(),
        // A name that resolves (offline) to 127.0.0.1.
        format!("http://localhost:{port}/hook"),
        "ftp://example.com/hook".to_owned(),
    ] {
        let response = server
            .post("/api/v1/webhooks", ADMIN_KEY, json!({"url": url}))
            .await;
        let body = support::problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(body["errors"][0]["pointer"], "/url", "{url}: {body}");
    }
    let listed: Value = server
        .get("/api/v1/webhooks", ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"], json!([]));

    // At connect time: the resolver drops the loopback address before reqwest connects (an
    // endpoint created earlier, or a name that re-resolves: DNS rebinding).
    let guarded = HttpWebhookSender::new(SenderSettings {
        connect_timeout: Duration::from_secs(2),
        timeout: Duration::from_secs(2),
        allow_private: false,
        proxy: None,
    })
    .unwrap();
    for url in [
        format!("http://localhost:{port}/hook"),
        format!("http://127.0.0.1:{port}/hook"),
    ] {
        let sent = guarded
            .send(&OutgoingWebhook {
                url: WebhookUrl::from_trusted(url.clone()),
                id: DeliveryId::new(),
                timestamp: 0,
                signature: "v1,x".into(),
                body: "{}".into(),
                traceparent: "00-0-0-01".into(),
            })
            .await;
        assert!(
            matches!(sent, Err(SendError::Refused(_))),
            "{url}: {sent:?}"
        );
    }
    assert!(receiver.log().is_empty(), "no request reached the receiver");
    server.stop().await;
}

/// A listener that accepts connections and never answers, counting them.
async fn black_hole() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(stream);
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_endpoint_does_not_slow_a_healthy_one() {
    let db = TestDb::new(Backend::Sqlite)
        .await
        .expect("SQLite needs no server");
    let mut config = config_for(&db);
    // Long enough that no black-holed attempt ends during the test.
    config.webhooks.webhook_timeout_secs = 60;
    config.webhooks.webhook_concurrency = 16;
    config.webhooks.webhook_endpoint_concurrency = 4;
    let server = TestServer::start_with(config).await;
    let (hole, _) = black_hole().await;
    let (dead, _) = create_webhook(&server, &format!("http://{hole}/hook"), &["*"]).await;
    let receiver = Receiver::start(&[]).await;
    let (healthy, _) = create_webhook(&server, &receiver.url(), &["*"]).await;
    let project = server
        .create_project("p", json!({"max_concurrency": 4}))
        .await;
    let mut commands = Vec::new();
    for _ in 0..10 {
        commands.push(server.submit(&project, json!({"command": "true"})).await);
    }
    for command in &commands {
        server
            .wait_for(command, Some("succeeded"), Duration::from_secs(30))
            .await;
    }
    eventually(
        Duration::from_secs(30),
        "the healthy endpoint gets all 30 events",
        || async {
            let listed = deliveries(&server, &healthy).await;
            listed.len() == 30 && listed.iter().all(|d| d["status"] == "delivered")
        },
    )
    .await;
    // Meanwhile not one black-holed attempt has ended: the healthy endpoint never waited for it.
    let stuck = deliveries(&server, &dead).await;
    assert_eq!(stuck.len(), 30);
    assert!(
        stuck
            .iter()
            .all(|d| d["status"] == "pending" && d["attempts"] == 0),
        "{stuck:?}"
    );
    assert_eq!(receiver.log().len(), 30, "each event once");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_dispatch_delivers_every_event_after_restart() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let env = [
        ("RDEV_WEBHOOK_ALLOW_PRIVATE", "true"),
        ("RDEV_WEBHOOK_RETRY_SCHEDULE", "200ms,200ms,200ms,200ms"),
        ("RDEV_WEBHOOK_TIMEOUT_SECS", "1"),
        ("RDEV_WEBHOOK_POLL_MS", "50"),
        ("RDEV_WEBHOOK_ENDPOINT_CONCURRENCY", "2"),
    ];
    let first = ServerProcess::start(&db, &env).await;
    let receiver = Receiver::start(&[]).await;
    receiver.set_delay(Duration::from_millis(150));
    let (webhook, secret) = create_webhook(&first.server, &receiver.url(), &["*"]).await;
    let project = first
        .server
        .create_project("p", json!({"max_concurrency": 4}))
        .await;
    let mut commands = Vec::new();
    for _ in 0..12 {
        commands.push(
            first
                .server
                .submit(&project, json!({"command": "true"}))
                .await,
        );
    }
    for command in &commands {
        first
            .server
            .wait_for(command, Some("succeeded"), Duration::from_secs(30))
            .await;
    }
    eventually(Duration::from_secs(30), "dispatch is under way", || async {
        receiver.log().len() >= 6
    })
    .await;
    let mut child = first.child;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let seen_before = receiver.log().len();
    assert!(
        seen_before < 36,
        "killed mid-dispatch, after {seen_before} of 36"
    );

    let second = ServerProcess::start(&db, &env).await;
    eventually(
        Duration::from_secs(60),
        "every delivery ends delivered",
        || async {
            let listed = deliveries(&second.server, &webhook).await;
            listed.len() == 36 && listed.iter().all(|d| d["status"] == "delivered")
        },
    )
    .await;
    // Every (command, event) reached the receiver at least once.
    let got = receiver.log();
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    for request in &got {
        let payload = request.payload();
        let key = (
            payload["data"]["id"].as_str().unwrap().to_owned(),
            payload["type"].as_str().unwrap().to_owned(),
        );
        *seen.entry(key).or_default() += 1;
    }
    assert_eq!(seen.len(), 36, "{seen:?}");
    // The log shows each recorded attempt, numbered without gaps, the last one the 2xx.
    for delivery in deliveries(&second.server, &webhook).await {
        let log = delivery_log(&second.server, &webhook, delivery["id"].as_str().unwrap()).await;
        let attempts = log["attempt_log"].as_array().unwrap();
        let numbers: Vec<u64> = attempts
            .iter()
            .map(|a| a["attempt"].as_u64().unwrap())
            .collect();
        assert_eq!(
            numbers,
            (1..=numbers.len() as u64).collect::<Vec<_>>(),
            "{log}"
        );
        assert_eq!(attempts.last().unwrap()["status_code"], 204, "{log}");
        assert_eq!(log["attempts"].as_u64().unwrap(), numbers.len() as u64);
    }
    verify_with_standardwebhooks(&secret, &got).await;
}

/// Runs the `standardwebhooks` verifier over `requests`; each must verify, and a tampered copy
/// of each must not.
async fn verify_with_standardwebhooks(secret: &str, requests: &[Received]) {
    let Some(venv) = python_venv(VERIFIER).await else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let spec = work.path().join("requests.json");
    let requests: Vec<Value> = requests
        .iter()
        .map(|r| {
            json!({"id": r.id, "timestamp": r.timestamp, "signature": r.signature, "body": r.body})
        })
        .collect();
    std::fs::write(
        &spec,
        json!({"secret": secret, "requests": requests}).to_string(),
    )
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/webhooks/verify.py");
    let output = Command::new(venv.join("bin/python"))
        .arg(script)
        .arg(&spec)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "standardwebhooks refused a signature:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["verified"], requests.len());
    assert_eq!(result["tampered_refused"], requests.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_changes_are_audited_without_the_secret_and_rotation_signs_with_the_new_one() {
    let db = TestDb::new(Backend::Sqlite)
        .await
        .expect("SQLite needs no server");
    let server = TestServer::start_with(config_for(&db)).await;
    let receiver = Receiver::start(&[]).await;
    let (webhook, first_secret) = create_webhook(&server, &receiver.url(), &["*"]).await;
    let shown: Value = server
        .get(&format!("/api/v1/webhooks/{webhook}"), ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    assert!(
        shown.get("secret").is_none(),
        "the secret is shown once: {shown}"
    );
    let rotated: Value = server
        .post(
            &format!("/api/v1/webhooks/{webhook}/rotate"),
            ADMIN_KEY,
            json!({}),
        )
        .await
        .json()
        .await
        .unwrap();
    let second_secret = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(first_secret, second_secret);
    let patched = server
        .patch(
            &format!("/api/v1/webhooks/{webhook}"),
            ADMIN_KEY,
            json!({"events": ["command.failed"], "description": "ops"}),
        )
        .await;
    assert_eq!(patched.status(), StatusCode::OK);
    let ping = server
        .post(
            &format!("/api/v1/webhooks/{webhook}/ping"),
            ADMIN_KEY,
            json!({}),
        )
        .await;
    assert_eq!(ping.status(), StatusCode::ACCEPTED);
    eventually(Duration::from_secs(10), "the ping arrives", || async {
        receiver.log().len() == 1
    })
    .await;
    verify_with_standardwebhooks(&second_secret, &receiver.log()).await;

    let deleted = server
        .delete(&format!("/api/v1/webhooks/{webhook}"), ADMIN_KEY)
        .await;
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let missing = server
        .get(&format!("/api/v1/webhooks/{webhook}"), ADMIN_KEY)
        .await;
    support::problem(missing, StatusCode::NOT_FOUND).await;
    let audit = server
        .get(&format!("/api/v1/audit?target_id={webhook}"), ADMIN_KEY)
        .await
        .text()
        .await
        .unwrap();
    for action in [
        "webhook.created",
        "webhook.rotated",
        "webhook.updated",
        "webhook.deleted",
    ] {
        assert!(audit.contains(action), "{action} missing: {audit}");
    }
    for secret in [&first_secret, &second_secret] {
        let key = secret.trim_start_matches("whsec_");
        assert!(!audit.contains(key), "a secret reached the audit log");
    }
    server.stop().await;
}

/// Behind a proxy the proxy resolves the host, and the guard would judge nothing: the proxy
/// variables of the server's environment are not used for webhooks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_proxy_variables_do_not_carry_webhooks_past_the_guard() {
    let db = TestDb::new(Backend::Sqlite)
        .await
        .expect("SQLite needs no server");
    let (proxy, reached_proxy) = black_hole().await;
    let proxy_url = format!("http://{proxy}");
    let process = ServerProcess::start(
        &db,
        &[
            ("HTTP_PROXY", proxy_url.as_str()),
            ("HTTPS_PROXY", proxy_url.as_str()),
            ("ALL_PROXY", proxy_url.as_str()),
            ("http_proxy", proxy_url.as_str()),
            ("RDEV_WEBHOOK_RETRY_SCHEDULE", "100ms"),
            ("RDEV_WEBHOOK_POLL_MS", "50"),
        ],
    )
    .await;
    let server = &process.server;
    // A documentation address passes the create-time check; no request is sent to it.
    let (webhook, _) =
        create_webhook(server, "http://203.0.113.7/hook", &["command.succeeded"]).await;
    // The endpoint now leads to loopback, as a rebound name or an old row would.
    let (receiver, reached_receiver) = black_hole().await;
    db.execute(&format!(
        "UPDATE webhooks SET url = 'http://localhost:{}/hook'",
        receiver.port()
    ))
    .await;
    let ping = server
        .post(
            &format!("/api/v1/webhooks/{webhook}/ping"),
            ADMIN_KEY,
            json!({}),
        )
        .await;
    assert_eq!(ping.status(), StatusCode::ACCEPTED);
    eventually(Duration::from_secs(10), "the ping fails", || async {
        deliveries(server, &webhook)
            .await
            .first()
            .is_some_and(|d| d["status"] == "failed")
    })
    .await;
    let delivery = deliveries(server, &webhook).await[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let log = delivery_log(server, &webhook, &delivery).await;
    let error = log["attempt_log"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("loopback"), "{log}");
    assert_eq!(
        reached_proxy.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing reached the proxy"
    );
    assert_eq!(
        reached_receiver.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

/// A receiver that answers 200 with a body that never ends.
async fn endless_receiver() -> (SocketAddr, Arc<std::sync::atomic::AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = sent.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut head = [0u8; 4096];
                let _ = stream.read(&mut head).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n")
                    .await;
                let chunk = vec![b'x'; 64 * 1024];
                while stream.write_all(&chunk).await.is_ok() {
                    counter.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    (addr, sent)
}

/// An endless 200 is a delivery, read no further than a few KiB: the connection is dropped
/// and the sender returns long before its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_answer_is_not_read() {
    let (addr, sent) = endless_receiver().await;
    let sender = HttpWebhookSender::new(SenderSettings {
        connect_timeout: Duration::from_secs(2),
        timeout: Duration::from_secs(30),
        allow_private: true,
        proxy: None,
    })
    .unwrap();
    let started = std::time::Instant::now();
    let status = sender
        .send(&OutgoingWebhook {
            url: WebhookUrl::from_trusted(format!("http://{addr}/hook")),
            id: DeliveryId::new(),
            timestamp: 0,
            signature: "v1,x".into(),
            body: "{}".into(),
            traceparent: "00-0-0-01".into(),
        })
        .await;
    assert_eq!(status.unwrap(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "returned in {:?}",
        started.elapsed()
    );
    // The receiver stops being able to write once the connection is gone: what it sent is
    // bounded by the socket buffers, not by the 30 s timeout.
    let settled = sent.load(std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = sent.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        settled, later,
        "the receiver still writes: the connection is open"
    );
    assert!(later < 64 * 1024 * 1024, "{later} bytes went out");
}

/// `RDEV_WEBHOOK_PROXY` is the one way to send webhooks through a proxy; the guard then leaves
/// resolving (and refusing) to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_egress_proxy_carries_every_webhook() {
    let (proxy, reached_proxy) = black_hole().await;
    let sender = HttpWebhookSender::new(SenderSettings {
        connect_timeout: Duration::from_secs(2),
        timeout: Duration::from_millis(500),
        allow_private: false,
        proxy: Some(format!("http://{proxy}").parse().unwrap()),
    })
    .unwrap();
    let sent = sender
        .send(&OutgoingWebhook {
            url: WebhookUrl::from_trusted("http://receiver.example/hook".into()),
            id: DeliveryId::new(),
            timestamp: 0,
            signature: "v1,x".into(),
            body: "{}".into(),
            traceparent: "00-0-0-01".into(),
        })
        .await;
    assert!(matches!(sent, Err(SendError::Timeout)), "{sent:?}");
    assert_eq!(reached_proxy.load(std::sync::atomic::Ordering::SeqCst), 1);
}
