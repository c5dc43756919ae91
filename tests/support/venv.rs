//! Python tools from PyPI for the tests that check us against independent implementations,
//! each in a virtualenv under the target directory, made on first use and reused after.
//! Without python3 and its `venv` module such a test is skipped with a note, except under
//! `CI=true`, where it fails.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use tokio::process::Command;

/// A virtualenv holding `package` (pinned, `name==version`), made on first use; `None` (with a
/// note) when python3 cannot make one outside CI.
pub async fn python_venv(package: &str) -> Option<PathBuf> {
    let version = package.replace("==", "-");
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
                package,
            ]))
            .await;
            if installed.status.success() {
                std::fs::write(&ready, package).unwrap();
                return Some(venv);
            }
            format!(
                "pip install {package} failed: {}",
                String::from_utf8_lossy(&installed.stderr)
            )
        }
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("cannot make a virtualenv with {package} under CI: {why}");
    }
    super::skipped(&format!("no {package} ({why})"));
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

/// Runs `command` to its end (at most 5 minutes), capturing its output.
pub async fn run(command: &mut Command) -> Output {
    let output = tokio::time::timeout(Duration::from_secs(300), command.output())
        .await
        .expect("finishes within 5 minutes");
    output.unwrap_or_else(|error| panic!("{command:?} did not start: {error}"))
}
