//! Configuration: read once at start from the environment (12-factor) or the matching flags,
//! validated by the parsers here so that a bad value stops the server with the variable's name.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use ipnet::IpNet;

use crate::domain::project::ExecutorKind;

pub const DEFAULT_DATABASE_URL: &str = "sqlite://rdev.db";

/// A value that must not reach logs: its `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "rdev-api",
    version,
    about = "HTTP gateway for running commands in Kubernetes pods"
)]
pub struct Config {
    /// Address the HTTP server listens on.
    #[arg(
        long,
        env = "RDEV_LISTEN_ADDR",
        value_name = "RDEV_LISTEN_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub listen_addr: SocketAddr,

    /// Storage: `sqlite://PATH` (embedded) or `postgres://...` (shared by replicas).
    #[arg(long, env = "DATABASE_URL", value_name = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, value_parser = parse_database_url, hide_env_values = true)]
    pub database_url: Secret,

    /// Admin key created on an empty database; a key is generated and printed once when unset.
    #[arg(
        long,
        env = "RDEV_BOOTSTRAP_ADMIN_KEY",
        value_name = "RDEV_BOOTSTRAP_ADMIN_KEY",
        hide_env_values = true
    )]
    pub bootstrap_admin_key: Option<Secret>,

    /// Comma-separated CIDRs whose `X-Forwarded-For` is believed.
    #[arg(long, env = "RDEV_TRUSTED_PROXIES", value_name = "RDEV_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_cidr)]
    pub trusted_proxies: Vec<IpNet>,

    /// Queue workers on this replica.
    #[arg(
        long,
        env = "RDEV_WORKERS",
        value_name = "RDEV_WORKERS",
        default_value_t = 4
    )]
    pub workers: usize,

    /// Command lease in seconds; a replica that stops renewing leaves its commands `lost`.
    #[arg(long, env = "RDEV_LEASE_SECS", value_name = "RDEV_LEASE_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub lease_secs: u64,

    /// Stored output per command, in bytes; the rest is counted and dropped.
    #[arg(long, env = "RDEV_MAX_OUTPUT_BYTES", value_name = "RDEV_MAX_OUTPUT_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub max_output_bytes: u64,

    /// Open SSE streams on this replica.
    #[arg(
        long,
        env = "RDEV_MAX_SSE_CONNECTIONS",
        value_name = "RDEV_MAX_SSE_CONNECTIONS",
        default_value_t = 10_000
    )]
    pub max_sse_connections: usize,

    /// Open SSE streams per API key on this replica.
    #[arg(
        long,
        env = "RDEV_MAX_SSE_PER_KEY",
        value_name = "RDEV_MAX_SSE_PER_KEY",
        default_value_t = 100
    )]
    pub max_sse_per_key: usize,

    /// Queued commands before submissions are refused with 503.
    #[arg(
        long,
        env = "RDEV_MAX_QUEUED",
        value_name = "RDEV_MAX_QUEUED",
        default_value_t = 10_000
    )]
    pub max_queued: u64,

    /// Seconds between SIGTERM and SIGKILL when a command is stopped.
    #[arg(
        long,
        env = "RDEV_KILL_GRACE_SECS",
        value_name = "RDEV_KILL_GRACE_SECS",
        default_value_t = 5
    )]
    pub kill_grace_secs: u64,

    /// Seconds running commands may go on after SIGTERM before the server stops them.
    #[arg(
        long,
        env = "RDEV_SHUTDOWN_GRACE_SECS",
        value_name = "RDEV_SHUTDOWN_GRACE_SECS",
        default_value_t = 20
    )]
    pub shutdown_grace_secs: u64,

    /// How long API keys and projects are cached (e.g. `30s`, `5m`).
    #[arg(long, env = "CACHE_TTL", value_name = "CACHE_TTL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub cache_ttl: Duration,

    /// Executor of projects that do not name one: `local` or `kube`.
    #[arg(long, env = "RDEV_EXECUTOR", value_name = "RDEV_EXECUTOR", default_value = "local", value_parser = parse_executor)]
    pub executor: ExecutorKind,

    /// Key that signs SSE stream tokens; set the same value on every replica (random when unset).
    #[arg(
        long,
        env = "RDEV_STREAM_TOKEN_SECRET",
        value_name = "RDEV_STREAM_TOKEN_SECRET",
        hide_env_values = true
    )]
    pub stream_token_secret: Option<Secret>,

    /// Seconds between SIGTERM and closing the listener, while `/ready` already answers 503.
    #[arg(
        long,
        env = "RDEV_DRAIN_DELAY_SECS",
        value_name = "RDEV_DRAIN_DELAY_SECS",
        default_value_t = 5
    )]
    pub drain_delay_secs: u64,

    /// Connections in the Postgres pool.
    #[arg(
        long,
        env = "RDEV_DB_MAX_CONNECTIONS",
        value_name = "RDEV_DB_MAX_CONNECTIONS",
        default_value_t = 16
    )]
    pub db_max_connections: u32,

    /// Milliseconds an idle worker waits before polling the queue without a wake-up.
    #[arg(
        long,
        env = "RDEV_POLL_INTERVAL_MS",
        value_name = "RDEV_POLL_INTERVAL_MS",
        default_value_t = 1000
    )]
    pub poll_interval_ms: u64,

    /// Seconds between SSE keep-alive comments.
    #[arg(
        long,
        env = "RDEV_SSE_KEEPALIVE_SECS",
        value_name = "RDEV_SSE_KEEPALIVE_SECS",
        default_value_t = 15
    )]
    pub sse_keepalive_secs: u64,

    /// Kubeconfig file(s) for the Kubernetes API outside a cluster (`:`-separated, merged in
    /// order); inside a pod, the service account is used when this is unset.
    #[arg(
        long,
        env = "KUBECONFIG",
        value_name = "KUBECONFIG",
        value_delimiter = ':'
    )]
    pub kubeconfig: Vec<PathBuf>,

    /// Consecutive Kubernetes API failures that open its circuit breaker.
    #[arg(long, env = "RDEV_KUBE_BREAKER_FAILURES", value_name = "RDEV_KUBE_BREAKER_FAILURES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub kube_breaker_failures: u32,

    /// Seconds an open Kubernetes circuit breaker fails calls fast before it probes again.
    #[arg(long, env = "RDEV_KUBE_BREAKER_OPEN_SECS", value_name = "RDEV_KUBE_BREAKER_OPEN_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub kube_breaker_open_secs: u64,

    /// Seconds `POST /projects/{id}/pod/restart` waits for the replacement pod to be Ready.
    #[arg(long, env = "RDEV_POD_RESTART_WAIT_SECS", value_name = "RDEV_POD_RESTART_WAIT_SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub pod_restart_wait_secs: u64,

    /// `json` (default) or `text`.
    #[arg(
        long,
        env = "RDEV_LOG_FORMAT",
        value_name = "RDEV_LOG_FORMAT",
        value_enum,
        default_value = "json"
    )]
    pub log_format: LogFormat,
}

