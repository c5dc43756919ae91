//! Several replicas sharing one Postgres database: the queue hands each command to exactly one
//! of them, and any replica can stream a command that another one runs.

mod support;

use std::time::Duration;

use eventsource_stream::Event;
use futures::{Stream, StreamExt};
use serde_json::{Value, json};
use support::{ADMIN_KEY, Backend, ServerProcess, TestDb, output_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_run_a_command_twice() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    // Two real server processes.
    let first = ServerProcess::start(&db, &[]).await;
    let second = ServerProcess::start(&db, &[]).await;
    let (a, b) = (&first.server, &second.server);
    let marks = tempfile::tempdir().unwrap();
    let mut projects = Vec::new();
    for name in ["alpha", "beta", "gamma"] {
        projects.push(a.create_project(name, json!({"max_concurrency": 8})).await);
    }
    let total = 300;
    let mut ids = Vec::with_capacity(total);
    for n in 0..total {
        let server = if n % 2 == 0 { &a } else { &b };
        let project = &projects[n % projects.len()];
        let command = format!("echo run >> {}/{n}", marks.path().display());
        ids.push(server.submit(project, json!({"command": command})).await);
    }
    for id in &ids {
        let command = a.wait_for(id, None, Duration::from_secs(120)).await;
        assert_eq!(command["status"], "succeeded", "{command}");
    }
    for n in 0..total {
        let runs = std::fs::read_to_string(marks.path().join(n.to_string())).unwrap();
        assert_eq!(
            runs,
            "run\n",
            "command {n} ran {} times",
            runs.lines().count()
        );
    }
    let finished: Value = a
        .get("/api/v1/audit?action=command.finished&limit=500", ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(finished["items"].as_array().unwrap().len(), total);
    let verified: Value = b
        .get("/api/v1/audit/verify", ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(verified["ok"], true, "{verified}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_one_replica_follows_a_command_running_on_another() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let runner_process = ServerProcess::start(&db, &[]).await;
    let watcher_process = ServerProcess::start(&db, &[("RDEV_WORKERS", "0")]).await;
    let (runner, watcher) = (&runner_process.server, &watcher_process.server);
    let project = runner
        .create_project("remote", json!({"max_concurrency": 1}))
        .await;
    // A command holding the project's only slot until the gate opens, so that the one below is
    // queued when its stream opens, and every status it goes through is seen.
    let gate = tempfile::tempdir().unwrap();
    let gate_file = gate.path().join("open");
    let holder = watcher
        .submit(
            &project,
            json!({"command": format!("while [ ! -e {} ]; do sleep 0.05; done", gate_file.display())}),
        )
        .await;
    runner
        .wait_for(&holder, Some("running"), Duration::from_secs(30))
        .await;
    let id = watcher
        .submit(
            &project,
            json!({"command": "for i in 1 2 3 4 5; do echo tick $i; sleep 0.2; done; echo done >&2"}),
        )
        .await;
    let mut stream = watcher.events(&id, None).await;
    let mut events = vec![next_event(&mut stream).await];
    std::fs::write(&gate_file, "").unwrap();
    while events.last().is_none_or(|e| e.event != "end") {
        events.push(next_event(&mut stream).await);
    }
    let statuses: Vec<Value> = events
        .iter()
        .filter(|e| e.event == "status")
        .map(|e| {
            let status: Value = serde_json::from_str(&e.data).unwrap();
            json!([status["status"], status["position"]])
        })
        .collect();
    assert_eq!(
        statuses,
        [
            json!(["queued", 1]),
            json!(["running", null]),
            json!(["succeeded", null])
        ]
    );
    assert_eq!(
        output_of(&events, "stdout"),
        "tick 1\ntick 2\ntick 3\ntick 4\ntick 5\n"
    );
    assert_eq!(output_of(&events, "stderr"), "done\n");
    let end: Value = serde_json::from_str(&events.last().unwrap().data).unwrap();
    assert_eq!(end["status"], "succeeded");

    // Cancel through the replica that does not run it.
    let sleeper = watcher
        .submit(&project, json!({"command": "sleep 60"}))
        .await;
    runner
        .wait_for(&sleeper, Some("running"), Duration::from_secs(30))
        .await;
    watcher
        .post(
            &format!("/api/v1/commands/{sleeper}/cancel"),
            ADMIN_KEY,
            json!({}),
        )
        .await;
    let cancelled = watcher
        .wait_for(&sleeper, Some("cancelled"), Duration::from_secs(15))
        .await;
    assert_eq!(cancelled["termination_reason"], "cancel");
}

async fn next_event(stream: &mut (impl Stream<Item = Event> + Unpin)) -> Event {
    tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("an event within 30 s")
        .expect("the stream goes on until `end`")
}
