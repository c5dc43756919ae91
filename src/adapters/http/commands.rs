//! `/api/v1/projects/{id}/commands`, `/api/v1/commands`, `/api/v1/queue`, and the SSE event
//! stream of a command.

use std::collections::BTreeMap;
use std::convert::Infallible;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::domain::command::{
    Command, CommandLine, CommandStatus, OutputStream, Priority, TerminationReason,
};
use crate::domain::ids::{CommandId, ProjectId};
use crate::domain::project::{EnvVars, MAX_TIMEOUT_SECS, parse_bounded};
use crate::domain::{Checked, DomainError, Validation};
use crate::services::Caller;
use crate::services::commands::{ListCommands, QueuedCommand, SubmitCommand};
use crate::services::follow::FollowEvent;

use super::AppState;
use super::extract::{
    ApiJson, ApiPath, ApiQuery, EventsQuery, IdempotencyKey, LastEventId, StreamCaller,
};
use super::problem::{ApiError, Problem};
use super::projects::env_body;

/// Reconnect delay suggested to SSE clients.
const SSE_RETRY_MS: u64 = 2000;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(submit_command))
        .routes(routes!(list_commands))
        .routes(routes!(get_command))
        .routes(routes!(get_command_output))
        .routes(routes!(cancel_command))
        .routes(routes!(command_events))
        .routes(routes!(create_stream_token))
        .routes(routes!(get_queue))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitCommandRequest {
    /// Run with `sh -c`.
    pub command: String,
    /// `low`, `normal` (default), `high` or `critical`.
    pub priority: Option<String>,
    /// 1-86400; defaults to the project's `default_timeout_secs`.
    pub timeout_secs: Option<i64>,
    /// Added to the project's variables (and winning over them).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

impl SubmitCommandRequest {
    fn into_submit(self, idempotency_key: Option<String>) -> Result<SubmitCommand, ApiError> {
        let mut v = Validation::new();
        let command = v.check("/command", CommandLine::parse(self.command));
        let priority = match self.priority {
            Some(raw) => v.check("/priority", Priority::parse(&raw)),
            None => Checked::given(Priority::Normal),
        };
        let timeout_secs = self
            .timeout_secs
            .map(|t| v.check("/timeout_secs", parse_bounded(t, 1, MAX_TIMEOUT_SECS)));
        let env = EnvVars::parse(self.env, "/env", &mut v);
        if let Some(key) = &idempotency_key
            && (key.is_empty() || key.len() > 255)
        {
            v.fail("Idempotency-Key", "must be 1 to 255 characters");
        }
        v.finish_with(|valid| SubmitCommand {
            command: valid.open(command),
            priority: valid.open(priority),
            timeout_secs: timeout_secs.map(|c| valid.open(c)),
            env: valid.open(env),
            idempotency_key,
        })
        .map_err(ApiError::from_domain)
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CommandLinks {
    #[serde(rename = "self")]
    pub this: String,
    pub events: String,
    pub output: String,
    pub cancel: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CommandResponse {
    pub id: Uuid,
    pub project_id: Uuid,
    pub command: String,
    /// Variable names with their values for admin keys; for other keys every value is `null`.
    pub env: BTreeMap<String, Option<String>>,
    /// `low`, `normal`, `high` or `critical`.
    #[schema(value_type = String)]
    pub priority: Priority,
    pub timeout_secs: u32,
    /// `queued`, `running`, `succeeded`, `failed`, `cancelled`, `timed_out` or `lost`.
    #[schema(value_type = String)]
    pub status: CommandStatus,
    /// 1-based place in the queue while queued.
    pub position: Option<u64>,
    pub submitted_by: Option<Uuid>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    pub exit_code: Option<i32>,
    /// Why it ended: `exit`, `signal`, `timeout`, `cancel`, `lost`, `start_failed` or `shutdown`.
    #[schema(value_type = Option<String>)]
    pub termination_reason: Option<TerminationReason>,
    pub error: Option<String>,
    pub cancel_requested: bool,
    pub stdout_bytes: i64,
    pub stderr_bytes: i64,
    /// Output bytes past `RDEV_MAX_OUTPUT_BYTES`, counted but not stored.
    pub dropped_bytes: i64,
    pub truncated: bool,
    /// Sequence number of the last stored output chunk.
    pub last_seq: i64,
    pub links: CommandLinks,
}

impl CommandResponse {
    fn new(command: Command, position: Option<u64>, caller: &Caller) -> Self {
        let base = format!("/api/v1/commands/{}", command.id);
        Self {
            id: command.id.as_uuid(),
            project_id: command.project_id.as_uuid(),
            command: command.command.as_str().to_owned(),
            env: env_body(&command.env, caller),
            priority: command.priority,
            timeout_secs: command.timeout_secs,
            status: command.status,
            position,
            submitted_by: command.submitted_by.map(|k| k.as_uuid()),
            created_at: command.created_at,
            started_at: command.started_at,
            finished_at: command.finished_at,
            exit_code: command.exit_code,
            termination_reason: command.termination_reason,
            error: command.error,
            cancel_requested: command.cancel_requested,
            stdout_bytes: command.stdout_bytes,
            stderr_bytes: command.stderr_bytes,
            dropped_bytes: command.dropped_bytes,
            truncated: command.truncated,
            last_seq: command.last_seq,
            links: CommandLinks {
                events: format!("{base}/events"),
                output: format!("{base}/output"),
                cancel: format!("{base}/cancel"),
                this: base,
            },
        }
    }
}

impl CommandResponse {
    fn queued(queued: QueuedCommand, caller: &Caller) -> Self {
        Self::new(queued.command, queued.position, caller)
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CommandPage {
    pub items: Vec<CommandResponse>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// `GET /commands` parameters. A value of the wrong type (`limit=lots`) is a 400; a `status`
/// that names no status breaks a domain rule and is a 422 naming the parameter.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct CommandQuery {
    pub project_id: Option<Uuid>,
    /// `queued`, `running`, `succeeded`, `failed`, `cancelled`, `timed_out` or `lost`.
    pub status: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<Uuid>,
    /// Page size, 1-200 (default 50).
    pub limit: Option<u32>,
}

impl TryFrom<CommandQuery> for ListCommands {
    type Error = DomainError;
    fn try_from(query: CommandQuery) -> Result<Self, DomainError> {
        let mut v = Validation::new();
        let status = query
            .status
            .map(|raw| v.check("status", CommandStatus::parse(&raw)));
        v.finish_with(|valid| ListCommands {
            project_id: query.project_id.map(ProjectId::from_uuid),
            status: status.map(|c| valid.open(c)),
            before: query.cursor.map(CommandId::from_uuid),
            limit: query.limit.unwrap_or(50),
        })
    }
}

/// `GET /commands/{id}/output` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct OutputQuery {
    /// Only this stream: `stdout` or `stderr`.
    pub stream: Option<String>,
}

impl OutputQuery {
    /// The stream asked for, `None` for both.
    fn only(self) -> Result<Option<OutputStream>, DomainError> {
        let mut v = Validation::new();
        let only = self
            .stream
            .map(|raw| v.check("stream", OutputStream::parse(&raw)));
        v.finish_with(|valid| only.map(|c| valid.open(c)))
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StreamTokenResponse {
    pub token: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// The events URL with the token, ready for `new EventSource(...)`.
    pub events_url: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueueResponse {
    /// Queued commands by priority.
    pub queued: BTreeMap<String, u64>,
    pub queued_total: u64,
    pub running: u64,
    pub projects: Vec<ProjectQueueResponse>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProjectQueueResponse {
    pub project_id: Uuid,
    pub queued: u64,
    pub running: u64,
}

/// Queues a command (execute scope). Answers 202 with the command and its queue position;
/// the same `Idempotency-Key` and body return the first command again.
#[utoipa::path(post, path = "/api/v1/projects/{id}/commands", tag = "commands", params(("id" = Uuid, Path),
    ("Idempotency-Key" = Option<String>, Header)), request_body = SubmitCommandRequest,
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 202, body = CommandResponse), (status = 404, body = Problem), (status = 409, body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem)))]
async fn submit_command(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(project): ApiPath<ProjectId>,
    IdempotencyKey(idempotency_key): IdempotencyKey,
    ApiJson(body): ApiJson<SubmitCommandRequest>,
) -> Result<Response, ApiError> {
    let queued = state
        .commands
        .submit(&caller, project, body.into_submit(idempotency_key)?)
        .await?;
    let replayed = !queued.created;
    let location = format!("/api/v1/commands/{}", queued.command.id);
    let mut response = (
        StatusCode::ACCEPTED,
        Json(CommandResponse::queued(queued, &caller)),
    )
        .into_response();
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(&location) {
        headers.insert(header::LOCATION, location);
    }
    if replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// Commands of the projects this key may see, newest first.
#[utoipa::path(get, path = "/api/v1/commands", tag = "commands", params(CommandQuery),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = CommandPage), (status = 422, body = Problem)))]
async fn list_commands(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<CommandQuery>,
) -> Result<Json<CommandPage>, ApiError> {
    let asked = ListCommands::try_from(query).map_err(ApiError::from_domain)?;
    let page = state.commands.list(&caller, asked).await?;
    Ok(Json(CommandPage {
        items: page
            .items
            .into_iter()
            .map(|c| CommandResponse::new(c, None, &caller))
            .collect(),
        next_cursor: page.next_cursor,
    }))
}

#[utoipa::path(get, path = "/api/v1/commands/{id}", tag = "commands", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = CommandResponse), (status = 404, body = Problem)))]
async fn get_command(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<CommandId>,
) -> Result<Json<CommandResponse>, ApiError> {
    let queued = state.commands.get(&caller, id).await?;
    Ok(Json(CommandResponse::queued(queued, &caller)))
}

/// The stored output as plain text (both streams interleaved as produced, or one of them).
#[utoipa::path(get, path = "/api/v1/commands/{id}/output", tag = "commands", params(("id" = Uuid, Path), OutputQuery),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, content_type = "text/plain"), (status = 404, body = Problem)))]
async fn get_command_output(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<CommandId>,
    ApiQuery(query): ApiQuery<OutputQuery>,
) -> Result<Response, ApiError> {
    let only = query.only().map_err(ApiError::from_domain)?;
    let text = state.commands.output(&caller, id, only).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

/// Cancels a command: a queued one at once, a running one by stopping its process group.
#[utoipa::path(post, path = "/api/v1/commands/{id}/cancel", tag = "commands", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 202, body = CommandResponse), (status = 404, body = Problem), (status = 409, body = Problem)))]
async fn cancel_command(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<CommandId>,
) -> Result<(StatusCode, Json<CommandResponse>), ApiError> {
    let command = state.commands.cancel(&caller, id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(CommandResponse::new(command, None, &caller)),
    ))
}

/// A short-lived token that lets `EventSource` (which cannot send headers) open the event stream.
#[utoipa::path(post, path = "/api/v1/commands/{id}/stream-token", tag = "commands", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = StreamTokenResponse), (status = 404, body = Problem)))]
async fn create_stream_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<CommandId>,
) -> Result<Json<StreamTokenResponse>, ApiError> {
    let (token, expires_at) = state.follow.issue_token(&caller, id).await?;
    Ok(Json(StreamTokenResponse {
        events_url: format!("/api/v1/commands/{id}/events?token={token}"),
        token,
        expires_at,
    }))
}

/// Server-Sent Events: `status`, `output` (with `id: <seq>`), `truncated`, `end`. Reconnect with
/// `Last-Event-ID` (or `?last_event_id=`) to get exactly the missed output.
#[utoipa::path(get, path = "/api/v1/commands/{id}/events", tag = "commands", params(("id" = Uuid, Path), EventsQuery,
    ("Last-Event-ID" = Option<String>, Header)),
    security(("bearer" = []), ("api_key" = []), ()),
    responses((status = 200, content_type = "text/event-stream"), (status = 404, body = Problem), (status = 503, body = Problem)))]
async fn command_events(
    State(state): State<AppState>,
    StreamCaller(caller): StreamCaller,
    ApiPath(id): ApiPath<CommandId>,
    LastEventId(after): LastEventId,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let events = state.follow.follow(&caller, id, after.after_seq()).await?;
    let shutdown = state.shutdown.clone();
    let stream = events
        .enumerate()
        .map(|(index, event)| {
            let event = sse_event(event);
            Ok(if index == 0 {
                event.retry(std::time::Duration::from_millis(SSE_RETRY_MS))
            } else {
                event
            })
        })
        .take_until(async move { shutdown.cancelled().await });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(state.sse_keep_alive)))
}

