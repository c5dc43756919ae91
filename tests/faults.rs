//! The queue and streams under real faults: a replica paused past its lease (SIGSTOP), a
//! database stopped under a running command, a replica draining after SIGTERM, and stream
//! tokens used across replicas and after they expire.

mod support;

use std::sync::Arc;
use std::time::Duration;

use rdev_api::ports::clock::ManualClock;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::own_postgres::OwnPostgres;
use support::{ADMIN_KEY, Backend, ServerProcess, TestDb, TestServer, eventually, test_config};

/// Gone, or a zombie nobody reaps (PID 1 here does not reap orphans).
fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) on a child process of this test; no memory is involved.
    let sent = unsafe { libc::kill(pid as i32, signal) };
    assert_eq!(sent, 0, "signal {signal} to {pid}");
}

async fn stored_output(server: &TestServer, id: &str) -> String {
    server
        .get(&format!("/api/v1/commands/{id}/output"), ADMIN_KEY)
        .await
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_paused_past_its_lease_writes_nothing_after_the_end() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let lease = [("RDEV_LEASE_SECS", "3")];
    let runner = ServerProcess::start(&db, &lease).await;
    let reaper =
        ServerProcess::start(&db, &[("RDEV_LEASE_SECS", "3"), ("RDEV_WORKERS", "0")]).await;
    let api = &reaper.server;
    let project = api
        .create_project("paused", json!({"max_concurrency": 1}))
        .await;
    let pid_file = tempfile::NamedTempFile::new().unwrap();
    let command = format!(
        "echo $$ > {}; i=0; while true; do i=$((i+1)); echo line $i; sleep 0.1; done",
        pid_file.path().display()
    );
    let id = api.submit(&project, json!({"command": command})).await;
    eventually(Duration::from_secs(20), "output flows", || async {
        stored_output(api, &id).await.lines().count() >= 5
    })
    .await;
    let shell: i32 = std::fs::read_to_string(pid_file.path())
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    signal(runner.child.id().unwrap(), libc::SIGSTOP);
    let lost = api
        .wait_for(&id, Some("lost"), Duration::from_secs(20))
        .await;
    let output_at_end = stored_output(api, &id).await;
    assert_eq!(
        output_at_end.lines().count() as i64,
        lost["last_seq"].as_i64().unwrap()
    );
    // The freed slot goes to the next command, which must not share it with a zombie run.
    signal(runner.child.id().unwrap(), libc::SIGCONT);

    eventually(
        Duration::from_secs(3),
        "the paused replica stops the process",
        || async { process_gone(shell) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = api.command(&id).await;
    assert_eq!(after["status"], "lost", "{after}");
    assert_eq!(
        after["last_seq"], lost["last_seq"],
        "no output counted after the end"
    );
    assert_eq!(
        stored_output(api, &id).await,
        output_at_end,
        "nothing appended after the end"
    );
    let next = api.submit(&project, json!({"command": "echo next"})).await;
    let next = api.wait_for(&next, None, Duration::from_secs(20)).await;
    assert_eq!(next["status"], "succeeded", "{next}");
}

/// A command that prints `lines` numbered lines, one every 100 ms.
fn counting(lines: u32) -> String {
    format!("for i in $(seq 1 {lines}); do echo line $i; sleep 0.1; done")
}

fn expected_lines(lines: u32) -> String {
    (1..=lines).map(|i| format!("line {i}\n")).collect()
}

/// Runs a counting command on a server of a test-owned Postgres, stops the database for
/// `outage` in the middle of it, and checks that the command finished with all of its output.
async fn ride_out_outage(lease_secs: u64, outage: Duration, lines: u32) {
    let Some(postgres) = OwnPostgres::start() else {
        return;
    };
    let db = TestDb::at(&postgres.url());
    let mut config = test_config(&db);
    config.worker.lease_secs = lease_secs;
    let server = TestServer::start_with(config).await;
    let project = server
        .create_project("outage", json!({"max_concurrency": 1}))
        .await;
    let id = server
        .submit(&project, json!({"command": counting(lines)}))
        .await;
    eventually(Duration::from_secs(20), "output flows", || async {
        stored_output(&server, &id).await.lines().count() >= 10
    })
    .await;

    postgres.stop();
    tokio::time::sleep(outage).await;
    postgres.start_server();

    let within = Duration::from_secs(u64::from(lines) / 10 + 60);
    let command = server.wait_for(&id, None, within).await;
    assert_eq!(command["status"], "succeeded", "{command}");
    assert_eq!(stored_output(&server, &id).await, expected_lines(lines));
    let verified: Value = server
        .get("/api/v1/audit/verify", ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(verified["ok"], true, "{verified}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_shorter_than_the_lease_loses_nothing() {
    ride_out_outage(30, Duration::from_secs(20), 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_lease_is_ridden_out_by_the_reaper_grace() {
    // Lease 4 s, outage 5 s (plus the time pg_ctl takes): without the grace, the first reaper
    // after the outage would mark the command lost before its replica renews. (Past two
    // leases without a renewal the replica stops the command itself.)
    ride_out_outage(4, Duration::from_secs(5), 150).await;
}

both_backends!(
    a_draining_replica_claims_nothing_and_says_why_it_stopped_the_rest,
    stream_tokens_work_on_every_replica_and_for_reconnects,
);

async fn a_draining_replica_claims_nothing_and_says_why_it_stopped_the_rest(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let mut config = test_config(&db);
    config.http.drain_delay_secs = 4;
    config.worker.shutdown_grace_secs = 1;
    let draining = TestServer::start_with(config).await;
    let project = draining
        .create_project("drain", json!({"max_concurrency": 4}))
        .await;
    let long = draining
        .submit(&project, json!({"command": "sleep 60"}))
        .await;
    draining
        .wait_for(&long, Some("running"), Duration::from_secs(10))
        .await;

    draining.begin_drain();
    // A claim already under way when the drain begins still completes (it may see rows
    // committed while it waited for a connection); no claim starts after. Submit once it is
    // surely over.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during: Vec<String> = futures::future::join_all(
        (0..2).map(|_| draining.submit(&project, json!({"command": "echo later"}))),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for id in &during {
        assert_eq!(
            draining.command(id).await["status"],
            "queued",
            "a draining replica claims nothing"
        );
    }
    let stopped = draining
        .wait_for(&long, None, Duration::from_secs(10))
        .await;
    assert_eq!(stopped["status"], "cancelled", "{stopped}");
    assert_eq!(stopped["termination_reason"], "shutdown", "{stopped}");
    draining.stopped().await;

    let next = TestServer::start(&db).await;
    for id in &during {
        let done = next.wait_for(id, None, Duration::from_secs(20)).await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }
    next.stop().await;
}

async fn stream_tokens_work_on_every_replica_and_for_reconnects(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let clock = Arc::new(ManualClock::default());
    let issuer = TestServer::start_with_clock(test_config(&db), clock.clone()).await;
    let other = TestServer::start_with_clock(test_config(&db), clock.clone()).await;
    let project = issuer
        .create_project("tokens", json!({"max_concurrency": 1}))
        .await;
    let id = issuer
        .submit(&project, json!({"command": "sleep 60"}))
        .await;
    issuer
        .wait_for(&id, Some("running"), Duration::from_secs(10))
        .await;
    let minted: Value = issuer
        .post(
            &format!("/api/v1/commands/{id}/stream-token"),
            ADMIN_KEY,
            json!({}),
        )
        .await
        .json()
        .await
        .unwrap();
    let events_url = minted["events_url"].as_str().unwrap().to_owned();
    let open = |server: &TestServer| {
        let url = server.url(&events_url);
        let client = server.client.clone();
        async move {
            client
                .get(url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(open(&other).await, StatusCode::OK, "the secret is shared");

    // Past its TTL (60 s), the token still reconnects to the running command.
    clock.advance(Duration::from_secs(120));
    assert_eq!(
        open(&other).await,
        StatusCode::OK,
        "a reconnect while it runs"
    );

    issuer
        .post(
            &format!("/api/v1/commands/{id}/cancel"),
            ADMIN_KEY,
            json!({}),
        )
        .await;
    issuer.wait_for(&id, None, Duration::from_secs(10)).await;
    assert_eq!(
        open(&issuer).await,
        StatusCode::OK,
        "just ended: still within the margin"
    );
    clock.advance(Duration::from_secs(120));
    assert_eq!(
        open(&issuer).await,
        StatusCode::UNAUTHORIZED,
        "an old token for a long-ended command"
    );
    issuer.stop().await;
    other.stop().await;
}
