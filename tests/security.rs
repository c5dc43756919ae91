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
            ("RDEV_EXECUTORS", "kube,local"),
            ("RDEV_EXECUTOR", "local"),
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

/// Without `RDEV_LOCAL_RUN_AS` a local command is the server's own user. The server is not
/// dumpable, so even so its environment (database URL, bootstrap and audit keys) and memory
/// stay closed to the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_of_the_servers_own_user_cannot_read_the_servers_environ() {
    const NOBODY: u32 = 65534;
    // SAFETY: geteuid has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        support::skipped("starting the server as another user needs a root test runner");
        return;
    }
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let database = db.url.trim_start_matches("sqlite://").to_owned();
    let directory = std::path::Path::new(&database).parent().unwrap();
    std::os::unix::fs::chown(directory, Some(NOBODY), Some(NOBODY)).unwrap();
    let process = ServerProcess::start_configured(&db, &[], |command| {
        command.uid(NOBODY).gid(NOBODY);
    })
    .await;
    let server = &process.server;
    let project = server
        .create_project("same-user", json!({"workdir": "/tmp"}))
        .await;
    let server_pid = process.child.id().unwrap();

    let (_, whoami) = run(server, &project, "id -u").await;
    assert_eq!(
        whoami,
        format!("{NOBODY}\n"),
        "the command is the server's own user"
    );
    for file in ["environ", "mem", "fd/0"] {
        let (_, output) = run(
            server,
            &project,
            &format!("head -c 4096 /proc/{server_pid}/{file}"),
        )
        .await;
        assert!(!output.contains(ADMIN_KEY), "{file}: {output}");
        assert!(output.contains("Permission denied"), "{file}: {output}");
    }
    let warned = process.logs.lock().unwrap().iter().any(|line| {
        line.contains("without RDEV_LOCAL_RUN_AS") && line.contains("this server's own user")
    });
    assert!(warned, "the start-up log tells the operator");
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
    config.auth.cache_ttl = Duration::from_secs(600);
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

    // A traceparent reaches the audit row only when it is well formed.
    for (traceparent, expected) in [
        (
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            json!("4bf92f3577b34da6a3ce929d0e0e4736"),
        ),
        (
            "00-\"forged\"level=ERROR\"xxxxxxxxxxxxx-00f067aa0ba902b7-01",
            json!(null),
        ),
    ] {
        let created = server
            .client
            .post(server.url("/api/v1/projects"))
            .bearer_auth(ADMIN_KEY)
            .header("traceparent", traceparent)
            .json(&json!({"name": format!("traced-{}", expected.is_null()), "workdir": "/tmp"}))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 201);
        let audited = audit_rows(&server, "project.created").await;
        assert_eq!(audited[0]["trace_id"], expected, "{traceparent}");
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

