//! The HTTP API: routes, handlers (thin: extract, call one service method, map the result),
//! problem+json errors, SSE, metrics, the generated OpenAPI document, and the web console.

pub mod api_keys;
pub mod audit;
pub mod commands;
pub mod console;
pub mod extract;
pub mod openapi;
pub mod ops;
pub mod pods;
pub mod problem;
pub mod projects;
pub mod webhooks;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::HeaderName;
use axum::middleware::{self, Next};
use axum::response::Response;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa::openapi::security::{
    ApiKey as ApiKeyScheme, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
};
use utoipa_axum::router::OpenApiRouter;

use crate::ports::{HeapProfiler, OperatorMetrics};
use crate::services::api_keys::ApiKeyService;
use crate::services::audit::AuditService;
use crate::services::commands::CommandService;
use crate::services::follow::FollowService;
use crate::services::pods::PodService;
use crate::services::projects::ProjectService;
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
    pub metrics: Arc<dyn OperatorMetrics>,
    pub profiler: Arc<dyn HeapProfiler>,
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
    let (api, mut openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .nest(
            "/api/v1",
            OpenApiRouter::new()
                .merge(api_keys::routes())
                .merge(projects::routes())
                .merge(pods::routes())
                .merge(commands::routes())
                .merge(audit::routes())
                .merge(webhooks::routes()),
        )
        .merge(ops::routes())
        .split_for_parts();
    let api = api.merge(console::routes());
    openapi.info.version = env!("CARGO_PKG_VERSION").to_owned();
    openapi::declare_problem_responses(&mut openapi);
    let openapi = Arc::new(openapi);
    let request_id = HeaderName::from_static("x-request-id");
    api.route(
        "/openapi.json",
        axum::routing::get(move || {
            let openapi = openapi.clone();
            async move { axum::Json(openapi.as_ref().clone()) }
        }),
    )
    // A route layer runs after routing, so it sees the matched route template.
    .route_layer(middleware::from_fn_with_state(
        state.clone(),
        record_metrics,
    ))
    .fallback(|| async { problem::ApiError::RouteNotFound })
    .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
    .layer(middleware::from_fn(problem::normalize_errors))
    .layer(
        ServiceBuilder::new()
            .layer(middleware::map_request(drop_unacceptable_request_id))
            .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
            .layer(TraceLayer::new_for_http())
            .layer(PropagateRequestIdLayer::new(request_id))
            .layer(CatchPanicLayer::custom(|_| {
                tracing::error!("a handler panicked");
                problem::status_problem(axum::http::StatusCode::INTERNAL_SERVER_ERROR)
            })),
    )
    .with_state(state)
}

/// A client's `X-Request-Id` goes into logs and audit rows: one that is too long or holds other
/// than `[A-Za-z0-9._-]` is dropped here, and a fresh one is made for the request.
async fn drop_unacceptable_request_id(mut request: Request) -> Request {
    let acceptable = request
        .headers()
        .get("x-request-id")
        .map(|id| id.to_str().is_ok_and(extract::acceptable_request_id));
    if acceptable == Some(false) {
        request.headers_mut().remove("x-request-id");
    }
    request
}

/// The `method` label: one of the standard methods, else `other`, so a client inventing
/// methods cannot add series.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

async fn record_metrics(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let response = next.run(request).await;
    state.metrics.http_request(
        method,
        &route,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}
