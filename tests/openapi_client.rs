//! The OpenAPI document as a user meets it: parameters declared where they are read, and an
//! independent generator (`openapi-python-client`
//! from PyPI) turns `/openapi.json` into a Python client without a warning, and that client
//! creates a project, submits a command, reads it back and fetches its output from a real server.
//!
//! The generator lives in a virtualenv under the target directory (`support::venv`).

mod support;

use std::path::Path;

use serde_json::Value;
use support::venv::{python_venv, run};
use support::{ADMIN_KEY, Backend, TestDb, TestServer};
use tokio::process::Command;

/// The generator, pinned so that a new release cannot change what "no warning" means here.
const GENERATOR: &str = "openapi-python-client==0.29.1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_python_client_submits_a_command_and_reads_its_output() {
    let Some(venv) = python_venv(GENERATOR).await else {
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

fn path_with(dir: &Path) -> std::ffi::OsString {
    let mut paths = vec![dir.to_path_buf()];
    paths.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(paths).unwrap()
}
