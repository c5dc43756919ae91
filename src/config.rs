//! Configuration: read once at start from the environment (12-factor) or the matching flags,
//! validated by the parsers here so that a bad value stops the server with the variable's name.
//! [`Config`] is the server's, in groups; [`DatabaseConfig`] and [`ServerConfig`] are what the
//! operator and client subcommands read. Every setting read from the environment is declared
//! in this file; the command line that gathers them is `crate::cli::Cli`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser};
use ipnet::IpNet;

use crate::domain::project::{EnabledExecutors, ExecutorKind};
use crate::domain::rate_limit::RateLimit;
use crate::domain::webhook::RetrySchedule;
use crate::resilience::BreakerSettings;

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

/// `OTEL_TRACES_SAMPLER`, by the specification's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum TraceSampler {
    AlwaysOn,
    AlwaysOff,
    Traceidratio,
    ParentbasedAlwaysOn,
    ParentbasedAlwaysOff,
    ParentbasedTraceidratio,
}

/// Where request rate limits are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RateLimitBackend {
    /// In this process: exact for one replica, no I/O per request.
    Memory,
    /// In the `rate_limiting` table: exact across replicas, one statement per request.
    Postgres,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

/// The server's settings, in groups. Each group hands out its typed values (durations, breaker
/// settings) so the composition root converts nothing.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "rdev-api",
    version,
    about = "HTTP gateway for running commands in Kubernetes pods"
)]
pub struct Config {
    #[command(flatten)]
    pub http: HttpConfig,

    #[command(flatten)]
    pub storage: StorageConfig,

    #[command(flatten)]
    pub auth: AuthConfig,

    #[command(flatten)]
    pub worker: WorkerConfig,

    #[command(flatten)]
    pub execution: ExecutionConfig,

    #[command(flatten)]
    pub kube: KubeConfig,

    #[command(flatten)]
    pub webhooks: WebhookConfig,

    #[command(flatten)]
    pub telemetry: TelemetryConfig,
}

/// The HTTP listener and its connections.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpConfig {
    /// Address the HTTP server listens on.
    #[arg(long, env = "RDEV_LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen_addr: SocketAddr,

    /// Comma-separated CIDRs whose `X-Forwarded-For` is believed.
    #[arg(long, env = "RDEV_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_cidr)]
    pub trusted_proxies: Vec<IpNet>,

    /// Whether a request from loopback that no proxy forwarded is an operator on this host
    /// (`kubectl exec ... curl localhost`), who may read `/debug/pprof/*` without a key. Set it
    /// to `false` behind a service-mesh sidecar, where every request arrives from loopback.
    #[arg(long, env = "RDEV_TRUST_LOOPBACK", default_value_t = true, action = clap::ArgAction::Set, value_parser = clap::value_parser!(bool))]
    pub trust_loopback: bool,

    /// Largest request head (request line and headers) in bytes; a larger one is answered 431
    /// and its connection closed.
    #[arg(long, env = "RDEV_MAX_REQUEST_HEAD_BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u64).range(1024..=16 * 1024 * 1024))]
    pub max_request_head_bytes: u64,

    /// Seconds a client has to send a whole request head: from connecting, or on a kept-alive
    /// connection from the head's first byte. A slower client is cut off.
    #[arg(long, env = "RDEV_HEADER_READ_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_read_timeout_secs: u64,

    /// Seconds a kept-alive connection may stay quiet between requests (HTTP/1) or without a
    /// stream (HTTP/2) before it is closed. Keep it above the idle timeout of the proxy in front
    /// (ingress-nginx and most load balancers: 60 s; Google Cloud load balancers: 600 s), so
    /// that the proxy closes first and never sends a request on a socket closed here.
    #[arg(long, env = "RDEV_IDLE_TIMEOUT_SECS", default_value_t = 75, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub idle_timeout_secs: u64,

    /// Seconds between SIGTERM and closing the listener, while `/ready` already answers 503.
    #[arg(long, env = "RDEV_DRAIN_DELAY_SECS", default_value_t = 5)]
    pub drain_delay_secs: u64,

    /// Open SSE streams on this replica.
    #[arg(long, env = "RDEV_MAX_SSE_CONNECTIONS", default_value_t = 10_000)]
    pub max_sse_connections: usize,

    /// Open SSE streams per API key on this replica.
    #[arg(long, env = "RDEV_MAX_SSE_PER_KEY", default_value_t = 100)]
    pub max_sse_per_key: usize,

    /// Seconds between SSE keep-alive comments.
    #[arg(long, env = "RDEV_SSE_KEEPALIVE_SECS", default_value_t = 15)]
    pub sse_keepalive_secs: u64,
}