async fn audit_rows(server: &TestServer, action: &str) -> Vec<serde_json::Value> {
    let page: serde_json::Value = server
        .get(&format!("/api/v1/audit?action={action}"), ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    page["items"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_keys_are_audited_once_per_client_and_prefix() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    let guessed = "rdev_guessing_0123456789abcdefghijklmnopqrstuv";
    for _ in 0..25 {
        assert_eq!(server.get("/api/v1/me", guessed).await.status(), 401);
    }
    for _ in 0..3 {
        assert_eq!(
            server.get("/api/v1/me", "a pasted password").await.status(),
            401
        );
    }
    // The tally is written once a minute and at shutdown.
    server.stop().await;

    let server = TestServer::start(&db).await;
    let rows = audit_rows(&server, "auth.failed").await;
    assert_eq!(rows.len(), 2, "one row per client and prefix: {rows:#?}");
    let by_prefix = |prefix: &str| {
        rows.iter()
            .find(|row| row["details"]["key_prefix"] == prefix)
            .unwrap_or_else(|| panic!("a row for {prefix}: {rows:#?}"))
    };
    let guesses = by_prefix("guessing");
    assert_eq!(guesses["details"]["count"], 25);
    assert_eq!(guesses["details"]["reasons"], json!({"invalid": 25}));
    assert_eq!(guesses["outcome"], "denied");
    assert_eq!(guesses["client_ip"], "127.0.0.1");
    assert_eq!(by_prefix("?")["details"]["count"], 3);
    let text = serde_json::to_string(&rows).unwrap();
    assert!(!text.contains("0123456789abcdef") && !text.contains("pasted"));
    let verify: serde_json::Value = server
        .get("/api/v1/audit/verify", ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(verify["ok"], true, "{verify}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_audit_every_changed_field_and_env_by_name_only() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    let project = server
        .create_project(
            "changing",
            json!({"env": {"KEEP": "1", "ROTATE": "old-secret"}}),
        )
        .await;
    let patched = server
        .patch(
            &format!("/api/v1/projects/{project}"),
            ADMIN_KEY,
            json!({
                "description": "now described",
                "max_concurrency": 3,
                "env": {"KEEP": "1", "ROTATE": "new-secret", "ADDED": "x"},
            }),
        )
        .await;
    assert_eq!(patched.status(), 200);
    let rows = audit_rows(&server, "project.updated").await;
    assert_eq!(
        rows[0]["details"]["changed"],
        json!({
            "description": "now described",
            "max_concurrency": 3,
            "env": {"set": ["ADDED", "ROTATE"], "removed": []},
        })
    );
    assert!(!serde_json::to_string(&rows).unwrap().contains("secret"));

    let (key, _) = server
        .create_key(json!({"name": "narrow", "scopes": ["read"]}))
        .await;
    let patched = server
        .patch(
            &format!("/api/v1/api-keys/{key}"),
            ADMIN_KEY,
            json!({"scopes": ["read", "execute"], "project_ids": [project], "allowed_ips": ["10.0.0.0/8"]}),
        )
        .await;
    assert_eq!(patched.status(), 200);
    let rows = audit_rows(&server, "api_key.updated").await;
    assert_eq!(
        rows[0]["details"]["changed"],
        json!({
            "scopes": "read,execute",
            "project_ids": [project],
            "allowed_ips": ["10.0.0.0/8"],
        })
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_values_are_shown_to_admin_keys_only() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    let project = server
        .create_project("private", json!({"env": {"TOKEN": "project-secret"}}))
        .await;
    let (_, executor) = server
        .create_key(json!({"name": "runner", "scopes": ["read", "execute"]}))
        .await;
    let submitted = server
        .post(
            &format!("/api/v1/projects/{project}/commands"),
            &executor,
            json!({"command": "true", "env": {"PASSWORD": "command-secret"}}),
        )
        .await;
    assert_eq!(submitted.status(), 202);
    let submitted: serde_json::Value = submitted.json().await.unwrap();
    let command = submitted["id"].as_str().unwrap().to_owned();
    assert_eq!(submitted["env"], json!({"PASSWORD": null}));

    let read = |path: String, key: String| {
        let server = &server;
        async move {
            let response = server.get(&path, &key).await;
            assert_eq!(response.status(), 200, "{path}");
            response.text().await.unwrap()
        }
    };
    for path in [
        format!("/api/v1/projects/{project}"),
        "/api/v1/projects".to_owned(),
        format!("/api/v1/commands/{command}"),
        "/api/v1/commands".to_owned(),
    ] {
        let seen = read(path.clone(), executor.clone()).await;
        assert!(!seen.contains("secret"), "{path}: {seen}");
        assert!(
            seen.contains("\"TOKEN\":null") || seen.contains("\"PASSWORD\":null"),
            "{path}: {seen}"
        );
        let admin = read(path.clone(), ADMIN_KEY.to_owned()).await;
        assert!(admin.contains("-secret"), "{path}: {admin}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_naming_another_projects_command_answers_like_a_random_one() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let Some(db) = TestDb::new(backend).await else {
            continue;
        };
        let server = TestServer::start(&db).await;
        let mine = server.create_project("mine", json!({})).await;
        let theirs = server.create_project("theirs", json!({})).await;
        for _ in 0..2 {
            server.submit(&mine, json!({"command": "true"})).await;
        }
        let foreign = server.submit(&theirs, json!({"command": "true"})).await;
        let (_, limited) = server
            .create_key(json!({"name": "mine only", "scopes": ["read"], "project_ids": [mine]}))
            .await;
        let page = |cursor: String| {
            let (server, limited) = (&server, &limited);
            async move {
                let response = server
                    .get(&format!("/api/v1/commands?cursor={cursor}"), limited)
                    .await;
                (response.status(), response.text().await.unwrap())
            }
        };
        let random = page(uuid::Uuid::new_v4().to_string()).await;
        assert_eq!(page(foreign).await, random, "{backend:?}");
        server.stop().await;
    }
}

/// One request a key limited to one project makes, and what it must get.
struct Attempt {
    method: reqwest::Method,
    /// The route as `/openapi.json` names it.
    route: &'static str,
    path: String,
    body: Option<serde_json::Value>,
    expected: u16,
}

fn attempt(
    method: reqwest::Method,
    route: &'static str,
    path: String,
    body: Option<serde_json::Value>,
    expected: u16,
) -> Attempt {
    Attempt {
        method,
        route,
        path,
        body,
        expected,
    }
}

/// What reaches outside a project: every project's executor and pod, every key's powers, every
/// webhook's destination. Read by the unrestricted admin.
async fn reach(server: &TestServer) -> serde_json::Value {
    let list = |path: &'static str| async move {
        let response = server.get(path, ADMIN_KEY).await;
        assert_eq!(response.status(), 200, "{path}");
        response.json::<serde_json::Value>().await.unwrap()
    };
    let projects: Vec<_> = items(&list("/api/v1/projects").await)
        .into_iter()
        .map(|p| json!([p["id"], p["executor"], p["target"], p["workdir"]]))
        .collect();
    let keys: Vec<_> = items(&list("/api/v1/api-keys").await)
        .into_iter()
        .map(|k| {
            json!([
                k["id"],
                k["scopes"],
                k["project_ids"],
                k["allowed_ips"],
                k["revoked_at"]
            ])
        })
        .collect();
    let webhooks: Vec<_> = items(&list("/api/v1/webhooks").await)
        .into_iter()
        .map(|w| {
            json!([
                w["id"],
                w["url"],
                w["project_id"],
                w["events"],
                w["enabled"]
            ])
        })
        .collect();
    json!({"projects": projects, "keys": keys, "webhooks": webhooks})
}

/// Every route that changes something, walked with an admin key limited to one project: what
/// would widen its reach (another executor or pod, another project, keys, webhooks) is refused,
/// and afterwards nothing outside its project is different. A new route that changes something
/// fails this test until it is added to the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_admin_cannot_widen_its_reach_through_any_route() {
    use reqwest::Method;
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let fake = fake_kube::FakeKube::start().await;
    fake.add_pod(fake_kube::PodSpec::running("team-p", "p-0"));
    fake.add_pod(fake_kube::PodSpec::running("team-q", "q-0"));
    let dir = tempfile::tempdir().unwrap();
    let mut config = support::test_config(&db);
    config.kube.kubeconfig = vec![fake.write_kubeconfig(dir.path())];
    // Both executors on, so that a refusal below is the key's, not the server's.
    config.execution.executors =
        Some(rdev_api::domain::project::EnabledExecutors::parse("kube,local").unwrap());
    config.webhooks.webhook_allow_private = true;
    let server = TestServer::start_with(config).await;
    let kube_project = |name: &str, namespace: &str, pod: &str| {
        json!({"name": name, "workdir": "/", "executor": "kube",
               "target": {"namespace": namespace, "pod": pod}})
    };
    let create = |body: serde_json::Value| {
        let server = &server;
        async move {
            let response = server.post("/api/v1/projects", ADMIN_KEY, body).await;
            assert_eq!(response.status(), 201);
            response.json::<serde_json::Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let own = create(kube_project("own", "team-p", "p-0")).await;
    let other = create(kube_project("other", "team-q", "q-0")).await;
    let (limited_id, limited) = server
        .create_key(
            json!({"name": "limited-admin", "scopes": ["read", "execute", "admin"],
                           "project_ids": [own]}),
        )
        .await;
    let (bystander, _) = server
        .create_key(json!({"name": "bystander", "scopes": ["read"]}))
        .await;
    let other_command = server.submit(&other, json!({"command": "sleep 30"})).await;
    let own_command = server.submit(&own, json!({"command": "sleep 30"})).await;
    let webhook = server
        .post(
            "/api/v1/webhooks",
            ADMIN_KEY,
            json!({"url": "http://127.0.0.1:9/hook", "events": ["command.succeeded"], "project_id": other}),
        )
        .await;
    assert_eq!(webhook.status(), 201);
    let webhook = webhook.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let nil = uuid::Uuid::nil();
    let before = reach(&server).await;

    let (post, patch, delete) = (Method::POST, Method::PATCH, Method::DELETE);
    let table = vec![
        // Projects: a new one, another executor or pod, another project.
        attempt(
            post.clone(),
            "/api/v1/projects",
            "/api/v1/projects".into(),
            Some(json!({"name": "mine", "workdir": "/tmp", "executor": "local"})),
            403,
        ),
        attempt(
            patch.clone(),
            "/api/v1/projects/{id}",
            format!("/api/v1/projects/{own}"),
            Some(json!({"executor": "local", "workdir": "/tmp"})),
            403,
        ),
        attempt(
            patch.clone(),
            "/api/v1/projects/{id}",
            format!("/api/v1/projects/{own}"),
            Some(json!({"target": {"namespace": "team-q", "pod": "q-0"}})),
            403,
        ),
        attempt(
            patch.clone(),
            "/api/v1/projects/{id}",
            format!("/api/v1/projects/{own}"),
            Some(json!({"target": {"namespace": "team-p", "selector": "app=anything"}})),
            403,
        ),
        attempt(
            patch.clone(),
            "/api/v1/projects/{id}",
            format!("/api/v1/projects/{own}"),
            Some(json!({"target": null})),
            403,
        ),
        attempt(
            patch.clone(),
            "/api/v1/projects/{id}",
            format!("/api/v1/projects/{other}"),
            Some(json!({"description": "mine now"})),
            404,
        ),
        attempt(
            delete.clone(),
            "/api/v1/projects/{id}",
            format!("/api/v1/projects/{other}"),
            None,
            404,
        ),
        // Within its own project, every other field stays its to change.
        attempt(
            patch.clone(),
            "/api/v1/projects/{id}",
            format!("/api/v1/projects/{own}"),
            Some(json!({"description": "still mine", "max_concurrency": 2,
                        "env": {"A": "b"}, "target": {"namespace": "team-p", "pod": "p-0"}})),
            200,
        ),
        // Pods and commands of another project.
        attempt(
            post.clone(),
            "/api/v1/projects/{id}/pod/restart",
            format!("/api/v1/projects/{other}/pod/restart"),
            None,
            404,
        ),
        attempt(
            post.clone(),
            "/api/v1/projects/{id}/commands",
            format!("/api/v1/projects/{other}/commands"),
            Some(json!({"command": "id"})),
            404,
        ),
        attempt(
            post.clone(),
            "/api/v1/commands/{id}/cancel",
            format!("/api/v1/commands/{other_command}/cancel"),
            None,
            404,
        ),
        attempt(
            post.clone(),
            "/api/v1/commands/{id}/stream-token",
            format!("/api/v1/commands/{other_command}/stream-token"),
            None,
            404,
        ),
        attempt(
            post.clone(),
            "/api/v1/projects/{id}/commands",
            format!("/api/v1/projects/{own}/commands"),
            Some(json!({"command": "id"})),
            202,
        ),
        attempt(
            post.clone(),
            "/api/v1/commands/{id}/stream-token",
            format!("/api/v1/commands/{own_command}/stream-token"),
            None,
            200,
        ),
        attempt(
            post.clone(),
            "/api/v1/commands/{id}/cancel",
            format!("/api/v1/commands/{own_command}/cancel"),
            None,
            202,
        ),
        // Keys: none minted, none widened, its own included.
        attempt(
            post.clone(),
            "/api/v1/api-keys",
            "/api/v1/api-keys".into(),
            Some(json!({"name": "wider", "scopes": ["admin"]})),
            403,
        ),
        attempt(
            patch.clone(),
            "/api/v1/api-keys/{id}",
            format!("/api/v1/api-keys/{limited_id}"),
            Some(json!({"project_ids": []})),
            403,
        ),
        attempt(
            patch.clone(),
            "/api/v1/api-keys/{id}",
            format!("/api/v1/api-keys/{bystander}"),
            Some(json!({"scopes": ["admin"]})),
            403,
        ),
        attempt(
            post.clone(),
            "/api/v1/api-keys/{id}/rotate",
            format!("/api/v1/api-keys/{bystander}/rotate"),
            None,
            403,
        ),
        attempt(
            delete.clone(),
            "/api/v1/api-keys/{id}",
            format!("/api/v1/api-keys/{bystander}"),
            None,
            403,
        ),
        // Webhooks: none created or pointed elsewhere, none of another project's touched.
        attempt(
            post.clone(),
            "/api/v1/webhooks",
            "/api/v1/webhooks".into(),
            Some(json!({"url": "http://127.0.0.1:9/mine", "events": ["command.succeeded"]})),
            403,
        ),
        attempt(
            patch.clone(),
            "/api/v1/webhooks/{id}",
            format!("/api/v1/webhooks/{webhook}"),
            Some(json!({"url": "http://127.0.0.1:9/mine"})),
            403,
        ),
        attempt(
            delete.clone(),
            "/api/v1/webhooks/{id}",
            format!("/api/v1/webhooks/{webhook}"),
            None,
            403,
        ),
        attempt(
            post.clone(),
            "/api/v1/webhooks/{id}/rotate",
            format!("/api/v1/webhooks/{webhook}/rotate"),
            None,
            403,
        ),
        attempt(
            post.clone(),
            "/api/v1/webhooks/{id}/ping",
            format!("/api/v1/webhooks/{webhook}/ping"),
            None,
            403,
        ),
        attempt(
            post.clone(),
            "/api/v1/webhooks/{id}/deliveries/{delivery_id}/redeliver",
            format!("/api/v1/webhooks/{webhook}/deliveries/{nil}/redeliver"),
            None,
            403,
        ),
    ];

    // The table covers every route that is not a read.
    let openapi = server.openapi().await;
    let mut changing: Vec<String> = openapi["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, operations)| {
            operations
                .as_object()
                .unwrap()
                .keys()
                .filter(|method| !["get", "head", "options"].contains(&method.as_str()))
                .map(move |method| format!("{} {path}", method.to_uppercase()))
        })
        .collect();
    changing.sort();
    let mut walked: Vec<String> = table
        .iter()
        .map(|a| format!("{} {}", a.method, a.route))
        .collect();
    walked.sort();
    walked.dedup();
    assert_eq!(walked, changing, "every changing route has a row here");

    for attempt in &table {
        let mut request = server
            .client
            .request(attempt.method.clone(), server.url(&attempt.path))
            .bearer_auth(&limited);
        if let Some(body) = &attempt.body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        assert_eq!(
            status, attempt.expected,
            "{} {} {:?}: {text}",
            attempt.method, attempt.path, attempt.body
        );
    }

    assert_eq!(
        reach(&server).await,
        before,
        "nothing outside its project changed"
    );
    server.stop().await;
}

/// The items of a listing, whether it is an array or a page.
fn items(page: &serde_json::Value) -> Vec<serde_json::Value> {
    match page {
        serde_json::Value::Array(items) => items.clone(),
        page => page["items"].as_array().cloned().unwrap_or_default(),
    }
}

/// A stream token stands for its key as it was: rotating the key (its secret leaked) or
/// revoking it ends the tokens issued before, also ones still within their lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_or_revoking_a_key_ends_its_stream_tokens() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    let project = server.create_project("tokens", json!({})).await;
    let command = server
        .submit(&project, json!({"command": "sleep 60"}))
        .await;
    for (action, method) in [
        ("rotate", reqwest::Method::POST),
        ("", reqwest::Method::DELETE),
    ] {
        let (key, secret) = server
            .create_key(json!({"name": "viewer", "scopes": ["read"]}))
            .await;
        let issued = server
            .post(
                &format!("/api/v1/commands/{command}/stream-token"),
                &secret,
                json!({}),
            )
            .await;
        assert_eq!(issued.status(), 200);
        let url: serde_json::Value = issued.json().await.unwrap();
        let events_url = url["events_url"].as_str().unwrap().to_owned();
        let open = server
            .client
            .get(server.url(&events_url))
            .send()
            .await
            .unwrap();
        assert_eq!(open.status(), 200, "the token opens the stream");
        drop(open);

        let path = if action.is_empty() {
            format!("/api/v1/api-keys/{key}")
        } else {
            format!("/api/v1/api-keys/{key}/{action}")
        };
        let changed = server.send(method, &path, ADMIN_KEY, None).await;
        assert!(
            changed.status().is_success(),
            "{path}: {}",
            changed.status()
        );
        let refused = server
            .client
            .get(server.url(&events_url))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 401, "{path}: the token died with the key");
    }
    server.stop().await;
}

/// The queue is shared, and a queued command's `position` is its place in it: a global count,
/// which includes other projects' commands ahead but names none of them. `GET /queue` shows a
/// limited key only its own projects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_position_is_a_global_count_that_names_no_other_project() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let mut config = support::test_config(&db);
    config.worker.workers = 0;
    let server = TestServer::start_with(config).await;
    let theirs = server.create_project("theirs", json!({})).await;
    let mine = server.create_project("mine", json!({})).await;
    for n in 0..3 {
        server
            .submit(&theirs, json!({"command": format!("echo {n}")}))
            .await;
    }
    let (_, limited) = server
        .create_key(
            json!({"name": "mine-only", "scopes": ["read", "execute"], "project_ids": [mine]}),
        )
        .await;
    let submitted = server
        .post(
            &format!("/api/v1/projects/{mine}/commands"),
            &limited,
            json!({"command": "echo mine"}),
        )
        .await;
    assert_eq!(submitted.status(), 202);
    let body = submitted.text().await.unwrap();
    let command: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(command["position"], 4, "three of theirs ahead: {body}");
    assert!(!body.contains(&theirs), "no other project named: {body}");
    let queue = server
        .get("/api/v1/queue", &limited)
        .await
        .text()
        .await
        .unwrap();
    assert!(!queue.contains(&theirs), "{queue}");
    let queue: serde_json::Value = serde_json::from_str(&queue).unwrap();
    let projects = queue["projects"].as_array().unwrap();
    assert_eq!(projects.len(), 1, "{queue}");
    assert_eq!(projects[0]["project_id"], mine.as_str());
    assert_eq!(
        queue["queued_total"], 1,
        "only its own queued commands: {queue}"
    );
    server.stop().await;
}
