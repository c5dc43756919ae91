//! The kube executor and pod management over HTTP, against a fake Kubernetes API server that
//! speaks the real protocol (the one `kubectl` is tested against in `fake-kube/tests`) and runs
//! commands as local processes: output, exit codes, SSE resume, timeout and cancel reaching the
//! remote process group, pod and container problems, a pod deleted mid-command, the API going
//! down and the circuit breaker, and the pod endpoints.

mod support;

use std::time::Duration;

use fake_kube::{Controller, FakeKube, PodSpec};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{ADMIN_KEY, Backend, TestDb, TestServer, output_of, problem, test_config};

both_backends!(
    output_streams_and_exit_codes_come_from_the_pod,
    resume_with_last_event_id_is_exact,
);

/// A server wired to a fresh fake cluster.
struct Cluster {
    fake: FakeKube,
    server: TestServer,
    _db: TestDb,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start(backend: Backend) -> Option<Cluster> {
        Self::start_with(backend, |_| {}).await
    }

    /// A cluster whose server's settings are adjusted first.
    async fn start_with(
        backend: Backend,
        adjust: impl FnOnce(&mut rdev_api::config::Config),
    ) -> Option<Cluster> {
        let db = TestDb::new(backend).await?;
        let fake = FakeKube::start().await;
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(&db);
        config.kube.kubeconfig = vec![fake.write_kubeconfig(dir.path())];
        config.kube.kube_breaker_failures = 3;
        config.kube.kube_breaker_open_secs = 1;
        config.kube.pod_restart_wait_secs = 10;
        adjust(&mut config);
        let server = TestServer::start_with(config).await;
        Some(Cluster {
            fake,
            server,
            _db: db,
            _dir: dir,
        })
    }

    async fn project(&self, name: &str, target: Value) -> String {
        self.server
            .create_project(name, json!({"executor": "kube", "target": target}))
            .await
    }

    async fn run(&self, project: &str, body: Value) -> (Vec<eventsource_stream::Event>, Value) {
        let id = self.server.submit(project, body).await;
        let events = self.server.events_until_end(&id, None).await;
        (events, self.server.command(&id).await)
    }