/// The database and what keeps its audit chain honest.
#[derive(Debug, Clone, clap::Args)]
pub struct StorageConfig {
    /// Storage: `sqlite://PATH` (embedded) or `postgres://...` (shared by replicas).
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, value_parser = parse_database_url, hide_env_values = true)]
    pub database_url: Secret,

    /// Connections in the Postgres pool.
    #[arg(long, env = "RDEV_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,

    /// Key of the audit chain (HMAC). Keep it out of the database: whoever can write the
    /// database but lacks the key cannot re-forge the chain. Unset with SQLite: generated once
    /// into `<database>.audit-key` (0600); unset with Postgres: the chain is unkeyed (a warning).
    #[arg(long, env = "RDEV_AUDIT_KEY", hide_env_values = true)]
    pub audit_key: Option<Secret>,
}

/// Keys: the first one, caching, rate limits, stream tokens.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthConfig {
    /// Admin key created on an empty database; a key is generated and printed once when unset.
    #[arg(long, env = "RDEV_BOOTSTRAP_ADMIN_KEY", hide_env_values = true)]
    pub bootstrap_admin_key: Option<Secret>,

    /// How long API keys and projects are cached (e.g. `30s`, `5m`).
    #[arg(long, env = "CACHE_TTL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub cache_ttl: Duration,

    /// Requests per API key in any sliding window (`600/60s`; units s, m, h), unless the key
    /// has its own `rate_limit`.
    #[arg(long, env = "RDEV_RATE_LIMIT", default_value = "600/60s", value_parser = parse_rate_limit)]
    pub rate_limit: RateLimit,

    /// Where rate limits are counted: `memory` (one replica) or `postgres` (shared by
    /// replicas). Default: `postgres` with a Postgres `DATABASE_URL`, else `memory`.
    #[arg(long, env = "RDEV_RATE_LIMIT_BACKEND", value_enum)]
    pub rate_limit_backend: Option<RateLimitBackend>,

    /// Failed or missing authentications per client address (`30/60s`: a burst of 30, then one
    /// every 2 s); past it the address gets 429 before its key is looked up.
    #[arg(long, env = "RDEV_AUTH_FAILURE_LIMIT", default_value = "30/60s", value_parser = parse_rate_limit)]
    pub auth_failure_limit: RateLimit,

    /// Key that signs SSE stream tokens. When unset, one is generated once and kept in the
    /// database, so every replica sharing it agrees.
    #[arg(long, env = "RDEV_STREAM_TOKEN_SECRET", hide_env_values = true)]
    pub stream_token_secret: Option<Secret>,

    /// Seconds a new stream token opens a stream for; reconnects to a command that has not
    /// ended (or ended less than this long ago) keep working after that.
    #[arg(
        long,
        env = "RDEV_STREAM_TOKEN_TTL_SECS",
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub stream_token_ttl_secs: u64,
}

