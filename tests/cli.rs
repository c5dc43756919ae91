//! The command-line client (`rdev-api run`, `commands`, `projects`) as a user runs it: the
//! real binary talking to a real server on a random port.

mod support;

use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use support::{ADMIN_KEY, Backend, TestDb, TestServer};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::Notify;

/// The binary as a client of `base`.
fn cli(base: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rdev-api"));
    command
        .args(args)
        .env("RDEV_URL", base)
        .env("RDEV_API_KEY", ADMIN_KEY)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

async fn finish(mut child: Child) -> Finished {
    let (mut stdout, mut stderr) = (String::new(), String::new());
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let (read_out, read_err, status) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(
            out.read_to_string(&mut stdout),
            err.read_to_string(&mut stderr),
            child.wait()
        )
    })
    .await
    .expect("the CLI finishes within 60 s");
    read_out.unwrap();
    read_err.unwrap();
    Finished {
        status: status.unwrap(),
        stdout,
        stderr,
    }
}

async fn run_cli(base: &str, args: &[&str]) -> Finished {
    finish(cli(base, args).spawn().unwrap()).await
}

async fn server() -> (TestDb, TestServer) {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let server = TestServer::start(&db).await;
    (db, server)
}

/// The newest command of the server.
async fn newest_command(server: &TestServer) -> Value {
    let page: Value = server
        .get("/api/v1/commands?limit=1", ADMIN_KEY)
        .await
        .json()
        .await
        .unwrap();
    page["items"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_mirrors_stdout_stderr_and_exit_code_with_a_project_by_name_or_id() {
    let (_db, server) = server().await;
    let project = server.create_project("cli-demo", json!({})).await;

    let by_name = run_cli(
        &server.base,
        &[
            "run",
            "--project",
            "cli-demo",
            "--",
            "printf 'out 1\\nout 2\\n'; echo 'err 1' >&2; printf 'out 3\\n'; exit 3",
        ],
    )
    .await;
    assert_eq!(by_name.stdout, "out 1\nout 2\nout 3\n");
    assert_eq!(by_name.stderr, "err 1\n");
    assert_eq!(by_name.status.code(), Some(3));

    // Several arguments reach the remote shell as exactly these arguments.
    let by_id = run_cli(
        &server.base,
        &[
            "run",
            "-p",
            &project,
            "--priority",
            "high",
            "--",
            "printf",
            "%s|",
            "a b",
            "$HOME",
            "c'd",
        ],
    )
    .await;
    assert_eq!(by_id.stdout, "a b|$HOME|c'd|", "{}", by_id.stderr);
    assert_eq!(by_id.status.code(), Some(0));
    assert_eq!(newest_command(&server).await["priority"], "high");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endings_without_an_exit_code_and_server_errors_have_documented_statuses() {
    let (_db, server) = server().await;
    server.create_project("cli-codes", json!({})).await;

    let timed_out = run_cli(
        &server.base,
        &[
            "run",
            "-p",
            "cli-codes",
            "--timeout",
            "1s",
            "--",
            "sleep 30",
        ],
    )
    .await;
    assert_eq!(timed_out.status.code(), Some(124));
    assert_eq!(newest_command(&server).await["status"], "timed_out");

    let unknown = run_cli(
        &server.base,
        &["run", "-p", "no-such-project", "--", "true"],
    )
    .await;
    assert_eq!(unknown.status.code(), Some(125));
    assert_eq!(unknown.stderr.lines().count(), 1, "{}", unknown.stderr);
    assert!(
        unknown
            .stderr
            .starts_with("rdev-api: 404 Not found: no project named `no-such-project`"),
        "{}",
        unknown.stderr
    );

    let mut refused = cli(&server.base, &["projects", "list"]);
    refused.env(
        "RDEV_API_KEY",
        "rdev_nosuchk0_0123456789abcdefghijklmnopqrstuv",
    );
    let refused = finish(refused.spawn().unwrap()).await;
    assert_eq!(refused.status.code(), Some(125));
    assert!(
        refused
            .stderr
            .starts_with("rdev-api: 401 Authentication required"),
        "{}",
        refused.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_cancels_the_command_on_the_server() {
    let (_db, server) = server().await;
    server.create_project("cli-cancel", json!({})).await;
    let mut child = cli(
        &server.base,
        &["run", "-p", "cli-cancel", "--", "echo started; sleep 600"],
    )
    .spawn()
    .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
        .await
        .expect("output within 30 s")
        .unwrap();
    assert_eq!(first.as_deref(), Some("started"));
    let id = newest_command(&server).await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let pid = i32::try_from(child.id().unwrap()).unwrap();
    // SAFETY: kill(2) with a pid of our own child and a valid signal number.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the CLI exits within 30 s")
        .unwrap();
    assert_eq!(status.code(), Some(130));
    let command = server.command(&id).await;
    assert_eq!(command["status"], "cancelled");
    assert_eq!(command["termination_reason"], "cancel");
}

/// A TCP proxy in front of the server whose connections can all be reset at once.
struct DroppingProxy {
    base: String,
    drop_all: Arc<Notify>,
    connections: Arc<AtomicUsize>,
}

impl DroppingProxy {
    async fn start(target: &str) -> DroppingProxy {
        let target = target.trim_start_matches("http://").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let drop_all = Arc::new(Notify::new());
        let connections = Arc::new(AtomicUsize::new(0));
        let (notify, count) = (drop_all.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let target = target.clone();
                let dropped = notify.clone();
                tokio::spawn(async move {
                    let mut upstream = tokio::net::TcpStream::connect(target).await.unwrap();
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                        // Both ends close: the client sees its stream cut mid-way.
                        _ = dropped.notified() => {}
                    }
                });
            }
        });
        DroppingProxy {
            base,
            drop_all,
            connections,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_resumes_after_a_dropped_connection_without_losing_or_repeating_output() {
    let (_db, server) = server().await;
    server.create_project("cli-resume", json!({})).await;
    let proxy = DroppingProxy::start(&server.base).await;
    let mut child = cli(
        &proxy.base,
        &[
            "run",
            "-p",
            "cli-resume",
            "--",
            "for i in $(seq 1 40); do echo line $i; sleep 0.05; done",
        ],
    )
    .spawn()
    .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut lines = Vec::new();
    while let Some(line) = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
        .await
        .expect("output within 30 s")
        .unwrap()
    {
        if line == "line 5" {
            proxy.drop_all.notify_waiters();
        }
        lines.push(line);
    }
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    let status = child.wait().await.unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    let expected: Vec<String> = (1..=40).map(|i| format!("line {i}")).collect();
    assert_eq!(lines, expected);
    assert!(stderr.contains("resuming after output"), "{stderr}");
    // One pooled connection before the drop, at least one after it.
    assert!(proxy.connections.load(Ordering::SeqCst) >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_and_projects_list_show_and_logs() {
    let (_db, server) = server().await;
    server.create_project("cli-list", json!({})).await;
    let ran = run_cli(
        &server.base,
        &[
            "run",
            "-p",
            "cli-list",
            "--",
            "echo to-out; echo to-err >&2",
        ],
    )
    .await;
    assert!(ran.status.success(), "{}", ran.stderr);
    let id = newest_command(&server).await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let projects = run_cli(&server.base, &["projects", "list"]).await;
    assert!(projects.stdout.lines().nth(1).unwrap().contains("cli-list"));

    let list = run_cli(&server.base, &["commands", "list", "--project", "cli-list"]).await;
    let row = list.stdout.lines().nth(1).unwrap().to_owned();
    assert!(row.starts_with(&id) && row.contains("succeeded"), "{row}");

    let show = run_cli(&server.base, &["commands", "show", &id]).await;
    assert!(
        show.stdout
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["status:", "succeeded"]),
        "{}",
        show.stdout
    );

    let logs = run_cli(&server.base, &["commands", "logs", &id]).await;
    assert_eq!(
        (logs.stdout.as_str(), logs.stderr.as_str()),
        ("to-out\n", "to-err\n")
    );

    let cancel = run_cli(&server.base, &["commands", "cancel", &id]).await;
    assert_eq!(cancel.status.code(), Some(125));
    assert!(
        cancel.stderr.starts_with("rdev-api: 409 Conflict"),
        "{}",
        cancel.stderr
    );
}

/// The binary as an operator tool on `database_url`.
async fn operator(database_url: &str, args: &[&str]) -> Finished {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rdev-api"));
    command
        .args(args)
        .env("DATABASE_URL", database_url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    finish(command.spawn().unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_migrate_and_manage_keys_without_a_server() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let migrated = operator(&db.url, &["migrate"]).await;
    assert!(migrated.status.success(), "{}", migrated.stderr);

    let created = operator(
        &db.url,
        &[
            "keys",
            "create",
            "--name",
            "ci-bot",
            "--scopes",
            "read,execute",
        ],
    )
    .await;
    assert!(created.status.success(), "{}", created.stderr);
    let secret = created.stdout.trim().to_owned();
    assert!(
        secret.starts_with("rdev_"),
        "only the secret on stdout: {secret}"
    );

    let refused = operator(
        &db.url,
        &["keys", "create", "--name", "x", "--scopes", "root"],
    )
    .await;
    assert_eq!(refused.status.code(), Some(125));
    assert!(
        refused.stderr.starts_with("rdev-api: invalid --scopes"),
        "{}",
        refused.stderr
    );

    // A server on that database accepts the key (and bootstraps nothing: it is not empty).
    let server = TestServer::start(&db).await;
    let me: Value = server
        .get("/api/v1/me", &secret)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(me["name"], "ci-bot");
    assert_eq!(me["scopes"], json!(["read", "execute"]));

    let listed = operator(&db.url, &["keys", "list"]).await;
    let row = listed
        .stdout
        .lines()
        .find(|line| line.contains("ci-bot"))
        .expect("the key is listed")
        .to_owned();
    let id = row.split_whitespace().next().unwrap().to_owned();
    assert_eq!(id, me["id"]);

    let revoked = operator(&db.url, &["keys", "revoke", &id]).await;
    assert!(revoked.status.success(), "{}", revoked.stderr);
    let listed = operator(&db.url, &["keys", "list"]).await;
    let row = listed
        .stdout
        .lines()
        .find(|l| l.contains("ci-bot"))
        .unwrap()
        .to_owned();
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert_ne!(columns[6], "-", "REVOKED is set: {row}");
    server.stop().await;
}
