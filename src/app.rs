//! The composition root: opens storage, picks adapters from the configuration, wires them into
//! the services, builds the router and runs the server with its background tasks until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::adapters::bus::InProcessBus;
use crate::adapters::cache::{CachedApiKeys, CachedProjects};
use crate::adapters::http::limits::AuthFailureGuard;
use crate::adapters::http::serve::ConnectionLimits;
use crate::adapters::http::{self, AppState, ClientIpResolver, ReadinessProbe, Services};
use crate::adapters::kube::{KubeApi, KubeExecutor, KubePodManager, KubeSetupError, KubeSource};
use crate::adapters::local::{LocalExecutor, RunAs};
use crate::adapters::memory::MemoryRateLimiter;
use crate::adapters::postgres::{PgDatabase, PgRelay, notify};
use crate::adapters::sql::{Sealing, StoreError};
use crate::adapters::sqlite::SqliteDatabase;
use crate::adapters::telemetry::{JemallocProfiler, Metrics, PprofCpuProfiler};
use crate::adapters::webhook::{HttpWebhookSender, SenderSettings};
use crate::config::{Config, ConfigError, RateLimitBackend, Secret};
use crate::domain::audit::AuditKey;
use crate::domain::project::ExecutorKind;
use crate::domain::webhook::RetrySchedule;
use crate::ports::clock::SystemClock;
use crate::ports::{
    ApiKeyRepository, AuditHeads, AuditLog, Clock, CommandMetrics, CommandQueue, CommandStore,
    ConnectionMetrics, DeliveryQueue, Executor, OutputBus, OutputStore, PodManager,
    ProjectRepository, RateLimiter, SharedSecrets, WebhookEndpoints, WebhookSender, WorkSignal,
};
use crate::resilience::BreakerSettings;
use crate::services::api_keys::ApiKeyService;
use crate::services::audit::AuditService;
use crate::services::auth_failures::FailedAuthentications;
use crate::services::commands::{CommandService, CommandServicePorts, SubmitLimits};
use crate::services::dispatcher::{Dispatcher, DispatcherPorts, DispatcherSettings};
use crate::services::follow::{FollowPorts, FollowService, StreamLimiter, StreamTokens};
use crate::services::pods::{PodService, PodServicePorts};
use crate::services::projects::ProjectService;
use crate::services::rate_limits::RequestLimits;
use crate::services::webhooks::{WebhookPorts, WebhookService};
use crate::services::worker::{WorkerPool, WorkerPorts, WorkerSettings};

