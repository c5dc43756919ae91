//! `/api/v1/me` and `/api/v1/api-keys`.

use std::collections::BTreeSet;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Deserializer, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::domain::Validation;
use crate::domain::api_key::{AllowedIps, ApiKey, KeyName, Scope, Scopes};
use crate::domain::ids::{ApiKeyId, ProjectId};
use crate::domain::rate_limit::RateLimit;
use crate::services::Caller;
use crate::services::api_keys::{IssuedKey, KeyChanges, NewKey};

use super::AppState;
use super::extract::{ApiJson, ApiPath};
use super::problem::{ApiError, Problem};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_me))
        .routes(routes!(create_api_key, list_api_keys))
        .routes(routes!(get_api_key, update_api_key, revoke_api_key))
        .routes(routes!(rotate_api_key))
}

/// An API key as shown to clients (never its secret or hash).
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyResponse {
    pub id: Uuid,
    pub name: String,
    /// The public part of the key, `rdev_<prefix>_...`.
    pub prefix: String,
    /// `read`, `execute`, `admin`.
    #[schema(value_type = Vec<String>)]
    pub scopes: Vec<Scope>,
    pub allowed_ips: Vec<String>,
    pub project_ids: Vec<Uuid>,
    /// This key's request rate limit (`600/60s`: requests per sliding window); `null` when the
    /// server default (`RDEV_RATE_LIMIT`) applies.
    #[schema(example = "600/60s")]
    pub rate_limit: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    pub created_by: Option<Uuid>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<OffsetDateTime>,
}

impl From<ApiKey> for ApiKeyResponse {
    fn from(key: ApiKey) -> Self {
        Self {
            id: key.id.as_uuid(),
            name: key.name.as_str().to_owned(),
            prefix: key.prefix,
            scopes: key.scopes.iter().collect(),
            allowed_ips: key
                .allowed_ips
                .as_slice()
                .iter()
                .map(ToString::to_string)
                .collect(),
            project_ids: key.project_ids.iter().map(ProjectId::as_uuid).collect(),
            rate_limit: key.rate_limit.map(|rate| rate.to_string()),
            created_at: key.created_at,
            created_by: key.created_by.map(|k| k.as_uuid()),
            expires_at: key.expires_at,
            revoked_at: key.revoked_at,
            last_used_at: key.last_used_at,
        }
    }
}

/// A key with its secret: the only time the secret is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct IssuedKeyResponse {
    #[serde(flatten)]
    pub key: ApiKeyResponse,
    /// The full key to send as `Authorization: Bearer <key>`. Store it now: it is not shown again.
    pub secret: String,
}

