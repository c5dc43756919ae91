//! Request rate limits, through HTTP against a real server: a key's sliding window (exactly N of
//! M pass, a burst at the boundary of two fixed windows is refused), the `RateLimit-*` headers
//! and the 429 problem, per-key overrides, three server processes sharing one Postgres counter,
//! and the per-address guard that stops key guessing before any key is looked up. The port
//! itself is checked below HTTP against both adapters, with a clock the test moves.

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use rdev_api::adapters::memory::MemoryRateLimiter;
use rdev_api::adapters::postgres::PgDatabase;
use rdev_api::adapters::sql::Sealing;
use rdev_api::domain::audit::AuditKey;
use rdev_api::domain::ids::ApiKeyId;
use rdev_api::domain::rate_limit::{RateLimit, epoch_ms};
use rdev_api::ports::clock::ManualClock;
use rdev_api::ports::{AuditHeads, Clock, RateLimiter};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{ADMIN_KEY, Backend, ServerProcess, TestDb, TestServer, problem, test_config};

both_backends!(
    exactly_the_limit_of_a_burst_passes,
    headers_describe_the_quota_and_429_says_when_to_return,
    a_key_can_have_its_own_limit,
);

/// A read key with `rate_limit`, returned as (id, secret).
async fn key_with_limit(server: &TestServer, rate_limit: &str) -> (String, String) {
    server
        .create_key(json!({"name": "limited", "scopes": ["read"], "rate_limit": rate_limit}))
        .await
}

/// Sends `n` concurrent `GET /me` with `key`; returns the statuses.
async fn burst(server: &TestServer, key: &str, n: usize) -> Vec<StatusCode> {
    join_all((0..n).map(|_| server.get("/api/v1/me", key)))
        .await
        .iter()
        .map(|r| r.status())
        .collect()
}

fn count(statuses: &[StatusCode], wanted: StatusCode) -> usize {
    statuses.iter().filter(|s| **s == wanted).count()
}

/// The value of one sample of the Prometheus text, 0 when absent.
fn metric(text: &str, sample: &str) -> u64 {
    support::sample(text, sample).map_or(0, |v| v as u64)
}

async fn exactly_the_limit_of_a_burst_passes(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    let (_, key) = key_with_limit(&server, "7/3600s").await;
    let statuses = burst(&server, &key, 20).await;
    assert_eq!(count(&statuses, StatusCode::OK), 7, "{statuses:?}");
    assert_eq!(count(&statuses, StatusCode::TOO_MANY_REQUESTS), 13);
    // Another key has its own window.
    assert_eq!(
        server.get("/api/v1/me", ADMIN_KEY).await.status(),
        StatusCode::OK
    );
    let metrics = server.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "rdev_rate_limit_rejections_total{limiter=\"api_key\"}"
        ),
        13
    );
    server.stop().await;
}

