//! Operations endpoints outside `/api/v1`: `/health`, `/ready`, `/metrics`, `/debug/pprof/heap`
//! and `/debug/pprof/profile` (CPU).

use axum::Json;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
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
        .routes(routes!(cpu_profile))
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

/// Longest CPU profile one request may ask for, in seconds.
pub const MAX_CPU_PROFILE_SECS: u64 = 60;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CpuProfileQuery {
    /// Seconds to sample, 1 to 60 (default 30, as `go tool pprof` asks).
    #[param(minimum = 1, maximum = 60)]
    pub seconds: Option<u64>,
}

/// A CPU profile (pprof protobuf; `go tool pprof` reads it), sampled for `seconds`. Same access
/// rule as the heap profile; one profile at a time (409 while another is being taken).
#[utoipa::path(get, path = "/debug/pprof/profile", tag = "operations", params(CpuProfileQuery),
    security((), ("bearer" = []), ("api_key" = [])),
    responses((status = 200, content_type = "application/octet-stream"), (status = 400, body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem), (status = 409, body = Problem),
        (status = 503, body = Problem)))]
async fn cpu_profile(
    State(state): State<AppState>,
    _access: AdminOrLocal,
    query: Result<Query<CpuProfileQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let seconds = match query {
        Ok(Query(CpuProfileQuery { seconds })) => seconds.unwrap_or(30),
        Err(rejection) => {
            return Err(ApiError::BadParameter {
                what: "seconds",
                detail: rejection.body_text(),
            });
        }
    };
    if !(1..=MAX_CPU_PROFILE_SECS).contains(&seconds) {
        return Err(ApiError::BadParameter {
            what: "seconds",
            detail: format!("must be from 1 to {MAX_CPU_PROFILE_SECS}"),
        });
    }
    let profile = state
        .cpu_profiler
        .cpu_profile(std::time::Duration::from_secs(seconds))
        .await
        .map_err(|e| ApiError::Service(ServiceError::from_port(e, "CPU profile")))?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"profile.pb\"",
            ),
        ],
        profile,
    )
        .into_response())
}
