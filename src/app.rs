//! The composition root: opens storage, picks adapters from the configuration, wires them into
//! the services, builds the router and runs the server with its background tasks until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::adapters::bus::InProcessBus;
use crate::adapters::cache::{CachedApiKeys, CachedProjects};
use crate::adapters::http::{self, AppState, ClientIpResolver, ReadinessProbe, Services};
use crate::adapters::kube::{KubeApi, KubeExecutor, KubePodManager, KubeSetupError, KubeSource};
use crate::adapters::local::LocalExecutor;
use crate::adapters::postgres::PgStore;
use crate::adapters::sqlite::SqliteStore;
use crate::adapters::telemetry::{JemallocProfiler, Metrics};
use crate::config::Config;
use crate::ports::clock::SystemClock;
use crate::ports::{
    ApiKeyRepository, AuditLog, Clock, CommandMetrics, CommandQueue, CommandStore, Executor,
    OutputBus, OutputStore, PodManager, ProjectRepository, WorkSignal,
};
use crate::resilience::BreakerSettings;
use crate::services::api_keys::ApiKeyService;
use crate::services::audit::AuditService;
use crate::services::commands::{CommandService, CommandServicePorts, SubmitLimits};
use crate::services::follow::{FollowPorts, FollowService, StreamLimiter, StreamTokens};
use crate::services::pods::{PodService, PodServicePorts};
use crate::services::projects::ProjectService;
use crate::services::worker::{WorkerPool, WorkerPorts, WorkerSettings};