/// The queue workers of this replica and the limits they keep.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerConfig {
    /// Queue workers on this replica.
    #[arg(long, env = "RDEV_WORKERS", default_value_t = 4)]
    pub workers: usize,

    /// Command lease in seconds; a replica that stops renewing leaves its commands `lost`.
    #[arg(long, env = "RDEV_LEASE_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub lease_secs: u64,

    /// Stored output per command, in bytes; the rest is counted and dropped.
    #[arg(long, env = "RDEV_MAX_OUTPUT_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub max_output_bytes: u64,

    /// Queued commands before submissions are refused with 503.
    #[arg(long, env = "RDEV_MAX_QUEUED", default_value_t = 10_000)]
    pub max_queued: u64,

    /// Queued commands of one project before its submissions are refused with 503, so one
    /// project cannot fill the shared queue.
    #[arg(long, env = "RDEV_MAX_QUEUED_PER_PROJECT", default_value_t = 1_000)]
    pub max_queued_per_project: u64,

    /// Seconds between SIGTERM and SIGKILL when a command is stopped.
    #[arg(long, env = "RDEV_KILL_GRACE_SECS", default_value_t = 5)]
    pub kill_grace_secs: u64,

    /// Seconds running commands may go on after SIGTERM before the server stops them.
    #[arg(long, env = "RDEV_SHUTDOWN_GRACE_SECS", default_value_t = 20)]
    pub shutdown_grace_secs: u64,

    /// Milliseconds an idle worker waits before polling the queue without a wake-up.
    #[arg(long, env = "RDEV_POLL_INTERVAL_MS", default_value_t = 1000)]
    pub poll_interval_ms: u64,
}

/// Which executors run commands, and as whom.
#[derive(Debug, Clone, clap::Args)]
pub struct ExecutionConfig {
    /// Executors this server runs commands with: `kube`, `local` or `kube,local`. A project
    /// whose executor is not enabled is refused, and its queued commands fail. Default: `kube`
    /// when a Kubernetes API is configured (KUBECONFIG or in-cluster), else `local`.
    #[arg(long, env = "RDEV_EXECUTORS", value_parser = parse_executors)]
    pub executors: Option<EnabledExecutors>,

    /// Executor of projects that do not name one (`local` or `kube`); one of RDEV_EXECUTORS.
    /// Default: `kube` when it is enabled, else `local`.
    #[arg(long, env = "RDEV_EXECUTOR", value_parser = parse_executor)]
    pub executor: Option<ExecutorKind>,

    /// Run local commands as this unprivileged user (uid, gid, no supplementary groups), so
    /// they cannot read the database file or the server's environment. Needs a root server.
    #[arg(long, env = "RDEV_LOCAL_RUN_AS")]
    pub local_run_as: Option<String>,
}

/// The Kubernetes API.
#[derive(Debug, Clone, clap::Args)]
pub struct KubeConfig {
    /// Kubeconfig file(s) for the Kubernetes API outside a cluster (`:`-separated, merged in
    /// order); inside a pod, the service account is used when this is unset.
    #[arg(long, env = "KUBECONFIG", value_delimiter = ':')]
    pub kubeconfig: Vec<PathBuf>,

    /// Consecutive Kubernetes API failures that open its circuit breaker.
    #[arg(long, env = "RDEV_KUBE_BREAKER_FAILURES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub kube_breaker_failures: u32,

    /// Seconds an open Kubernetes circuit breaker fails calls fast before it probes again.
    #[arg(long, env = "RDEV_KUBE_BREAKER_OPEN_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub kube_breaker_open_secs: u64,

    /// Seconds `POST /projects/{id}/pod/restart` waits for the replacement pod to be Ready.
    #[arg(long, env = "RDEV_POD_RESTART_WAIT_SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub pod_restart_wait_secs: u64,
}

