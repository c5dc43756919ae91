//! What every scenario needs: the built binaries, server processes with their RSS, fresh
//! Postgres databases, statistics over repeated runs, and the result rows.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The admin key of every server the harness starts.
pub const ADMIN_KEY: &str = "rdev_benchadm_0123456789abcdefghijklmnopqrstuv";

/// What a scenario gets.
pub struct Ctx {
    pub bin_dir: PathBuf,
    pub workspace: PathBuf,
    pub admin_db_url: String,
    pub smoke: bool,
    pub runs: usize,
}

impl Ctx {
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// `full` normally, `small` in smoke mode.
    pub fn size<T>(&self, full: T, small: T) -> T {
        if self.smoke { small } else { full }
    }
}

/// One line of the result table.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub figure: String,
    pub anchor: String,
    pub goal: String,
    pub measured: String,
    pub ratio: String,
    /// `Some(true)` met, `Some(false)` missed, `None` reported only.
    pub met: Option<bool>,
}

impl Row {
    pub fn new(scenario: &str, figure: &str) -> Self {
        Self {
            scenario: scenario.to_owned(),
            figure: figure.to_owned(),
            anchor: "-".into(),
            goal: "-".into(),
            measured: "-".into(),
            ratio: "-".into(),
            met: None,
        }
    }

    pub fn anchor(mut self, anchor: impl Into<String>) -> Self {
        self.anchor = anchor.into();
        self
    }

    pub fn goal(mut self, goal: impl Into<String>) -> Self {
        self.goal = goal.into();
        self
    }

    pub fn measured(mut self, measured: impl Into<String>) -> Self {
        self.measured = measured.into();
        self
    }

    pub fn ratio(mut self, ratio: f64) -> Self {
        self.ratio = format!("{ratio:.2}x");
        self
    }

    pub fn met(mut self, met: bool) -> Self {
        self.met = Some(met);
        self
    }
}

/// Median with min and max of repeated measurements.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Spread {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Spread {
            median: percentile(&sorted, 50.0),
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
        }
    }

    pub fn show(&self, unit: &str, decimals: usize) -> String {
        format!(
            "{:.d$} {unit} [{:.d$}–{:.d$}]",
            self.median,
            self.min,
            self.max,
            d = decimals
        )
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// An rdev-api process, killed on drop.
pub struct Server {
    child: Child,
    pub base: String,
    pub pid: u32,
    pub client: reqwest::Client,
}

impl Server {
    /// Starts the binary on a random port with `env`, waiting for its "listening" log line.
    pub async fn start(ctx: &Ctx, env: &[(&str, String)]) -> Result<Server> {
        let mut command = Command::new(ctx.bin("rdev-api"));
        command
            .env("RDEV_LISTEN_ADDR", "127.0.0.1:0")
            .env("RDEV_BOOTSTRAP_ADMIN_KEY", ADMIN_KEY)
            .env("RDEV_LOG_FORMAT", "json")
            .env("RUST_LOG", "warn,rdev_api::app=info")
            // The rate limiter stays on (in memory with SQLite, in Postgres with Postgres), with
            // a limit no scenario reaches: scenario 1 measures the authenticated GET with it.
            .env("RDEV_RATE_LIMIT", "1000000000/60s")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().context("starting rdev-api")?;
        let pid = child.id().context("rdev-api pid")?;
        let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
        let address = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                if let Ok(log) = serde_json::from_str::<serde_json::Value>(&line)
                    && log["message"] == "rdev-api listening"
                {
                    return Ok(log["address"].as_str().unwrap_or_default().to_owned());
                }
            }
            bail!("rdev-api exited before listening")
        })
        .await
        .context("rdev-api did not start within 60 s")??;
        // Keep draining its log so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Server {
            child,
            base: format!("http://{address}"),
            pid,
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(200)
                .build()?,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> Result<serde_json::Value> {
        let response = self
            .client
            .post(self.url(path))
            .bearer_auth(ADMIN_KEY)
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        let body: serde_json::Value = response.json().await?;
        if !status.is_success() {
            bail!("POST {path}: {status} {body}");
        }
        Ok(body)
    }

    pub async fn get(&self, path: &str) -> Result<serde_json::Value> {
        Ok(self
            .client
            .get(self.url(path))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// Creates a local project and returns its id.
    pub async fn project(&self, name: &str, max_concurrency: u32) -> Result<String> {
        let body = serde_json::json!({
            "name": name, "workdir": "/tmp", "executor": "local", "max_concurrency": max_concurrency
        });
        Ok(self.post("/api/v1/projects", body).await?["id"]
            .as_str()
            .context("project id")?
            .to_owned())
    }

    pub async fn submit(&self, project: &str, command: &str) -> Result<String> {
        let body = self
            .post(
                &format!("/api/v1/projects/{project}/commands"),
                serde_json::json!({"command": command}),
            )
            .await?;
        Ok(body["id"].as_str().context("command id")?.to_owned())
    }

    /// The SSE events of a command, parsed.
    pub async fn events(
        &self,
        id: &str,
    ) -> Result<
        impl futures::Stream<
            Item = Result<
                eventsource_stream::Event,
                eventsource_stream::EventStreamError<reqwest::Error>,
            >,
        > + Send
        + Unpin
        + use<>,
    > {
        use eventsource_stream::Eventsource;
        let response = self
            .client
            .get(self.url(&format!("/api/v1/commands/{id}/events")))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await?
            .error_for_status()?;
        Ok(response.bytes_stream().eventsource())
    }

    /// Submits `command` and returns the milliseconds until its first SSE `output` event.
    pub async fn submit_to_first_output(&self, project: &str, command: &str) -> Result<f64> {
        use futures::StreamExt;
        let started = std::time::Instant::now();
        let id = self.submit(project, command).await?;
        let mut events = self.events(&id).await?;
        loop {
            let event = tokio::time::timeout(Duration::from_secs(30), events.next())
                .await
                .context("no output within 30 s")?
                .context("stream ended before output")??;
            match event.event.as_str() {
                "output" => return Ok(started.elapsed().as_secs_f64() * 1000.0),
                "end" => bail!("the command ended without output: {}", event.data),
                _ => {}
            }
        }
    }

    pub fn rss_kib(&self) -> Result<u64> {
        status_kib(self.pid, "VmRSS:")
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

pub fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{field} of {pid}"))
}

/// CPU time the whole machine has spent busy so far, all cores together (`/proc/stat`: user,
/// nice, system, irq, softirq and steal). The difference over a measurement charges it with all
/// it made the machine do: the server, the clients and the database alike.
pub fn machine_busy() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .context("the cpu line of /proc/stat")?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal
    let busy: u64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| ticks.get(i))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_micros(busy * 1_000_000 / per_sec))
}

