//! The command pipeline over HTTP, against both backends: submit, queue, run with the local
//! executor, stored output, SSE with exact resume, cancel, timeout, output cap and crash recovery.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{
    ADMIN_KEY, Backend, ServerProcess, TestDb, TestServer, output_of, problem, test_config,
};

both_backends!(
    output_streams_in_order_with_exit_status,
    timeout_stops_the_command,
    cancel_stops_the_whole_process_group,
    resume_with_last_event_id_is_exact,
    priority_order_and_project_concurrency_hold,
    output_beyond_the_cap_is_counted_and_dropped,
    submit_validation_idempotency_and_queue_limits,
    stream_gauge_returns_when_clients_leave,
    stream_tokens_open_the_stream_without_headers,
    crashed_server_leaves_running_commands_lost,
);

fn json_data(event: &eventsource_stream::Event) -> Value {
    serde_json::from_str(&event.data).unwrap()
}

async fn output_streams_in_order_with_exit_status(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    let project = server
        .create_project(
            "runner",
            json!({"env": {"FROM_PROJECT": "p", "SHARED": "project"}}),
        )
        .await;

    let ok = server
        .submit(
            &project,
            json!({"command": "for i in 1 2 3; do echo out $i; echo err $i >&2; done; echo $FROM_PROJECT $SHARED",
                   "env": {"SHARED": "command"}}),
        )
        .await;
    let events = server.events_until_end(&ok, None).await;
    assert_eq!(
        output_of(&events, "stdout"),
        "out 1\nout 2\nout 3\np command\n"
    );
    assert_eq!(output_of(&events, "stderr"), "err 1\nerr 2\nerr 3\n");
    let ids: Vec<i64> = events
        .iter()
        .filter(|e| e.event == "output")
        .map(|e| e.id.parse().unwrap())
        .collect();
    assert_eq!(
        ids,
        (1..=ids.len() as i64).collect::<Vec<_>>(),
        "sequence numbers start at 1 without gaps"
    );
    let end = json_data(events.last().unwrap());
    assert_eq!(end["status"], "succeeded");
    assert_eq!(end["exit_code"], 0);
    assert_eq!(events.iter().filter(|e| e.event == "end").count(), 1);
    let last_status = events
        .iter()
        .rev()
        .find(|e| e.event == "status")
        .map(json_data)
        .unwrap();
    assert_eq!(last_status["status"], "succeeded");

    let stored = server
        .get(
            &format!("/api/v1/commands/{ok}/output?stream=stdout"),
            ADMIN_KEY,
        )
        .await;
    assert_eq!(
        stored.text().await.unwrap(),
        "out 1\nout 2\nout 3\np command\n"
    );
    let command = server.command(&ok).await;
    assert_eq!(command["stdout_bytes"], 28);
    assert_eq!(command["stderr_bytes"], 18);
    assert_eq!(command["termination_reason"], "exit");
    assert!(command["started_at"].is_string() && command["finished_at"].is_string());

    // NUL cannot be stored as text: it shows as U+2400, on both backends.
    let nul = server
        .submit(&project, json!({"command": "printf 'a\\000b'"}))
        .await;
    let events = server.events_until_end(&nul, None).await;
    assert_eq!(output_of(&events, "stdout"), "a\u{2400}b");

    let failing = server
        .submit(&project, json!({"command": "echo bye; exit 3"}))
        .await;
    let events = server.events_until_end(&failing, None).await;
    let end = json_data(events.last().unwrap());
    assert_eq!(
        (end["status"].as_str(), end["exit_code"].as_i64()),
        (Some("failed"), Some(3))
    );

    // A stream opened after the end replays everything and ends at once.
    let replay = server.events_until_end(&ok, None).await;
    assert_eq!(
        output_of(&replay, "stdout"),
        "out 1\nout 2\nout 3\np command\n"
    );

    let finished: Value = server
        .get(
            &format!("/api/v1/audit?action=command.finished&target_id={failing}"),
            ADMIN_KEY,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(finished["items"][0]["details"]["exit_code"], 3);
    let verified: Value = server
        .get("/api/v1/audit/verify", ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(verified["ok"], true);
    server.stop().await;
}

async fn timeout_stops_the_command(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    let project = server.create_project("slow", json!({})).await;
    let id = server
        .submit(
            &project,
            json!({"command": "echo started; sleep 30; echo never", "timeout_secs": 1}),
        )
        .await;
    let events = server.events_until_end(&id, None).await;
    assert_eq!(output_of(&events, "stdout"), "started\n");
    let end = json_data(events.last().unwrap());
    assert_eq!(end["status"], "timed_out");
    assert_eq!(end["termination_reason"], "timeout");

    // A process that closes its output early is still timed out.
    let silent = server
        .submit(
            &project,
            json!({"command": "exec >/dev/null 2>&1; sleep 30", "timeout_secs": 1}),
        )
        .await;
    let ended = server
        .wait_for(&silent, None, Duration::from_secs(20))
        .await;
    assert_eq!(ended["status"], "timed_out");

    // A shell and its background child that both ignore SIGTERM: only the SIGKILL after the
    // kill grace ends them, and only if it reaches the whole group, not just the shell.
    let stubborn = server
        .submit(
            &project,
            json!({"command": "trap '' TERM; sleep 300 & echo $!; wait", "timeout_secs": 1}),
        )
        .await;
    let events = server.events_until_end(&stubborn, None).await;
    let child_pid: u32 = output_of(&events, "stdout").trim().parse().unwrap();
    let end = json_data(events.last().unwrap());
    assert_eq!(end["status"], "timed_out");
    assert_eq!(end["termination_reason"], "timeout");
    wait_until_gone(child_pid, "the timeout").await;
    server.stop().await;
}

/// Waits up to 10 s for `pid` to be gone (or a zombie), failing the test otherwise.
async fn wait_until_gone(pid: u32, after: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !process_is_gone(pid) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "child {pid} survived {after}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Gone, or a zombie nobody reaped (PID 1 here does not reap orphans).
fn process_is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

async fn cancel_stops_the_whole_process_group(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    let project = server
        .create_project("cancellable", json!({"max_concurrency": 1}))
        .await;
    let running = server
        .submit(
            &project,
            json!({"command": "sleep 300 & echo $!; trap '' TERM; wait"}),
        )
        .await;
    let queued = server
        .submit(&project, json!({"command": "echo should not run"}))
        .await;

    let mut stream = server.events(&running, None).await;
    let child_pid: u32 = loop {
        let event = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .unwrap()
            .unwrap();
        if event.event == "output" {
            break json_data(&event)["data"]
                .as_str()
                .unwrap()
                .trim()
                .parse()
                .unwrap();
        }
    };
    assert!(!process_is_gone(child_pid));

    // Cancelling the queued one ends it at once.
    let cancelled = server
        .post(
            &format!("/api/v1/commands/{queued}/cancel"),
            ADMIN_KEY,
            json!({}),
        )
        .await;
    assert_eq!(cancelled.status(), StatusCode::ACCEPTED);
    assert_eq!(
        cancelled.json::<Value>().await.unwrap()["status"],
        "cancelled"
    );

    // The shell ignores SIGTERM and its child does not: a SIGTERM to the group ends the child,
    // whereupon the shell's `wait` returns. Signalling only the shell would leave the child
    // running (the timeout test covers a child that ignores SIGTERM too).
    let response = server
        .post(
            &format!("/api/v1/commands/{running}/cancel"),
            ADMIN_KEY,
            json!({}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let mut end = None;
    while let Some(event) = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .unwrap()
    {
        if event.event == "end" {
            end = Some(json_data(&event));
            break;
        }
    }
    let end = end.expect("an end event");
    assert_eq!(end["status"], "cancelled");
    assert_eq!(end["termination_reason"], "cancel");
    wait_until_gone(child_pid, "the cancel").await;
    assert_eq!(server.command(&queued).await["status"], "cancelled");
    let ended = problem(
        server
            .post(
                &format!("/api/v1/commands/{running}/cancel"),
                ADMIN_KEY,
                json!({}),
            )
            .await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(ended["type"], "urn:rdev:problem:already-ended");
    server.stop().await;
}

async fn resume_with_last_event_id_is_exact(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    let project = server.create_project("chatty", json!({})).await;
    let (id, ids) = server.check_exact_resume(&project, 6000).await;

    // Resuming from the middle after the end replays exactly the rest.
    let tail = server
        .events_until_end(&id, Some(ids.len() as i64 - 3))
        .await;
    assert_eq!(tail.iter().filter(|e| e.event == "output").count(), 3);
    // The query parameter works like the header.
    let via_query = server
        .client
        .get(server.url(&format!(
            "/api/v1/commands/{id}/events?last_event_id={}",
            ids.len()
        )))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!via_query.contains("event: output") && via_query.contains("event: end"));
    problem(
        server
            .client
            .get(server.url(&format!("/api/v1/commands/{id}/events")))
            .bearer_auth(ADMIN_KEY)
            .header("Last-Event-ID", "abc")
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
    )
    .await;
    server.stop().await;
}

async fn priority_order_and_project_concurrency_hold(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    let gate = tempfile::tempdir().unwrap();
    let go = gate.path().join("go");
    let project = server
        .create_project("serial", json!({"max_concurrency": 1}))
        .await;
    let other = server
        .create_project("parallel", json!({"max_concurrency": 2}))
        .await;
    let blocker = server
        .submit(
            &project,
            json!({"command": format!("while [ ! -f {} ]; do sleep 0.05; done", go.display())}),
        )
        .await;
    server
        .wait_for(&blocker, Some("running"), Duration::from_secs(30))
        .await;

    let priorities = ["low", "normal", "high", "critical"];
    let mut submitted = Vec::new();
    for i in 0..40 {
        let priority = priorities[i % 4];
        let id = server
            .submit(&project, json!({"command": "true", "priority": priority}))
            .await;
        submitted.push((id, priority, i));
    }
    // Another project is not held up by the full one.
    let elsewhere = server.submit(&other, json!({"command": "echo free"})).await;
    server
        .wait_for(&elsewhere, Some("succeeded"), Duration::from_secs(30))
        .await;

    let critical_first = &submitted
        .iter()
        .find(|(_, p, _)| *p == "critical")
        .unwrap()
        .0;
    assert_eq!(server.command(critical_first).await["position"], 1);
    let queue: Value = server
        .get("/api/v1/queue", ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(queue["queued"]["critical"], 10);
    assert_eq!(queue["queued_total"], 40);
    assert_eq!(queue["running"], 1);

    std::fs::write(&go, b"").unwrap();
    let mut finished = Vec::new();
    for (id, priority, index) in &submitted {
        let command = server
            .wait_for(id, Some("succeeded"), Duration::from_secs(60))
            .await;
        finished.push((
            command["started_at"].as_str().unwrap().to_owned(),
            command["finished_at"].as_str().unwrap().to_owned(),
            priorities.iter().position(|p| p == priority).unwrap(),
            *index,
        ));
    }
    let parse = |t: &str| {
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).unwrap()
    };
    finished.sort_by_key(|(started, ..)| parse(started));
    // Highest priority first, FIFO within a priority.
    let order: Vec<(usize, usize)> = finished.iter().map(|(_, _, p, i)| (*p, *i)).collect();
    let mut expected = order.clone();
    expected.sort_by_key(|(p, i)| (std::cmp::Reverse(*p), *i));
    assert_eq!(order, expected);
    // Never two at once in a project with max_concurrency 1.
    for pair in finished.windows(2) {
        assert!(
            parse(&pair[0].1) <= parse(&pair[1].0),
            "overlapping runs: {pair:?}"
        );
    }
    server.stop().await;
}

/// A figure from `/proc/PID/status` (`VmRSS`, `VmHWM`), in KiB.
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

async fn output_beyond_the_cap_is_counted_and_dropped(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let cap = 1024 * 1024;
    // Its own process, so that its memory is measured alone (not the test's SSE client).
    let process = ServerProcess::start(&db, &[("RDEV_MAX_OUTPUT_BYTES", &cap.to_string())]).await;
    let server = &process.server;
    let pid = process.child.id().expect("the server runs");
    let project = server.create_project("loud", json!({})).await;
    let written: u64 = 256 * 1024 * 1024;
    // Writing 5 to clear_refs resets the peak (VmHWM) to the current RSS.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    let before = proc_status_kib(pid, "VmRSS");
    let id = server
        .submit(&project, json!({"command": format!("head -c {written} /dev/zero | tr '\\0' 'x'; echo done >&2")}))
        .await;
    let events = server.events_until_end(&id, None).await;
    let growth_mib = proc_status_kib(pid, "VmHWM").saturating_sub(before) / 1024;

    assert_eq!(events.iter().filter(|e| e.event == "truncated").count(), 1);
    let streamed = output_of(&events, "stdout");
    assert_eq!(streamed.len() as u64, cap);
    assert_eq!(
        output_of(&events, "stderr"),
        "",
        "output after the cap is not stored"
    );
    let end = json_data(events.last().unwrap());
    assert_eq!(end["status"], "succeeded");
    assert_eq!(end["truncated"], true);
    assert_eq!(end["stdout_bytes"].as_u64().unwrap(), written);
    assert_eq!(end["dropped_bytes"].as_u64().unwrap(), written - cap + 5);
    let stored = server
        .get(&format!("/api/v1/commands/{id}/output"), ADMIN_KEY)
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(stored.len() as u64, cap);
    eprintln!("server peak RSS grew by {growth_mib} MiB while 256 MiB went through");
    assert!(
        growth_mib < 32,
        "the server's peak RSS grew by {growth_mib} MiB while 256 MiB went through"
    );
}

async fn submit_validation_idempotency_and_queue_limits(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let mut config = test_config(&db);
    config.worker.workers = 0;
    config.worker.max_queued = 3;
    let server = TestServer::start_with(config).await;
    let project = server.create_project("held", json!({})).await;
    let path = format!("/api/v1/projects/{project}/commands");

    let invalid = server
        .post(
            &path,
            ADMIN_KEY,
            json!({"command": " ", "priority": "urgent", "timeout_secs": 0, "env": {"9X": "y"}}),
        )
        .await;
    let body = problem(invalid, StatusCode::UNPROCESSABLE_ENTITY).await;
    let pointers: HashSet<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pointer"].as_str().unwrap())
        .collect();
    assert_eq!(
        pointers,
        HashSet::from(["/command", "/priority", "/timeout_secs", "/env/9X"])
    );
    problem(
        server
            .post(
                "/api/v1/projects/01a213d7-acc7-76e6-b86f-390edc9289ca/commands",
                ADMIN_KEY,
                json!({"command": "true"}),
            )
            .await,
        StatusCode::NOT_FOUND,
    )
    .await;

    let submit = |key: &'static str, command: &'static str| {
        server
            .client
            .post(server.url(&path))
            .bearer_auth(ADMIN_KEY)
            .header("Idempotency-Key", key)
            .json(&json!({"command": command}))
            .send()
    };
    let first = submit("build-42", "make build").await.unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    assert!(first.headers().get("location").is_some());
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["position"], 1);
    assert_eq!(
        first["links"]["events"],
        format!("/api/v1/commands/{}/events", first["id"].as_str().unwrap())
    );
    let again = submit("build-42", "make build").await.unwrap();
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap()["id"], first["id"]);
    let reused = problem(
        submit("build-42", "make other").await.unwrap(),
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(reused["type"], "urn:rdev:problem:idempotency-mismatch");

    server.submit(&project, json!({"command": "true"})).await;
    let urgent = server
        .submit(&project, json!({"command": "true", "priority": "critical"}))
        .await;
    assert_eq!(server.command(&urgent).await["position"], 1);
    let full = server
        .post(&path, ADMIN_KEY, json!({"command": "true"}))
        .await;
    assert!(full.headers().get("retry-after").is_some());
    problem(full, StatusCode::SERVICE_UNAVAILABLE).await;

    let listed: Value = server
        .get(
            &format!("/api/v1/commands?project_id={project}&status=queued&limit=2"),
            ADMIN_KEY,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 2);
    let cursor = listed["next_cursor"].as_str().unwrap();
    let older: Value = server
        .get(
            &format!("/api/v1/commands?project_id={project}&cursor={cursor}"),
            ADMIN_KEY,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(older["items"].as_array().unwrap().len(), 1);
    assert_eq!(older["items"][0]["id"], first["id"]);

    // A project with active commands cannot be deleted.
    let busy = problem(
        server
            .delete(&format!("/api/v1/projects/{project}"), ADMIN_KEY)
            .await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(busy["type"], "urn:rdev:problem:project-busy");
    server.stop().await;
}

async fn sse_gauge(server: &TestServer) -> i64 {
    let metrics = server.metrics().await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("rdev_sse_connections_active "))
        .unwrap()
        .parse()
        .unwrap()
}

async fn stream_gauge_returns_when_clients_leave(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    let project = server.create_project("watched", json!({})).await;
    let id = server
        .submit(&project, json!({"command": "echo hi; sleep 30"}))
        .await;
    let before = sse_gauge(&server).await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut stream = server.events(&id, None).await;
        stream.next().await.unwrap();
        streams.push(stream);
    }
    assert_eq!(sse_gauge(&server).await, before + 3);
    drop(streams);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sse_gauge(&server).await != before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "SSE gauge did not return to {before}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server
        .post(
            &format!("/api/v1/commands/{id}/cancel"),
            ADMIN_KEY,
            json!({}),
        )
        .await;
    server.stop().await;
}

async fn stream_tokens_open_the_stream_without_headers(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let server = TestServer::start(&db).await;
    let project = server.create_project("browser", json!({})).await;
    let id = server
        .submit(&project, json!({"command": "echo from a browser"}))
        .await;
    let other = server.submit(&project, json!({"command": "true"})).await;
    let token: Value = server
        .post(
            &format!("/api/v1/commands/{id}/stream-token"),
            ADMIN_KEY,
            json!({}),
        )
        .await
        .json()
        .await
        .unwrap();
    let url = server.url(token["events_url"].as_str().unwrap());
    let body = server
        .client
        .get(&url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        body.contains("from a browser") && body.contains("event: end"),
        "{body}"
    );
    let token = token["token"].as_str().unwrap();
    let wrong_command = server
        .client
        .get(server.url(&format!("/api/v1/commands/{other}/events?token={token}")))
        .send()
        .await
        .unwrap();
    problem(wrong_command, StatusCode::UNAUTHORIZED).await;
    server.stop().await;
}

async fn crashed_server_leaves_running_commands_lost(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let mut process = ServerProcess::start(&db, &[("RDEV_LEASE_SECS", "2")]).await;
    let crashing = &process.server;
    let project = crashing
        .create_project("survivor", json!({"max_concurrency": 1}))
        .await;
    let running = crashing
        .submit(&project, json!({"command": "sleep 30"}))
        .await;
    crashing
        .wait_for(&running, Some("running"), Duration::from_secs(30))
        .await;
    let waiting = crashing
        .submit(&project, json!({"command": "echo after the crash"}))
        .await;
    process.child.kill().await.unwrap();

    let mut config = test_config(&db);
    config.worker.lease_secs = 2;
    let server = TestServer::start_with(config).await;
    let lost = server
        .wait_for(&running, Some("lost"), Duration::from_secs(30))
        .await;
    assert_eq!(lost["termination_reason"], "lost");
    let after = server
        .wait_for(&waiting, Some("succeeded"), Duration::from_secs(30))
        .await;
    assert_eq!(after["exit_code"], 0);
    let output = server
        .get(&format!("/api/v1/commands/{waiting}/output"), ADMIN_KEY)
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(output, "after the crash\n");
    let events = server.events_until_end(&running, None).await;
    assert_eq!(json_data(events.last().unwrap())["status"], "lost");
    server.stop().await;
}