/// Webhook delivery.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookConfig {
    /// Let webhooks reach loopback, private, link-local (cloud metadata), CGNAT and unique-local
    /// addresses (`true` or `false`). Off by default: the SSRF guard refuses them.
    #[arg(long, env = "RDEV_WEBHOOK_ALLOW_PRIVATE", default_value_t = false, action = clap::ArgAction::Set, value_parser = clap::value_parser!(bool))]
    pub webhook_allow_private: bool,

    /// An egress proxy for every webhook (`http://HOST:PORT`). The proxy resolves the hosts, so
    /// refusing private destinations becomes its duty. The process's own HTTP_PROXY,
    /// HTTPS_PROXY and ALL_PROXY are never used for webhooks.
    #[arg(long, env = "RDEV_WEBHOOK_PROXY", value_parser = parse_proxy_url)]
    pub webhook_proxy: Option<url::Url>,

    /// Waits between webhook attempts (comma-separated durations: `5s,30s,2m`); a delivery gets
    /// one attempt more than there are waits, then fails. Each wait is jittered by +-20 %.
    #[arg(long, env = "RDEV_WEBHOOK_RETRY_SCHEDULE", value_delimiter = ',', default_value = "5s,30s,2m,10m,1h,6h", value_parser = parse_delay)]
    pub webhook_retry_schedule: Vec<Duration>,

    /// Seconds one webhook attempt may take in all (connect, send, answer).
    #[arg(long, env = "RDEV_WEBHOOK_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub webhook_timeout_secs: u64,

    /// Milliseconds a webhook connection may take to open.
    #[arg(long, env = "RDEV_WEBHOOK_CONNECT_TIMEOUT_MS", default_value_t = 3000, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub webhook_connect_timeout_ms: u64,

    /// Webhook requests in flight on this replica, all endpoints together.
    #[arg(long, env = "RDEV_WEBHOOK_CONCURRENCY", default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub webhook_concurrency: u64,

    /// Webhook requests in flight to one endpoint on this replica.
    #[arg(long, env = "RDEV_WEBHOOK_ENDPOINT_CONCURRENCY", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub webhook_endpoint_concurrency: u64,

    /// Milliseconds between looks for due webhook deliveries when there is nothing to send.
    #[arg(long, env = "RDEV_WEBHOOK_POLL_MS", default_value_t = 200, value_parser = clap::value_parser!(u64).range(5..=60_000))]
    pub webhook_poll_ms: u64,

    /// Consecutive failed attempts to one endpoint that open its circuit breaker.
    #[arg(long, env = "RDEV_WEBHOOK_BREAKER_FAILURES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub webhook_breaker_failures: u32,

    /// Seconds an endpoint's open circuit holds its deliveries before one probe is sent.
    #[arg(long, env = "RDEV_WEBHOOK_BREAKER_OPEN_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub webhook_breaker_open_secs: u64,
}

/// Logs and exported traces.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryConfig {
    /// `json` (default) or `text`.
    #[arg(long, env = "RDEV_LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,

    /// OTLP/HTTP collector base URL (`http://HOST:4318`): traces go to `<URL>/v1/traces` as
    /// protobuf, batched off the request path. Unset: no export.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_parser = parse_otlp_endpoint)]
    pub otlp_endpoint: Option<String>,

    /// Which spans are exported, in `RUST_LOG` syntax (`info`, `rdev_api=debug,info`), apart
    /// from `RUST_LOG`, which filters the log lines only. Sampling then follows
    /// `OTEL_TRACES_SAMPLER`.
    #[arg(long, env = "RDEV_TRACE_FILTER", default_value = "info", value_parser = parse_trace_filter)]
    pub trace_filter: String,

    /// `service.name` of exported spans (else `service.name` from `OTEL_RESOURCE_ATTRIBUTES`,
    /// else `rdev-api`).
    #[arg(long, env = "OTEL_SERVICE_NAME")]
    pub otel_service_name: Option<String>,

    /// More resource attributes of exported spans: `key=value,key=value` (values
    /// percent-encoded, as the OpenTelemetry specification says).
    #[arg(long, env = "OTEL_RESOURCE_ATTRIBUTES", value_delimiter = ',', value_parser = parse_resource_attribute)]
    pub otel_resource_attributes: Vec<(String, String)>,

    /// Which traces are sampled: `always_on`, `always_off`, `traceidratio`,
    /// `parentbased_always_on` (default), `parentbased_always_off`, `parentbased_traceidratio`.
    #[arg(
        long,
        env = "OTEL_TRACES_SAMPLER",
        value_enum,
        default_value = "parentbased_always_on"
    )]
    pub otel_traces_sampler: TraceSampler,

    /// The ratio of the `*traceidratio` samplers, from 0 to 1 (default 1).
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG", value_parser = parse_ratio)]
    pub otel_traces_sampler_arg: Option<f64>,
}