async fn headers_describe_the_quota_and_429_says_when_to_return(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    let (_, key) = key_with_limit(&server, "3/3600s").await;
    let first = server.get("/api/v1/me", &key).await;
    assert_eq!(first.status(), StatusCode::OK);
    let header = |response: &reqwest::Response, name: &str| -> String {
        response.headers()[name].to_str().unwrap().to_owned()
    };
    assert_eq!(header(&first, "ratelimit-limit"), "3");
    assert_eq!(header(&first, "ratelimit-remaining"), "2");
    assert_eq!(header(&first, "ratelimit-policy"), "3;w=3600");
    let reset: u64 = header(&first, "ratelimit-reset").parse().unwrap();
    assert!((3600..=7200).contains(&reset), "reset {reset}");
    assert!(!first.headers().contains_key("retry-after"));

    // A response that fails after authentication carries them too.
    let missing = server
        .get(&format!("/api/v1/commands/{}", uuid::Uuid::new_v4()), &key)
        .await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(header(&missing, "ratelimit-remaining"), "1");
    assert_eq!(
        server.get("/api/v1/me", &key).await.status(),
        StatusCode::OK
    );

    let refused = server.get("/api/v1/me", &key).await;
    assert_eq!(header(&refused, "ratelimit-remaining"), "0");
    let retry_after: u64 = header(&refused, "retry-after").parse().unwrap();
    assert!((1..=7200).contains(&retry_after), "{retry_after}");
    let body = problem(refused, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(body["type"], "urn:rdev:problem:rate-limited");
    assert!(
        body["detail"].as_str().unwrap().contains("3/3600s"),
        "{body}"
    );

    // Unauthenticated answers name no key's quota.
    let anonymous = server
        .client
        .get(server.url("/api/v1/me"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert!(!anonymous.headers().contains_key("ratelimit-limit"));
    server.stop().await;
}

async fn a_key_can_have_its_own_limit(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    let (id, key) = key_with_limit(&server, "2/1h").await;
    let shown: Value = server
        .get(&format!("/api/v1/api-keys/{id}"), ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(shown["rate_limit"], "2/3600s");
    let me: Value = server.get("/api/v1/me", &key).await.json().await.unwrap();
    assert_eq!(me["rate_limit"], "2/3600s", "a key sees its own limit");
    assert_eq!(
        server.get("/api/v1/me", &key).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        server.get("/api/v1/me", &key).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );

    // Raised: the requests already counted still count.
    let raised = server
        .patch(
            &format!("/api/v1/api-keys/{id}"),
            ADMIN_KEY,
            json!({"rate_limit": "4/3600s"}),
        )
        .await;
    assert_eq!(raised.status(), StatusCode::OK);
    let statuses = burst(&server, &key, 5).await;
    assert_eq!(count(&statuses, StatusCode::OK), 2, "{statuses:?}");

    // Back to the server default (test_config's, far away).
    let reset: Value = server
        .patch(
            &format!("/api/v1/api-keys/{id}"),
            ADMIN_KEY,
            json!({"rate_limit": null}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(reset["rate_limit"], Value::Null);
    let response = server.get("/api/v1/me", &key).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["ratelimit-limit"], "1000000");

    // Validation happens in the domain and names the field.
    for bad in [json!("fast"), json!("0/60s"), json!("10/2d"), json!(10)] {
        let refused = server
            .patch(
                &format!("/api/v1/api-keys/{id}"),
                ADMIN_KEY,
                json!({"rate_limit": bad}),
            )
            .await;
        let body = problem(refused, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(body["errors"][0]["pointer"], "/rate_limit", "{body}");
    }
    let refused = server
        .post(
            "/api/v1/api-keys",
            ADMIN_KEY,
            json!({"name": "x", "scopes": ["read"], "rate_limit": "600/60"}),
        )
        .await;
    let body = problem(refused, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(body["errors"][0]["pointer"], "/rate_limit");
    server.stop().await;
}

/// The sliding window, seen through HTTP with a clock the test moves: a burst at the end of one
/// fixed window, then another just after the boundary, which a fixed-window counter would take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_at_the_boundary_of_two_fixed_windows_is_refused() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let clock = Arc::new(ManualClock::default());
    let server = TestServer::start_with_clock(test_config(&db), clock.clone()).await;
    let (_, key) = key_with_limit(&server, "10/3600s").await;
    let window = Duration::from_secs(3600);
    move_to_end_of_window(&clock, window, Duration::from_secs(2));

    assert_eq!(count(&burst(&server, &key, 10).await, StatusCode::OK), 10);
    clock.advance(Duration::from_secs(4));
    let after_boundary = burst(&server, &key, 10).await;
    assert_eq!(
        count(&after_boundary, StatusCode::TOO_MANY_REQUESTS),
        10,
        "the burst before the boundary still fills the sliding window"
    );
    // 1,980 s into the new window, 45% of the old burst still weighs: 5 more fit (4.5 + 5 <= 10).
    clock.advance(Duration::from_secs(1_980 - 2));
    let later = burst(&server, &key, 10).await;
    assert_eq!(count(&later, StatusCode::OK), 5, "{later:?}");
    server.stop().await;
}

/// Moves `clock` to `margin` before the end of its current fixed window of `window`.
fn move_to_end_of_window(clock: &ManualClock, window: Duration, margin: Duration) {
    let window_ms = window.as_millis() as i64;
    let into = epoch_ms(clock.now()).rem_euclid(window_ms);
    let mut ahead = window_ms - margin.as_millis() as i64 - into;
    if ahead < 0 {
        ahead += window_ms;
    }
    clock.advance(Duration::from_millis(ahead as u64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_an_event_stream_counts_as_one_request() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let server = TestServer::start(&db).await;
    let project = server.create_project("streams", json!({})).await;
    let command = server.submit(&project, json!({"command": "echo hi"})).await;
    server
        .wait_for(&command, None, Duration::from_secs(30))
        .await;
    let (_, key) = key_with_limit(&server, "2/3600s").await;
    let stream = server
        .client
        .get(server.url(&format!("/api/v1/commands/{command}/events")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    assert_eq!(stream.headers()["ratelimit-remaining"], "1");
    // Reading the whole stream is still that one request.
    let body = stream.text().await.unwrap();
    assert!(body.contains("event: end"), "{body}");
    assert_eq!(
        server.get("/api/v1/me", &key).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        server.get("/api/v1/me", &key).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    server.stop().await;
}

/// Three rdev-api processes on one database, each taking a third of a concurrent burst for one
/// key: the shared counter admits exactly the limit in total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_server_processes_admit_exactly_the_limit_between_them() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let env = [("RDEV_RATE_LIMIT_BACKEND", "postgres")];
    let first = ServerProcess::start(&db, &env).await;
    let (second, third) = tokio::join!(
        ServerProcess::start(&db, &env),
        ServerProcess::start(&db, &env)
    );
    let (_, key) = key_with_limit(&first.server, "25/3600s").await;
    let servers = [&first.server, &second.server, &third.server];
    let requests = (0..90).map(|n| servers[n % 3].get("/api/v1/me", &key));
    let responses = join_all(requests).await;
    let admitted_by: Vec<usize> = responses
        .iter()
        .enumerate()
        .filter(|(_, r)| r.status() == StatusCode::OK)
        .map(|(n, _)| n % 3)
        .collect();
    let refused = responses
        .iter()
        .filter(|r| r.status() == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(admitted_by.len(), 25, "admitted across the replicas");
    assert_eq!(refused, 65);
    // Which server admitted which request depends on who reached the database first, so it is
    // not asserted: the requests went to the three servers in turn, and the total is exact.
}

/// Hundreds of guessed keys from one address: only the failure budget reaches the key lookup;
/// the rest get 429 without their key being looked at. Another address is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_keys_from_one_address_is_cut_before_any_key_lookup() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let mut config = test_config(&db);
    config.auth.auth_failure_limit = RateLimit::parse("20/3600s").unwrap();
    // The test client is the trusted proxy, so it can speak for several client addresses.
    config.http.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    let server = TestServer::start_with(config).await;
    let from = |address: &'static str, key: String| {
        server
            .client
            .get(server.url("/api/v1/me"))
            .bearer_auth(key)
            .header("x-forwarded-for", address)
            .send()
    };
    let guesses = (0..300).map(|_| {
        let guess = rdev_api::domain::api_key::PresentedKey::generate(&mut rand::rng());
        from("203.0.113.7", guess.expose().to_owned())
    });
    let mut statuses = Vec::new();
    // In order, so the first twenty are the ones that reach the key lookup.
    for guess in guesses {
        statuses.push(guess.await.unwrap());
    }
    let unauthorized = statuses
        .iter()
        .take_while(|r| r.status() == StatusCode::UNAUTHORIZED)
        .count();
    assert_eq!(unauthorized, 20);
    assert!(
        statuses[20..]
            .iter()
            .all(|r| r.status() == StatusCode::TOO_MANY_REQUESTS)
    );
    let last = statuses.pop().unwrap();
    let retry_after: u64 = last.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=180).contains(&retry_after), "{retry_after}");
    let body = problem(last, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(
        body["type"],
        "urn:rdev:problem:too-many-failed-authentications"
    );

    // While blocked, even a real key from that address is not looked at.
    let blocked = from("203.0.113.7", ADMIN_KEY.to_owned()).await.unwrap();
    assert_eq!(blocked.status(), StatusCode::TOO_MANY_REQUESTS);
    // Another address still gets its keys checked.
    let bystander = from("203.0.113.8", ADMIN_KEY.to_owned()).await.unwrap();
    assert_eq!(bystander.status(), StatusCode::OK);

    let metrics = server.metrics().await;
    assert_eq!(
        metric(&metrics, "rdev_api_key_lookups_total"),
        21,
        "the twenty guesses within budget and the bystander's key"
    );
    assert_eq!(
        metric(&metrics, "rdev_auth_failures_total{reason=\"invalid\"}"),
        20
    );
    assert_eq!(
        metric(
            &metrics,
            "rdev_rate_limit_rejections_total{limiter=\"client_ip\"}"
        ),
        281
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_keyed_operation_declares_429_and_the_headers() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let server = TestServer::start(&db).await;
    let spec = server.openapi().await;
    let mut keyed = 0;
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let Some(responses) = operation["responses"].as_object() else {
                continue;
            };
            let secured = operation["security"]
                .as_array()
                .is_some_and(|s| !s.is_empty());
            if !secured {
                assert!(!responses.contains_key("429"), "{method} {path}");
                continue;
            }
            keyed += 1;
            let too_many = &responses["429"];
            assert!(
                too_many["headers"]["Retry-After"].is_object(),
                "{method} {path}"
            );
            assert!(
                too_many["content"]["application/problem+json"].is_object(),
                "{method} {path}"
            );
            for (status, response) in responses {
                for name in ["RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"] {
                    assert!(
                        response["headers"][name].is_object(),
                        "{method} {path} {status} lacks {name}"
                    );
                }
            }
        }
    }
    assert!(keyed > 20, "only {keyed} keyed operations");
    server.stop().await;
}

#[tokio::test]
async fn postgres_rate_limits_need_a_postgres_store() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let mut config = test_config(&db);
    config.auth.rate_limit_backend = Some(rdev_api::config::RateLimitBackend::Postgres);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let Err(error) = rdev_api::app::build(config, listener).await else {
        panic!("the server started");
    };
    assert!(
        error.to_string().contains("RDEV_RATE_LIMIT_BACKEND"),
        "{error}"
    );
}

// The port below HTTP: the same behaviour from both adapters, on a clock the test moves.

struct NoHeads;

impl AuditHeads for NoHeads {
    fn published(&self, _head: rdev_api::domain::audit::AuditHead) {}
}

/// Both limiters on `clock`; Postgres only when it answers (and always under CI=true).
async fn limiters(
    clock: &Arc<ManualClock>,
) -> (Vec<(&'static str, Arc<dyn RateLimiter>)>, Option<TestDb>) {
    let as_clock: Arc<dyn Clock> = clock.clone();
    let mut all: Vec<(&'static str, Arc<dyn RateLimiter>)> =
        vec![("memory", Arc::new(MemoryRateLimiter::new(as_clock.clone())))];
    let db = TestDb::new(Backend::Postgres).await;
    if let Some(db) = &db {
        let sealing = Arc::new(Sealing {
            key: AuditKey::new(b"rate limit test".to_vec()),
            heads: Arc::new(NoHeads),
        });
        let pg = PgDatabase::connect(&db.url, 8, sealing).await.unwrap();
        all.push(("postgres", Arc::new(pg.rate_limiter(Some(as_clock)))));
    }
    (all, db)
}

async fn hits(limiter: &dyn RateLimiter, key: ApiKeyId, rate: RateLimit, n: usize) -> usize {
    let mut admitted = 0;
    for _ in 0..n {
        admitted += usize::from(limiter.hit(key, rate).await.unwrap().admitted);
    }
    admitted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_limiters_slide_the_window_alike() {
    let clock = Arc::new(ManualClock::default());
    let (limiters, _db) = limiters(&clock).await;
    let rate = RateLimit::parse("10/3600s").unwrap();
    move_to_end_of_window(&clock, rate.window(), Duration::from_secs(2));
    let keys: Vec<ApiKeyId> = limiters.iter().map(|_| ApiKeyId::new()).collect();
    let mut seen = Vec::new();
    for step in [
        Duration::ZERO,
        Duration::from_secs(4),
        Duration::from_secs(1_978),
        Duration::from_secs(7_200),
    ] {
        clock.advance(step);
        let mut admitted = Vec::new();
        for ((name, limiter), key) in limiters.iter().zip(&keys) {
            admitted.push((*name, hits(limiter.as_ref(), *key, rate, 15).await));
        }
        seen.push(admitted);
    }
    for (name, _) in &limiters {
        let of = |step: usize| seen[step].iter().find(|(n, _)| n == name).unwrap().1;
        assert_eq!([of(0), of(1), of(2), of(3)], [10, 0, 5, 10], "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_decisions_admit_exactly_the_limit() {
    let clock = Arc::new(ManualClock::default());
    let (limiters, _db) = limiters(&clock).await;
    let rate = RateLimit::parse("40/3600s").unwrap();
    move_to_end_of_window(&clock, rate.window(), Duration::from_secs(600));
    for (name, limiter) in &limiters {
        let key = ApiKeyId::new();
        let decisions = join_all((0..120).map(|_| {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.hit(key, rate).await.unwrap() })
        }))
        .await;
        let admitted: Vec<_> = decisions
            .into_iter()
            .map(Result::unwrap)
            .filter(|d| d.admitted)
            .collect();
        assert_eq!(admitted.len(), 40, "{name}");
        let mut remaining: Vec<u64> = admitted.iter().map(|d| d.remaining).collect();
        remaining.sort_unstable();
        assert_eq!(
            remaining,
            (0..40).collect::<Vec<_>>(),
            "{name}: each count once"
        );
    }
}

#[tokio::test]
async fn a_changed_window_starts_a_fresh_count() {
    let clock = Arc::new(ManualClock::default());
    let (limiters, _db) = limiters(&clock).await;
    for (name, limiter) in &limiters {
        let key = ApiKeyId::new();
        let hourly = RateLimit::parse("3/1h").unwrap();
        assert_eq!(hits(limiter.as_ref(), key, hourly, 5).await, 3, "{name}");
        let per_minute = RateLimit::parse("3/1m").unwrap();
        assert_eq!(
            hits(limiter.as_ref(), key, per_minute, 5).await,
            3,
            "{name}"
        );
    }
}
