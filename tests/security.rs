//! What a command can reach, tried as an attacker with an `execute` key would: the real binary,
//! a real command, and the server's secrets within reach of a careless executor.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use serde_json::json;
use support::{ADMIN_KEY, Backend, ServerProcess, TestDb, TestServer};

async fn run(server: &TestServer, project: &str, command: &str) -> (String, String) {
    let id = server.submit(project, json!({"command": command})).await;
    let done = server.wait_for(&id, None, Duration::from_secs(20)).await;
    let output = server
        .get(&format!("/api/v1/commands/{id}/output"), ADMIN_KEY)
        .await
        .text()
        .await
        .unwrap();
    (done["status"].as_str().unwrap().to_owned(), output)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_see_none_of_the_servers_variables() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    // A kubeconfig the server can load (nothing listens there; nothing here contacts it).
    let kubeconfig = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        kubeconfig.path(),
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'http://127.0.0.1:9'}\n\
         users:\n- name: u\n  user: {}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\n\
         current-context: x\n",
    )
    .unwrap();
    let process = ServerProcess::start(
        &db,
        &[
            ("OTEL_SERVICE_NAME", "rdev-secret-otel"),
            ("KUBECONFIG", kubeconfig.path().to_str().unwrap()),
            (
                "RDEV_STREAM_TOKEN_SECRET",
                "a-secret-the-command-must-not-see",
            ),
        ],
    )
    .await;
    let server = &process.server;
    let project = server
        .create_project("env", json!({"env": {"PROJECT_VAR": "p"}}))
        .await;
    let (status, output) = run(server, &project, "env").await;
    assert_eq!(status, "succeeded");
    let names: Vec<&str> = output
        .lines()
        .filter_map(|line| line.split_once('=').map(|(name, _)| name))
        .collect();
    for leaked in ["RDEV_", "DATABASE_URL", "OTEL_", "KUBECONFIG"] {
        assert!(
            !names.iter().any(|name| name.starts_with(leaked)),
            "{leaked} reached the command: {output}"
        );
    }
    assert!(
        !output.contains(ADMIN_KEY),
        "the admin key reached the command"
    );
    for expected in ["PATH", "HOME", "LANG", "TERM", "PROJECT_VAR"] {
        assert!(names.contains(&expected), "{expected} missing: {output}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_run_as_another_user_cannot_read_the_database_or_the_servers_environ() {
    // SAFETY: geteuid has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        support::skipped("switching users needs a root test runner");
        return;
    }
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let database = db.url.trim_start_matches("sqlite://").to_owned();
    let directory = std::path::Path::new(&database).parent().unwrap();
    // Open the directory to everyone: only the file's own mode may keep the command out.
    std::fs::set_permissions(directory, std::fs::Permissions::from_mode(0o755)).unwrap();
    let process = ServerProcess::start(&db, &[("RDEV_LOCAL_RUN_AS", "nobody")]).await;
    let server = &process.server;
    let project = server
        .create_project("jail", json!({"workdir": "/tmp"}))
        .await;
    let server_pid = process.child.id().unwrap();

    let (_, whoami) = run(server, &project, "id -u; id -G").await;
    assert_eq!(
        whoami, "65534\n65534\n",
        "nobody's uid and only its own group"
    );
    let mode = std::fs::metadata(&database).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the database file is the server's alone"
    );

    let (status, output) = run(server, &project, &format!("cat {database} | wc -c")).await;
    assert_eq!(status, "succeeded");
    assert!(output.contains("Permission denied"), "{output}");
    let (_, environ) = run(server, &project, &format!("cat /proc/{server_pid}/environ")).await;
    assert!(!environ.contains(ADMIN_KEY), "{environ}");
    assert!(environ.contains("Permission denied"), "{environ}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_methods_and_paths_add_no_metric_series() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    let series = |metrics: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with("rdev_http_requests_total{"))
            .count()
    };
    for n in 0..3 {
        let method = reqwest::Method::from_bytes(format!("PROBE{n}").as_bytes()).unwrap();
        server
            .client
            .request(method, server.url("/health"))
            .send()
            .await
            .unwrap();
        server.get(&format!("/no/such/path/{n}"), ADMIN_KEY).await;
    }
    server.metrics().await; // its own series, counted from the next scrape on
    let before = series(&server.metrics().await);
    for n in 3..50 {
        let method = reqwest::Method::from_bytes(format!("PROBE{n}").as_bytes()).unwrap();
        server
            .client
            .request(method, server.url("/health"))
            .send()
            .await
            .unwrap();
        server.get(&format!("/no/such/path/{n}"), ADMIN_KEY).await;
    }
    let metrics = server.metrics().await;
    assert_eq!(series(&metrics), before, "{metrics}");
    assert!(metrics.contains("method=\"other\""), "{metrics}");
    assert!(!metrics.contains("PROBE"), "{metrics}");
    assert!(!metrics.contains("/no/such/path"), "{metrics}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_replica_takes_effect_on_another_within_a_second() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    // A long cache TTL: only the change notice can explain a quick 401.
    let mut config = support::test_config(&db);
    config.cache_ttl = Duration::from_secs(600);
    let revoking = TestServer::start_with(config.clone()).await;
    let other = TestServer::start_with(config).await;
    let (id, secret) = revoking
        .create_key(json!({"name": "leaky", "scopes": ["read"]}))
        .await;
    assert_eq!(
        other.get("/api/v1/me", &secret).await.status(),
        200,
        "now cached on the other"
    );

    revoking
        .delete(&format!("/api/v1/api-keys/{id}"), ADMIN_KEY)
        .await;
    let revoked_at = std::time::Instant::now();
    loop {
        let status = other.get("/api/v1/me", &secret).await.status();
        if status == 401 {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "still {status} on the other replica after a second"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    revoking.stop().await;
    other.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_headers_and_limited_admins_are_refused() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let server = TestServer::start(&db).await;

    // Two credentials at once: ambiguous, so refused.
    let both = server
        .client
        .get(server.url("/api/v1/me"))
        .bearer_auth(ADMIN_KEY)
        .header("x-api-key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(both.status(), 400);

    // A request id that could forge log lines is replaced; a plain one is kept.
    let request_id = |id: &'static str| {
        let request = server
            .client
            .get(server.url("/health"))
            .header("x-request-id", id);
        async move { request.send().await.unwrap().headers()["x-request-id"].clone() }
    };
    assert_eq!(request_id("trace-42.a_b").await, "trace-42.a_b");
    let forged = request_id("x\" level=\"ERROR").await;
    assert_ne!(forged, "x\" level=\"ERROR");
    assert_eq!(forged.len(), 36, "a fresh UUID: {forged:?}");

    // Over loopback but relayed: not a local operator, so the heap profile wants a key.
    for header in ["forwarded", "x-real-ip", "x-forwarded-host"] {
        let relayed = server
            .client
            .get(server.url("/debug/pprof/heap"))
            .header(header, "for=203.0.113.9")
            .send()
            .await
            .unwrap();
        assert_eq!(relayed.status(), 401, "{header}");
    }

    // An admin key limited to one project cannot widen its reach with a new project.
    let project = server.create_project("mine", json!({})).await;
    let (_, limited) = server
        .create_key(json!({"name": "limited admin", "scopes": ["admin"], "project_ids": [project]}))
        .await;
    let created = server
        .post(
            "/api/v1/projects",
            &limited,
            json!({"name": "another", "workdir": "/tmp"}),
        )
        .await;
    assert_eq!(created.status(), 403);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_audit_tail_fails_verification_against_the_published_head() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    server.create_project("audited", json!({})).await;
    server.create_project("audited-too", json!({})).await;
    let metrics = server.metrics().await;
    let head_seq: i64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("rdev_audit_head_seq "))
        .expect("the head gauge is exported")
        .parse()
        .unwrap();
    let newest: serde_json::Value = server
        .get("/api/v1/audit?limit=1", ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(newest["items"][0]["seq"], head_seq);
    let key_file = format!("{}.audit-key", db.url.trim_start_matches("sqlite://"));
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the audit key stays beside the database, owner only"
    );

    db.execute(&format!("DELETE FROM audit_log WHERE seq = {head_seq}"))
        .await;
    let verify = |query: String| {
        let server = &server;
        async move {
            server
                .get(&format!("/api/v1/audit/verify{query}"), ADMIN_KEY)
                .await
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    assert_eq!(
        verify(String::new()).await["ok"],
        true,
        "alone, a cut chain still chains"
    );
    let against_head = verify(format!("?head_seq={head_seq}")).await;
    assert_eq!(against_head["ok"], false, "{against_head}");
    assert_eq!(against_head["first_broken_seq"], head_seq);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_keys_are_counted_by_reason() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    let (id, revoked) = server
        .create_key(json!({"name": "soon revoked", "scopes": ["read"]}))
        .await;
    server
        .delete(&format!("/api/v1/api-keys/{id}"), ADMIN_KEY)
        .await;
    for key in [
        "rdev_nosuchky_0123456789abcdefghijklmnopqrstuv",
        "not even a key",
        revoked.as_str(),
    ] {
        assert_eq!(server.get("/api/v1/me", key).await.status(), 401);
    }
    let anonymous = server
        .client
        .get(server.url("/api/v1/me"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let metrics = server.metrics().await;
    for (reason, count) in [("invalid", 2), ("revoked", 1), ("missing", 1)] {
        let line = format!("rdev_auth_failures_total{{reason=\"{reason}\"}} {count}");
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
    server.stop().await;
}
