//! Hostile input: every malformed request gets a clear 4xx problem, changes nothing, and the
//! server stays up. Each case is sent raw (reqwest with a byte body, or a bare TCP write where
//! reqwest would refuse to send it).

mod support;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{ADMIN_KEY, Backend, TestDb, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `body` as JSON bytes to `path` and returns the status and the problem's content type.
async fn post_raw(server: &TestServer, path: &str, body: Vec<u8>) -> (StatusCode, String) {
    let response = server
        .client
        .post(server.url(path))
        .bearer_auth(ADMIN_KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, content_type)
}

async fn state(server: &TestServer) -> (Value, Value, Value) {
    let read = |path: &'static str| async move {
        let response = server.get(path, ADMIN_KEY).await;
        assert_eq!(response.status(), 200, "{path}");
        let mut body: Value = response.json().await.unwrap();
        // Keys' last use moves with every request; what matters is which keys exist.
        if let Some(items) = body["items"].as_array_mut() {
            for item in items {
                item.as_object_mut().unwrap().remove("last_used_at");
            }
        }
        body
    };
    (
        read("/api/v1/projects").await,
        read("/api/v1/commands").await,
        read("/api/v1/api-keys").await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_get_a_clear_4xx_and_change_nothing() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    let project = server.create_project("target", json!({})).await;
    let before = state(&server).await;

    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let project_body = |extra: Value| {
        let mut body = json!({"name": "hostile", "workdir": "/tmp"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().cloned().unwrap());
        serde_json::to_vec(&body).unwrap()
    };
    let submit = format!("/api/v1/projects/{project}/commands");
    let cases: Vec<(&str, &str, Vec<u8>, &[u16])> = vec![
        (
            "2 MiB body",
            "/api/v1/projects",
            vec![b' '; 2 << 20],
            &[413],
        ),
        (
            "deep nesting",
            "/api/v1/projects",
            deep.into_bytes(),
            &[400, 422],
        ),
        (
            "invalid UTF-8",
            "/api/v1/projects",
            b"{\"name\": \"\xff\xfe\"}".to_vec(),
            &[400],
        ),
        ("not JSON", "/api/v1/projects", b"name=x".to_vec(), &[400]),
        ("empty", "/api/v1/projects", vec![], &[400]),
        (
            "NUL in a name",
            "/api/v1/projects",
            project_body(json!({"name": "a\u{0}b"})),
            &[422],
        ),
        (
            "NUL in a command",
            &submit,
            serde_json::to_vec(&json!({"command": "echo \u{0}"})).unwrap(),
            &[422],
        ),
        (
            "NUL in an env value",
            &submit,
            serde_json::to_vec(&json!({"command": "true", "env": {"A": "\u{0}"}})).unwrap(),
            &[422],
        ),
        (
            "traversal in workdir",
            "/api/v1/projects",
            project_body(json!({"workdir": "/tmp/../etc"})),
            &[422],
        ),
        (
            "relative workdir",
            "/api/v1/projects",
            project_body(json!({"workdir": "tmp"})),
            &[422],
        ),
        (
            "unknown field",
            "/api/v1/projects",
            project_body(json!({"admin": true})),
            &[400, 422],
        ),
        (
            "wrong type",
            "/api/v1/projects",
            project_body(json!({"max_concurrency": "many"})),
            &[400, 422],
        ),
        (
            "negative number",
            "/api/v1/projects",
            project_body(json!({"max_concurrency": -1})),
            &[422],
        ),
        (
            "overflowing number",
            "/api/v1/projects",
            project_body(json!({"max_concurrency": 18_446_744_073_709_551_616u128 as f64})),
            &[400, 422],
        ),
        (
            "huge timeout",
            &submit,
            serde_json::to_vec(&json!({"command": "true", "timeout_secs": 1e300})).unwrap(),
            &[400, 422],
        ),
        (
            "bad priority",
            &submit,
            serde_json::to_vec(&json!({"command": "true", "priority": "urgent!"})).unwrap(),
            &[422],
        ),
        (
            "empty command",
            &submit,
            serde_json::to_vec(&json!({"command": ""})).unwrap(),
            &[422],
        ),
        (
            "bad env name",
            &submit,
            serde_json::to_vec(&json!({"command": "true", "env": {"A=B": "1"}})).unwrap(),
            &[422],
        ),
        (
            "key with bad CIDR",
            "/api/v1/api-keys",
            serde_json::to_vec(
                &json!({"name": "k", "scopes": ["read"], "allowed_ips": ["10.0.0.0/33"]}),
            )
            .unwrap(),
            &[422],
        ),
        (
            "key with unknown scope",
            "/api/v1/api-keys",
            serde_json::to_vec(&json!({"name": "k", "scopes": ["root"]})).unwrap(),
            &[422],
        ),
    ];
    for (name, path, body, expected) in cases {
        let (status, content_type) = post_raw(&server, path, body).await;
        assert!(
            expected.contains(&status.as_u16()),
            "{name}: {status}, expected one of {expected:?}"
        );
        assert_eq!(content_type, "application/problem+json", "{name}");
    }

    // Bad identifiers, cursors and resume points in the URL and headers.
    let bad_gets = [
        "/api/v1/projects/not-a-uuid",
        "/api/v1/commands/..%2F..%2Fetc%2Fpasswd",
        "/api/v1/commands?cursor=not-a-uuid",
        "/api/v1/commands?limit=-1",
        "/api/v1/commands?limit=99999999999999999999",
        "/api/v1/commands?status=exploded",
        "/api/v1/audit?cursor=abc",
        "/api/v1/audit?since=yesterday",
    ];
    for path in bad_gets {
        let status = server.get(path, ADMIN_KEY).await.status();
        assert!(
            status.is_client_error(),
            "{path}: {status} is not a clear 4xx"
        );
    }
    let command = server.submit(&project, json!({"command": "true"})).await;
    for last_event_id in ["abc", "-1", "99999999999999999999999", "1.5", "1,2"] {
        let response = server
            .client
            .get(server.url(&format!("/api/v1/commands/{command}/events")))
            .bearer_auth(ADMIN_KEY)
            .header("last-event-id", last_event_id)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "Last-Event-ID {last_event_id}");
    }

    let after = state(&server).await;
    assert_eq!(after.0, before.0, "projects unchanged");
    assert_eq!(after.2, before.2, "keys unchanged");
    let commands = after.1["items"].as_array().unwrap();
    assert_eq!(commands.len(), 1, "only the one valid submit: {commands:?}");
    let health = server
        .client
        .get(server.url("/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200, "still serving");
    server.stop().await;
}

/// Bytes no HTTP client library would send: a NUL in the request line and in a header, a
/// method of 10 KB. The server answers 400 or closes, and stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_http_is_refused_and_the_server_stays_up() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    let address = server.base.trim_start_matches("http://").to_owned();
    let requests: Vec<Vec<u8>> = vec![
        b"GET /api/v1/me\0 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bad: a\0b\r\n\r\n".to_vec(),
        [
            b"A".repeat(10_000),
            b" / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ]
        .concat(),
        b"GET /health HTTP/9.9\r\n\r\n".to_vec(),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(),
    ];
    for raw in requests {
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        stream.write_all(&raw).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            stream.read_to_end(&mut answer),
        )
        .await;
        let text = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || text.starts_with("HTTP/1.1 4"),
            "{:?}: {text}",
            String::from_utf8_lossy(&raw[..raw.len().min(40)])
        );
    }
    let health = server
        .client
        .get(server.url("/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    server.stop().await;
}

/// A key limited to one project, probing another: every way in answers exactly like an id that
/// does not exist. Wrong scopes, addresses outside `allowed_ips` (also behind a forged
/// `X-Forwarded-For` from an untrusted peer) are refused. And no secret (keys, env values)
/// appears anywhere in the server's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_key_learns_nothing_of_other_projects_and_secrets_stay_out_of_logs() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let process = support::ServerProcess::start(&db, &[("RUST_LOG", "debug")]).await;
    let server = &process.server;
    let mine = server.create_project("mine", json!({})).await;
    let theirs = server
        .create_project(
            "theirs",
            json!({"env": {"DEPLOY_TOKEN": "theirs-env-secret"}}),
        )
        .await;
    let foreign = server
        .submit(
            &theirs,
            json!({"command": "sleep 30", "env": {"PASSWORD": "command-env-secret"}}),
        )
        .await;
    let (_, limited) = server
        .create_key(json!({"name": "mine", "scopes": ["read", "execute"], "project_ids": [mine]}))
        .await;

    let random = uuid::Uuid::new_v4().to_string();
    let probe = |id: String| {
        let (server, limited, theirs) = (server, limited.clone(), theirs.clone());
        async move {
            let mut answers = Vec::new();
            for (method, path) in [
                (reqwest::Method::GET, format!("/api/v1/commands/{id}")),
                (
                    reqwest::Method::GET,
                    format!("/api/v1/commands/{id}/events"),
                ),
                (
                    reqwest::Method::GET,
                    format!("/api/v1/commands/{id}/output"),
                ),
                (
                    reqwest::Method::POST,
                    format!("/api/v1/commands/{id}/cancel"),
                ),
                (
                    reqwest::Method::POST,
                    format!("/api/v1/commands/{id}/stream-token"),
                ),
                (reqwest::Method::GET, format!("/api/v1/projects/{id}")),
                (
                    reqwest::Method::GET,
                    format!("/api/v1/commands?project_id={id}"),
                ),
                (
                    reqwest::Method::GET,
                    format!("/api/v1/commands?cursor={id}"),
                ),
            ] {
                let path = path.replace(&theirs, &id);
                let response = server.send(method.clone(), &path, &limited, None).await;
                let status = response.status();
                let body = response.text().await.unwrap().replace(&id, "<id>");
                answers.push((
                    format!("{method} {}", path.replace(&id, "<id>")),
                    status,
                    body,
                ));
            }
            answers
        }
    };
    // Their command and their project, against ids that name nothing.
    let about_theirs = [probe(foreign.clone()).await, probe(theirs.clone()).await];
    let about_nothing = [probe(random.clone()).await, probe(random).await];
    assert_eq!(about_theirs, about_nothing);
    assert!(about_theirs[0].iter().any(|(_, status, _)| *status == 404));
    let listed = server
        .get("/api/v1/projects", &limited)
        .await
        .text()
        .await
        .unwrap();
    assert!(!listed.contains("theirs"), "{listed}");
    let commands = server
        .get("/api/v1/commands", &limited)
        .await
        .text()
        .await
        .unwrap();
    assert!(!commands.contains(&foreign), "{commands}");

    // Scope and address rules.
    let (_, reader) = server
        .create_key(json!({"name": "reader", "scopes": ["read"]}))
        .await;
    let submit = server
        .post(
            &format!("/api/v1/projects/{mine}/commands"),
            &reader,
            json!({"command": "true"}),
        )
        .await;
    assert_eq!(submit.status(), 403);
    let (_, fenced) = server
        .create_key(json!({"name": "office", "scopes": ["read"], "allowed_ips": ["10.0.0.0/8"]}))
        .await;
    for forged in [None, Some("10.1.2.3"), Some("10.1.2.3, 127.0.0.1")] {
        let mut request = server
            .client
            .get(server.url("/api/v1/me"))
            .bearer_auth(&fenced);
        if let Some(forged) = forged {
            request = request.header("x-forwarded-for", forged);
        }
        let status = request.send().await.unwrap().status();
        assert!(
            status == 401 || status == 403,
            "from 127.0.0.1 with X-Forwarded-For {forged:?}: {status}"
        );
    }
    server
        .post(
            &format!("/api/v1/commands/{foreign}/cancel"),
            ADMIN_KEY,
            json!({}),
        )
        .await;

    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let logs = process.logs.lock().unwrap().join("\n");
    let secret_of = |key: &str| key.rsplit('_').next().unwrap().to_owned();
    for secret in [
        secret_of(ADMIN_KEY),
        secret_of(&limited),
        secret_of(&reader),
        secret_of(&fenced),
        "theirs-env-secret".to_owned(),
        "command-env-secret".to_owned(),
    ] {
        assert!(!logs.contains(&secret), "`{secret}` is in the server log");
    }
    assert!(logs.lines().count() > 20, "the log was captured: {logs}");
}
