//! Test harness: a real server on a random port against a fresh database (a temporary SQLite
//! file, or a new Postgres database), spoken to over HTTP.
#![allow(dead_code)]

pub mod own_postgres;
pub mod venv;

use std::sync::Arc;
use std::time::Duration;

use eventsource_stream::{Event, Eventsource};
use futures::{Stream, StreamExt};
use rdev_api::config::{Config, Secret};
use rdev_api::ports::Clock;
use rdev_api::ports::clock::SystemClock;
use reqwest::{Method, Response, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The admin key every test server is bootstrapped with.
pub const ADMIN_KEY: &str = "rdev_testadmn_0123456789abcdefghijklmnopqrstuv";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Stamps each listed test body (`async fn name(backend: Backend)`) for both backends.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::Backend::Postgres).await
                }
            )*
        }
    };
}

fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Says loudly that a test did not run. The test still ends as passed (libtest cannot skip at
/// run time), and nextest shows a passing test's output only on request, so besides stderr the
/// line goes to the terminal the tests were started from, when there is one.
pub fn skipped(why: &str) {
    let line = format!(
        "SKIPPED: {}: {why}",
        std::thread::current().name().unwrap_or("a test")
    );
    eprintln!("{line}");
    if let Ok(mut tty) = std::fs::OpenOptions::new().write(true).open("/dev/tty") {
        use std::io::Write;
        let _ = write!(tty, "\r\n{line}\r\n");
    }
}

/// A connection URL fit for a log line: its password, if any, replaced by `***`.
fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((user_info, host)) if user_info.contains(':') => {
            let user = user_info.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

/// A database that lives as long as the test.
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg_name: Option<String>,
}

impl TestDb {
    /// `None` when the backend is Postgres and it cannot be reached outside CI (the test is then
    /// skipped with a note); under `CI=true` an unreachable Postgres fails the test.
    pub async fn new(backend: Backend) -> Option<TestDb> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("rdev.db").display());
                Some(TestDb {
                    url,
                    _dir: Some(dir),
                    pg_name: None,
                })
            }
            Backend::Postgres => {
                use sqlx::Connection;
                let admin = admin_url();
                let connected = tokio::time::timeout(
                    Duration::from_secs(10),
                    sqlx::PgConnection::connect(&admin),
                )
                .await;
                let mut conn = match connected {
                    Ok(Ok(conn)) => conn,
                    other => {
                        let why = match other {
                            Ok(Err(e)) => e.to_string(),
                            _ => "timed out".into(),
                        };
                        let shown = without_password(&admin);
                        if std::env::var("CI").is_ok_and(|v| v == "true") {
                            panic!("no Postgres at {shown} under CI=true: {why}");
                        }
                        skipped(&format!(
                            "no Postgres at {shown} ({why}); start it or set DATABASE_URL"
                        ));
                        return None;
                    }
                };
                let name = format!("rdev_t_{}", uuid::Uuid::new_v4().simple());
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .await
                    .expect("create test database");
                let base = admin
                    .rsplit_once('/')
                    .map_or(admin.as_str(), |(base, _)| base);
                Some(TestDb {
                    url: format!("{base}/{name}"),
                    _dir: None,
                    pg_name: Some(name),
                })
            }
        }
    }

    /// A database the test set up itself (nothing is dropped afterwards).
    pub fn at(url: &str) -> TestDb {
        TestDb {
            url: url.to_owned(),
            _dir: None,
            pg_name: None,
        }
    }

    /// A raw connection for tampering tests.
    pub async fn execute(&self, sql: &str) {
        use sqlx::Connection;
        if self.url.starts_with("postgres") {
            let mut conn = sqlx::PgConnection::connect(&self.url).await.unwrap();
            sqlx::query(sql).execute(&mut conn).await.unwrap();
        } else {
            let mut conn = sqlx::SqliteConnection::connect(&self.url).await.unwrap();
            sqlx::query(sql).execute(&mut conn).await.unwrap();
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else {
            return;
        };
        // Drop runs outside async context: use a short-lived runtime on its own thread.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                use sqlx::Connection;
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url()).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                }
            });
        })
        .join();
    }
}

