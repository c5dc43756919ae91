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
use crate::config::{Config, ConfigError, ExecutorSettings, RateLimitBackend, Secret};
use crate::domain::audit::AuditKey;
use crate::domain::project::ExecutorKind;
use crate::ports::clock::SystemClock;
use crate::ports::{
    ApiKeyRepository, AuditHeads, AuditLog, Clock, CommandMetrics, CommandQueue, CommandStore,
    ConnectionMetrics, DeliveryQueue, Executor, OutputBus, OutputStore, PodManager,
    ProjectRepository, RateLimiter, RemoteInbox, SharedSecrets, WebhookEndpoints, WebhookSender,
    WorkSignal,
};
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

/// What the database is to the rest of the server once it is open: readiness and closing.
#[async_trait]
trait Database: ReadinessProbe {
    async fn close(&self);
}

#[async_trait]
impl ReadinessProbe for SqliteDatabase {
    async fn storage_ready(&self) -> bool {
        self.ping().await
    }
}

#[async_trait]
impl Database for SqliteDatabase {
    async fn close(&self) {
        SqliteDatabase::close(self).await;
    }
}

#[async_trait]
impl ReadinessProbe for PgDatabase {
    async fn storage_ready(&self) -> bool {
        self.ping().await
    }
}

#[async_trait]
impl Database for PgDatabase {
    async fn close(&self) {
        PgDatabase::close(self).await;
    }
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

/// How replicas sharing the database tell each other what happened.
struct Relay {
    sender: Arc<dyn crate::ports::Relay>,
    /// Starts delivering the other replicas' hints to an inbox, until shutdown.
    listen: Box<dyn FnOnce(Arc<dyn RemoteInbox>, CancellationToken) + Send>,
}

/// The open database, and everything that differs with which one it is: the one place that
/// tells SQLite from Postgres.
struct Storage {
    ports: Ports,
    database: Arc<dyn Database>,
    /// Postgres: LISTEN/NOTIFY between replicas. SQLite: one process, none needed.
    relay: Option<Relay>,
    /// Postgres: counters in the `rate_limiting` table, shared by replicas.
    shared_rate_limiter: Option<Arc<dyn RateLimiter>>,
    /// How often an idle follower re-reads the store in case a hint was lost: where the bus
    /// carries other replicas' events as best-effort hints.
    follower_recheck: Option<Duration>,
}

/// Opens `DATABASE_URL` (applying its migrations) with the audit key, and wires its ports.
async fn open_storage(
    config: &Config,
    heads: Arc<dyn AuditHeads>,
    clock: &Arc<dyn Clock>,
    replica: &str,
) -> Result<Storage, StartupError> {
    let url = config.storage.database_url.expose();
    let configured = config
        .storage
        .audit_key
        .as_ref()
        .map(|k| k.expose().as_bytes().to_vec());
    if config.storage.uses_postgres() {
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
        let db = PgDatabase::connect(url, config.storage.db_max_connections, sealing)
            .await
            .map_err(StartupError::Database)?;
        let (pool, origin) = (db.pool().clone(), replica.to_owned());
        Ok(Storage {
            ports: Ports {
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
            relay: Some(Relay {
                sender: Arc::new(PgRelay::new(pool.clone(), origin.clone())),
                listen: Box::new(move |inbox, shutdown| {
                    notify::listen(pool, origin, inbox, shutdown)
                }),
            }),
            // On the database clock, which every replica shares.
            shared_rate_limiter: Some(Arc::new(db.rate_limiter(None))),
            follower_recheck: Some(FOLLOWER_STORE_RECHECK),
            database: Arc::new(db),
        })
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
        Ok(Storage {
            ports: Ports {
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
            relay: None,
            shared_rate_limiter: None,
            follower_recheck: None,
            database: Arc::new(db),
        })
    }
}

/// The bus: in this process, and through the relay to the other replicas where there is one.
fn build_bus(relay: Option<Relay>, shutdown: &CancellationToken) -> Arc<InProcessBus> {
    match relay {
        None => InProcessBus::local(),
        Some(Relay { sender, listen }) => {
            let bus = InProcessBus::relayed(sender);
            listen(bus.clone(), shutdown.clone());
            bus
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
    database: Arc<dyn Database>,
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
            database,
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
        database.close().await;
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
    // Settings that do not fit together stop the start before anything is opened.
    let rate_limit_backend = config.rate_limit_backend()?;
    let kube_source = KubeSource::detect(&config.kube.kubeconfig);
    let executors = config.execution.settings(kube_source.is_some())?;
    let shutdown = CancellationToken::new();
    let draining = CancellationToken::new();
    let metrics = Arc::new(Metrics::new().map_err(StartupError::Metrics)?);
    let replica = replica_name();
    let mut storage = open_storage(&config, metrics.clone(), &clock, &replica).await?;
    let bus = build_bus(storage.relay.take(), &shutdown);
    let kube = match kube_source {
        Some(source) if executors.enabled.allows(ExecutorKind::Kube) => {
            Some(connect_kube(&config, source, metrics.clone()).await?)
        }
        _ => None,
    };
    let limiter: Arc<dyn RateLimiter> = match rate_limit_backend {
        RateLimitBackend::Postgres => storage
            .shared_rate_limiter
            .clone()
            .expect("the configuration refuses Postgres rate limits without Postgres"),
        RateLimitBackend::Memory => Arc::new(MemoryRateLimiter::new(clock.clone())),
    };
    let services = build_services(
        &config,
        Wiring {
            storage: &storage,
            bus,
            kube,
            executors,
            limiter,
            metrics: metrics.clone(),
            clock,
            replica,
        },
    )
    .await?;
    let state = AppState::new(Services {
        keys: services.keys.clone(),
        limits: Arc::new(RequestLimits::new(services.limiter, config.auth.rate_limit)),
        auth_guard: Arc::new(AuthFailureGuard::new(config.auth.auth_failure_limit)),
        projects: services.projects,
        pods: services.pods,
        audit: services.audit,
        commands: services.commands,
        follow: services.follow,
        webhooks: services.webhooks,
        metrics: metrics.clone(),
        profiler: Arc::new(JemallocProfiler),
        cpu_profiler: Arc::new(PprofCpuProfiler::default()),
        export_traces: config.telemetry.otlp_endpoint.is_some(),
        client_ip: Arc::new(
            ClientIpResolver::new(config.http.trusted_proxies.clone())
                .trusting_loopback(config.http.trust_loopback),
        ),
        probe: storage.database.clone(),
        shutdown: shutdown.clone(),
        draining: draining.clone(),
        sse_keep_alive: config.http.sse_keep_alive(),
    });
    Ok(App {
        listener,
        router: http::router(state),
        limits: ConnectionLimits {
            max_head_bytes: config.http.max_head_bytes(),
            header_read_timeout: config.http.header_read_timeout(),
            idle_timeout: config.http.idle_timeout(),
        },
        connections: metrics,
        shutdown,
        draining,
        drain_delay: config.http.drain_delay(),
        database: storage.database,
        keys: services.keys,
        workers: services.workers,
        dispatcher: services.dispatcher,
        bootstrap_key: services.bootstrap_key,
    })
}

/// What the services are built from, besides the settings.
struct Wiring<'s> {
    storage: &'s Storage,
    bus: Arc<InProcessBus>,
    kube: Option<KubeApi>,
    executors: ExecutorSettings,
    limiter: Arc<dyn RateLimiter>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    replica: String,
}

/// The use cases and background loops of one replica.
struct Built {
    keys: Arc<ApiKeyService>,
    projects: Arc<ProjectService>,
    pods: Arc<PodService>,
    audit: Arc<AuditService>,
    commands: Arc<CommandService>,
    follow: Arc<FollowService>,
    webhooks: Arc<WebhookService>,
    limiter: Arc<dyn RateLimiter>,
    workers: Arc<WorkerPool>,
    dispatcher: Arc<Dispatcher>,
    /// The generated bootstrap key, when one was just created.
    bootstrap_key: Option<String>,
}

/// Hands the ports to the services: caches in front of the key and project repositories, the
/// first admin key, the executors, the webhook sender.
async fn build_services(config: &Config, wiring: Wiring<'_>) -> Result<Built, StartupError> {
    let Wiring {
        storage,
        bus,
        kube,
        executors,
        limiter,
        metrics,
        clock,
        replica,
    } = wiring;
    let ports = &storage.ports;
    let command_metrics: Arc<dyn CommandMetrics> = metrics.clone();
    let output_bus: Arc<dyn OutputBus> = bus.clone();

    // Revocations and other key or project changes reach every replica's cache at once.
    let cached_keys = Arc::new(CachedApiKeys::new(
        ports.keys.clone(),
        config.auth.cache_ttl,
        bus.clone(),
        metrics.clone(),
    ));
    let cached_projects = Arc::new(CachedProjects::new(
        ports.projects.clone(),
        config.auth.cache_ttl,
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
        .bootstrap(config.auth.bootstrap_admin_key.as_ref().map(|s| s.expose()))
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
            max_queued: config.worker.max_queued,
            max_queued_per_project: config.worker.max_queued_per_project,
        },
    ));
    let token_secret = match &config.auth.stream_token_secret {
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
            store_recheck: storage.follower_recheck,
        },
        StreamLimiter::new(
            config.http.max_sse_connections,
            config.http.max_sse_per_key,
            command_metrics.clone(),
        ),
        StreamTokens::new(token_secret, config.auth.stream_token_ttl()),
    ));

    let local_executor: Option<Arc<dyn Executor>> = if executors.enabled.allows(ExecutorKind::Local)
    {
        Some(Arc::new(LocalExecutor::new(local_run_as(config)?)))
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
            queue: ports.queue.clone(),
            projects: projects_repo.clone(),
            output: ports.output.clone(),
            bus: output_bus,
            work,
            clock: clock.clone(),
            metrics: command_metrics,
            local: local_executor,
            kube: kube
                .clone()
                .map(|api| Arc::new(KubeExecutor::new(api)) as Arc<dyn Executor>),
        },
        WorkerSettings {
            workers: config.worker.workers,
            lease: config.worker.lease(),
            kill_grace: config.worker.kill_grace(),
            max_output_bytes: config.worker.max_output_bytes,
            poll_interval: config.worker.poll_interval(),
            drain: config.worker.shutdown_grace(),
            claim_batch: (config.worker.workers / 4).max(1),
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
            pods: kube.map(|api| Arc::new(KubePodManager::new(api)) as Arc<dyn PodManager>),
            audit: ports.audit.clone(),
            clock: clock.clone(),
        },
        config.kube.pod_restart_wait(),
    ));
    let (webhooks, dispatcher) = build_webhooks(config, ports, clock, metrics)?;
    Ok(Built {
        keys,
        projects,
        pods,
        audit: Arc::new(AuditService::new(ports.audit.clone())),
        commands,
        follow,
        webhooks,
        limiter,
        workers,
        dispatcher,
        bootstrap_key,
    })
}