/// How often batched `last_used_at` updates are written.
const USAGE_FLUSH_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot open the database (DATABASE_URL)")]
    Database(#[source] sqlx::Error),
    #[error("cannot set up metrics")]
    Metrics(#[source] prometheus::Error),
    #[error("cannot create the bootstrap admin key")]
    Bootstrap(#[source] crate::services::ServiceError),
    #[error("cannot set up the Kubernetes client")]
    Kube(#[source] KubeSetupError),
    #[error("cannot bind {0}")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error("the server failed")]
    Serve(#[source] std::io::Error),
}

/// The database behind every storage port.
#[derive(Clone)]
enum Storage {
    Sqlite(Arc<SqliteStore>),
    Postgres(Arc<PgStore>),
}

struct Ports {
    keys: Arc<dyn ApiKeyRepository>,
    projects: Arc<dyn ProjectRepository>,
    audit: Arc<dyn AuditLog>,
    commands: Arc<dyn CommandStore>,
    queue: Arc<dyn CommandQueue>,
    output: Arc<dyn OutputStore>,
}

impl Storage {
    async fn open(config: &Config) -> Result<Self, StartupError> {
        let url = config.database_url.expose();
        if url.starts_with("postgres") {
            let store = PgStore::connect(url, config.db_max_connections)
                .await
                .map_err(StartupError::Database)?;
            Ok(Storage::Postgres(Arc::new(store)))
        } else {
            let store = SqliteStore::connect(url)
                .await
                .map_err(StartupError::Database)?;
            Ok(Storage::Sqlite(Arc::new(store)))
        }
    }

    fn ports(&self) -> Ports {
        match self {
            Storage::Sqlite(s) => Ports {
                keys: s.clone(),
                projects: s.clone(),
                audit: s.clone(),
                commands: s.clone(),
                queue: s.clone(),
                output: s.clone(),
            },
            Storage::Postgres(s) => Ports {
                keys: s.clone(),
                projects: s.clone(),
                audit: s.clone(),
                commands: s.clone(),
                queue: s.clone(),
                output: s.clone(),
            },
        }
    }

    async fn close(&self) {
        match self {
            Storage::Sqlite(s) => s.close().await,
            Storage::Postgres(s) => s.close().await,
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
    shutdown: CancellationToken,
    draining: CancellationToken,
    drain_delay: Duration,
    storage: Storage,
    keys: Arc<ApiKeyService>,
    workers: Arc<WorkerPool>,
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
            shutdown,
            draining,
            drain_delay,
            storage,
            keys,
            workers,
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
        let worker_task = tokio::spawn(workers.run(shutdown.clone()));
        let usage_task = tokio::spawn(flush_usage_periodically(keys.clone(), shutdown.clone()));
        // Small SSE events must leave at once, not wait for the peer's delayed ACK (Nagle).
        let listener = listener.tap_io(|tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::warn!(%error, "cannot set TCP_NODELAY");
            }
        });
        let served = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await;
        shutdown.cancel();
        draining.cancel();
        tracing::info!("stopped accepting requests; draining workers");
        let _ = worker_task.await;
        let _ = usage_task.await;
        if let Err(error) = keys.flush_usage().await {
            tracing::warn!(%error, "could not write key usage at shutdown");
        }
        storage.close().await;
        tracing::info!("shut down");
        served.map_err(StartupError::Serve)
    }
}

async fn flush_usage_periodically(keys: Arc<ApiKeyService>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(USAGE_FLUSH_INTERVAL) => {}
        }
        if let Err(error) = keys.flush_usage().await {
            tracing::warn!(%error, "could not write key usage");
        }
    }
}

/// Opens storage (applying migrations), bootstraps the first admin key, wires everything and
/// returns a server bound to `listener`.
pub async fn build(config: Config, listener: TcpListener) -> Result<App, StartupError> {
    let shutdown = CancellationToken::new();
    let draining = CancellationToken::new();
    let storage = Storage::open(&config).await?;
    let ports = storage.ports();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let metrics = Arc::new(Metrics::new().map_err(StartupError::Metrics)?);
    let command_metrics: Arc<dyn CommandMetrics> = metrics.clone();
    let replica = replica_name();
    let kube = connect_kube(&config, metrics.clone()).await?;
    let kube_executor: Option<Arc<dyn Executor>> = kube
        .clone()
        .map(|api| Arc::new(KubeExecutor::new(api)) as Arc<dyn Executor>);
    let pod_manager: Option<Arc<dyn PodManager>> = kube
        .clone()
        .map(|api| Arc::new(KubePodManager::new(api)) as Arc<dyn PodManager>);

    let bus = match &storage {
        Storage::Sqlite(_) => InProcessBus::local(),
        Storage::Postgres(pg) => {
            let bus = InProcessBus::relayed(Arc::new(pg.relay(replica.clone())));
            pg.listen(replica.clone(), bus.clone(), shutdown.clone());
            bus
        }
    };
    let output_bus: Arc<dyn OutputBus> = bus.clone();
    let work: Arc<dyn WorkSignal> = bus;

    let keys_repo: Arc<dyn ApiKeyRepository> =
        Arc::new(CachedApiKeys::new(ports.keys, config.cache_ttl));
    let projects_repo: Arc<dyn ProjectRepository> =
        Arc::new(CachedProjects::new(ports.projects, config.cache_ttl));

    let keys = Arc::new(ApiKeyService::new(keys_repo, clock.clone()));
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
        },
    ));
    let token_secret = config
        .stream_token_secret
        .as_ref()
        .map(|s| s.expose().as_bytes().to_vec())
        .unwrap_or_else(|| rand::random::<[u8; 32]>().to_vec());
    let follow = Arc::new(FollowService::new(
        commands.clone(),
        FollowPorts {
            store: ports.commands.clone(),
            output: ports.output.clone(),
            bus: output_bus.clone(),
            clock: clock.clone(),
        },
        StreamLimiter::new(
            config.max_sse_connections,
            config.max_sse_per_key,
            command_metrics.clone(),
        ),
        StreamTokens::new(token_secret),
    ));
    let workers = WorkerPool::new(
        WorkerPorts {
            queue: ports.queue,
            projects: projects_repo.clone(),
            output: ports.output,
            bus: output_bus,
            work,
            clock: clock.clone(),
            metrics: command_metrics,
            local: Arc::new(LocalExecutor),
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

    let projects = Arc::new(
        ProjectService::new(projects_repo, clock.clone(), config.executor)
            .with_kube_available(kube.is_some()),
    );
    let pods = Arc::new(PodService::new(
        PodServicePorts {
            projects: projects.clone(),
            pods: pod_manager,
            audit: ports.audit.clone(),
            clock: clock.clone(),
        },
        Duration::from_secs(config.pod_restart_wait_secs),
    ));
    let state = AppState::new(Services {
        keys: keys.clone(),
        projects,
        pods,
        audit: Arc::new(AuditService::new(ports.audit)),
        commands,
        follow,
        metrics,
        profiler: Arc::new(JemallocProfiler),
        client_ip: Arc::new(ClientIpResolver::new(config.trusted_proxies.clone())),
        probe: Arc::new(storage.clone()),
        shutdown: shutdown.clone(),
        draining: draining.clone(),
        sse_keep_alive: Duration::from_secs(config.sse_keepalive_secs),
    });
    Ok(App {
        listener,
        router: http::router(state),
        shutdown,
        draining,
        drain_delay: Duration::from_secs(config.drain_delay_secs),
        storage,
        keys,
        workers,
        bootstrap_key,
    })
}

/// The Kubernetes API from `KUBECONFIG` or the in-cluster service account; `None` when neither
/// is there (kube projects are then refused). A configured but unusable source stops the start.
async fn connect_kube(
    config: &Config,
    metrics: Arc<Metrics>,
) -> Result<Option<KubeApi>, StartupError> {
    let Some(source) = KubeSource::detect(&config.kubeconfig) else {
        tracing::info!(
            "no Kubernetes API configured (KUBECONFIG or in-cluster): kube projects are refused"
        );
        return Ok(None);
    };
    let breaker = BreakerSettings {
        failure_threshold: config.kube_breaker_failures,
        open_for: Duration::from_secs(config.kube_breaker_open_secs),
    };
    let api = KubeApi::connect(&source, breaker, metrics)
        .await
        .map_err(StartupError::Kube)?;
    tracing::info!(?source, "Kubernetes API configured");
    Ok(Some(api))
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
