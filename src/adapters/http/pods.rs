//! `/api/v1/projects/{id}/pod`: the project's pod, and restarting it.

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::domain::ids::ProjectId;
use crate::ports::PodStatus;
use crate::services::Caller;

use super::AppState;
use super::extract::ApiPath;
use super::problem::{ApiError, Problem};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_pod))
        .routes(routes!(restart_pod))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PodResponse {
    pub namespace: String,
    pub name: String,
    /// `Pending`, `Running`, `Succeeded`, `Failed` or `Unknown`.
    pub phase: String,
    pub ready: bool,
    /// Container restarts, summed over the pod's containers.
    pub restarts: u32,
    pub node: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    /// The container commands run in.
    pub container: String,
}

impl From<PodStatus> for PodResponse {
    fn from(pod: PodStatus) -> Self {
        Self {
            namespace: pod.namespace,
            name: pod.name,
            phase: pod.phase,
            ready: pod.ready,
            restarts: pod.restarts,
            node: pod.node,
            started_at: pod.started_at,
            container: pod.container,
        }
    }
}

/// The pod the project's commands run in (for a selector: the newest Ready match).
#[utoipa::path(get, path = "/api/v1/projects/{id}/pod", tag = "pods", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = PodResponse), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem), (status = 503, body = Problem)))]
async fn get_pod(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<ProjectId>,
) -> Result<Json<PodResponse>, ApiError> {
    Ok(Json(state.pods.status(&caller, id).await?.into()))
}

/// Deletes the project's pod so that its controller recreates it, and answers with the Ready
/// replacement (`execute` scope; audited).
#[utoipa::path(post, path = "/api/v1/projects/{id}/pod/restart", tag = "pods", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = PodResponse), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem), (status = 503, body = Problem)))]
async fn restart_pod(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<ProjectId>,
) -> Result<Json<PodResponse>, ApiError> {
    Ok(Json(state.pods.restart(&caller, id).await?.into()))
}
