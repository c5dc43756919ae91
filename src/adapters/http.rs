//! The HTTP API: routes, handlers (thin: extract, call one service method, map the result),
//! problem+json errors, SSE, metrics, the generated OpenAPI document, and the web console.

pub mod api_keys;
pub mod audit;
pub mod commands;
pub mod console;
pub mod edge;
pub mod extract;
pub mod limits;
pub mod openapi;
pub mod ops;
pub mod pods;
pub mod problem;
pub mod projects;
pub mod serve;
pub mod trace_context;
pub mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa::openapi::security::{
    ApiKey as ApiKeyScheme, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
};
use utoipa_axum::router::OpenApiRouter;

use crate::ports::{CpuProfiler, HeapProfiler, OperatorMetrics};
use crate::services::api_keys::ApiKeyService;
use crate::services::audit::AuditService;
use crate::services::commands::CommandService;
use crate::services::follow::FollowService;
use crate::services::pods::PodService;
use crate::services::projects::ProjectService;
use crate::services::rate_limits::RequestLimits;
use crate::services::webhooks::WebhookService;

pub use extract::ClientIpResolver;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Answers whether the storage behind the API is usable right now.
#[async_trait]
pub trait ReadinessProbe: Send + Sync {
    async fn storage_ready(&self) -> bool;
}

/// Everything handlers reach, behind one `Arc`: axum clones the state for every extractor and
/// middleware of every request, so a clone must be one atomic increment (profiling showed
/// field-by-field clones, cancellation tokens included, at 8% of CPU under load).
#[derive(Clone)]
pub struct AppState(Arc<Services>);

impl AppState {
    pub fn new(services: Services) -> Self {
        Self(Arc::new(services))
    }
}

impl std::ops::Deref for AppState {
    type Target = Services;
    fn deref(&self) -> &Services {
        &self.0
    }
}

/// The services and settings behind [`AppState`].
pub struct Services {
    pub keys: Arc<ApiKeyService>,
    pub projects: Arc<ProjectService>,
    pub audit: Arc<AuditService>,
    pub commands: Arc<CommandService>,
    pub follow: Arc<FollowService>,
    pub webhooks: Arc<WebhookService>,
    pub pods: Arc<PodService>,
    /// Each authenticated request counts once against its key's rate limit.
    pub limits: Arc<RequestLimits>,
    /// Failed authentications per client address, checked before any key lookup.
    pub auth_guard: Arc<limits::AuthFailureGuard>,
    pub metrics: Arc<dyn OperatorMetrics>,
    pub profiler: Arc<dyn HeapProfiler>,
    pub cpu_profiler: Arc<dyn CpuProfiler>,
    /// Spans are exported (OTLP): every request gets one. Otherwise only a request that
    /// brings a `traceparent` does, for its trace id in the logs.
    pub export_traces: bool,
    pub client_ip: Arc<ClientIpResolver>,
    pub probe: Arc<dyn ReadinessProbe>,
    /// Cancelled when the server stops: event streams end.
    pub shutdown: CancellationToken,
    /// Cancelled when the server starts draining: `/ready` fails.
    pub draining: CancellationToken,
    pub sse_keep_alive: Duration,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "rdev-api", description = "Run shell commands in Kubernetes pods over HTTP."),
    modifiers(&SecurityAddon),
    components(schemas(problem::Problem))
)]
struct ApiDoc;

struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKeyScheme::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}

/// The whole application router.
pub fn router(state: AppState) -> Router {
    // The API's paths are written out in full (`/api/v1/...`) rather than nested: a nest
    // rebuilds every request's URI to strip its prefix (4% of an authenticated GET's CPU).
    let (api, mut openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(api_keys::routes())
        .merge(projects::routes())
        .merge(pods::routes())
        .merge(commands::routes())
        .merge(audit::routes())
        .merge(webhooks::routes())
        .merge(ops::routes())
        .split_for_parts();
    let api = api.merge(console::routes());
    openapi.info.version = env!("CARGO_PKG_VERSION").to_owned();
    openapi::declare_problem_responses(&mut openapi);
    openapi::declare_problem_types(&mut openapi);
    openapi::declare_rate_limits(&mut openapi);
    let openapi = Arc::new(openapi);
    api.route(
        "/openapi.json",
        axum::routing::get(move || {
            let openapi = openapi.clone();
            async move { axum::Json(openapi.as_ref().clone()) }
        }),
    )
    // A route layer runs after routing, so it sees the matched route template.
    .route_layer(edge::RouteMetricsLayer::new(state.metrics.clone()))
    .fallback(|| async { problem::ApiError::RouteNotFound })
    .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
    .layer(
        ServiceBuilder::new()
            .layer(edge::EdgeLayer)
            .layer(TraceLayer::new_for_http().make_span_with(trace_context::RequestSpans {
                export: state.export_traces,
            }))
            .layer(CatchPanicLayer::custom(|_| {
                tracing::error!("a handler panicked");
                problem::status_problem(axum::http::StatusCode::INTERNAL_SERVER_ERROR)
            })),
    )
    .with_state(state)
}