pub fn test_config(db: &TestDb) -> Config {
    let mut config = Config::with_database(&db.url);
    config.auth.bootstrap_admin_key = Some(ADMIN_KEY.parse::<Secret>().unwrap());
    config.worker.workers = 4;
    config.worker.kill_grace_secs = 1;
    config.worker.shutdown_grace_secs = 1;
    config.worker.poll_interval_ms = 200;
    // Tests poll; a key's rate limit is tested where it is set on purpose (tests/rate_limit.rs).
    config.auth.rate_limit = rdev_api::domain::rate_limit::RateLimit::parse(UNREACHED_RATE_LIMIT)
        .expect("a valid rate limit");
    config
}

/// Polls `ready` until it holds, failing the test with `what` after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !ready().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of one sample (`name` or `name{labels}`) in Prometheus text, if exported.
pub fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Whether the slow variant of the suite was asked for (`RDEV_SUITE=long`).
pub fn long_suite() -> bool {
    std::env::var("RDEV_SUITE").is_ok_and(|v| v == "long")
}

/// A rate limit no test reaches by polling.
pub const UNREACHED_RATE_LIMIT: &str = "1000000/60s";

/// A running server.
pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    shutdown: CancellationToken,
    drain: CancellationToken,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(db: &TestDb) -> TestServer {
        Self::start_with(test_config(db)).await
    }

    pub async fn start_with(config: Config) -> TestServer {
        Self::start_with_clock(config, Arc::new(SystemClock)).await
    }

    /// A server whose time the test moves (`rdev_api::ports::clock::ManualClock`).
    pub async fn start_with_clock(config: Config, clock: Arc<dyn Clock>) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = rdev_api::app::build_with_clock(config, listener, clock)
            .await
            .expect("server builds");
        let base = format!("http://{}", app.local_addr());
        let shutdown = app.shutdown_token();
        let drain = app.drain_token();
        let handle = tokio::spawn(async move {
            app.run().await.expect("server runs");
        });
        TestServer {
            base,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            shutdown,
            drain,
            handle: Some(handle),
        }
    }

    /// A client for a server running elsewhere.
    pub fn detached(base: String) -> TestServer {
        TestServer {
            base,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            shutdown: CancellationToken::new(),
            drain: CancellationToken::new(),
            handle: None,
        }
    }

    /// What SIGTERM does: start draining (the server stops by itself after the drain delay).
    pub fn begin_drain(&self) {
        self.drain.cancel();
    }

    /// Waits until the server has stopped by itself.
    pub async fn stopped(mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = handle.await;
        }
    }

    /// Graceful stop, waiting for the drain to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            let _ = handle.await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Sends an authenticated request, with a JSON body when one is given.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> Response {
        let mut request = self.client.request(method, self.url(path)).bearer_auth(key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.unwrap()
    }

    pub async fn get(&self, path: &str, key: &str) -> Response {
        self.send(Method::GET, path, key, None).await
    }

    pub async fn delete(&self, path: &str, key: &str) -> Response {
        self.send(Method::DELETE, path, key, None).await
    }

    pub async fn post(&self, path: &str, key: &str, body: Value) -> Response {
        self.send(Method::POST, path, key, Some(body)).await
    }

    pub async fn patch(&self, path: &str, key: &str, body: Value) -> Response {
        self.send(Method::PATCH, path, key, Some(body)).await
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The OpenAPI document the server serves.
    pub async fn openapi(&self) -> Value {
        let response = self
            .client
            .get(self.url("/openapi.json"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    }

    /// Creates a key and returns (id, secret).
    pub async fn create_key(&self, body: Value) -> (String, String) {
        let response = self.post("/api/v1/api-keys", ADMIN_KEY, body).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let key: Value = response.json().await.unwrap();
        (
            key["id"].as_str().unwrap().to_owned(),
            key["secret"].as_str().unwrap().to_owned(),
        )
    }

    /// Creates a local project in a fresh directory and returns its id.
    pub async fn create_project(&self, name: &str, extra: Value) -> String {
        let mut body = json!({"name": name, "workdir": "/tmp", "executor": "local"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().cloned().unwrap_or_default());
        let response = self.post("/api/v1/projects", ADMIN_KEY, body).await;
        created_id(response, StatusCode::CREATED).await
    }

    /// Submits a command and returns its id.
    pub async fn submit(&self, project: &str, body: Value) -> String {
        let response = self
            .post(
                &format!("/api/v1/projects/{project}/commands"),
                ADMIN_KEY,
                body,
            )
            .await;
        created_id(response, StatusCode::ACCEPTED).await
    }

    pub async fn command(&self, id: &str) -> Value {
        self.get(&format!("/api/v1/commands/{id}"), ADMIN_KEY)
            .await
            .json()
            .await
            .unwrap()
    }

    /// Polls until the command reaches `status` (or any final status when `None`).
    pub async fn wait_for(&self, id: &str, status: Option<&str>, within: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let command = self.command(id).await;
            let current = command["status"].as_str().unwrap().to_owned();
            let done = match status {
                Some(wanted) => current == wanted,
                None => !matches!(current.as_str(), "queued" | "running"),
            };
            if done {
                return command;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "command {id} stuck in {current}, wanted {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Opens the SSE stream of a command.
    pub async fn events(
        &self,
        id: &str,
        last_event_id: Option<i64>,
    ) -> impl Stream<Item = Event> + Unpin + use<> {
        let mut request = self
            .client
            .get(self.url(&format!("/api/v1/commands/{id}/events")))
            .bearer_auth(ADMIN_KEY)
            .timeout(Duration::from_secs(300));
        if let Some(last) = last_event_id {
            request = request.header("Last-Event-ID", last.to_string());
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Box::pin(
            response
                .bytes_stream()
                .eventsource()
                .map(|e| e.expect("well-formed SSE")),
        )
    }

    /// Runs a chatty command (`lines` lines, six pauses), hangs up after its first output
    /// event, resumes with `Last-Event-ID`, and checks that nothing was lost or repeated;
    /// returns the command id and the output event ids seen.
    pub async fn check_exact_resume(&self, project: &str, lines: usize) -> (String, Vec<i64>) {
        let pause_every = (lines / 6).max(1);
        let id = self
            .submit(
                project,
                json!({"command": format!(
                    "i=1; while [ $i -le {lines} ]; do echo \"line $i\"; \
                     if [ $((i % {pause_every})) -eq 0 ]; then sleep 0.3; fi; i=$((i+1)); done")}),
            )
            .await;
        let expected: String = (1..=lines).map(|i| format!("line {i}\n")).collect();

        // First connection: read the first output event and hang up mid-stream. A chunk is
        // whatever one read of the pipe got, so under load a few chunks can hold all the
        // output; the pauses make sure more chunks follow the first.
        let mut first = self.events(&id, None).await;
        let mut received = Vec::new();
        while received.is_empty() {
            let event = tokio::time::timeout(Duration::from_secs(30), first.next())
                .await
                .unwrap()
                .unwrap();
            if event.event == "output" {
                received.push(event);
            }
        }
        drop(first);
        let last_id: i64 = received.last().unwrap().id.parse().unwrap();

        // Second connection resumes after the last id it saw.
        let rest = self.events_until_end(&id, Some(last_id)).await;
        let resumed: Vec<_> = rest
            .iter()
            .filter(|e| e.event == "output")
            .cloned()
            .collect();
        assert_eq!(
            resumed.first().unwrap().id,
            (last_id + 1).to_string(),
            "no gap, no duplicate"
        );
        received.extend(resumed);
        let ids: Vec<i64> = received.iter().map(|e| e.id.parse().unwrap()).collect();
        assert_eq!(ids, (1..=ids.len() as i64).collect::<Vec<_>>());
        assert_eq!(output_of(&received, "stdout"), expected);
        let end: Value = serde_json::from_str(&rest.last().unwrap().data).unwrap();
        assert_eq!(end["status"], "succeeded");
        (id, ids)
    }

    /// Reads a stream up to and including the `end` event.
    pub async fn events_until_end(&self, id: &str, last_event_id: Option<i64>) -> Vec<Event> {
        let mut stream = self.events(id, last_event_id).await;
        let mut events = Vec::new();
        while let Some(event) = tokio::time::timeout(Duration::from_secs(120), stream.next())
            .await
            .expect("an event within 120 s")
        {
            let end = event.event == "end";
            events.push(event);
            if end {
                break;
            }
        }
        events
    }
}

/// An rdev-api process (the real binary) on a random port; killed on drop.
pub struct ServerProcess {
    pub child: tokio::process::Child,
    pub server: TestServer,
    /// Every line the server wrote to stderr so far.
    pub logs: Arc<std::sync::Mutex<Vec<String>>>,
}

impl ServerProcess {
    pub async fn start(db: &TestDb, env: &[(&str, &str)]) -> ServerProcess {
        Self::start_configured(db, env, |_| {}).await
    }

    /// [`ServerProcess::start`], with the process command adjusted first (another user, say).
    pub async fn start_configured(
        db: &TestDb,
        env: &[(&str, &str)],
        configure: impl FnOnce(&mut tokio::process::Command),
    ) -> ServerProcess {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_rdev-api"));
        command
            .env("DATABASE_URL", &db.url)
            .env("RDEV_LISTEN_ADDR", "127.0.0.1:0")
            .env("RDEV_BOOTSTRAP_ADMIN_KEY", ADMIN_KEY)
            .env("RDEV_LOG_FORMAT", "json")
            .env("RDEV_POLL_INTERVAL_MS", "200")
            .env("RDEV_RATE_LIMIT", UNREACHED_RATE_LIMIT)
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        for (name, value) in env {
            command.env(name, value);
        }
        configure(&mut command);
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
        let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let address = loop {
            let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .expect("the server starts within 30 s")
                .unwrap()
                .expect("the server logs its address");
            logs.lock().unwrap().push(line.clone());
            if let Ok(log) = serde_json::from_str::<Value>(&line)
                && log["message"] == "rdev-api listening"
            {
                break log["address"].as_str().unwrap().to_owned();
            }
        };
        tokio::spawn({
            let logs = logs.clone();
            async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    logs.lock().unwrap().push(line);
                }
            }
        });
        ServerProcess {
            child,
            server: TestServer::detached(format!("http://{address}")),
            logs,
        }
    }
}

/// Checks a creating request answered `expected` (showing the body otherwise) and returns the
/// `id` it created.
async fn created_id(response: Response, expected: StatusCode) -> String {
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(status, expected, "{body}");
    let created: Value = serde_json::from_str(&body).unwrap();
    created["id"].as_str().unwrap().to_owned()
}

/// The output text of SSE `output` events, per stream (`stdout`, `stderr`).
pub fn output_of(events: &[Event], stream: &str) -> String {
    events
        .iter()
        .filter(|e| e.event == "output")
        .map(|e| serde_json::from_str::<Value>(&e.data).unwrap())
        .filter(|v| v["stream"] == stream)
        .map(|v| v["data"].as_str().unwrap().to_owned())
        .collect()
}

pub async fn problem(response: Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16());
    assert!(
        body["type"]
            .as_str()
            .unwrap()
            .starts_with("urn:rdev:problem:")
    );
    assert!(body["title"].is_string());
    body
}