/// The webhook endpoints' use cases and the dispatcher that delivers from the outbox.
fn build_webhooks(
    config: &Config,
    ports: &Ports,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
) -> Result<(Arc<WebhookService>, Arc<Dispatcher>), StartupError> {
    let sender: Arc<dyn WebhookSender> = Arc::new(
        HttpWebhookSender::new(SenderSettings {
            connect_timeout: config.webhooks.connect_timeout(),
            timeout: config.webhooks.timeout(),
            allow_private: config.webhooks.webhook_allow_private,
            proxy: config.webhooks.webhook_proxy.clone(),
        })
        .map_err(StartupError::WebhookClient)?,
    );
    let webhooks = Arc::new(WebhookService::new(
        WebhookPorts {
            endpoints: ports.webhooks.clone(),
            deliveries: ports.deliveries.clone(),
            sender: sender.clone(),
            clock: clock.clone(),
        },
        config.webhooks.webhook_allow_private,
    ));
    let dispatcher = Arc::new(Dispatcher::new(
        DispatcherPorts {
            queue: ports.deliveries.clone(),
            sender,
            clock,
            metrics,
        },
        DispatcherSettings {
            concurrency: config.webhooks.webhook_concurrency as usize,
            per_endpoint: config.webhooks.webhook_endpoint_concurrency as usize,
            lease: config.webhooks.lease(),
            poll_interval: config.webhooks.poll_interval(),
            schedule: config.webhooks.retry_schedule(),
            breaker: config.webhooks.breaker(),
            drain: config.worker.shutdown_grace(),
        },
    ));
    Ok((webhooks, dispatcher))
}