impl Config {
    /// The defaults, without reading the environment (for tests and embedding).
    pub fn with_database(database_url: &str) -> Self {
        let mut config = Config::parse_from(["rdev-api", "--database-url", database_url]);
        // `parse_from` still reads the environment for unset flags; a caller's bootstrap key
        // must not leak into an embedded server.
        config.bootstrap_admin_key = None;
        // Nor may the caller's cluster: an embedded server talks to Kubernetes only when told.
        config.kubeconfig = Vec::new();
        config
    }

    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_secs)
    }
}

fn parse_database_url(raw: &str) -> Result<Secret, String> {
    if raw.starts_with("sqlite:")
        || raw.starts_with("postgres://")
        || raw.starts_with("postgresql://")
    {
        Ok(Secret(raw.to_owned()))
    } else {
        Err("expected sqlite://PATH or postgres://USER@HOST/DB".into())
    }
}

fn parse_cidr(raw: &str) -> Result<IpNet, String> {
    let raw = raw.trim();
    raw.parse::<IpNet>()
        .or_else(|_| raw.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("`{raw}` is not a CIDR or IP address"))
}

fn parse_executor(raw: &str) -> Result<ExecutorKind, String> {
    ExecutorKind::parse(raw).map_err(|rule| rule.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_with_runbook_names() {
        let config = Config::try_parse_from([
            "rdev-api",
            "--database-url",
            "sqlite://x.db",
            "--cache-ttl",
            "15s",
            "--trusted-proxies",
            "10.0.0.0/8,192.168.1.1",
        ])
        .unwrap();
        assert_eq!(config.cache_ttl, Duration::from_secs(15));
        assert_eq!(config.trusted_proxies.len(), 2);
        assert!(format!("{config:?}").contains("Secret(..)"));
    }

    #[test]
    fn bad_values_fail_naming_the_variable() {
        let error = Config::try_parse_from(["rdev-api", "--lease-secs", "0"]).unwrap_err();
        assert!(error.to_string().contains("RDEV_LEASE_SECS"), "{error}");
        let error =
            Config::try_parse_from(["rdev-api", "--database-url", "mysql://x"]).unwrap_err();
        assert!(error.to_string().contains("DATABASE_URL"), "{error}");
    }
}