fn sse_event(event: FollowEvent) -> Event {
    match event {
        FollowEvent::Status { command, position } => Event::default().event("status").data(
            json!({
                "status": command.status.as_str(),
                "position": position,
                "exit_code": command.exit_code,
                "termination_reason": command.termination_reason.map(|r| r.as_str()),
            })
            .to_string(),
        ),
        FollowEvent::Output(chunk) => Event::default()
            .event("output")
            .id(chunk.seq.to_string())
            .data(json!({"stream": chunk.stream.as_str(), "data": chunk.data}).to_string()),
        FollowEvent::Truncated => Event::default().event("truncated").data(
            json!({"message": "output reached the stored-output cap; the rest is counted and dropped"})
                .to_string(),
        ),
        FollowEvent::End { command } => Event::default().event("end").data(
            json!({
                "status": command.status.as_str(),
                "exit_code": command.exit_code,
                "termination_reason": command.termination_reason.map(|r| r.as_str()),
                "error": command.error,
                "stdout_bytes": command.stdout_bytes,
                "stderr_bytes": command.stderr_bytes,
                "dropped_bytes": command.dropped_bytes,
                "truncated": command.truncated,
            })
            .to_string(),
        ),
    }
}

/// Queue depth by priority, running commands, and per-project load (of the projects this key sees).
#[utoipa::path(get, path = "/api/v1/queue", tag = "commands", security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = QueueResponse)))]
async fn get_queue(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<QueueResponse>, ApiError> {
    let summary = state.commands.queue(&caller).await?;
    Ok(Json(QueueResponse {
        queued_total: summary.queued_by_priority.iter().map(|(_, n)| n).sum(),
        queued: summary
            .queued_by_priority
            .into_iter()
            .map(|(p, n)| (p.as_str().to_owned(), n))
            .collect(),
        running: summary.running,
        projects: summary
            .per_project
            .into_iter()
            .map(|load| ProjectQueueResponse {
                project_id: load.project_id.as_uuid(),
                queued: load.queued,
                running: load.running,
            })
            .collect(),
    }))
}
