//! `/api/v1/audit` and `/api/v1/audit/verify`.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::domain::audit::{AuditEvent, AuditFilterText, ExpectedHead};
use crate::domain::ids::ApiKeyId;
use crate::ports::AuditFilter;
use crate::services::Caller;

use super::AppState;
use super::extract::ApiQuery;
use super::problem::{ApiError, Problem};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_audit_events))
        .routes(routes!(verify_audit_log))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct VerifyQuery {
    /// A head `seq` published earlier (the `audit head` log line, `rdev_audit_head_seq`): the
    /// chain must still reach it, so rows deleted from its end are found.
    pub head_seq: Option<i64>,
    /// The hash published with that head; checked when given (needs `head_seq`).
    pub head_hash: Option<String>,
}

impl VerifyQuery {
    fn expected_head(self) -> Result<Option<ExpectedHead>, ApiError> {
        match (self.head_seq, self.head_hash) {
            (Some(seq), hash) if seq >= 1 => Ok(Some(ExpectedHead { seq, hash })),
            (None, None) => Ok(None),
            _ => Err(ApiError::BadParameter {
                what: "head",
                detail: "head_seq must be at least 1, and head_hash needs head_seq".into(),
            }),
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// API key id of the actor.
    pub actor: Option<Uuid>,
    /// Action name, e.g. `project.created` (at most 200 characters).
    #[param(value_type = Option<String>)]
    pub action: Option<AuditFilterText>,
    /// Id of the resource acted on (at most 200 characters).
    #[param(value_type = Option<String>)]
    pub target_id: Option<AuditFilterText>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[param(value_type = Option<String>, format = DateTime)]
    pub since: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[param(value_type = Option<String>, format = DateTime)]
    pub until: Option<OffsetDateTime>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<i64>,
    /// Page size, 1-500 (default 100).
    pub limit: Option<u32>,
}

impl From<AuditQuery> for AuditFilter {
    fn from(query: AuditQuery) -> Self {
        AuditFilter {
            actor: query.actor.map(ApiKeyId::from_uuid),
            action: query.action.map(AuditFilterText::into_inner),
            target_id: query.target_id.map(AuditFilterText::into_inner),
            since: query.since,
            until: query.until,
            before_seq: query.cursor,
            limit: query.limit.unwrap_or(100),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEventResponse {
    pub seq: i64,
    pub id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub actor_key_id: Option<Uuid>,
    pub client_ip: Option<String>,
    pub request_id: Option<String>,
    pub trace_id: Option<String>,
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    pub outcome: String,
    pub details: serde_json::Value,
    pub prev_hash: String,
    pub hash: String,
}

impl From<AuditEvent> for AuditEventResponse {
    fn from(event: AuditEvent) -> Self {
        Self {
            seq: event.seq,
            id: event.id.as_uuid(),
            at: event.at,
            actor_key_id: event.actor.map(|a| a.as_uuid()),
            client_ip: event.client_ip,
            request_id: event.request_id,
            trace_id: event.trace_id,
            action: event.action,
            target_type: event.target_type,
            target_id: event.target_id,
            outcome: event.outcome,
            details: serde_json::from_str(&event.details)
                .unwrap_or(serde_json::Value::String(event.details)),
            prev_hash: event.prev_hash,
            hash: event.hash,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    pub items: Vec<AuditEventResponse>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VerifyResponse {
    /// True when every row matches its hash and follows the previous one.
    pub ok: bool,
    pub checked: u64,
    /// The first row where the chain breaks.
    pub first_broken_seq: Option<i64>,
    pub reason: Option<String>,
}

/// Audit events, newest first (admin).
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(AuditQuery),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = AuditPage), (status = 403, body = Problem)))]
async fn list_audit_events(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    let page = state.audit.list(&caller, query.into()).await?;
    Ok(Json(AuditPage {
        items: page.items.into_iter().map(Into::into).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// Walks the keyed hash chain and reports the first edited or missing row (admin); with
/// `head_seq` (and `head_hash`), also rows deleted from its end.
#[utoipa::path(get, path = "/api/v1/audit/verify", tag = "audit", params(VerifyQuery), security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = VerifyResponse), (status = 400, body = Problem), (status = 403, body = Problem)))]
async fn verify_audit_log(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<VerifyQuery>,
) -> Result<Json<VerifyResponse>, ApiError> {
    let report = state.audit.verify(&caller, query.expected_head()?).await?;
    Ok(Json(VerifyResponse {
        ok: report.first_broken.is_none(),
        checked: report.checked,
        first_broken_seq: report.first_broken.as_ref().map(|b| b.seq),
        reason: report.first_broken.map(|b| b.reason.to_owned()),
    }))
}