/// The name of the stream token signing key in the shared secrets.
const STREAM_TOKEN_SECRET: &str = "stream_token";
/// How often an idle follower on Postgres re-reads the store, in case a NOTIFY hint was lost.
const FOLLOWER_STORE_RECHECK: Duration = Duration::from_secs(5);
/// How often batched `last_used_at` updates are written.
const USAGE_FLUSH_INTERVAL: Duration = Duration::from_secs(10);
/// Refused authentications are audited once a minute per client address and key prefix.
const AUTH_FAILURE_FLUSH_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open the database (DATABASE_URL)")]
    Database(#[source] StoreError),
    #[error("cannot read or create the audit key file beside the database (RDEV_AUDIT_KEY)")]
    AuditKey(#[source] std::io::Error),
    #[error("cannot read or store the shared stream token secret")]
    SharedSecret(#[source] crate::ports::PortError),
    #[error("cannot run local commands as the configured user")]
    RunAs(#[source] crate::adapters::local::UnknownUser),
    #[error("cannot set up metrics")]
    Metrics(#[source] prometheus::Error),
    #[error("cannot create the bootstrap admin key")]
    Bootstrap(#[source] crate::services::ServiceError),
    #[error("cannot set up the Kubernetes client")]
    Kube(#[source] KubeSetupError),
    #[error("cannot set up the webhook HTTP client")]
    WebhookClient(#[source] reqwest::Error),
    #[error("cannot bind {0}")]
    Bind(SocketAddr, #[source] std::io::Error),
}

/// The database behind every storage port.
#[derive(Clone)]
enum Storage {
    Sqlite(SqliteDatabase),
    Postgres(PgDatabase),
}

struct Ports {
    keys: Arc<dyn ApiKeyRepository>,
    projects: Arc<dyn ProjectRepository>,
    audit: Arc<dyn AuditLog>,
    commands: Arc<dyn CommandStore>,
    queue: Arc<dyn CommandQueue>,
    output: Arc<dyn OutputStore>,
    secrets: Arc<dyn SharedSecrets>,
    webhooks: Arc<dyn WebhookEndpoints>,
    deliveries: Arc<dyn DeliveryQueue>,
}

impl Storage {
    async fn open(config: &Config, heads: Arc<dyn AuditHeads>) -> Result<Self, StartupError> {
        let url = config.database_url.expose();
        let configured = config
            .audit_key
            .as_ref()
            .map(|k| k.expose().as_bytes().to_vec());
        if url.starts_with("postgres") {
            let key = configured.unwrap_or_else(|| {
                tracing::warn!(
                    "RDEV_AUDIT_KEY is not set: the audit chain is not keyed, so a database writer could re-forge it"
                );
                Vec::new()
            });
            let sealing = Arc::new(Sealing {
                key: AuditKey::new(key),
                heads,
            });
            let db = PgDatabase::connect(url, config.db_max_connections, sealing)
                .await
                .map_err(StartupError::Database)?;
            Ok(Storage::Postgres(db))
        } else {
            let key = match configured {
                Some(key) => key,
                None => SqliteDatabase::key_file_beside(url).map_err(StartupError::AuditKey)?,
            };
            let sealing = Arc::new(Sealing {
                key: AuditKey::new(key),
                heads,
            });
            let db = SqliteDatabase::connect(url, sealing)
                .await
                .map_err(StartupError::Database)?;
            Ok(Storage::Sqlite(db))
        }
    }

    fn ports(&self, clock: &Arc<dyn Clock>) -> Ports {
        match self {
            Storage::Sqlite(db) => Ports {
                keys: Arc::new(db.api_keys()),
                projects: Arc::new(db.projects()),
                audit: Arc::new(db.audit_log()),
                commands: Arc::new(db.command_store(clock.clone())),
                queue: Arc::new(db.command_queue(clock.clone())),
                output: Arc::new(db.output_store()),
                secrets: Arc::new(db.shared_secrets()),
                webhooks: Arc::new(db.webhook_endpoints()),
                deliveries: Arc::new(db.delivery_queue(clock.clone())),
            },
            Storage::Postgres(db) => Ports {
                keys: Arc::new(db.api_keys()),
                projects: Arc::new(db.projects()),
                audit: Arc::new(db.audit_log()),
                commands: Arc::new(db.command_store(clock.clone())),
                queue: Arc::new(db.command_queue()),
                output: Arc::new(db.output_store()),
                secrets: Arc::new(db.shared_secrets()),
                webhooks: Arc::new(db.webhook_endpoints()),
                deliveries: Arc::new(db.delivery_queue()),
            },
        }
    }

    async fn close(&self) {
        match self {
            Storage::Sqlite(db) => db.close().await,
            Storage::Postgres(db) => db.close().await,
        }
    }
}

#[async_trait]
impl ReadinessProbe for Storage {
    async fn storage_ready(&self) -> bool {
        match self {
            Storage::Sqlite(s) => s.ping().await,
            Storage::Postgres(s) => s.ping().await,
        }
    }
}

/// A built server, bound and ready to run.
pub struct App {
    listener: TcpListener,
    router: axum::Router,
    limits: ConnectionLimits,
    connections: Arc<dyn ConnectionMetrics>,
    shutdown: CancellationToken,
    draining: CancellationToken,
    drain_delay: Duration,
    storage: Storage,
    keys: Arc<ApiKeyService>,
    workers: Arc<WorkerPool>,
    dispatcher: Arc<Dispatcher>,
    /// The generated bootstrap key, when one was just created.
    pub bootstrap_key: Option<String>,
}

impl App {
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Cancelling this token shuts the server down gracefully, at once.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Cancelling this token starts draining: `/ready` answers 503 while requests are still
    /// served for `RDEV_DRAIN_DELAY_SECS` (so load balancers stop sending traffic), then the
    /// server shuts down.
    pub fn drain_token(&self) -> CancellationToken {
        self.draining.clone()
    }

    /// Serves until the shutdown token is cancelled, then drains: stops accepting, ends event
    /// streams, lets running commands finish within the grace period, flushes key usage.
    pub async fn run(self) -> Result<(), StartupError> {
        let App {
            listener,
            router,
            limits,
            connections,
            shutdown,
            draining,
            drain_delay,
            storage,
            keys,
            workers,
            dispatcher,
            ..
        } = self;
        tokio::spawn({
            let (draining, shutdown) = (draining.clone(), shutdown.clone());
            async move {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = draining.cancelled() => {
                        tracing::info!(delay = ?drain_delay, "draining: /ready fails, requests still served");
                        tokio::time::sleep(drain_delay).await;
                        shutdown.cancel();
                    }
                }
            }
        });
        // From SIGTERM on this replica claims nothing; queued commands wait for the others.
        let worker_task = tokio::spawn(workers.run(draining.clone()));
        let usage_task = tokio::spawn(flush_usage_periodically(keys.clone(), shutdown.clone()));
        let dispatcher_task = tokio::spawn(dispatcher.run(shutdown.clone()));
        http::serve::serve(listener, router, limits, connections, shutdown.clone()).await;
        shutdown.cancel();
        draining.cancel();
        tracing::info!("stopped accepting requests; draining workers");
        let _ = worker_task.await;
        let _ = usage_task.await;
        let _ = dispatcher_task.await;
        if let Err(error) = keys.flush_usage().await {
            tracing::warn!(%error, "could not write key usage at shutdown");
        }
        if let Err(error) = keys.flush_failures().await {
            tracing::warn!(%error, "could not audit refused keys at shutdown");
        }
        storage.close().await;
        tracing::info!("shut down");
        Ok(())
    }
}

async fn flush_usage_periodically(keys: Arc<ApiKeyService>, shutdown: CancellationToken) {
    let mut failures_flushed = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(USAGE_FLUSH_INTERVAL) => {}
        }
        if let Err(error) = keys.flush_usage().await {
            tracing::warn!(%error, "could not write key usage");
        }
        if failures_flushed.elapsed() >= AUTH_FAILURE_FLUSH_INTERVAL {
            failures_flushed = tokio::time::Instant::now();
            if let Err(error) = keys.flush_failures().await {
                tracing::warn!(%error, "could not audit refused keys");
            }
        }
    }
}

/// Opens storage (applying migrations), bootstraps the first admin key, wires everything and
/// returns a server bound to `listener`.
pub async fn build(config: Config, listener: TcpListener) -> Result<App, StartupError> {
    build_with_clock(config, listener, Arc::new(SystemClock)).await
}

/// [`build`] with another clock: tests move time to check expiry without sleeping.
pub async fn build_with_clock(
    config: Config,
    listener: TcpListener,
    clock: Arc<dyn Clock>,
) -> Result<App, StartupError> {
    let rate_limit_backend = config.rate_limit_backend()?;
    let shutdown = CancellationToken::new();
    let draining = CancellationToken::new();
    let metrics = Arc::new(Metrics::new().map_err(StartupError::Metrics)?);
    let storage = Storage::open(&config, metrics.clone()).await?;
    let ports = storage.ports(&clock);
    let command_metrics: Arc<dyn CommandMetrics> = metrics.clone();
    let connections: Arc<dyn ConnectionMetrics> = metrics.clone();
    let replica = replica_name();
    let kube_source = KubeSource::detect(&config.kubeconfig);
    let executors = config.executor_settings(kube_source.is_some())?;
    let kube = match kube_source {
        Some(source) if executors.enabled.allows(ExecutorKind::Kube) => {
            Some(connect_kube(&config, source, metrics.clone()).await?)
        }
        _ => None,
    };
    let kube_executor: Option<Arc<dyn Executor>> = kube
        .clone()
        .map(|api| Arc::new(KubeExecutor::new(api)) as Arc<dyn Executor>);
    let pod_manager: Option<Arc<dyn PodManager>> = kube
        .clone()
        .map(|api| Arc::new(KubePodManager::new(api)) as Arc<dyn PodManager>);

    let bus = match &storage {
        Storage::Sqlite(_) => InProcessBus::local(),
        Storage::Postgres(db) => {
            let relay = PgRelay::new(db.pool().clone(), replica.clone());
            let bus = InProcessBus::relayed(Arc::new(relay));
            notify::listen(
                db.pool().clone(),
                replica.clone(),
                bus.clone(),
                shutdown.clone(),
            );
            bus
        }
    };
    let output_bus: Arc<dyn OutputBus> = bus.clone();

    // Revocations and other key or project changes reach every replica's cache at once.
    let cached_keys = Arc::new(CachedApiKeys::new(
        ports.keys,
        config.cache_ttl,
        bus.clone(),
        metrics.clone(),
    ));
    let cached_projects = Arc::new(CachedProjects::new(
        ports.projects,
        config.cache_ttl,
        bus.clone(),
        metrics.clone(),
    ));
    bus.listen_for_changes(cached_keys.clone());
    bus.listen_for_changes(cached_projects.clone());
    let keys_repo: Arc<dyn ApiKeyRepository> = cached_keys;
    let projects_repo: Arc<dyn ProjectRepository> = cached_projects;
    let work: Arc<dyn WorkSignal> = bus;

    let keys = Arc::new(
        ApiKeyService::new(keys_repo, clock.clone()).with_failure_audit(
            FailedAuthentications::new(ports.audit.clone(), clock.clone()),
        ),
    );
    let bootstrap_key = keys
        .bootstrap(config.bootstrap_admin_key.as_ref().map(|s| s.expose()))
        .await
        .map_err(StartupError::Bootstrap)?
        .map(|key| key.expose().to_owned());

    let commands = Arc::new(CommandService::new(
        CommandServicePorts {
            commands: ports.commands.clone(),
            output: ports.output.clone(),
            projects: projects_repo.clone(),
            bus: output_bus.clone(),
            work: work.clone(),
            clock: clock.clone(),
        },
        SubmitLimits {
            max_queued: config.max_queued,
            max_queued_per_project: config.max_queued_per_project,
        },
    ));
    let token_secret = match &config.stream_token_secret {
        Some(secret) => secret.expose().as_bytes().to_vec(),
        None => {
            let candidate = hex::encode(rand::random::<[u8; 32]>());
            ports
                .secrets
                .get_or_insert(STREAM_TOKEN_SECRET, &candidate)
                .await
                .map_err(StartupError::SharedSecret)?
                .into_bytes()
        }
    };
    let follow = Arc::new(FollowService::new(
        commands.clone(),
        FollowPorts {
            store: ports.commands.clone(),
            output: ports.output.clone(),
            bus: output_bus.clone(),
            clock: clock.clone(),
            store_recheck: match &storage {
                Storage::Sqlite(_) => None,
                Storage::Postgres(_) => Some(FOLLOWER_STORE_RECHECK),
            },
        },
        StreamLimiter::new(
            config.max_sse_connections,
            config.max_sse_per_key,
            command_metrics.clone(),
        ),
        StreamTokens::new(
            token_secret,
            Duration::from_secs(config.stream_token_ttl_secs),
        ),
    ));
    let local_executor: Option<Arc<dyn Executor>> = if executors.enabled.allows(ExecutorKind::Local)
    {
        Some(Arc::new(LocalExecutor::new(local_run_as(&config)?)))
    } else {
        None
    };
    tracing::info!(
        executors = %executors.enabled,
        default = executors.default.as_str(),
        "executors enabled (RDEV_EXECUTORS)"
    );
    let workers = WorkerPool::new(
        WorkerPorts {
            queue: ports.queue,
            projects: projects_repo.clone(),
            output: ports.output,
            bus: output_bus,
            work,
            clock: clock.clone(),
            metrics: command_metrics,
            local: local_executor,
            kube: kube_executor,
        },
        WorkerSettings {
            workers: config.workers,
            lease: config.lease(),
            kill_grace: Duration::from_secs(config.kill_grace_secs),
            max_output_bytes: config.max_output_bytes,
            poll_interval: Duration::from_millis(config.poll_interval_ms),
            drain: Duration::from_secs(config.shutdown_grace_secs),
            claim_batch: (config.workers / 4).max(1),
        },
        replica,
    );

    let projects = Arc::new(ProjectService::new(
        projects_repo,
        clock.clone(),
        executors.enabled,
        executors.default,
    ));
    let pods = Arc::new(PodService::new(
        PodServicePorts {
            projects: projects.clone(),
            pods: pod_manager,
            audit: ports.audit.clone(),
            clock: clock.clone(),
        },
        Duration::from_secs(config.pod_restart_wait_secs),
    ));
    let limiter: Arc<dyn RateLimiter> = match (rate_limit_backend, &storage) {
        // On the database clock, which every replica shares.
        (RateLimitBackend::Postgres, Storage::Postgres(db)) => Arc::new(db.rate_limiter(None)),
        (RateLimitBackend::Postgres, Storage::Sqlite(_)) => {
            unreachable!("the configuration refuses Postgres rate limits without Postgres")
        }
        (RateLimitBackend::Memory, _) => Arc::new(MemoryRateLimiter::new(clock.clone())),
    };
    let sender: Arc<dyn WebhookSender> = Arc::new(
        HttpWebhookSender::new(SenderSettings {
            connect_timeout: Duration::from_millis(config.webhook_connect_timeout_ms),
            timeout: Duration::from_secs(config.webhook_timeout_secs),
            allow_private: config.webhook_allow_private,
            proxy: config.webhook_proxy.clone(),
        })
        .map_err(StartupError::WebhookClient)?,
    );
    let webhooks = Arc::new(WebhookService::new(
        WebhookPorts {
            endpoints: ports.webhooks,
            deliveries: ports.deliveries.clone(),
            sender: sender.clone(),
            clock: clock.clone(),
        },
        config.webhook_allow_private,
    ));
    let dispatcher = Arc::new(Dispatcher::new(
        DispatcherPorts {
            queue: ports.deliveries,
            sender,
            clock: clock.clone(),
            metrics: metrics.clone(),
        },
        DispatcherSettings {
            concurrency: config.webhook_concurrency as usize,
            per_endpoint: config.webhook_endpoint_concurrency as usize,
            lease: config.webhook_lease(),
            poll_interval: Duration::from_millis(config.webhook_poll_ms),
            schedule: RetrySchedule::new(config.webhook_retry_schedule.clone()),
            breaker: BreakerSettings {
                failure_threshold: config.webhook_breaker_failures,
                open_for: Duration::from_secs(config.webhook_breaker_open_secs),
            },
            drain: Duration::from_secs(config.shutdown_grace_secs),
        },
    ));
    let state = AppState::new(Services {
        keys: keys.clone(),
        limits: Arc::new(RequestLimits::new(limiter, config.rate_limit)),
        auth_guard: Arc::new(AuthFailureGuard::new(config.auth_failure_limit)),
        projects,
        pods,
        audit: Arc::new(AuditService::new(ports.audit)),
        commands,
        follow,
        webhooks,
        metrics,
        profiler: Arc::new(JemallocProfiler),
        cpu_profiler: Arc::new(PprofCpuProfiler::default()),
        export_traces: config.otlp_endpoint.is_some(),
        client_ip: Arc::new(
            ClientIpResolver::new(config.trusted_proxies.clone())
                .trusting_loopback(config.trust_loopback),
        ),
        probe: Arc::new(storage.clone()),
        shutdown: shutdown.clone(),
        draining: draining.clone(),
        sse_keep_alive: Duration::from_secs(config.sse_keepalive_secs),
    });
    Ok(App {
        listener,
        router: http::router(state),
        limits: ConnectionLimits {
            max_head_bytes: usize::try_from(config.max_request_head_bytes).unwrap_or(usize::MAX),
            header_read_timeout: Duration::from_secs(config.header_read_timeout_secs),
            idle_timeout: Duration::from_secs(config.idle_timeout_secs),
        },
        connections,
        shutdown,
        draining,
        drain_delay: Duration::from_secs(config.drain_delay_secs),
        storage,
        keys,
        workers,
        dispatcher,
        bootstrap_key,
    })
}

/// The local executor's user: `RDEV_LOCAL_RUN_AS`, else the server's own, which operators are
/// told about (its commands can read what the server's user can: the database file, the audit
/// key file; the server's own memory and environment are closed to them, see
/// [`crate::cli::protect_process`]).
fn local_run_as(config: &Config) -> Result<Option<RunAs>, StartupError> {
    if let Some(name) = &config.local_run_as {
        return RunAs::lookup(name).map(Some).map_err(StartupError::RunAs);
    }
    // SAFETY: geteuid has no preconditions and touches no memory.
    let uid = unsafe { libc::geteuid() };
    tracing::warn!(
        uid,
        "the local executor is enabled without RDEV_LOCAL_RUN_AS: local commands run as this server's own user and can read what it can (the database file, the audit key file); set RDEV_LOCAL_RUN_AS to an unprivileged user, or RDEV_EXECUTORS=kube"
    );
    Ok(None)
}

/// The Kubernetes API from `KUBECONFIG` or the in-cluster service account. A configured but
/// unusable source stops the start.
async fn connect_kube(
    config: &Config,
    source: KubeSource,
    metrics: Arc<Metrics>,
) -> Result<KubeApi, StartupError> {
    let breaker = BreakerSettings {
        failure_threshold: config.kube_breaker_failures,
        open_for: Duration::from_secs(config.kube_breaker_open_secs),
    };
    let api = KubeApi::connect(&source, breaker, metrics)
        .await
        .map_err(StartupError::Kube)?;
    tracing::info!(?source, "Kubernetes API configured");
    Ok(api)
}

/// A lease owner name unique to this process.
fn replica_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "rdev".into());
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &nonce[..8])
}

/// Binds the configured address, builds the app, prints a generated bootstrap key once, and
/// serves until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), StartupError> {
    let listener = TcpListener::bind(config.listen_addr)
        .await
        .map_err(|e| StartupError::Bind(config.listen_addr, e))?;
    let app = build(config, listener).await?;
    if let Some(key) = &app.bootstrap_key {
        eprintln!(
            "\nrdev-api: created the first admin API key. It is shown only this once; store it now:\n\n    {key}\n"
        );
    }
    tracing::info!(address = %app.local_addr(), "rdev-api listening");
    let (shutdown, draining) = (app.shutdown_token(), app.drain_token());
    tokio::spawn(async move {
        match wait_for_signal().await {
            Signal::Terminate => {
                tracing::info!("SIGTERM received");
                draining.cancel();
            }
            Signal::Interrupt => {
                tracing::info!("SIGINT received");
                draining.cancel();
                shutdown.cancel();
            }
        }
    });
    app.run().await
}

/// Opens the database (applying its migrations) and closes it again: `rdev-api migrate`.
pub async fn migrate(database_url: &Secret) -> Result<(), StartupError> {
    let config = Config::with_database(database_url.expose());
    let storage = Storage::open(&config, operator_heads()?).await?;
    storage.close().await;
    Ok(())
}

/// The key use cases straight against the database, for `rdev-api keys ...` (no server; a
/// running server sees changes within its CACHE_TTL).
pub struct KeyAdmin {
    pub keys: ApiKeyService,
    storage: Storage,
}

impl KeyAdmin {
    pub async fn close(self) {
        self.storage.close().await;
    }
}

/// Operator commands publish the audit head to their log only.
fn operator_heads() -> Result<Arc<dyn AuditHeads>, StartupError> {
    Ok(Arc::new(Metrics::new().map_err(StartupError::Metrics)?))
}

pub async fn key_admin(database_url: &Secret) -> Result<KeyAdmin, StartupError> {
    let config = Config::with_database(database_url.expose());
    let storage = Storage::open(&config, operator_heads()?).await?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let keys = ApiKeyService::new(storage.ports(&clock).keys, clock);
    Ok(KeyAdmin { keys, storage })
}

enum Signal {
    /// SIGTERM: an orchestrator asks to stop; drain first.
    Terminate,
    /// SIGINT (Ctrl-C): a person asks to stop; no delay.
    Interrupt,
}

async fn wait_for_signal() -> Signal {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing a SIGTERM handler works on unix");
        tokio::select! {
            _ = interrupt => Signal::Interrupt,
            _ = terminate.recv() => Signal::Terminate,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
        Signal::Interrupt
    }
}
