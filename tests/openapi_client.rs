//! The OpenAPI document as a user meets it: parameters declared where they are read, and an
//! independent generator (`openapi-python-client`
//! from PyPI) turns `/openapi.json` into a Python client without a warning, and that client
//! creates a project, submits a command, reads it back and fetches its output from a real server.
//!
//! The generator lives in a virtualenv under the target directory, made on first use (about
//! 25 s) and reused after. Without python3 and its `venv` module the test is skipped with a
//! note, except under `CI=true`, where it fails.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use support::{ADMIN_KEY, Backend, TestDb, TestServer};
use tokio::process::Command;

/// The generator, pinned so that a new release cannot change what "no warning" means here.
const GENERATOR: &str = "openapi-python-client==0.29.1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_python_client_submits_a_command_and_reads_its_output() {
    let Some(venv) = generator_venv().await else {
        return;
    };
    let db = TestDb::new(Backend::Sqlite)
        .await
        .expect("SQLite needs no server");
    let server = TestServer::start(&db).await;
    let spec = server.openapi().await;
    let work = tempfile::tempdir().unwrap();
    let spec_path = work.path().join("openapi.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();

    let generated = run(Command::new(venv.join("bin/openapi-python-client"))
        .arg("generate")
        .arg("--path")
        .arg(&spec_path)
        .args(["--meta", "none", "--output-path"])
        .arg(work.path().join("rdev_client"))
        // Its post-generation hooks call `ruff` from PATH; the venv has it.
        .env("PATH", path_with(&venv.join("bin"))))
    .await;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&generated.stdout),
        String::from_utf8_lossy(&generated.stderr)
    );
    assert!(generated.status.success(), "generation failed:\n{report}");
    for sign in ["warning", "skipping", "error"] {
        assert!(
            !report.to_lowercase().contains(sign),
            "the generator reported a problem ({sign}):\n{report}"
        );
    }

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openapi/drive_client.py");
    let driven = run(Command::new(venv.join("bin/python"))
        .arg(script)
        .arg(work.path())
        .arg(&server.base)
        .arg(ADMIN_KEY))
    .await;
    assert!(
        driven.status.success(),
        "the generated client failed:\n{}{}",
        String::from_utf8_lossy(&driven.stdout),
        String::from_utf8_lossy(&driven.stderr)
    );
    let result: Value = serde_json::from_slice(&driven.stdout).unwrap();
    assert_eq!(result["submitted_status"], "queued", "{result}");
    assert_eq!(result["priority"], "high");
    assert_eq!(result["status"], "succeeded");
    assert_eq!(result["exit_code"], 0);
    assert_eq!(result["stdout"], "hello from python\n");
    let mut lines: Vec<&str> = result["output"].as_str().unwrap().lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["hello from python", "oops"]);
    assert_eq!(result["listed"], serde_json::json!([result["id"]]));
    assert_eq!(result["audited"], serde_json::json!([result["id"]]));
    server.stop().await;
}

/// Needs no Python: every parameter is declared where the route reads it. A name in the path
/// template is `in: path`; nothing else is, and the list endpoints' filters are `in: query`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_parameter_is_declared_where_the_route_reads_it() {
    let db = TestDb::new(Backend::Sqlite)
        .await
        .expect("SQLite needs no server");
    let server = TestServer::start(&db).await;
    let spec = server.openapi().await;
    let mut query_params = Vec::new();
    for (path, operations) in spec["paths"].as_object().unwrap() {
        for (method, operation) in operations.as_object().unwrap() {
            for parameter in operation["parameters"].as_array().into_iter().flatten() {
                let name = parameter["name"].as_str().unwrap();
                let place = parameter["in"].as_str().unwrap();
                let templated = path.contains(&format!("{{{name}}}"));
                assert_eq!(
                    place == "path",
                    templated,
                    "{method} {path}: `{name}` is declared in: {place}"
                );
                if place == "query" {
                    query_params.push(format!("{method} {path} {name}"));
                }
            }
        }
    }
    for expected in [
        "get /api/v1/commands project_id",
        "get /api/v1/commands status",
        "get /api/v1/commands limit",
        "get /api/v1/audit actor",
        "get /api/v1/audit since",
        "get /api/v1/commands/{id}/output stream",
        "get /api/v1/commands/{id}/events last_event_id",
        "get /api/v1/commands/{id}/events token",
    ] {
        assert!(
            query_params.iter().any(|p| p == expected),
            "{expected} is not a query parameter: {query_params:?}"
        );
    }
    server.stop().await;
}

/// The virtualenv holding the generator, made on first use; `None` (with a note) when python3
/// cannot make one outside CI.
async fn generator_venv() -> Option<PathBuf> {
    let version = GENERATOR.replace("==", "-");
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("venv-{version}"));
    let ready = venv.join(".installed");
    if ready.exists() {
        return Some(venv);
    }
    let _lock = VenvLock::take(&venv).await;
    if ready.exists() {
        return Some(venv);
    }
    let _ = std::fs::remove_dir_all(&venv);
    let created = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
        .await;
    let why = match created {
        Err(error) => format!("python3 did not start: {error}"),
        Ok(output) if !output.status.success() => format!(
            "python3 -m venv failed (Debian: apt-get install python3-venv): {}",
            String::from_utf8_lossy(&output.stderr)
        ),
        Ok(_) => {
            let installed = run(Command::new(venv.join("bin/pip")).args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                GENERATOR,
            ]))
            .await;
            if installed.status.success() {
                std::fs::write(&ready, GENERATOR).unwrap();
                return Some(venv);
            }
            format!(
                "pip install {GENERATOR} failed: {}",
                String::from_utf8_lossy(&installed.stderr)
            )
        }
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("cannot make the generator's virtualenv under CI: {why}");
    }
    support::skipped(&format!("no openapi-python-client ({why})"));
    None
}

/// Keeps two test runs sharing a target directory from building the same virtualenv at once
/// (a virtualenv cannot be built elsewhere and moved: its scripts name their own path).
struct VenvLock(PathBuf);

impl VenvLock {
    async fn take(venv: &Path) -> VenvLock {
        let path = venv.with_extension("lock");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        loop {
            match std::fs::File::create_new(&path) {
                Ok(_) => return VenvLock(path),
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{} held for 5 minutes; remove it if no test run is making the venv",
                        path.display()
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => panic!("cannot create {}: {error}", path.display()),
            }
        }
    }
}

impl Drop for VenvLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn run(command: &mut Command) -> Output {
    let output = tokio::time::timeout(Duration::from_secs(300), command.output())
        .await
        .expect("finishes within 5 minutes");
    output.unwrap_or_else(|error| panic!("{command:?} did not start: {error}"))
}

fn path_with(dir: &Path) -> std::ffi::OsString {
    let mut paths = vec![dir.to_path_buf()];
    paths.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(paths).unwrap()
}
