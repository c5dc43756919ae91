//! `/api/v1/projects`.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::domain::ids::ProjectId;
use crate::domain::project::{
    EnvVars, ExecutorKind, KubeLabelName, KubeTarget, LabelSelector, MAX_CONCURRENCY,
    MAX_TIMEOUT_SECS, PodName, PodRef, Project, ProjectName, Workdir, parse_bounded,
    parse_description,
};
use crate::domain::{Checked, Validation};
use crate::services::Caller;
use crate::services::projects::{NewProject, ProjectChanges};

use super::AppState;
use super::api_keys::nullable;
use super::extract::{ApiJson, ApiPath};
use super::problem::{ApiError, Problem};

pub const DEFAULT_MAX_CONCURRENCY: u32 = 4;
pub const DEFAULT_TIMEOUT_SECS: u32 = 600;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_project, list_projects))
        .routes(routes!(get_project, update_project, delete_project))
}

/// Where in Kubernetes a project's commands run.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetBody {
    pub namespace: String,
    /// A pod name; give either this or `selector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// A label selector (`app=web`); the first ready pod is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

fn parse_target(body: TargetBody, v: &mut Validation) -> Checked<KubeTarget> {
    let namespace = v.check("/target/namespace", KubeLabelName::parse(body.namespace));
    let container = body
        .container
        .map(|c| v.check("/target/container", KubeLabelName::parse(c)));
    let pod = match (body.pod, body.selector) {
        (Some(pod), None) => v
            .check("/target/pod", PodName::parse(pod))
            .map(PodRef::Name),
        (None, Some(selector)) => v
            .check("/target/selector", LabelSelector::parse(selector))
            .map(PodRef::Selector),
        _ => v.refuse("/target", "give exactly one of `pod` or `selector`"),
    };
    namespace
        .and(pod)
        .and(Checked::transpose(container))
        .map(|((namespace, pod), container)| KubeTarget {
            namespace,
            pod,
            container,
        })
}

