//! Operations endpoints of the real binary, as the high-memory runbook uses them.

mod support;

use reqwest::StatusCode;
use support::{ADMIN_KEY, Backend, ServerProcess, TestDb, problem};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heap_profile_is_served_to_loopback_and_to_admins() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let process = ServerProcess::start(&db, &[("RDEV_TRUSTED_PROXIES", "127.0.0.1/32")]).await;
    let server = &process.server;

    // `kubectl exec ... curl -o /tmp/heap.prof localhost:8080/debug/pprof/heap`: no key needed.
    let response = server
        .client
        .get(server.url("/debug/pprof/heap"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "application/octet-stream"
    );
    let profile = response.bytes().await.unwrap();
    assert_eq!(&profile[..2], &[0x1f, 0x8b], "a gzipped pprof protobuf");
    assert!(profile.len() > 100);

    // A client behind a trusted proxy is not on loopback: it needs an admin key.
    let remote = |key: Option<&str>| {
        let mut request = server
            .client
            .get(server.url("/debug/pprof/heap"))
            .header("X-Forwarded-For", "203.0.113.7");
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    problem(remote(None).await.unwrap(), StatusCode::UNAUTHORIZED).await;
    assert_eq!(
        remote(Some(ADMIN_KEY)).await.unwrap().status(),
        StatusCode::OK
    );

    // The runbook's metric greps.
    let metrics = server.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("rdev_sse_connections_active "))
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("rdev_commands_active "))
    );
    // Process metrics under the standard names dashboards and alerts read.
    for name in [
        "process_resident_memory_bytes ",
        "process_cpu_seconds_total ",
        "process_open_fds ",
        "process_start_time_seconds ",
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(name)),
            "{name}missing"
        );
    }
    assert!(!metrics.contains("rdev_process_"), "no prefixed copies");
}

/// Behind a service-mesh sidecar every request arrives from loopback: with
/// `RDEV_TRUST_LOOPBACK=false` the profiles want an admin key even there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_trusted_loopback_profiles_need_an_admin_key() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let process = ServerProcess::start(&db, &[("RDEV_TRUST_LOOPBACK", "false")]).await;
    let server = &process.server;
    for path in ["/debug/pprof/heap", "/debug/pprof/profile?seconds=1"] {
        let anonymous = server.client.get(server.url(path)).send().await.unwrap();
        problem(anonymous, StatusCode::UNAUTHORIZED).await;
        let admin = server
            .client
            .get(server.url(path))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(admin.status(), StatusCode::OK, "{path}");
    }
    // /metrics, /health and /ready stay open: the probes and the scraper hold no key.
    for path in ["/metrics", "/health", "/ready"] {
        let response = server.client.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
}
