//! `/api/v1/webhooks`: endpoints (admin), their secrets (shown on create and rotate only), the
//! delivery log, redeliveries and pings.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::domain::Validation;
use crate::domain::ids::ProjectId;
use crate::domain::webhook::{Attempt, Delivery, DeliveryId, EventFilter, Webhook, WebhookId};
use crate::services::Caller;
use crate::services::webhooks::{DeliveryLog, IssuedWebhook, NewWebhook, WebhookChanges};

use super::AppState;
use super::api_keys::nullable;
use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::problem::{ApiError, Problem};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_webhook, list_webhooks))
        .routes(routes!(get_webhook, update_webhook, delete_webhook))
        .routes(routes!(rotate_webhook_secret))
        .routes(routes!(ping_webhook))
        .routes(routes!(list_deliveries))
        .routes(routes!(get_delivery))
        .routes(routes!(redeliver))
}

/// Longest accepted description.
const MAX_DESCRIPTION: usize = 1000;

/// An endpoint as shown to clients (never its secret).
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookResponse {
    pub id: Uuid,
    pub url: String,
    /// `["*"]` (every command event) or event names such as `command.failed`.
    pub events: Vec<String>,
    /// Only this project's commands; `null` is every project.
    pub project_id: Option<Uuid>,
    pub description: String,
    pub enabled: bool,
    /// Why the server disabled it (the receiver answered `410 Gone`).
    pub disabled_reason: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl From<Webhook> for WebhookResponse {
    fn from(w: Webhook) -> Self {
        Self {
            id: w.id.as_uuid(),
            url: w.url.as_str().to_owned(),
            events: w.events.names(),
            project_id: w.project_id.map(|p| p.as_uuid()),
            description: w.description,
            enabled: w.enabled,
            disabled_reason: w.disabled_reason,
            created_at: w.created_at,
            updated_at: w.updated_at,
        }
    }
}

/// An endpoint with its signing secret: the only time the secret is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct IssuedWebhookResponse {
    #[serde(flatten)]
    pub webhook: WebhookResponse,
    /// `whsec_<base64>`: verify `webhook-signature` with it (any Standard Webhooks library).
    /// Store it now: it is not shown again.
    pub secret: String,
}