impl Config {
    /// Parses `args` (and, for what they leave unset, the environment), naming every value
    /// after its variable ([`name_values_after_env`]).
    pub fn try_parse_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut matches = name_values_after_env(Self::command()).try_get_matches_from(args)?;
        Self::from_arg_matches_mut(&mut matches)
    }

    /// The defaults, without reading the environment (for tests and embedding).
    pub fn with_database(database_url: &str) -> Self {
        let mut config = Self::try_parse_args(["rdev-api", "--database-url", database_url])
            .expect("the defaults and a database URL parse");
        // Parsing still reads the environment for unset flags; a caller's bootstrap key must
        // not leak into an embedded server.
        config.auth.bootstrap_admin_key = None;
        // Nor may the caller's cluster: an embedded server talks to Kubernetes only when told.
        config.kube.kubeconfig = Vec::new();
        config
    }

    /// The rate limit backend: the configured one, else the one that goes with the storage.
    /// Postgres counters need a Postgres database.
    pub fn rate_limit_backend(&self) -> Result<RateLimitBackend, ConfigError> {
        match (self.auth.rate_limit_backend, self.storage.uses_postgres()) {
            (Some(RateLimitBackend::Postgres), false) => Err(ConfigError {
                variable: "RDEV_RATE_LIMIT_BACKEND",
                message: "`postgres` needs a Postgres DATABASE_URL".into(),
            }),
            (Some(backend), _) => Ok(backend),
            (None, true) => Ok(RateLimitBackend::Postgres),
            (None, false) => Ok(RateLimitBackend::Memory),
        }
    }
}

/// Names every value after its environment variable in help and errors (`--lease-secs
/// <RDEV_LEASE_SECS>`), so that a bad value names the variable an operator set; the flags are
/// declared with their `env` alone.
pub fn name_values_after_env(command: clap::Command) -> clap::Command {
    command
        .mut_args(|arg| {
            let env = arg
                .get_env()
                .and_then(|env| env.to_str())
                .map(str::to_owned);
            match env {
                Some(env) => arg.value_name(env),
                None => arg,
            }
        })
        .mut_subcommands(name_values_after_env)
}

fn secs(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

impl HttpConfig {
    pub fn max_head_bytes(&self) -> usize {
        usize::try_from(self.max_request_head_bytes).unwrap_or(usize::MAX)
    }

    pub fn header_read_timeout(&self) -> Duration {
        secs(self.header_read_timeout_secs)
    }

    pub fn idle_timeout(&self) -> Duration {
        secs(self.idle_timeout_secs)
    }

    pub fn drain_delay(&self) -> Duration {
        secs(self.drain_delay_secs)
    }

    pub fn sse_keep_alive(&self) -> Duration {
        secs(self.sse_keepalive_secs)
    }
}

impl StorageConfig {
    /// True when `DATABASE_URL` names Postgres.
    pub fn uses_postgres(&self) -> bool {
        self.database_url.expose().starts_with("postgres")
    }
}

impl AuthConfig {
    pub fn stream_token_ttl(&self) -> Duration {
        secs(self.stream_token_ttl_secs)
    }
}

impl WorkerConfig {
    pub fn lease(&self) -> Duration {
        secs(self.lease_secs)
    }

    pub fn kill_grace(&self) -> Duration {
        secs(self.kill_grace_secs)
    }

    pub fn shutdown_grace(&self) -> Duration {
        secs(self.shutdown_grace_secs)
    }

    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }
}

impl ExecutionConfig {
    /// `RDEV_EXECUTORS` and `RDEV_EXECUTOR`, checked against whether a Kubernetes API is
    /// configured: `kube` cannot be enabled without one, and the default must be enabled.
    pub fn settings(&self, kube_configured: bool) -> Result<ExecutorSettings, ConfigError> {
        let enabled = self
            .executors
            .unwrap_or(EnabledExecutors::only(if kube_configured {
                ExecutorKind::Kube
            } else {
                ExecutorKind::Local
            }));
        if enabled.allows(ExecutorKind::Kube) && !kube_configured {
            return Err(ConfigError {
                variable: "RDEV_EXECUTORS",
                message: format!(
                    "`{enabled}` enables kube, but no Kubernetes API is configured: run in a cluster (service account) or set KUBECONFIG"
                ),
            });
        }
        let default = self.executor.unwrap_or(enabled.preferred());
        if !enabled.allows(default) {
            return Err(ConfigError {
                variable: "RDEV_EXECUTOR",
                message: format!(
                    "`{}` is not one of the enabled executors (RDEV_EXECUTORS={enabled})",
                    default.as_str()
                ),
            });
        }
        Ok(ExecutorSettings { enabled, default })
    }
}

