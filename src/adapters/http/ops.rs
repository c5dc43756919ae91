//! Operations endpoints outside `/api/v1`: `/health`, `/ready`, `/metrics`, `/debug/pprof/heap`.

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::extract::AdminOrLocal;
use super::problem::{ApiError, Problem};
use crate::services::ServiceError;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(metrics))
        .routes(routes!(heap_profile))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthResponse {
    pub status: &'static str,
}

/// The process is alive.
#[utoipa::path(get, path = "/health", tag = "operations", responses((status = 200, body = HealthResponse)))]
async fn health() -> Json<HealthResponse> {
    Json(HealthResponse { status: "ok" })
}

/// Ready for traffic: storage answers, migrations applied, not draining.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses((status = 200, body = HealthResponse), (status = 503, body = Problem)))]
async fn ready(State(state): State<AppState>) -> Result<Json<HealthResponse>, ApiError> {
    if state.draining.is_cancelled() {
        return Err(ApiError::NotReady("draining"));
    }
    if !state.probe.storage_ready().await {
        return Err(ApiError::NotReady("storage unavailable"));
    }
    Ok(Json(HealthResponse { status: "ready" }))
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, content_type = "text/plain")))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    if let Ok(queued) = state.commands.queued_total().await {
        state.metrics.set_commands_queued(queued);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// A jemalloc heap profile (gzipped pprof; `go tool pprof` reads it). Requests made on this host
/// (loopback peer, no `X-Forwarded-For`, as `kubectl exec ... curl localhost:8080/...`) need no
/// key; others need an admin key.
#[utoipa::path(get, path = "/debug/pprof/heap", tag = "operations",
    security((), ("bearer" = []), ("api_key" = [])),
    responses((status = 200, content_type = "application/octet-stream"), (status = 401, body = Problem),
        (status = 503, body = Problem)))]
async fn heap_profile(
    State(state): State<AppState>,
    _access: AdminOrLocal,
) -> Result<Response, ApiError> {
    let profile = state
        .profiler
        .heap_profile()
        .await
        .map_err(|e| ApiError::Service(ServiceError::from_port(e, "heap profile")))?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"heap.pb.gz\"",
            ),
        ],
        profile,
    )
        .into_response())
}
