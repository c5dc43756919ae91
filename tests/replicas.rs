//! Several replicas sharing one Postgres database: the queue hands each command to exactly one
//! of them, and any replica can stream a command that another one runs.

mod support;

use std::time::Duration;

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
    let project = runner.create_project("remote", json!({})).await;
    let id = watcher
        .submit(
            &project,
            json!({"command": "for i in 1 2 3 4 5; do echo tick $i; sleep 0.2; done; echo done >&2"}),
        )
        .await;
    let events = watcher.events_until_end(&id, None).await;
    let statuses: Vec<String> = events
        .iter()
        .filter(|e| e.event == "status")
        .map(|e| {
            serde_json::from_str::<Value>(&e.data).unwrap()["status"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(
        statuses.contains(&"running".to_owned()) || statuses.first().is_some_and(|s| s == "queued")
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