impl KubeConfig {
    pub fn breaker(&self) -> BreakerSettings {
        BreakerSettings {
            failure_threshold: self.kube_breaker_failures,
            open_for: secs(self.kube_breaker_open_secs),
        }
    }

    pub fn pod_restart_wait(&self) -> Duration {
        secs(self.pod_restart_wait_secs)
    }
}

impl WebhookConfig {
    pub fn timeout(&self) -> Duration {
        secs(self.webhook_timeout_secs)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.webhook_connect_timeout_ms)
    }

    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.webhook_poll_ms)
    }

    /// How long a claimed webhook delivery stays with its dispatcher: an attempt may wait for its
    /// endpoint's slot (one timeout) and then run (another), so three timeouts and a second.
    pub fn lease(&self) -> Duration {
        secs(self.webhook_timeout_secs * 3 + 1)
    }

    pub fn breaker(&self) -> BreakerSettings {
        BreakerSettings {
            failure_threshold: self.webhook_breaker_failures,
            open_for: secs(self.webhook_breaker_open_secs),
        }
    }

    pub fn retry_schedule(&self) -> RetrySchedule {
        RetrySchedule::new(self.webhook_retry_schedule.clone())
    }
}

/// The executors a server runs, and the one new projects get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecutorSettings {
    pub enabled: EnabledExecutors,
    pub default: ExecutorKind,
}

/// Settings that parse one by one but do not fit together.
#[derive(Debug, thiserror::Error)]
#[error("invalid {variable}: {message}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub message: String,
}

/// The database an operator command works on.
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseConfig {
    /// Storage: `sqlite://PATH` or `postgres://...`, as the server uses.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, value_parser = parse_database_url, hide_env_values = true, global = true)]
    pub database_url: Secret,
}

/// The server a client command talks to.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerConfig {
    /// Base URL of the rdev-api server (`http://` or `https://`).
    #[arg(long, env = "RDEV_URL", default_value = "http://127.0.0.1:8080", value_parser = parse_server_url, global = true)]
    pub url: String,

    /// API key, sent as `Authorization: Bearer`.
    // Optional here because clap cannot require a global flag; the client refuses to start
    // without it.
    #[arg(long, env = "RDEV_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<Secret>,
}

fn parse_server_url(raw: &str) -> Result<String, String> {
    let trimmed = raw.trim_end_matches('/');
    let host = trimmed
        .strip_prefix("http://")
        .or_else(|| trimmed.strip_prefix("https://"));
    match host {
        Some(host) if !host.is_empty() => Ok(trimmed.to_owned()),
        _ => Err("expected http://HOST[:PORT] or https://HOST[:PORT]".into()),
    }
}

/// Export speaks plain HTTP (a collector or sidecar on the pod's network); `https` is refused
/// at start rather than failing at every export.
fn parse_otlp_endpoint(raw: &str) -> Result<String, String> {
    let trimmed = raw.trim_end_matches('/');
    match trimmed.strip_prefix("http://") {
        Some(host) if !host.is_empty() && !host.contains(char::is_whitespace) => {
            Ok(trimmed.to_owned())
        }
        _ => Err("expected http://HOST[:PORT] (OTLP over HTTP/protobuf, without TLS)".into()),
    }
}

fn parse_proxy_url(raw: &str) -> Result<url::Url, String> {
    match url::Url::parse(raw) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => Ok(url),
        _ => Err("expected http://HOST:PORT or https://HOST:PORT".into()),
    }
}

fn parse_trace_filter(raw: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::builder()
        .parse(raw)
        .map(|_| raw.to_owned())
        .map_err(|e| format!("`{raw}`: {e}"))
}