    /// Waits until nothing the fake's execs started is alive.
    async fn no_remote_processes_within(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let live = self.fake.live_processes();
            if live.is_empty() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "remote processes still alive: {live:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A finished command's status and termination reason, for one assertion.
fn ended(command: &Value) -> (&str, &str) {
    (
        command["status"].as_str().unwrap_or_default(),
        command["termination_reason"].as_str().unwrap_or_default(),
    )
}

fn json_data(event: &eventsource_stream::Event) -> Value {
    serde_json::from_str(&event.data).unwrap()
}

async fn output_streams_and_exit_codes_come_from_the_pod(backend: Backend) {
    let Some(cluster) = Cluster::start(backend).await else {
        return;
    };
    cluster
        .fake
        .add_pod(PodSpec::running("apps", "web-0").containers(&["app", "sidecar"]));
    let project = cluster
        .server
        .create_project(
            "in-pod",
            json!({"executor": "kube", "workdir": "/tmp",
                   "target": {"namespace": "apps", "pod": "web-0", "container": "app"},
                   "env": {"FROM_PROJECT": "p", "SHARED": "project", "QUOTED": "it's $HOME"}}),
        )
        .await;
    let (events, command) = cluster
        .run(
            &project,
            json!({"command": "for i in 1 2 3; do echo out $i; echo err $i >&2; done; pwd; echo $FROM_PROJECT $SHARED \"$QUOTED\" $HOSTNAME",
                   "env": {"SHARED": "command"}}),
        )
        .await;
    assert_eq!(
        output_of(&events, "stdout"),
        "out 1\nout 2\nout 3\n/tmp\np command it's $HOME web-0\n"
    );
    assert_eq!(output_of(&events, "stderr"), "err 1\nerr 2\nerr 3\n");
    let ids: Vec<i64> = events
        .iter()
        .filter(|e| e.event == "output")
        .map(|e| e.id.parse().unwrap())
        .collect();
    assert_eq!(ids, (1..=ids.len() as i64).collect::<Vec<_>>());
    assert_eq!(json_data(events.last().unwrap())["status"], "succeeded");
    assert_eq!(
        (
            command["exit_code"].as_i64(),
            command["termination_reason"].as_str()
        ),
        (Some(0), Some("exit"))
    );

    let (events, command) = cluster
        .run(
            &project,
            json!({"command": "echo out; echo err >&2; exit 3"}),
        )
        .await;
    assert_eq!(output_of(&events, "stdout"), "out\n");
    assert_eq!(output_of(&events, "stderr"), "err\n");
    assert_eq!(
        (command["status"].as_str(), command["exit_code"].as_i64()),
        (Some("failed"), Some(3))
    );

    // A missing workdir fails the start with the shell's own words.
    let elsewhere = cluster
        .server
        .create_project(
            "no-dir",
            json!({"executor": "kube", "workdir": "/definitely/not/here",
                   "target": {"namespace": "apps", "pod": "web-0"}}),
        )
        .await;
    let (_, command) = cluster.run(&elsewhere, json!({"command": "true"})).await;
    assert_eq!(command["termination_reason"], "start_failed");
    assert!(
        command["error"]
            .as_str()
            .unwrap()
            .contains("/definitely/not/here"),
        "{command}"
    );
    cluster
        .no_remote_processes_within(Duration::from_secs(5))
        .await;
    cluster.server.stop().await;
}

async fn resume_with_last_event_id_is_exact(backend: Backend) {
    let Some(cluster) = Cluster::start(backend).await else {
        return;
    };
    cluster.fake.add_pod(PodSpec::running("apps", "web-0"));
    let project = cluster
        .project("chatty", json!({"namespace": "apps", "pod": "web-0"}))
        .await;
    cluster.server.check_exact_resume(&project, 3000).await;
    cluster.server.stop().await;
}

/// Waits until the command has printed `marker` (so it runs, in the pod).
async fn wait_for_output(server: &TestServer, id: &str, marker: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = server
            .get(&format!("/api/v1/commands/{id}/output"), ADMIN_KEY)
            .await
            .text()
            .await
            .unwrap();
        if text.contains(marker) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no `{marker}` in {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_and_cancel_stop_the_remote_process_group() {
    let cluster = Cluster::start(Backend::Sqlite).await.unwrap();
    cluster.fake.add_pod(PodSpec::running("apps", "web-0"));
    let project = cluster
        .project("stoppable", json!({"namespace": "apps", "pod": "web-0"}))
        .await;

    let timed = cluster
        .server
        .submit(
            &project,
            json!({"command": "sleep 30 & sleep 30", "timeout_secs": 1}),
        )
        .await;
    let command = cluster
        .server
        .wait_for(&timed, None, Duration::from_secs(30))
        .await;
    assert_eq!(ended(&command), ("timed_out", "timeout"), "{command}");
    cluster
        .no_remote_processes_within(Duration::from_secs(10))
        .await;

    // Children that ignore SIGTERM are killed after the grace period.
    let cancelled = cluster
        .server
        .submit(
            &project,
            json!({"command": "trap '' TERM; sleep 30 & sleep 30 & echo started; wait"}),
        )
        .await;
    wait_for_output(&cluster.server, &cancelled, "started").await;
    assert!(!cluster.fake.live_processes().is_empty());
    let response = cluster
        .server
        .post(
            &format!("/api/v1/commands/{cancelled}/cancel"),
            ADMIN_KEY,
            json!({}),
        )
        .await;
    assert!(response.status().is_success(), "{}", response.status());
    let command = cluster
        .server
        .wait_for(&cancelled, None, Duration::from_secs(30))
        .await;
    assert_eq!(ended(&command), ("cancelled", "cancel"), "{command}");
    cluster
        .no_remote_processes_within(Duration::from_secs(10))
        .await;
    cluster.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_pods_containers_and_unready_pods_fail_the_start_clearly() {
    let cluster = Cluster::start(Backend::Sqlite).await.unwrap();
    cluster.fake.add_pod(PodSpec::running("apps", "web-0"));
    cluster
        .fake
        .add_pod(PodSpec::running("apps", "starting").ready(false));
    cluster.fake.add_pod(
        PodSpec::running("apps", "db-0")
            .label("app", "db")
            .ready(false),
    );
    let cases = [
        (
            json!({"namespace": "apps", "pod": "gone"}),
            "pod apps/gone not found",
        ),
        (
            json!({"namespace": "apps", "pod": "web-0", "container": "nope"}),
            "container nope not found in pod apps/web-0",
        ),
        (
            json!({"namespace": "apps", "pod": "starting"}),
            "pod apps/starting is not ready",
        ),
        (
            json!({"namespace": "apps", "selector": "app=db"}),
            "none is Running and Ready",
        ),
        (
            json!({"namespace": "apps", "selector": "app=none"}),
            "no pod in namespace apps matches",
        ),
    ];
    for (i, (target, expected)) in cases.into_iter().enumerate() {
        let project = cluster.project(&format!("broken-{i}"), target).await;
        let (_, command) = cluster.run(&project, json!({"command": "echo hi"})).await;
        assert_eq!(ended(&command), ("failed", "start_failed"), "{command}");
        let error = command["error"].as_str().unwrap();
        assert!(error.contains(expected), "{error:?} lacks {expected:?}");
    }
    assert_eq!(cluster.fake.execs(), 0, "nothing was started");
    cluster.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selector_picks_the_newest_ready_pod() {
    let cluster = Cluster::start(Backend::Sqlite).await.unwrap();
    let web = |name: &str, age_secs: u64| {
        PodSpec::running("apps", name)
            .label("app", "web")
            .age(Duration::from_secs(age_secs))
    };
    cluster.fake.add_pod(web("web-old", 300));
    cluster.fake.add_pod(web("web-new", 60));
    cluster.fake.add_pod(web("web-starting", 1).ready(false));
    cluster
        .fake
        .add_pod(PodSpec::running("apps", "db-0").label("app", "db"));
    let project = cluster
        .project("picky", json!({"namespace": "apps", "selector": "app=web"}))
        .await;
    let (events, _) = cluster
        .run(&project, json!({"command": "echo $HOSTNAME"}))
        .await;
    assert_eq!(output_of(&events, "stdout"), "web-new\n");
    cluster.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_deleted_mid_command_leaves_it_lost() {
    let cluster = Cluster::start(Backend::Sqlite).await.unwrap();
    cluster.fake.add_pod(PodSpec::running("apps", "web-0"));
    let project = cluster
        .project("doomed", json!({"namespace": "apps", "pod": "web-0"}))
        .await;
    let id = cluster
        .server
        .submit(&project, json!({"command": "echo started; sleep 30"}))
        .await;
    wait_for_output(&cluster.server, &id, "started").await;
    assert!(cluster.fake.delete_pod("apps", "web-0"));
    let command = cluster
        .server
        .wait_for(&id, None, Duration::from_secs(30))
        .await;
    assert_eq!(ended(&command), ("lost", "lost"), "{command}");
    let error = command["error"].as_str().unwrap();
    assert!(
        error.contains("pod apps/web-0 was deleted while the command ran"),
        "{error}"
    );
    cluster.server.stop().await;
}

async fn breaker_gauge(server: &TestServer) -> Option<i64> {
    server
        .metrics()
        .await
        .lines()
        .find(|l| l.starts_with("rdev_circuit_breaker_state{target=\"kubernetes\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_opens_the_breaker_commands_fail_fast_and_it_recovers() {
    let cluster = Cluster::start(Backend::Sqlite).await.unwrap();
    cluster.fake.add_pod(PodSpec::running("apps", "web-0"));
    let project = cluster
        .project("flaky", json!({"namespace": "apps", "pod": "web-0"}))
        .await;
    assert_eq!(breaker_gauge(&cluster.server).await, Some(0));

    cluster.fake.set_down(true);
    for _ in 0..3 {
        let (_, command) = cluster.run(&project, json!({"command": "echo hi"})).await;
        assert_eq!(command["termination_reason"], "start_failed");
        assert!(
            command["error"].as_str().unwrap().contains("unavailable"),
            "{command}"
        );
    }
    assert_eq!(breaker_gauge(&cluster.server).await, Some(1));
    let requests = cluster.fake.requests();
    let (_, command) = cluster.run(&project, json!({"command": "echo hi"})).await;
    let error = command["error"].as_str().unwrap();
    assert!(error.contains("circuit breaker is open"), "{error}");
    assert_eq!(
        cluster.fake.requests(),
        requests,
        "an open breaker sends nothing"
    );
    let ready = cluster
        .server
        .client
        .get(cluster.server.url("/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK, "the server stays ready");

    cluster.fake.set_down(false);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (events, command) = cluster.run(&project, json!({"command": "echo back"})).await;
    assert_eq!(command["status"], "succeeded", "{command}");
    assert_eq!(output_of(&events, "stdout"), "back\n");
    assert_eq!(breaker_gauge(&cluster.server).await, Some(0));
    cluster.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_status_and_restart_through_the_api() {
    let cluster = Cluster::start(Backend::Sqlite).await.unwrap();
    cluster.fake.set_ready_delay(Duration::from_millis(500));
    cluster.fake.add_pod(
        PodSpec::running("apps", "web-5d8f7-abcde")
            .label("app", "web")
            .controller(Controller::Deployment),
    );
    cluster
        .fake
        .add_pod(PodSpec::running("apps", "db-0").controller(Controller::StatefulSet));
    let web = cluster
        .project("web", json!({"namespace": "apps", "selector": "app=web"}))
        .await;
    let pod: Value = cluster
        .server
        .get(&format!("/api/v1/projects/{web}/pod"), ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(pod["name"], "web-5d8f7-abcde");
    assert_eq!(
        (
            pod["phase"].as_str(),
            pod["ready"].as_bool(),
            pod["node"].as_str()
        ),
        (Some("Running"), Some(true), Some("fake-node-1"))
    );
    assert_eq!(
        (pod["restarts"].as_i64(), pod["container"].as_str()),
        (Some(0), Some("main"))
    );
    assert!(pod["started_at"].is_string());

    let response = cluster
        .server
        .post(
            &format!("/api/v1/projects/{web}/pod/restart"),
            ADMIN_KEY,
            json!({}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let replaced: Value = response.json().await.unwrap();
    assert_ne!(replaced["name"], "web-5d8f7-abcde");
    assert_eq!(replaced["ready"], true);
    assert_eq!(cluster.fake.pod_names("apps").len(), 2);
    let audit: Value = cluster
        .server
        .get(
            &format!("/api/v1/audit?action=pod.restarted&target_id={web}"),
            ADMIN_KEY,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        audit["items"][0]["details"]["deleted_pod"],
        "web-5d8f7-abcde"
    );
    assert_eq!(
        audit["items"][0]["details"]["replacement_pod"],
        replaced["name"]
    );

    // A StatefulSet pod comes back under its name.
    let db = cluster
        .project("db", json!({"namespace": "apps", "pod": "db-0"}))
        .await;
    let response = cluster
        .server
        .post(
            &format!("/api/v1/projects/{db}/pod/restart"),
            ADMIN_KEY,
            json!({}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let restarted: Value = response.json().await.unwrap();
    assert_eq!(
        (restarted["name"].as_str(), restarted["ready"].as_bool()),
        (Some("db-0"), Some(true))
    );

    // Problems.
    let missing = cluster
        .project("missing", json!({"namespace": "apps", "pod": "nope"}))
        .await;
    let body = problem(
        cluster
            .server
            .get(&format!("/api/v1/projects/{missing}/pod"), ADMIN_KEY)
            .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(body["type"], "urn:rdev:problem:pod-not-found");
    let no_container = cluster
        .project(
            "no-container",
            json!({"namespace": "apps", "pod": "db-0", "container": "x"}),
        )
        .await;
    let body = problem(
        cluster
            .server
            .get(&format!("/api/v1/projects/{no_container}/pod"), ADMIN_KEY)
            .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(body["type"], "urn:rdev:problem:container-not-found");
    cluster.fake.forbid_namespace("locked");
    let locked = cluster
        .project("locked", json!({"namespace": "locked", "pod": "x"}))
        .await;
    let body = problem(
        cluster
            .server
            .get(&format!("/api/v1/projects/{locked}/pod"), ADMIN_KEY)
            .await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_eq!(body["type"], "urn:rdev:problem:kube-forbidden");
    assert!(
        body["detail"].as_str().unwrap().contains("cannot access"),
        "{body}"
    );
    // A read-only key sees the pod but cannot restart it.
    let (_, reader) = cluster
        .server
        .create_key(json!({"name": "reader", "scopes": ["read"]}))
        .await;
    let response = cluster
        .server
        .get(&format!("/api/v1/projects/{db}/pod"), &reader)
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    problem(
        cluster
            .server
            .post(
                &format!("/api/v1/projects/{db}/pod/restart"),
                &reader,
                json!({}),
            )
            .await,
        StatusCode::FORBIDDEN,
    )
    .await;
    cluster.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_kubernetes_kube_projects_are_refused() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let server = TestServer::start(&db).await;
    let refused = server
        .post(
            "/api/v1/projects",
            ADMIN_KEY,
            json!({"name": "k", "workdir": "/", "executor": "kube",
                   "target": {"namespace": "apps", "pod": "web-0"}}),
        )
        .await;
    let body = problem(refused, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(body["errors"][0]["pointer"], "/executor");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("KUBECONFIG")
    );
    let local = server
        .create_project(
            "l",
            json!({"target": {"namespace": "apps", "pod": "web-0"}}),
        )
        .await;
    let body = problem(
        server
            .get(&format!("/api/v1/projects/{local}/pod"), ADMIN_KEY)
            .await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(body["type"], "urn:rdev:problem:kube-not-configured");
    server.stop().await;
}

/// `RDEV_EXECUTORS` is the operator's: a project asking for another executor is refused when
/// written, and commands already queued for one that is no longer enabled fail saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executors_are_a_server_setting() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    // First the embedded default (local only), with no worker, so the command stays queued.
    let mut config = test_config(&db);
    config.worker.workers = 0;
    let local_only = TestServer::start_with(config).await;
    let project = local_only.create_project("was-local", json!({})).await;
    let queued = local_only
        .submit(&project, json!({"command": "echo never"}))
        .await;
    local_only.stop().await;

    // Then the same database behind a server with a Kubernetes API and its default: kube only.
    let fake = FakeKube::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&db);
    config.kube.kubeconfig = vec![fake.write_kubeconfig(dir.path())];
    let kube_only = TestServer::start_with(config).await;
    let failed = kube_only
        .wait_for(&queued, Some("failed"), Duration::from_secs(20))
        .await;
    assert_eq!(failed["termination_reason"], "start_failed", "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("executor `local` is not enabled on this server (RDEV_EXECUTORS)"),
        "{failed}"
    );
    for refused in [
        kube_only
            .post(
                "/api/v1/projects",
                ADMIN_KEY,
                json!({"name": "new-local", "workdir": "/tmp", "executor": "local"}),
            )
            .await,
        kube_only
            .patch(
                &format!("/api/v1/projects/{project}"),
                ADMIN_KEY,
                json!({"description": "still local"}),
            )
            .await,
    ] {
        let body = problem(refused, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(body["errors"][0]["pointer"], "/executor", "{body}");
        assert!(
            body["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("`local` is not enabled on this server (RDEV_EXECUTORS=kube"),
            "{body}"
        );
    }
    // Without an executor named, a new project gets the enabled one.
    let defaulted = kube_only
        .post(
            "/api/v1/projects",
            ADMIN_KEY,
            json!({"name": "defaulted", "workdir": "/",
                   "target": {"namespace": "apps", "pod": "web-0"}}),
        )
        .await;
    assert_eq!(defaulted.status(), StatusCode::CREATED);
    let defaulted: Value = defaulted.json().await.unwrap();
    assert_eq!(defaulted["executor"], "kube");
    // Moving the old project onto the enabled executor is the way out.
    let moved = kube_only
        .patch(
            &format!("/api/v1/projects/{project}"),
            ADMIN_KEY,
            json!({"executor": "kube", "target": {"namespace": "apps", "pod": "web-0"}}),
        )
        .await;
    assert_eq!(moved.status(), StatusCode::OK);
    kube_only.stop().await;
}

/// Stopping a command is an exec that can fail like any other call. A failed stop is tried
/// again with backoff (and at once on a repeated cancel) until the group is gone; a stop that
/// never works gives the command up as `lost` after the kill grace and a lease, which frees
/// its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_that_fails_is_retried_and_one_that_never_works_ends_lost() {
    let cluster = Cluster::start_with(Backend::Sqlite, |config| {
        config.worker.lease_secs = 5;
        // Failed stops must not open the breaker for the rest of the test.
        config.kube.kube_breaker_failures = 100;
    })
    .await
    .unwrap();
    cluster.fake.add_pod(PodSpec::running("apps", "web-0"));
    let project = cluster
        .server
        .create_project(
            "stops",
            json!({"executor": "kube", "target": {"namespace": "apps", "pod": "web-0"},
                   "max_concurrency": 1}),
        )
        .await;
    let server = &cluster.server;
    let cancel = |id: String| async move {
        let response = server
            .post(
                &format!("/api/v1/commands/{id}/cancel"),
                ADMIN_KEY,
                json!({}),
            )
            .await;
        assert!(response.status().is_success(), "{}", response.status());
    };

    // The first two stopping execs fail (500); the third stops the group.
    cluster.fake.fail_execs("kill -TERM", 2);
    let retried = server
        .submit(&project, json!({"command": "echo started; sleep 300"}))
        .await;
    wait_for_output(server, &retried, "started").await;
    cancel(retried.clone()).await;
    let command = server
        .wait_for(&retried, None, Duration::from_secs(30))
        .await;
    assert_eq!(ended(&command), ("cancelled", "cancel"), "{command}");
    assert_eq!(
        cluster.fake.failed_execs(),
        2,
        "two failed stops before the third"
    );
    cluster
        .no_remote_processes_within(Duration::from_secs(10))
        .await;

    // No stop works: a repeated cancel tries again at once, and the command ends `lost` after
    // the kill grace (1 s) and a lease (5 s).
    cluster.fake.fail_execs("kill -TERM", 1000);
    let stuck = server
        .submit(&project, json!({"command": "echo started; sleep 300"}))
        .await;
    wait_for_output(server, &stuck, "started").await;
    let cancelled_at = std::time::Instant::now();
    cancel(stuck.clone()).await;
    // Failed tries at about 0, 0.5, 1.5 and 3.5 s; the next would be at 7.5 s.
    tokio::time::sleep(Duration::from_millis(4000)).await;
    let before = cluster.fake.failed_execs();
    cancel(stuck.clone()).await;
    support::eventually(
        Duration::from_millis(1500),
        "a repeated cancel tries at once",
        || async { cluster.fake.failed_execs() > before },
    )
    .await;
    let command = server.wait_for(&stuck, None, Duration::from_secs(30)).await;
    let waited = cancelled_at.elapsed();
    assert_eq!(ended(&command), ("lost", "lost"), "{command}");
    let error = command["error"].as_str().unwrap();
    assert!(
        error.contains("did not end within 6s of being stopped (cancel)"),
        "{error}"
    );
    assert!(error.contains("fake-kube"), "the stop's own error: {error}");
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(20),
        "{waited:?}"
    );

    // Its slot is free: the project's one slot runs the next command.
    let next = server
        .submit(&project, json!({"command": "echo next"}))
        .await;
    let command = server.wait_for(&next, None, Duration::from_secs(30)).await;
    assert_eq!(command["status"], "succeeded", "{command}");
    cluster.server.stop().await;
}

/// A command (or environment) too long for the exec request's query string goes through stdin,
/// where no proxy in front of the API server limits it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_command_reaches_the_pod_through_stdin() {
    let cluster = Cluster::start(Backend::Sqlite).await.unwrap();
    cluster.fake.add_pod(PodSpec::running("apps", "web-0"));
    let project = cluster
        .project("long", json!({"namespace": "apps", "pod": "web-0"}))
        .await;
    let filler = "x".repeat(40 * 1024);
    let command = format!("echo start; : '{filler}'; echo \"${{#LONG}}\"; echo end");
    let (events, command) = cluster
        .run(
            &project,
            json!({"command": command, "env": {"LONG": "y".repeat(20_000)}}),
        )
        .await;
    assert_eq!(command["status"], "succeeded", "{command}");
    assert_eq!(output_of(&events, "stdout"), "start\n20000\nend\n");
    assert!(
        cluster.fake.longest_exec_query() < 8 * 1024,
        "{} bytes of query",
        cluster.fake.longest_exec_query()
    );
    cluster.server.stop().await;
}
