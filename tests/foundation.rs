//! The foundation over HTTP, against both backends: API keys, client addresses, projects, the
//! audit chain, problem details and the operations endpoints.

mod support;

use std::sync::Arc;
use std::time::Duration;

use rdev_api::ports::Clock;
use rdev_api::ports::clock::ManualClock;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{ADMIN_KEY, Backend, TestDb, TestServer, problem, test_config};

both_backends!(
    api_key_lifecycle,
    scopes_limit_what_a_key_may_do,
    ip_allowlist_uses_the_socket_peer,
    forwarded_for_counts_only_from_trusted_proxies,
    project_crud_and_validation,
    keys_see_only_their_projects,
    audit_records_admin_actions_and_detects_tampering,
    bad_requests_are_problem_details,
    operations_endpoints,
    draining_fails_readiness_but_keeps_serving,
);

async fn api_key_lifecycle(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let clock = Arc::new(ManualClock::default());
    let server = TestServer::start_with_clock(test_config(&db), clock.clone()).await;

    let (id, secret) = server
        .create_key(json!({"name": "ci bot", "scopes": ["read"]}))
        .await;
    assert!(secret.starts_with("rdev_"));
    let me: Value = server
        .get("/api/v1/me", &secret)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(me["id"], id);
    assert_eq!(me["scopes"], json!(["read"]));
    assert!(me.get("secret").is_none() && me.get("secret_hash").is_none());

    // X-API-Key works as well as a bearer token.
    let via_header = server
        .client
        .get(server.url("/api/v1/me"))
        .header("X-API-Key", &secret)
        .send()
        .await
        .unwrap();
    assert_eq!(via_header.status(), StatusCode::OK);

    let listed: Value = server
        .get("/api/v1/api-keys", ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 2);

    let renamed: Value = server
        .patch(
            &format!("/api/v1/api-keys/{id}"),
            ADMIN_KEY,
            json!({"name": "renamed"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(renamed["name"], "renamed");

    // Rotation: the old secret stops at once, the new one works.
    let rotated: Value = server
        .post(
            &format!("/api/v1/api-keys/{id}/rotate"),
            ADMIN_KEY,
            json!({}),
        )
        .await
        .json()
        .await
        .unwrap();
    let new_secret = rotated["secret"].as_str().unwrap();
    assert_ne!(new_secret, secret);
    problem(
        server.get("/api/v1/me", &secret).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert_eq!(
        server.get("/api/v1/me", new_secret).await.status(),
        StatusCode::OK
    );

    // Revocation.
    let revoked: Value = server
        .delete(&format!("/api/v1/api-keys/{id}"), ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    assert!(revoked["revoked_at"].is_string());
    let body = problem(
        server.get("/api/v1/me", new_secret).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert!(body["detail"].as_str().unwrap().contains("revoked"));

    // Expiry.
    let soon = clock.now() + time::Duration::seconds(60);
    let (_, short_lived) = server
        .create_key(json!({
            "name": "short",
            "scopes": ["read"],
            "expires_at": soon.format(&time::format_description::well_known::Rfc3339).unwrap(),
        }))
        .await;
    assert_eq!(
        server.get("/api/v1/me", &short_lived).await.status(),
        StatusCode::OK
    );
    clock.advance(Duration::from_secs(61));
    let body = problem(
        server.get("/api/v1/me", &short_lived).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert!(body["detail"].as_str().unwrap().contains("expired"));

    // Missing, malformed and unknown keys.
    let anonymous = server
        .client
        .get(server.url("/api/v1/me"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
    problem(anonymous, StatusCode::UNAUTHORIZED).await;
    problem(
        server.get("/api/v1/me", "not-a-key").await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    problem(
        server
            .get(
                "/api/v1/me",
                "rdev_zzzzzzzz_0123456789abcdefghijklmnopqrstuv",
            )
            .await,
        StatusCode::UNAUTHORIZED,
    )
    .await;

    // last_used_at is written in batches, at the latest on shutdown.
    server.stop().await;
    let server = TestServer::start(&db).await;
    let listed: Value = server
        .get("/api/v1/api-keys", ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    let used = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id)
        .unwrap();
    assert!(used["last_used_at"].is_string(), "{used}");
    server.stop().await;
}

async fn scopes_limit_what_a_key_may_do(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    let (_, reader) = server
        .create_key(json!({"name": "reader", "scopes": ["read"]}))
        .await;
    let (_, executor) = server
        .create_key(json!({"name": "runner", "scopes": ["execute"]}))
        .await;
    let project = server.create_project("scoped", json!({})).await;

    problem(
        server
            .post(
                "/api/v1/api-keys",
                &executor,
                json!({"name": "x", "scopes": ["admin"]}),
            )
            .await,
        StatusCode::FORBIDDEN,
    )
    .await;
    problem(
        server
            .post(
                "/api/v1/projects",
                &reader,
                json!({"name": "nope", "workdir": "/tmp"}),
            )
            .await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_eq!(
        server.get("/api/v1/projects", &reader).await.status(),
        StatusCode::OK
    );
    problem(
        server
            .post(
                &format!("/api/v1/projects/{project}/commands"),
                &reader,
                json!({"command": "true"}),
            )
            .await,
        StatusCode::FORBIDDEN,
    )
    .await;
    let submitted = server
        .post(
            &format!("/api/v1/projects/{project}/commands"),
            &executor,
            json!({"command": "true"}),
        )
        .await;
    assert_eq!(submitted.status(), StatusCode::ACCEPTED);
    problem(
        server.get("/api/v1/audit", &executor).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    // An admin limited to some projects cannot mint keys or read the whole audit log.
    let (_, limited_admin) = server
        .create_key(json!({"name": "limited", "scopes": ["admin"], "project_ids": [project]}))
        .await;
    problem(
        server
            .post(
                "/api/v1/api-keys",
                &limited_admin,
                json!({"name": "wide", "scopes": ["admin"]}),
            )
            .await,
        StatusCode::FORBIDDEN,
    )
    .await;
    problem(
        server.get("/api/v1/audit", &limited_admin).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    server.stop().await;
}

async fn ip_allowlist_uses_the_socket_peer(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    let (_, inside) = server
        .create_key(json!({"name": "inside", "scopes": ["read"], "allowed_ips": ["127.0.0.0/8"]}))
        .await;
    let (_, outside) = server
        .create_key(json!({"name": "outside", "scopes": ["read"], "allowed_ips": ["10.0.0.0/8", "192.168.7.7"]}))
        .await;
    assert_eq!(
        server.get("/api/v1/me", &inside).await.status(),
        StatusCode::OK
    );
    problem(
        server.get("/api/v1/me", &outside).await,
        StatusCode::FORBIDDEN,
    )
    .await;

    // A client claiming to be inside the allowlist through X-Forwarded-For is not believed:
    // no proxy is trusted, so the socket peer (127.0.0.1) counts.
    let spoofed = server
        .client
        .get(server.url("/api/v1/me"))
        .bearer_auth(&outside)
        .header("X-Forwarded-For", "10.1.2.3")
        .send()
        .await
        .unwrap();
    problem(spoofed, StatusCode::FORBIDDEN).await;
    let me: Value = server
        .client
        .get(server.url("/api/v1/me"))
        .bearer_auth(&inside)
        .header("X-Forwarded-For", "10.1.2.3")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["client_ip"], "127.0.0.1");
    server.stop().await;
}

async fn forwarded_for_counts_only_from_trusted_proxies(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let mut config = test_config(&db);
    config.http.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    let server = TestServer::start_with(config).await;
    let (_, office) = server
        .create_key(json!({"name": "office", "scopes": ["read"], "allowed_ips": ["10.0.0.0/8"]}))
        .await;
    let via = |xff: &'static str| {
        server
            .client
            .get(server.url("/api/v1/me"))
            .bearer_auth(&office)
            .header("X-Forwarded-For", xff)
            .send()
    };
    let response = via("10.1.2.3").await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.json::<Value>().await.unwrap()["client_ip"],
        "10.1.2.3"
    );
    // The right-most untrusted hop is the client, whatever the client wrote to the left.
    problem(
        via("10.1.2.3, 203.0.113.9").await.unwrap(),
        StatusCode::FORBIDDEN,
    )
    .await;
    problem(
        server.get("/api/v1/me", &office).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    server.stop().await;
}

async fn project_crud_and_validation(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    // Kube projects are accepted only where a Kubernetes API is configured (writing one does
    // not call it).
    let fake = fake_kube::FakeKube::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&db);
    config.kube.kubeconfig = vec![fake.write_kubeconfig(dir.path())];
    // Both executors (RDEV_EXECUTORS=kube,local): the project moves from one to the other.
    // (RDEV_EXECUTOR=local: projects naming none stay local, as before the setting existed.)
    config.execution.executors =
        Some(rdev_api::domain::project::EnabledExecutors::parse("kube,local").unwrap());
    config.execution.executor = Some(rdev_api::domain::project::ExecutorKind::Local);
    let server = TestServer::start_with(config).await;
    let created = server
        .post(
            "/api/v1/projects",
            ADMIN_KEY,
            json!({
                "name": "web-app",
                "description": "the web app",
                "target": {"namespace": "dev", "pod": "web-0", "container": "app"},
                "workdir": "/srv/app",
                "env": {"RUST_LOG": "debug"},
                "max_concurrency": 2,
                "default_timeout_secs": 120,
                "executor": "kube"
            }),
        )
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let project: Value = created.json().await.unwrap();
    let id = project["id"].as_str().unwrap();
    assert_eq!(project["target"]["pod"], "web-0");
    assert_eq!(project["env"]["RUST_LOG"], "debug");

    let fetched: Value = server
        .get(&format!("/api/v1/projects/{id}"), ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(fetched, project);

    // A duplicate name conflicts.
    let duplicate = server
        .post(
            "/api/v1/projects",
            ADMIN_KEY,
            json!({"name": "web-app", "workdir": "/tmp"}),
        )
        .await;
    let body = problem(duplicate, StatusCode::CONFLICT).await;
    assert_eq!(body["type"], "urn:rdev:problem:already-exists");

    // Every bad field is reported, each with its pointer.
    let invalid = server
        .post(
            "/api/v1/projects",
            ADMIN_KEY,
            json!({
                "name": "Bad_Name",
                "workdir": "/srv/../etc",
                "env": {"1BAD": "x"},
                "max_concurrency": 0,
                "executor": "docker",
                "target": {"namespace": "Dev", "pod": "p", "selector": "app=x"}
            }),
        )
        .await;
    let body = problem(invalid, StatusCode::UNPROCESSABLE_ENTITY).await;
    let pointers: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pointer"].as_str().unwrap())
        .collect();
    for expected in [
        "/name",
        "/workdir",
        "/env/1BAD",
        "/max_concurrency",
        "/executor",
        "/target/namespace",
        "/target",
    ] {
        assert!(
            pointers.contains(&expected),
            "{expected} missing from {pointers:?}"
        );
    }
    // A kube project needs a target.
    let no_target = server
        .post(
            "/api/v1/projects",
            ADMIN_KEY,
            json!({"name": "k", "workdir": "/", "executor": "kube"}),
        )
        .await;
    let body = problem(no_target, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(body["errors"][0]["pointer"], "/target");

    // Update, including removing a field with null.
    let updated: Value = server
        .patch(
            &format!("/api/v1/projects/{id}"),
            ADMIN_KEY,
            json!({"description": "changed", "target": null, "executor": "local", "max_concurrency": 3}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(updated["description"], "changed");
    assert_eq!(updated["target"], Value::Null);
    assert_eq!(updated["max_concurrency"], 3);
    assert_eq!(updated["workdir"], "/srv/app");
    problem(
        server
            .patch(
                &format!("/api/v1/projects/{id}"),
                ADMIN_KEY,
                json!({"workdir": "relative"}),
            )
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;

    let listed: Value = server
        .get("/api/v1/projects", ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);

    assert_eq!(
        server
            .delete(&format!("/api/v1/projects/{id}"), ADMIN_KEY)
            .await
            .status(),
        StatusCode::NO_CONTENT
    );
    problem(
        server
            .get(&format!("/api/v1/projects/{id}"), ADMIN_KEY)
            .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    problem(
        server
            .delete(&format!("/api/v1/projects/{id}"), ADMIN_KEY)
            .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    server.stop().await;
}

async fn keys_see_only_their_projects(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    let mine = server.create_project("mine", json!({})).await;
    let theirs = server.create_project("theirs", json!({})).await;
    let (_, key) = server
        .create_key(json!({"name": "scoped", "scopes": ["execute"], "project_ids": [mine]}))
        .await;
    let listed: Value = server
        .get("/api/v1/projects", &key)
        .await
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["mine"]);
    // Outside its projects a resource answers 404, not 403.
    problem(
        server
            .get(&format!("/api/v1/projects/{theirs}"), &key)
            .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let foreign_command = server.submit(&theirs, json!({"command": "true"})).await;
    problem(
        server
            .get(&format!("/api/v1/commands/{foreign_command}"), &key)
            .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    problem(
        server
            .post(
                &format!("/api/v1/projects/{theirs}/commands"),
                &key,
                json!({"command": "true"}),
            )
            .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let commands: Value = server
        .get("/api/v1/commands", &key)
        .await
        .json()
        .await
        .unwrap();
    assert!(commands["items"].as_array().unwrap().is_empty());
    server.stop().await;
}

async fn audit_records_admin_actions_and_detects_tampering(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    let (key_id, _) = server
        .create_key(json!({"name": "audited", "scopes": ["read"]}))
        .await;
    server
        .post(
            &format!("/api/v1/api-keys/{key_id}/rotate"),
            ADMIN_KEY,
            json!({}),
        )
        .await;
    server
        .delete(&format!("/api/v1/api-keys/{key_id}"), ADMIN_KEY)
        .await;
    let project = server.create_project("audited", json!({})).await;
    server
        .patch(
            &format!("/api/v1/projects/{project}"),
            ADMIN_KEY,
            json!({"description": "x"}),
        )
        .await;
    server
        .delete(&format!("/api/v1/projects/{project}"), ADMIN_KEY)
        .await;

    let page: Value = server
        .get("/api/v1/audit?limit=100", ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    let actions: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "project.deleted",
            "project.updated",
            "project.created",
            "api_key.revoked",
            "api_key.rotated",
            "api_key.created",
            "api_key.created"
        ]
    );
    let newest = &page["items"][0];
    assert_eq!(newest["target_id"], project);
    assert_eq!(newest["client_ip"], "127.0.0.1");
    assert!(newest["request_id"].is_string());
    assert!(newest["actor_key_id"].is_string());

    // Filters and cursor pagination.
    let filtered: Value = server
        .get("/api/v1/audit?action=api_key.created", ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(filtered["items"].as_array().unwrap().len(), 2);
    let first: Value = server
        .get("/api/v1/audit?limit=3", ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    let cursor = first["next_cursor"].as_str().unwrap();
    let second: Value = server
        .get(&format!("/api/v1/audit?limit=3&cursor={cursor}"), ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(second["items"][0]["action"], "api_key.revoked");

    let verified: Value = server
        .get("/api/v1/audit/verify", ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(verified["checked"], 7);

    // Edit one row behind the server's back.
    db.execute("UPDATE audit_log SET details = '{\"name\":\"forged\"}' WHERE seq = 4")
        .await;
    let verified: Value = server
        .get("/api/v1/audit/verify", ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(verified["ok"], false);
    assert_eq!(verified["first_broken_seq"], 4);
    server.stop().await;
}

async fn bad_requests_are_problem_details(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    let post_raw = |body: &'static str, content_type: &'static str| {
        server
            .client
            .post(server.url("/api/v1/projects"))
            .bearer_auth(ADMIN_KEY)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    problem(
        post_raw("{\"name\": ", "application/json").await.unwrap(),
        StatusCode::BAD_REQUEST,
    )
    .await;
    problem(
        post_raw("{}", "text/plain").await.unwrap(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
    )
    .await;
    let missing = problem(
        post_raw("{}", "application/json").await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(
        missing["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("missing field")
    );
    let unknown = problem(
        post_raw(
            r#"{"name":"a","workdir":"/","colour":"red"}"#,
            "application/json",
        )
        .await
        .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(
        unknown["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("colour")
    );
    let wrong_type = problem(
        post_raw(
            r#"{"name":"a","workdir":"/","max_concurrency":"many"}"#,
            "application/json",
        )
        .await
        .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(wrong_type["errors"][0]["pointer"], "/max_concurrency");

    let huge = format!(
        r#"{{"name":"a","workdir":"/","description":"{}"}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    // Its own connection: the server answers 413 without reading the body and closes it.
    let too_large = reqwest::Client::new()
        .post(server.url("/api/v1/projects"))
        .bearer_auth(ADMIN_KEY)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    problem(too_large, StatusCode::PAYLOAD_TOO_LARGE).await;

    problem(
        server.get("/api/v1/projects/not-a-uuid", ADMIN_KEY).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    problem(
        server.get("/api/v1/commands/123", ADMIN_KEY).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    problem(
        server.get("/api/v1/nothing-here", ADMIN_KEY).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    problem(
        server.get("/api/v1/commands?limit=lots", ADMIN_KEY).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    let bad_status = problem(
        server
            .get("/api/v1/commands?status=sleeping", ADMIN_KEY)
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(bad_status["errors"][0]["pointer"], "status");
    let bad_stream = problem(
        server
            .get(
                &format!("/api/v1/commands/{}/output?stream=both", uuid::Uuid::nil()),
                ADMIN_KEY,
            )
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(bad_stream["errors"][0]["pointer"], "stream");
    let long_action = problem(
        server
            .get(
                &format!("/api/v1/audit?action={}", "a".repeat(201)),
                ADMIN_KEY,
            )
            .await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(long_action["type"], "urn:rdev:problem:bad-parameter");
    assert!(
        long_action["detail"]
            .as_str()
            .unwrap()
            .contains("at most 200 characters"),
        "{long_action}"
    );
    problem(
        server.get("/api/v1/audit?target_id=a%00b", ADMIN_KEY).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    let wrong_method = server
        .client
        .put(server.url("/api/v1/projects"))
        .send()
        .await
        .unwrap();
    problem(wrong_method, StatusCode::METHOD_NOT_ALLOWED).await;
    server.stop().await;
}

async fn operations_endpoints(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    let health = server
        .client
        .get(server.url("/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let ready = server
        .client
        .get(server.url("/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    let openapi = server.openapi().await;
    assert!(openapi["openapi"].as_str().unwrap().starts_with("3."));
    let types = &openapi["components"]["schemas"]["Problem"]["properties"]["type"]["enum"];
    for kind in [
        "validation",
        "already-exists",
        "project-busy",
        "already-ended",
        "idempotency-mismatch",
    ] {
        let uri = format!("urn:rdev:problem:{kind}");
        assert!(
            types
                .as_array()
                .is_some_and(|t| t.contains(&uri.clone().into())),
            "{uri} missing from the Problem schema: {types}"
        );
    }
    for path in [
        "/api/v1/projects",
        "/api/v1/api-keys/{id}/rotate",
        "/api/v1/commands/{id}/events",
        "/api/v1/audit/verify",
    ] {
        assert!(
            openapi["paths"].get(path).is_some(),
            "{path} missing from the OpenAPI document"
        );
    }

    server.get("/api/v1/me", ADMIN_KEY).await;
    let metrics = server.metrics().await;
    for name in [
        "rdev_http_requests_total",
        "rdev_sse_connections_active",
        "rdev_commands_active",
        "rdev_commands_queued",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    assert!(metrics.contains(r#"route="/api/v1/me""#));
    server.stop().await;
}

async fn draining_fails_readiness_but_keeps_serving(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let mut config = test_config(&db);
    config.http.drain_delay_secs = 2;
    let server = TestServer::start_with(config).await;
    server.begin_drain();
    let ready = server
        .client
        .get(server.url("/ready"))
        .send()
        .await
        .unwrap();
    let body = problem(ready, StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(body["detail"].as_str().unwrap().contains("draining"));
    assert_eq!(
        server.get("/api/v1/me", ADMIN_KEY).await.status(),
        StatusCode::OK
    );
    let client = reqwest::Client::new();
    let health = server.url("/health");
    tokio::time::timeout(Duration::from_secs(20), server.stopped())
        .await
        .expect("the server stops after the drain delay");
    assert!(
        client.get(health).send().await.is_err(),
        "the listener is closed"
    );
}