impl From<IssuedWebhook> for IssuedWebhookResponse {
    fn from(issued: IssuedWebhook) -> Self {
        Self {
            secret: issued.webhook.secret.expose().to_owned(),
            webhook: issued.webhook.into(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookList {
    pub items: Vec<WebhookResponse>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhookRequest {
    /// `http` or `https`; private, loopback and link-local destinations are refused unless the
    /// server runs with `RDEV_WEBHOOK_ALLOW_PRIVATE=true`.
    pub url: String,
    /// Event names, or `["*"]` / absent for every command event.
    #[serde(default)]
    pub events: Vec<String>,
    pub project_id: Option<Uuid>,
    #[serde(default)]
    pub description: String,
    /// Default `true`.
    pub enabled: Option<bool>,
}

fn check_description(v: &mut Validation, description: &str) {
    if description.len() > MAX_DESCRIPTION {
        v.fail(
            "/description",
            format!("must be at most {MAX_DESCRIPTION} bytes"),
        );
    }
}

impl TryFrom<CreateWebhookRequest> for NewWebhook {
    type Error = ApiError;
    fn try_from(body: CreateWebhookRequest) -> Result<Self, ApiError> {
        let mut v = Validation::new();
        let events = v.check("/events", EventFilter::parse(&body.events));
        check_description(&mut v, &body.description);
        v.finish_with(|valid| NewWebhook {
            url: body.url,
            events: valid.open(events),
            project_id: body.project_id.map(ProjectId::from_uuid),
            description: body.description,
            enabled: body.enabled.unwrap_or(true),
        })
        .map_err(ApiError::from_domain)
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateWebhookRequest {
    pub url: Option<String>,
    pub events: Option<Vec<String>>,
    /// A project id, or `null` for every project.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<Uuid>)]
    pub project_id: Option<Option<Uuid>>,
    pub description: Option<String>,
    /// `true` re-enables an endpoint the server disabled.
    pub enabled: Option<bool>,
}

impl TryFrom<UpdateWebhookRequest> for WebhookChanges {
    type Error = ApiError;
    fn try_from(body: UpdateWebhookRequest) -> Result<Self, ApiError> {
        let mut v = Validation::new();
        let events = body
            .events
            .map(|e| v.check("/events", EventFilter::parse(&e)));
        if let Some(description) = &body.description {
            check_description(&mut v, description);
        }
        v.finish_with(|valid| WebhookChanges {
            url: body.url,
            events: events.map(|c| valid.open(c)),
            project_id: body.project_id.map(|p| p.map(ProjectId::from_uuid)),
            description: body.description,
            enabled: body.enabled,
        })
        .map_err(ApiError::from_domain)
    }
}

/// One attempt of a delivery.
#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptResponse {
    pub attempt: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The receiver's answer; `null` when there was none (see `error`).
    pub status_code: Option<u16>,
    pub latency_ms: u64,
    pub error: Option<String>,
}

impl From<Attempt> for AttemptResponse {
    fn from(a: Attempt) -> Self {
        Self {
            attempt: a.number,
            at: a.at,
            status_code: a.status_code,
            latency_ms: a.latency_ms,
            error: a.error,
        }
    }
}

/// One event on its way to one endpoint.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryResponse {
    /// Also the `webhook-id` header, the same on every attempt.
    pub id: Uuid,
    pub webhook_id: Uuid,
    pub event_type: String,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    pub attempts: u32,
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
    pub last_status_code: Option<u16>,
    pub last_latency_ms: Option<u64>,
    pub last_error: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub delivered_at: Option<OffsetDateTime>,
    /// The body as sent: `{type, timestamp, data}`.
    pub payload: serde_json::Value,
}

impl From<Delivery> for DeliveryResponse {
    fn from(d: Delivery) -> Self {
        Self {
            id: d.id.as_uuid(),
            webhook_id: d.webhook_id.as_uuid(),
            event_type: d.event_type,
            status: d.status.as_str().to_owned(),
            attempts: d.attempts,
            next_attempt_at: d.next_attempt_at,
            last_status_code: d.last_status_code,
            last_latency_ms: d.last_latency_ms,
            last_error: d.last_error,
            created_at: d.created_at,
            delivered_at: d.delivered_at,
            payload: serde_json::from_str(&d.payload).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// A delivery with every recorded attempt.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryLogResponse {
    #[serde(flatten)]
    pub delivery: DeliveryResponse,
    pub attempt_log: Vec<AttemptResponse>,
}

impl From<DeliveryLog> for DeliveryLogResponse {
    fn from(log: DeliveryLog) -> Self {
        Self {
            delivery: log.delivery.into(),
            attempt_log: log.attempts.into_iter().map(Into::into).collect(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryList {
    pub items: Vec<DeliveryResponse>,
    /// Pass as `cursor` for the next (older) page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeliveryQuery {
    /// `next_cursor` of the previous page.
    pub cursor: Option<Uuid>,
    /// Page size, 1-500 (default 50).
    pub limit: Option<u32>,
}

/// Creates an endpoint (admin). The signing secret is in the response, and nowhere else, ever.
#[utoipa::path(post, path = "/api/v1/webhooks", tag = "webhooks", request_body = CreateWebhookRequest,
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 201, body = IssuedWebhookResponse), (status = 422, body = Problem), (status = 403, body = Problem)))]
async fn create_webhook(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateWebhookRequest>,
) -> Result<(StatusCode, Json<IssuedWebhookResponse>), ApiError> {
    let issued = state.webhooks.create(&caller, body.try_into()?).await?;
    Ok((StatusCode::CREATED, Json(issued.into())))
}

/// Lists every endpoint (admin).
#[utoipa::path(get, path = "/api/v1/webhooks", tag = "webhooks", security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = WebhookList), (status = 403, body = Problem)))]
async fn list_webhooks(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<WebhookList>, ApiError> {
    let items = state.webhooks.list(&caller).await?;
    Ok(Json(WebhookList {
        items: items.into_iter().map(Into::into).collect(),
    }))
}

/// One endpoint (admin).
#[utoipa::path(get, path = "/api/v1/webhooks/{id}", tag = "webhooks", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = WebhookResponse), (status = 404, body = Problem)))]
async fn get_webhook(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<WebhookId>,
) -> Result<Json<WebhookResponse>, ApiError> {
    Ok(Json(state.webhooks.get(&caller, id).await?.into()))
}

/// Changes an endpoint's URL, events, project, description or enabled flag (admin).
#[utoipa::path(patch, path = "/api/v1/webhooks/{id}", tag = "webhooks", params(("id" = Uuid, Path)),
    request_body = UpdateWebhookRequest, security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = WebhookResponse), (status = 404, body = Problem), (status = 422, body = Problem)))]
async fn update_webhook(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<WebhookId>,
    ApiJson(body): ApiJson<UpdateWebhookRequest>,
) -> Result<Json<WebhookResponse>, ApiError> {
    let changes = body.try_into()?;
    Ok(Json(
        state.webhooks.update(&caller, id, changes).await?.into(),
    ))
}

/// Deletes an endpoint and its deliveries (admin).
#[utoipa::path(delete, path = "/api/v1/webhooks/{id}", tag = "webhooks", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 204), (status = 404, body = Problem)))]
async fn delete_webhook(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<WebhookId>,
) -> Result<StatusCode, ApiError> {
    state.webhooks.delete(&caller, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Replaces the signing secret (admin): deliveries are signed with the new one at once; it is
/// returned once.
#[utoipa::path(post, path = "/api/v1/webhooks/{id}/rotate", tag = "webhooks", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = IssuedWebhookResponse), (status = 404, body = Problem)))]
async fn rotate_webhook_secret(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<WebhookId>,
) -> Result<Json<IssuedWebhookResponse>, ApiError> {
    Ok(Json(state.webhooks.rotate(&caller, id).await?.into()))
}

/// Queues a `ping` event to the endpoint (admin), whatever its event filter.
#[utoipa::path(post, path = "/api/v1/webhooks/{id}/ping", tag = "webhooks", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 202, body = DeliveryResponse), (status = 404, body = Problem)))]
async fn ping_webhook(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<WebhookId>,
) -> Result<(StatusCode, Json<DeliveryResponse>), ApiError> {
    let delivery = state.webhooks.ping(&caller, id).await?;
    Ok((StatusCode::ACCEPTED, Json(delivery.into())))
}

/// The endpoint's deliveries, newest first (admin).
#[utoipa::path(get, path = "/api/v1/webhooks/{id}/deliveries", tag = "webhooks",
    params(("id" = Uuid, Path), DeliveryQuery), security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = DeliveryList), (status = 400, body = Problem), (status = 404, body = Problem)))]
async fn list_deliveries(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<WebhookId>,
    ApiQuery(query): ApiQuery<DeliveryQuery>,
) -> Result<Json<DeliveryList>, ApiError> {
    let limit = query.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadParameter {
            what: "limit",
            detail: "must be between 1 and 500".into(),
        });
    }
    let before = query.cursor.map(DeliveryId::from_uuid);
    let page = state
        .webhooks
        .deliveries(&caller, id, before, limit)
        .await?;
    Ok(Json(DeliveryList {
        items: page.items.into_iter().map(Into::into).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// One delivery with every recorded attempt (admin).
#[utoipa::path(get, path = "/api/v1/webhooks/{id}/deliveries/{delivery_id}", tag = "webhooks",
    params(("id" = Uuid, Path), ("delivery_id" = Uuid, Path)), security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = DeliveryLogResponse), (status = 404, body = Problem)))]
async fn get_delivery(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, delivery)): ApiPath<(WebhookId, DeliveryId)>,
) -> Result<Json<DeliveryLogResponse>, ApiError> {
    Ok(Json(
        state.webhooks.delivery(&caller, id, delivery).await?.into(),
    ))
}

/// Sends a delivery again, due at once, with the same `webhook-id` (admin).
#[utoipa::path(post, path = "/api/v1/webhooks/{id}/deliveries/{delivery_id}/redeliver", tag = "webhooks",
    params(("id" = Uuid, Path), ("delivery_id" = Uuid, Path)), security(("bearer" = []), ("api_key" = [])),
    responses((status = 202, body = DeliveryResponse), (status = 404, body = Problem)))]
async fn redeliver(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, delivery)): ApiPath<(WebhookId, DeliveryId)>,
) -> Result<(StatusCode, Json<DeliveryResponse>), ApiError> {
    let delivery = state.webhooks.redeliver(&caller, id, delivery).await?;
    Ok((StatusCode::ACCEPTED, Json(delivery.into())))
}
