//! The fake is only as good as its faithfulness: the real `kubectl` (on PATH) runs against it
//! over plain http with a generated kubeconfig and must see what a cluster would show.

use std::process::Output;

use fake_kube::{FakeKube, PodSpec};

async fn kubectl(fake: &FakeKube, dir: &std::path::Path, args: &[&str]) -> Output {
    let kubeconfig = fake.write_kubeconfig(dir);
    tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .await
        .expect("kubectl is installed (the CI script installs it)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_exec_sees_output_streams_and_the_exit_code() {
    let fake = FakeKube::start().await;
    fake.add_pod(PodSpec::running("apps", "web-0").containers(&["app", "sidecar"]));
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "exec",
        "-n",
        "apps",
        "web-0",
        "-c",
        "app",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ];
    // kubectl itself can drop stdout that arrived just before the exit status
    // (kubernetes/kubernetes#124571); seen here once under heavy load. The fake sends every
    // output frame before the status, so a retry tells kubectl's race from a fault of ours.
    let mut output = kubectl(&fake, dir.path(), &args).await;
    for _ in 0..2 {
        if !output.stdout.is_empty() {
            break;
        }
        output = kubectl(&fake, dir.path(), &args).await;
    }
    assert_eq!(String::from_utf8_lossy(&output.stdout), "out\n");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("err\n"), "{stderr}");
    assert_eq!(output.status.code(), Some(3), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_exec_succeeds_and_reads_pods() {
    let fake = FakeKube::start().await;
    fake.add_pod(PodSpec::running("apps", "web-0").label("app", "web"));
    let dir = tempfile::tempdir().unwrap();
    let output = kubectl(
        &fake,
        dir.path(),
        &[
            "exec",
            "-n",
            "apps",
            "web-0",
            "--",
            "sh",
            "-c",
            "echo $HOSTNAME",
        ],
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&output.stdout), "web-0\n");
    assert_eq!(output.status.code(), Some(0));

    let output = kubectl(
        &fake,
        dir.path(),
        &["get", "pods", "-n", "apps", "-l", "app=web", "-o", "name"],
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "pod/web-0\n",
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let output = kubectl(
        &fake,
        dir.path(),
        &["exec", "-n", "apps", "nope", "--", "true"],
    )
    .await;
    assert_ne!(output.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("pods \"nope\" not found"), "{stderr}");
}