impl From<IssuedKey> for IssuedKeyResponse {
    fn from(issued: IssuedKey) -> Self {
        Self {
            secret: issued.secret.expose().to_owned(),
            key: issued.key.into(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MeResponse {
    #[serde(flatten)]
    pub key: ApiKeyResponse,
    /// The address this request was seen from (after trusted proxies).
    pub client_ip: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyList {
    pub items: Vec<ApiKeyResponse>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKeyRequest {
    pub name: String,
    /// Any of `read`, `execute`, `admin` (`admin` implies `execute`, which implies `read`).
    pub scopes: Vec<String>,
    /// CIDRs or addresses the key may be used from; empty or absent means any.
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    /// Projects the key may see and use; empty or absent means all.
    #[serde(default)]
    pub project_ids: Vec<Uuid>,
    /// Requests per sliding window for this key (`100/60s`; units `s`, `m`, `h`); absent or
    /// `null` for the server default.
    #[serde(default)]
    #[schema(example = "100/60s")]
    pub rate_limit: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
}

impl TryFrom<CreateApiKeyRequest> for NewKey {
    type Error = ApiError;
    fn try_from(body: CreateApiKeyRequest) -> Result<Self, ApiError> {
        let mut v = Validation::new();
        let name = v.check("/name", KeyName::parse(body.name));
        let scopes = v.check("/scopes", Scopes::parse(&body.scopes));
        let allowed_ips = v.check("/allowed_ips", AllowedIps::parse(&body.allowed_ips));
        let rate_limit = body
            .rate_limit
            .map(|raw| v.check("/rate_limit", RateLimit::parse(&raw)));
        v.finish_with(|valid| NewKey {
            name: valid.open(name),
            scopes: valid.open(scopes),
            allowed_ips: valid.open(allowed_ips),
            project_ids: unique_projects(body.project_ids),
            rate_limit: rate_limit.map(|c| valid.open(c)),
            expires_at: body.expires_at,
        })
        .map_err(ApiError::from_domain)
    }
}

fn unique_projects(ids: Vec<Uuid>) -> Vec<ProjectId> {
    ids.into_iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(ProjectId::from_uuid)
        .collect()
}

/// Distinguishes an absent field (`None`) from an explicit `null` (`Some(None)`).
pub fn nullable<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

#[derive(Debug, Deserialize)]
#[serde(transparent)]
struct Rfc3339(#[serde(with = "time::serde::rfc3339")] OffsetDateTime);

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateApiKeyRequest {
    pub name: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub allowed_ips: Option<Vec<String>>,
    pub project_ids: Option<Vec<Uuid>>,
    /// Requests per sliding window for this key (`100/60s`), or `null` for the server default.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, example = "100/60s")]
    rate_limit: Option<Option<String>>,
    /// An RFC 3339 time, or `null` to remove the expiry.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, format = DateTime)]
    expires_at: Option<Option<Rfc3339>>,
}

impl TryFrom<UpdateApiKeyRequest> for KeyChanges {
    type Error = ApiError;
    fn try_from(body: UpdateApiKeyRequest) -> Result<Self, ApiError> {
        let mut v = Validation::new();
        let name = body.name.map(|n| v.check("/name", KeyName::parse(n)));
        let scopes = body.scopes.map(|s| v.check("/scopes", Scopes::parse(&s)));
        let allowed_ips = body
            .allowed_ips
            .map(|ips| v.check("/allowed_ips", AllowedIps::parse(&ips)));
        let rate_limit = body
            .rate_limit
            .map(|rate| rate.map(|raw| v.check("/rate_limit", RateLimit::parse(&raw))));
        v.finish_with(|valid| KeyChanges {
            name: name.map(|c| valid.open(c)),
            scopes: scopes.map(|c| valid.open(c)),
            allowed_ips: allowed_ips.map(|c| valid.open(c)),
            project_ids: body.project_ids.map(unique_projects),
            // A `Some(None)` is an explicit `null`: the key returns to the server default.
            rate_limit: rate_limit.map(|rate| rate.map(|c| valid.open(c))),
            expires_at: body.expires_at.map(|at| at.map(|Rfc3339(at)| at)),
        })
        .map_err(ApiError::from_domain)
    }
}

/// The key making this request.
#[utoipa::path(get, path = "/api/v1/me", tag = "api-keys", security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = MeResponse), (status = 401, body = Problem)))]
async fn get_me(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<MeResponse>, ApiError> {
    let key = state.keys.me(&caller).await?;
    Ok(Json(MeResponse {
        key: key.into(),
        client_ip: caller.context.client_ip,
    }))
}

/// Creates a key (admin). The secret is in the response, and nowhere else, ever.
#[utoipa::path(post, path = "/api/v1/api-keys", tag = "api-keys", request_body = CreateApiKeyRequest,
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 201, body = IssuedKeyResponse), (status = 422, body = Problem), (status = 403, body = Problem)))]
async fn create_api_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateApiKeyRequest>,
) -> Result<(StatusCode, Json<IssuedKeyResponse>), ApiError> {
    let issued = state.keys.create(&caller, body.try_into()?).await?;
    Ok((StatusCode::CREATED, Json(issued.into())))
}

/// Lists all keys (admin).
#[utoipa::path(get, path = "/api/v1/api-keys", tag = "api-keys", security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = ApiKeyList), (status = 403, body = Problem)))]
async fn list_api_keys(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<ApiKeyList>, ApiError> {
    let keys = state.keys.list(&caller).await?;
    Ok(Json(ApiKeyList {
        items: keys.into_iter().map(Into::into).collect(),
    }))
}

/// One key (admin).
#[utoipa::path(get, path = "/api/v1/api-keys/{id}", tag = "api-keys", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = ApiKeyResponse), (status = 404, body = Problem)))]
async fn get_api_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<ApiKeyId>,
) -> Result<Json<ApiKeyResponse>, ApiError> {
    Ok(Json(state.keys.get(&caller, id).await?.into()))
}

/// Changes a key's name, scopes, allowlist, projects, rate limit or expiry (admin).
#[utoipa::path(patch, path = "/api/v1/api-keys/{id}", tag = "api-keys", params(("id" = Uuid, Path)),
    request_body = UpdateApiKeyRequest, security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = ApiKeyResponse), (status = 404, body = Problem), (status = 422, body = Problem)))]
async fn update_api_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<ApiKeyId>,
    ApiJson(body): ApiJson<UpdateApiKeyRequest>,
) -> Result<Json<ApiKeyResponse>, ApiError> {
    Ok(Json(
        state
            .keys
            .update(&caller, id, body.try_into()?)
            .await?
            .into(),
    ))
}

/// Revokes a key (admin); it stops working at once.
#[utoipa::path(delete, path = "/api/v1/api-keys/{id}", tag = "api-keys", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = ApiKeyResponse), (status = 404, body = Problem)))]
async fn revoke_api_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<ApiKeyId>,
) -> Result<Json<ApiKeyResponse>, ApiError> {
    Ok(Json(state.keys.revoke(&caller, id).await?.into()))
}

/// Replaces a key's secret (admin): the old secret stops working, the new one is returned once.
#[utoipa::path(post, path = "/api/v1/api-keys/{id}/rotate", tag = "api-keys", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = IssuedKeyResponse), (status = 404, body = Problem), (status = 409, body = Problem)))]
async fn rotate_api_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<ApiKeyId>,
) -> Result<Json<IssuedKeyResponse>, ApiError> {
    Ok(Json(state.keys.rotate(&caller, id).await?.into()))
}