fn target_body(target: &KubeTarget) -> TargetBody {
    let (pod, selector) = match &target.pod {
        PodRef::Name(name) => (Some(name.to_string()), None),
        PodRef::Selector(selector) => (None, Some(selector.to_string())),
    };
    TargetBody {
        namespace: target.namespace.to_string(),
        pod,
        selector,
        container: target.container.as_ref().map(ToString::to_string),
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProjectResponse {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub target: Option<TargetBody>,
    pub workdir: String,
    /// Variable names with their values for admin keys; for other keys every value is `null`.
    pub env: BTreeMap<String, Option<String>>,
    pub max_concurrency: u32,
    pub default_timeout_secs: u32,
    /// `kube` or `local`.
    #[schema(value_type = String)]
    pub executor: ExecutorKind,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// An environment as `caller` may read it: values for admin keys, names only for the others.
pub(super) fn env_body(env: &EnvVars, caller: &Caller) -> BTreeMap<String, Option<String>> {
    let values = caller.sees_env_values();
    env.iter()
        .map(|(name, value)| (name.to_owned(), values.then(|| value.to_owned())))
        .collect()
}

impl ProjectResponse {
    fn new(project: Project, caller: &Caller) -> Self {
        Self {
            id: project.id.as_uuid(),
            name: project.name.to_string(),
            description: project.description,
            target: project.target.as_ref().map(target_body),
            workdir: project.workdir.to_string(),
            env: env_body(&project.env, caller),
            max_concurrency: project.max_concurrency,
            default_timeout_secs: project.default_timeout_secs,
            executor: project.executor,
            created_at: project.created_at,
            updated_at: project.updated_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProjectList {
    pub items: Vec<ProjectResponse>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProjectRequest {
    /// A DNS-1123 label: lowercase letters, digits and '-', starting with a letter.
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub target: Option<TargetBody>,
    /// Absolute, normalised directory the commands run in.
    pub workdir: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Commands of this project running at once (1-64, default 4).
    pub max_concurrency: Option<i64>,
    /// Timeout for commands that give none (1-86400 s, default 600).
    pub default_timeout_secs: Option<i64>,
    /// `kube` or `local`; defaults to the server's `RDEV_EXECUTOR`.
    pub executor: Option<String>,
}

impl CreateProjectRequest {
    fn into_new(self, default_executor: ExecutorKind) -> Result<NewProject, ApiError> {
        let mut v = Validation::new();
        let name = v.check("/name", ProjectName::parse(self.name));
        let description = v.check("/description", parse_description(self.description));
        let target = self.target.map(|t| parse_target(t, &mut v));
        let workdir = v.check("/workdir", Workdir::parse(self.workdir));
        let env = EnvVars::parse(self.env, "/env", &mut v);
        let max_concurrency = v.check(
            "/max_concurrency",
            parse_bounded(
                self.max_concurrency
                    .unwrap_or(DEFAULT_MAX_CONCURRENCY.into()),
                1,
                MAX_CONCURRENCY,
            ),
        );
        let default_timeout_secs = v.check(
            "/default_timeout_secs",
            parse_bounded(
                self.default_timeout_secs
                    .unwrap_or(DEFAULT_TIMEOUT_SECS.into()),
                1,
                MAX_TIMEOUT_SECS,
            ),
        );
        let executor = match self.executor {
            Some(raw) => v.check("/executor", ExecutorKind::parse(&raw)),
            None => Checked::given(default_executor),
        };
        v.finish_with(|valid| NewProject {
            name: valid.open(name),
            description: valid.open(description),
            target: target.map(|t| valid.open(t)),
            workdir: valid.open(workdir),
            env: valid.open(env),
            max_concurrency: valid.open(max_concurrency),
            default_timeout_secs: valid.open(default_timeout_secs),
            executor: valid.open(executor),
        })
        .map_err(ApiError::from_domain)
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateProjectRequest {
    pub name: Option<String>,
    pub description: Option<String>,
    /// A new target, or `null` to remove it.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<TargetBody>)]
    pub target: Option<Option<TargetBody>>,
    pub workdir: Option<String>,
    /// Replaces all variables.
    pub env: Option<BTreeMap<String, String>>,
    pub max_concurrency: Option<i64>,
    pub default_timeout_secs: Option<i64>,
    pub executor: Option<String>,
}

impl TryFrom<UpdateProjectRequest> for ProjectChanges {
    type Error = ApiError;
    fn try_from(body: UpdateProjectRequest) -> Result<Self, ApiError> {
        let mut v = Validation::new();
        let name = body.name.map(|n| v.check("/name", ProjectName::parse(n)));
        let description = body
            .description
            .map(|d| v.check("/description", parse_description(d)));
        let target = body.target.map(|t| t.map(|t| parse_target(t, &mut v)));
        let workdir = body.workdir.map(|w| v.check("/workdir", Workdir::parse(w)));
        let env = body.env.map(|e| EnvVars::parse(e, "/env", &mut v));
        let max_concurrency = body
            .max_concurrency
            .map(|n| v.check("/max_concurrency", parse_bounded(n, 1, MAX_CONCURRENCY)));
        let default_timeout_secs = body.default_timeout_secs.map(|n| {
            v.check(
                "/default_timeout_secs",
                parse_bounded(n, 1, MAX_TIMEOUT_SECS),
            )
        });
        let executor = body
            .executor
            .map(|e| v.check("/executor", ExecutorKind::parse(&e)));
        v.finish_with(|valid| ProjectChanges {
            name: name.map(|c| valid.open(c)),
            description: description.map(|c| valid.open(c)),
            target: target.map(|t| t.map(|t| valid.open(t))),
            workdir: workdir.map(|c| valid.open(c)),
            env: env.map(|c| valid.open(c)),
            max_concurrency: max_concurrency.map(|c| valid.open(c)),
            default_timeout_secs: default_timeout_secs.map(|c| valid.open(c)),
            executor: executor.map(|c| valid.open(c)),
        })
        .map_err(ApiError::from_domain)
    }
}

/// Registers a project (admin).
#[utoipa::path(post, path = "/api/v1/projects", tag = "projects", request_body = CreateProjectRequest,
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 201, body = ProjectResponse), (status = 409, body = Problem), (status = 422, body = Problem)))]
async fn create_project(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateProjectRequest>,
) -> Result<(StatusCode, Json<ProjectResponse>), ApiError> {
    let new = body.into_new(state.projects.default_executor())?;
    let project = state.projects.create(&caller, new).await?;
    Ok((
        StatusCode::CREATED,
        Json(ProjectResponse::new(project, &caller)),
    ))
}

/// The projects this key may see.
#[utoipa::path(get, path = "/api/v1/projects", tag = "projects", security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = ProjectList)))]
async fn list_projects(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<ProjectList>, ApiError> {
    let projects = state.projects.list(&caller).await?;
    Ok(Json(ProjectList {
        items: projects
            .into_iter()
            .map(|project| ProjectResponse::new(project, &caller))
            .collect(),
    }))
}

#[utoipa::path(get, path = "/api/v1/projects/{id}", tag = "projects", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = ProjectResponse), (status = 404, body = Problem)))]
async fn get_project(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<ProjectId>,
) -> Result<Json<ProjectResponse>, ApiError> {
    let project = state.projects.get(&caller, id).await?;
    Ok(Json(ProjectResponse::new(project, &caller)))
}

/// Changes a project (admin); absent fields stay as they are.
#[utoipa::path(patch, path = "/api/v1/projects/{id}", tag = "projects", params(("id" = Uuid, Path)),
    request_body = UpdateProjectRequest, security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = ProjectResponse), (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
async fn update_project(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<ProjectId>,
    ApiJson(body): ApiJson<UpdateProjectRequest>,
) -> Result<Json<ProjectResponse>, ApiError> {
    let project = state.projects.update(&caller, id, body.try_into()?).await?;
    Ok(Json(ProjectResponse::new(project, &caller)))
}

/// Deletes a project and its finished commands (admin); refused while commands are active.
#[utoipa::path(delete, path = "/api/v1/projects/{id}", tag = "projects", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 204), (status = 404, body = Problem), (status = 409, body = Problem)))]
async fn delete_project(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<ProjectId>,
) -> Result<StatusCode, ApiError> {
    state.projects.delete(&caller, id).await?;
    Ok(StatusCode::NO_CONTENT)
}
