//! A small client of the rdev-api HTTP API (reqwest, rustls on ring): JSON requests, problem
//! details turned into one readable error, and a command's event stream resumed after a drop.

use std::time::Duration;

use eventsource_stream::{Event, Eventsource};
use futures::{Stream, StreamExt};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::config::ServerConfig;

/// How long a plain request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach {url}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error (problem details, or at least a status).
    #[error("{}", problem_line(*status, title, detail.as_deref(), fields))]
    Server {
        status: StatusCode,
        title: String,
        detail: Option<String>,
        fields: Vec<String>,
    },
    #[error("unexpected answer from {url}")]
    Unexpected {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot build the HTTP client")]
    Setup(#[source] reqwest::Error),
    #[error("no API key: set RDEV_API_KEY (or pass --api-key)")]
    MissingKey,
}

impl ClientError {
    /// Whether trying again later may help (the network, a restarting or busy server).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } | ClientError::Unexpected { .. } => true,
            ClientError::Server { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            ClientError::Setup(_) | ClientError::MissingKey => false,
        }
    }

    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Server { status, .. } => Some(*status),
            _ => None,
        }
    }
}

fn problem_line(
    status: StatusCode,
    title: &str,
    detail: Option<&str>,
    fields: &[String],
) -> String {
    let mut line = format!("{} {title}", status.as_u16());
    if let Some(detail) = detail {
        line.push_str(": ");
        line.push_str(detail);
    }
    if !fields.is_empty() {
        line.push_str(" (");
        line.push_str(&fields.join("; "));
        line.push(')');
    }
    line
}

#[derive(Deserialize)]
struct ProblemBody {
    title: Option<String>,
    detail: Option<String>,
    #[serde(default)]
    errors: Vec<FieldProblem>,
}

#[derive(Deserialize)]
struct FieldProblem {
    pointer: String,
    message: String,
}

/// A command as the API shows it (the fields the CLI uses).
#[derive(Debug, Clone, Deserialize)]
pub struct CommandView {
    pub id: Uuid,
    pub project_id: Uuid,
    pub command: String,
    pub priority: String,
    pub status: String,
    pub position: Option<u64>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub exit_code: Option<i32>,
    pub termination_reason: Option<String>,
    pub error: Option<String>,
    pub stdout_bytes: i64,
    pub stderr_bytes: i64,
    pub last_seq: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ProjectView {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub executor: String,
    pub workdir: String,
    pub max_concurrency: u32,
}

#[derive(Debug, Deserialize)]
pub struct Page<T> {
    pub items: Vec<T>,
}

pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl ApiClient {
    pub fn new(server: &ServerConfig) -> Result<Self, ClientError> {
        let key = server
            .api_key
            .as_ref()
            .ok_or(ClientError::MissingKey)?
            .expose()
            .to_owned();
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("rdev-api-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ClientError::Setup)?;
        Ok(Self {
            http,
            base: server.url.clone(),
            key,
        })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}/api/v1{path}", self.base))
            .bearer_auth(&self.key)
    }

    /// Sends a request; any answer but 2xx becomes [`ClientError::Server`].
    async fn send(&self, request: RequestBuilder) -> Result<Response, ClientError> {
        let response = request
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: self.base.clone(),
                source,
            })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let problem: Option<ProblemBody> = response.json().await.ok();
        Err(match problem {
            Some(problem) => ClientError::Server {
                status,
                title: problem
                    .title
                    .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").into()),
                detail: problem.detail,
                fields: problem
                    .errors
                    .into_iter()
                    .map(|e| format!("{}: {}", e.pointer, e.message))
                    .collect(),
            },
            None => ClientError::Server {
                status,
                title: status.canonical_reason().unwrap_or("error").into(),
                detail: None,
                fields: vec![],
            },
        })
    }

    async fn json<T: DeserializeOwned>(&self, request: RequestBuilder) -> Result<T, ClientError> {
        let response = self.send(request.timeout(REQUEST_TIMEOUT)).await?;
        let url = response.url().to_string();
        response
            .json()
            .await
            .map_err(|source| ClientError::Unexpected { url, source })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.json(self.request(Method::GET, path)).await
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T, ClientError> {
        self.json(self.request(Method::POST, path).json(body)).await
    }

    pub async fn projects(&self) -> Result<Vec<ProjectView>, ClientError> {
        Ok(self.get::<Page<ProjectView>>("/projects").await?.items)
    }

    /// A project by id, or by name among the projects this key can see.
    pub async fn resolve_project(&self, name_or_id: &str) -> Result<ProjectView, ClientError> {
        if let Ok(id) = name_or_id.parse::<Uuid>() {
            return self.get(&format!("/projects/{id}")).await;
        }
        self.projects()
            .await?
            .into_iter()
            .find(|p| p.name == name_or_id)
            .ok_or_else(|| ClientError::Server {
                status: StatusCode::NOT_FOUND,
                title: "Not found".into(),
                detail: Some(format!(
                    "no project named `{name_or_id}` is visible to this key"
                )),
                fields: vec![],
            })
    }

    pub async fn command(&self, id: Uuid) -> Result<CommandView, ClientError> {
        self.get(&format!("/commands/{id}")).await
    }

    pub async fn cancel(&self, id: Uuid) -> Result<CommandView, ClientError> {
        self.post(&format!("/commands/{id}/cancel"), &serde_json::json!({}))
            .await
    }

    /// The command's event stream, resuming after output sequence number `after`.
    pub async fn events(
        &self,
        id: Uuid,
        after: i64,
    ) -> Result<impl Stream<Item = Result<Event, String>> + Unpin + use<>, ClientError> {
        let mut request = self
            .request(Method::GET, &format!("/commands/{id}/events"))
            .header("accept", "text/event-stream");
        if after > 0 {
            request = request.header("last-event-id", after.to_string());
        }
        let response = self.send(request).await?;
        Ok(Box::pin(
            response
                .bytes_stream()
                .eventsource()
                .map(|event| event.map_err(|e| e.to_string())),
        ))
    }
}