/// The local executor's user: `RDEV_LOCAL_RUN_AS`, else the server's own, which operators are
/// told about (its commands can read what the server's user can: the database file, the audit
/// key file; the server's own memory and environment are closed to them, see
/// [`crate::cli::protect_process`]).
fn local_run_as(config: &Config) -> Result<Option<RunAs>, StartupError> {
    if let Some(name) = &config.execution.local_run_as {
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
    let api = KubeApi::connect(&source, config.kube.breaker(), metrics)
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
    let address = config.http.listen_addr;
    let listener = TcpListener::bind(address)
        .await
        .map_err(|e| StartupError::Bind(address, e))?;
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
    let admin = key_admin(database_url).await?;
    admin.close().await;
    Ok(())
}

/// The key use cases straight against the database, for `rdev-api keys ...` (no server; a
/// running server sees changes within its CACHE_TTL).
pub struct KeyAdmin {
    pub keys: ApiKeyService,
    database: Arc<dyn Database>,
}

impl KeyAdmin {
    pub async fn close(self) {
        self.database.close().await;
    }
}

/// Opens the database as an operator command does: its audit head goes to its log only, and
/// no other replica hears from it (its changes reach running servers within `CACHE_TTL`).
pub async fn key_admin(database_url: &Secret) -> Result<KeyAdmin, StartupError> {
    let config = Config::with_database(database_url.expose());
    let heads = Arc::new(Metrics::new().map_err(StartupError::Metrics)?);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let storage = open_storage(&config, heads, &clock, "operator").await?;
    let keys = ApiKeyService::new(storage.ports.keys, clock);
    Ok(KeyAdmin {
        keys,
        database: storage.database,
    })
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
