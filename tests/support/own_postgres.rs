//! A Postgres server of the test's own (Debian's `initdb` and `pg_ctl`, a temporary directory),
//! so a test can stop and start the database under a running rdev-api. It listens only on a
//! Unix socket in that directory: no port to pick, nothing shared with other tests.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct OwnPostgres {
    dir: tempfile::TempDir,
}

impl OwnPostgres {
    /// Creates and starts a cluster; `None` (with a printed SKIPPED line) where the Postgres
    /// binaries or `runuser` are missing, except under `CI=true`, where that fails the test.
    pub fn start() -> Option<OwnPostgres> {
        let missing: Vec<_> = ["initdb", "pg_ctl", "runuser"]
            .into_iter()
            .filter(|tool| which(tool).is_none())
            .collect();
        if !missing.is_empty() {
            assert!(
                !std::env::var("CI").is_ok_and(|v| v == "true"),
                "a test-owned Postgres needs {missing:?} on PATH under CI"
            );
            super::skipped(&format!("no {missing:?} on PATH for a test-owned Postgres"));
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        chown_to_postgres(dir.path());
        let own = OwnPostgres { dir };
        own.as_postgres(&[
            "initdb",
            "-D",
            own.data().to_str().unwrap(),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ]);
        own.start_server();
        Some(own)
    }

    /// A `DATABASE_URL` for the `postgres` database over the socket.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@localhost:5432/postgres?host={}",
            self.dir.path().display()
        )
    }

    /// Stops the server at once (`-m fast`: connections are cut).
    pub fn stop(&self) {
        self.as_postgres(&[
            "pg_ctl",
            "-D",
            self.data().to_str().unwrap(),
            "-m",
            "fast",
            "-w",
            "stop",
        ]);
    }

    pub fn start_server(&self) {
        let options = format!(
            "-k {} -c listen_addresses='' -p 5432 -c fsync=off",
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log");
        self.as_postgres(&[
            "pg_ctl",
            "-D",
            self.data().to_str().unwrap(),
            "-o",
            &options,
            "-l",
            log.to_str().unwrap(),
            "-w",
            "start",
        ]);
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn as_postgres(&self, args: &[&str]) {
        let status = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("runuser runs");
        assert!(status.success(), "{args:?} failed");
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--", "pg_ctl", "-D"])
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(tool))
        .find(|path| path.is_file())
}

fn chown_to_postgres(path: &Path) {
    let status = Command::new("chown")
        .args(["postgres:postgres"])
        .arg(path)
        .status()
        .expect("chown runs");
    assert!(status.success(), "chown postgres {}", path.display());
}