fn parse_resource_attribute(raw: &str) -> Result<(String, String), String> {
    let (key, value) = raw
        .split_once('=')
        .ok_or_else(|| format!("`{raw}` is not key=value"))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(format!("`{raw}` has an empty key"));
    }
    let value = percent_decode(value.trim()).ok_or_else(|| format!("`{raw}`: bad %-escape"))?;
    Ok((key.to_owned(), value))
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn parse_ratio(raw: &str) -> Result<f64, String> {
    match raw.trim().parse::<f64>() {
        Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
        _ => Err("expected a number from 0 to 1".into()),
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

fn parse_delay(raw: &str) -> Result<Duration, String> {
    let delay = humantime::parse_duration(raw.trim()).map_err(|e| format!("{raw:?}: {e}"))?;
    if delay > Duration::from_secs(7 * 24 * 3600) {
        return Err(format!("{raw:?} is longer than a week"));
    }
    Ok(delay)
}

fn parse_cidr(raw: &str) -> Result<IpNet, String> {
    let raw = raw.trim();
    raw.parse::<IpNet>()
        .or_else(|_| raw.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("`{raw}` is not a CIDR or IP address"))
}

fn parse_rate_limit(raw: &str) -> Result<RateLimit, String> {
    RateLimit::parse(raw).map_err(|rule| rule.0)
}

fn parse_executor(raw: &str) -> Result<ExecutorKind, String> {
    ExecutorKind::parse(raw).map_err(|rule| rule.0)
}

fn parse_executors(raw: &str) -> Result<EnabledExecutors, String> {
    EnabledExecutors::parse(raw).map_err(|rule| rule.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_with_runbook_names() {
        let config = Config::try_parse_args([
            "rdev-api",
            "--database-url",
            "sqlite://x.db",
            "--cache-ttl",
            "15s",
            "--trusted-proxies",
            "10.0.0.0/8,192.168.1.1",
        ])
        .unwrap();
        assert_eq!(config.auth.cache_ttl, Duration::from_secs(15));
        assert_eq!(config.http.trusted_proxies.len(), 2);
        assert!(format!("{config:?}").contains("Secret(..)"));
    }

    #[test]
    fn opentelemetry_settings_parse_and_refuse_bad_values() {
        let config = Config::try_parse_args([
            "rdev-api",
            "--otlp-endpoint",
            "http://127.0.0.1:4318/",
            "--otel-resource-attributes",
            "deployment.environment=prod,team=a%2Cb",
            "--otel-traces-sampler",
            "parentbased_traceidratio",
            "--otel-traces-sampler-arg",
            "0.25",
        ])
        .unwrap();
        assert_eq!(
            config.telemetry.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4318")
        );
        assert_eq!(config.telemetry.otel_service_name, None);
        assert_eq!(
            config.telemetry.otel_resource_attributes,
            [
                ("deployment.environment".to_owned(), "prod".to_owned()),
                ("team".to_owned(), "a,b".to_owned())
            ]
        );
        assert_eq!(
            config.telemetry.otel_traces_sampler,
            TraceSampler::ParentbasedTraceidratio
        );
        assert_eq!(config.telemetry.otel_traces_sampler_arg, Some(0.25));
        for bad in [
            ["--otlp-endpoint", "https://collector:4318"],
            ["--otlp-endpoint", "collector:4318"],
            ["--otel-traces-sampler", "sometimes"],
            ["--otel-traces-sampler-arg", "1.5"],
            ["--otel-resource-attributes", "novalue"],
        ] {
            let error = Config::try_parse_args(["rdev-api", bad[0], bad[1]]).unwrap_err();
            let env_name = bad[0]
                .trim_start_matches("--")
                .replace('-', "_")
                .to_uppercase();
            let shown = error.to_string();
            assert!(
                shown.contains(&env_name) || shown.contains("OTEL_EXPORTER_OTLP_ENDPOINT"),
                "{bad:?}: {shown}"
            );
        }
    }

    #[test]
    fn bad_values_fail_naming_the_variable() {
        let error = Config::try_parse_args(["rdev-api", "--lease-secs", "0"]).unwrap_err();
        assert!(error.to_string().contains("RDEV_LEASE_SECS"), "{error}");
        let error =
            Config::try_parse_args(["rdev-api", "--header-read-timeout-secs", "0"]).unwrap_err();
        assert!(
            error.to_string().contains("RDEV_HEADER_READ_TIMEOUT_SECS"),
            "{error}"
        );
        let error =
            Config::try_parse_args(["rdev-api", "--max-request-head-bytes", "10"]).unwrap_err();
        assert!(
            error.to_string().contains("RDEV_MAX_REQUEST_HEAD_BYTES"),
            "{error}"
        );
        let error =
            Config::try_parse_args(["rdev-api", "--database-url", "mysql://x"]).unwrap_err();
        assert!(error.to_string().contains("DATABASE_URL"), "{error}");
        for bad in ["600", "0/60s", "600/60d", "lots"] {
            let error = Config::try_parse_args(["rdev-api", "--rate-limit", bad]).unwrap_err();
            assert!(error.to_string().contains("RDEV_RATE_LIMIT"), "{error}");
            let error =
                Config::try_parse_args(["rdev-api", "--auth-failure-limit", bad]).unwrap_err();
            assert!(
                error.to_string().contains("RDEV_AUTH_FAILURE_LIMIT"),
                "{error}"
            );
        }
        let error =
            Config::try_parse_args(["rdev-api", "--rate-limit-backend", "redis"]).unwrap_err();
        assert!(
            error.to_string().contains("RDEV_RATE_LIMIT_BACKEND"),
            "{error}"
        );
    }

    #[test]
    fn executors_default_to_kube_with_a_kubernetes_api_and_refuse_what_cannot_run() {
        let plain = Config::try_parse_args(["rdev-api"]).unwrap();
        let local = plain.execution.settings(false).unwrap();
        assert_eq!(local.enabled, EnabledExecutors::only(ExecutorKind::Local));
        assert_eq!(local.default, ExecutorKind::Local);
        let kube = plain.execution.settings(true).unwrap();
        assert_eq!(kube.enabled, EnabledExecutors::only(ExecutorKind::Kube));
        assert_eq!(kube.default, ExecutorKind::Kube);

        let both = Config::try_parse_args(["rdev-api", "--executors", "kube,local"]).unwrap();
        let error = both.execution.settings(false).unwrap_err();
        assert_eq!(error.variable, "RDEV_EXECUTORS", "{error}");
        assert_eq!(
            both.execution.settings(true).unwrap().default,
            ExecutorKind::Kube
        );

        let mismatch = Config::try_parse_args(["rdev-api", "--executor", "local"]).unwrap();
        let error = mismatch.execution.settings(true).unwrap_err();
        assert_eq!(error.variable, "RDEV_EXECUTOR", "{error}");

        let error = Config::try_parse_args(["rdev-api", "--executors", "docker"]).unwrap_err();
        assert!(error.to_string().contains("RDEV_EXECUTORS"), "{error}");
    }

    #[test]
    fn the_rate_limit_backend_follows_the_storage_unless_told() {
        let sqlite = Config::try_parse_args(["rdev-api", "--database-url", "sqlite://x.db"]);
        let sqlite = sqlite.unwrap();
        assert_eq!(sqlite.auth.rate_limit.to_string(), "600/60s");
        assert_eq!(
            sqlite.rate_limit_backend().unwrap(),
            RateLimitBackend::Memory
        );
        let postgres = Config::try_parse_args(["rdev-api", "--database-url", "postgres://db/x"]);
        assert_eq!(
            postgres.unwrap().rate_limit_backend().unwrap(),
            RateLimitBackend::Postgres
        );
        let memory = Config::try_parse_args([
            "rdev-api",
            "--database-url",
            "postgres://db/x",
            "--rate-limit-backend",
            "memory",
        ]);
        assert_eq!(
            memory.unwrap().rate_limit_backend().unwrap(),
            RateLimitBackend::Memory
        );
        let mismatch = Config::try_parse_args([
            "rdev-api",
            "--database-url",
            "sqlite://x.db",
            "--rate-limit-backend",
            "postgres",
        ]);
        let error = mismatch.unwrap().rate_limit_backend().unwrap_err();
        assert!(
            error.to_string().contains("RDEV_RATE_LIMIT_BACKEND"),
            "{error}"
        );
    }
}
