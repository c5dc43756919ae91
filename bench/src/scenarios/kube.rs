//! Scenario 6: submit -> first output byte through the kube executor, against `kubectl exec` of
//! the same command on the same fake API server (fake-kube: real protocol, local processes), in
//! the same run. kubectl's figure includes starting kubectl, as a person or a script pays it.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fake_kube::{FakeKube, PodSpec};
use tokio::io::AsyncReadExt;

use super::Scenario;
use crate::harness::{Ctx, Row, Server, SqliteDb, percentile};

pub const SCENARIO: Scenario = Scenario {
    name: "kube",
    about: "submit -> first output byte, kube executor vs kubectl exec, same fake API server",
    run: |ctx| Box::pin(run(ctx)),
};

const COMMAND: &str = "echo x";

/// Milliseconds from starting `kubectl exec` to the first byte on its stdout.
async fn kubectl_sample(kubeconfig: &Path) -> Result<f64> {
    let started = Instant::now();
    let mut child = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["exec", "-n", "bench", "bench-0", "--", "sh", "-c", COMMAND])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting kubectl")?;
    let mut stdout = child.stdout.take().context("kubectl stdout")?;
    let mut first = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(30), stdout.read(&mut first))
        .await
        .context("kubectl printed nothing within 30 s")??;
    let elapsed = started.elapsed().as_secs_f64() * 1000.0;
    if read == 0 {
        bail!("kubectl exec printed nothing");
    }
    let _ = child.wait().await;
    Ok(elapsed)
}

async fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let count = ctx.size(100, 5);
    let fake = FakeKube::start().await;
    fake.add_pod(PodSpec::running("bench", "bench-0"));
    let dir = tempfile_dir()?;
    let kubeconfig = fake.write_kubeconfig(&dir);
    let sqlite = SqliteDb::create()?;
    let server = Server::start(
        ctx,
        &[
            ("DATABASE_URL", sqlite.url.clone()),
            ("KUBECONFIG", kubeconfig.display().to_string()),
        ],
    )
    .await?;
    let project = server
        .post(
            "/api/v1/projects",
            serde_json::json!({"name": "bench-kube", "workdir": "/tmp", "executor": "kube",
                               "target": {"namespace": "bench", "pod": "bench-0"}}),
        )
        .await?["id"]
        .as_str()
        .context("project id")?
        .to_owned();
    let kubectl_present = tokio::process::Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .await
        .is_ok_and(|o| o.status.success());

    // Interleaved, so that both see the same machine state; the first three warm up.
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for index in 0..count + 3 {
        let rdev = server.submit_to_first_output(&project, COMMAND).await?;
        let kubectl = if kubectl_present {
            Some(kubectl_sample(&kubeconfig).await?)
        } else {
            None
        };
        if index >= 3 {
            ours.push(rdev);
            theirs.extend(kubectl);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    ours.sort_by(f64::total_cmp);
    theirs.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&ours, 50.0), percentile(&ours, 99.0));
    eprintln!(
        "  rdev-api kube executor: p50 {p50:.2} ms, p99 {p99:.2} ms over {} samples",
        ours.len()
    );
    let mut row = Row::new("6", "submit -> first output byte, kube executor, p50")
        .goal("<= 1.0x kubectl exec")
        .measured(format!("{p50:.2} ms (p99 {p99:.2} ms)"));
    if theirs.is_empty() {
        row = row
            .anchor("kubectl not installed: anchor unavailable")
            .met(false);
    } else {
        let (k50, k99) = (percentile(&theirs, 50.0), percentile(&theirs, 99.0));
        eprintln!(
            "  kubectl exec: p50 {k50:.2} ms, p99 {k99:.2} ms over {} samples",
            theirs.len()
        );
        let ratio = p50 / k50;
        row = row
            .anchor(format!("kubectl exec p50 {k50:.2} ms (p99 {k99:.2} ms)"))
            .ratio(ratio)
            .met(ratio <= 1.0);
    }
    Ok(vec![row])
}

/// A private directory for the kubeconfig.
fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir =
        std::env::temp_dir().join(format!("rdev-bench-kube-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