/// CPU time this process has spent so far, user and system, all threads.
pub fn own_busy() -> Duration {
    // SAFETY: getrusage writes into the struct it is given and nothing else.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

/// Kernel memory held by TCP sockets (all of them), from /proc/net/sockstat, in KiB.
pub fn tcp_socket_kib() -> Result<u64> {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat")?;
    let pages: u64 = sockstat
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "mem").nth(1))
        .and_then(|v| v.parse().ok())
        .context("TCP mem in /proc/net/sockstat")?;
    Ok(pages * 4)
}

/// A fresh Postgres database, dropped on drop.
pub struct PgDb {
    pub url: String,
    admin: String,
    name: String,
}

impl PgDb {
    pub async fn create(admin: &str) -> Result<PgDb> {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(admin)
            .await
            .with_context(|| format!("connecting to Postgres at {admin}"))?;
        let name = format!("rdev_bench_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await?;
        let base = admin.rsplit_once('/').map_or(admin, |(base, _)| base);
        Ok(PgDb {
            url: format!("{base}/{name}"),
            admin: admin.to_owned(),
            name,
        })
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async move {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&admin).await.ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// A scratch SQLite database path in a temporary directory (removed on drop).
pub struct SqliteDb {
    pub url: String,
    dir: PathBuf,
}

impl SqliteDb {
    pub fn create() -> Result<SqliteDb> {
        let dir =
            std::env::temp_dir().join(format!("rdev-bench-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        Ok(SqliteDb {
            url: format!("sqlite://{}", dir.join("rdev.db").display()),
            dir,
        })
    }
}

impl Drop for SqliteDb {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs a program to completion and returns its stdout, failing on a non-zero exit.
pub async fn run_program(program: &Path, args: &[&str], dir: Option<&Path>) -> Result<String> {
    let mut command = Command::new(program);
    command
        .args(args)
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let output = command
        .output()
        .await
        .with_context(|| format!("running {}", program.display()))?;
    if !output.status.success() {
        bail!("{} {:?} failed: {}", program.display(), args, output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Raises this process's open-file limit (inherited by the servers it starts) to `wanted`.
pub fn raise_fd_limit(wanted: u64) -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read a plain struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            bail!("getrlimit failed");
        }
        limit.rlim_cur = wanted.min(limit.rlim_max);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            bail!("setrlimit failed");
        }
    }
    Ok(limit.rlim_cur)
}

/// "2 cores, Intel(R) ..., 24 GiB".
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    format!("{cores} cores, {model}, {} GiB RAM", mem_kib / 1024 / 1024)
}
