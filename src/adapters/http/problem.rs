//! RFC 9457 problem details: the one shape every error leaves this server in.

use axum::Json;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::FieldError;
use crate::domain::api_key::KeyRejection;
use crate::ports::PodError;
use crate::services::ServiceError;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// A problem details object.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// Stable identifier of the kind of problem, e.g. `urn:rdev:problem:validation`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Each invalid field, for validation problems.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldErrorBody>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FieldErrorBody {
    /// RFC 6901 pointer into the request body (or the parameter name).
    pub pointer: String,
    pub message: String,
}

/// The cause chain of a 5xx, kept on the response for the logging middleware.
#[derive(Debug, Clone)]
pub struct ErrorChain(pub String);

/// Every way a request can fail at the HTTP edge.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("malformed request body: {0}")]
    MalformedBody(String),
    #[error("the request body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("the request body is too large")]
    PayloadTooLarge,
    #[error("invalid {what}: {detail}")]
    BadParameter { what: &'static str, detail: String },
    #[error("no such route")]
    RouteNotFound,
    #[error("not ready: {0}")]
    NotReady(&'static str),
    #[error(
        "too many failed authentications from this address; retry in {} s",
        crate::domain::rate_limit::ceil_secs(*.0)
    )]
    TooManyFailedAuthentications(std::time::Duration),
}

impl ApiError {
    pub fn invalid(fields: Vec<FieldError>) -> Self {
        ApiError::Service(ServiceError::Invalid(fields))
    }
}

struct Shape {
    status: StatusCode,
    slug: &'static str,
    title: &'static str,
}

const fn shape(status: StatusCode, slug: &'static str, title: &'static str) -> Shape {
    Shape {
        status,
        slug,
        title,
    }
}

fn service_shape(error: &ServiceError) -> Shape {
    match error {
        ServiceError::Invalid(_) => shape(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            "Invalid input",
        ),
        ServiceError::Unauthenticated(KeyRejection::AddressNotAllowed) => shape(
            StatusCode::FORBIDDEN,
            "address-not-allowed",
            "Client address not allowed",
        ),
        ServiceError::Unauthenticated(
            KeyRejection::Missing
            | KeyRejection::Invalid
            | KeyRejection::Expired
            | KeyRejection::Revoked,
        ) => shape(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "Authentication required",
        ),
        ServiceError::MissingScope(_) | ServiceError::LimitedKey => {
            shape(StatusCode::FORBIDDEN, "forbidden", "Insufficient scope")
        }
        ServiceError::NotFound(_) => shape(StatusCode::NOT_FOUND, "not-found", "Not found"),
        ServiceError::Conflict(_) => shape(StatusCode::CONFLICT, "conflict", "Conflict"),
        ServiceError::QueueFull { .. } => {
            shape(StatusCode::SERVICE_UNAVAILABLE, "queue-full", "Queue full")
        }
        ServiceError::RateLimited(_) => shape(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Rate limit reached",
        ),
        ServiceError::TooManyStreams => shape(
            StatusCode::SERVICE_UNAVAILABLE,
            "too-many-streams",
            "Too many event streams",
        ),
        ServiceError::KubeNotConfigured => shape(
            StatusCode::CONFLICT,
            "kube-not-configured",
            "Kubernetes not configured",
        ),
        ServiceError::Pod(error) => pod_shape(error),
        ServiceError::Unavailable(_) => shape(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
        ),
        ServiceError::Internal(_) => shape(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
        ),
    }
}

fn pod_shape(error: &PodError) -> Shape {
    match error {
        PodError::PodNotFound { .. } | PodError::NoPodMatches { .. } => {
            shape(StatusCode::NOT_FOUND, "pod-not-found", "Pod not found")
        }
        PodError::NotReady { .. }
        | PodError::NoReadyPod { .. }
        | PodError::RestartTimedOut { .. } => {
            shape(StatusCode::CONFLICT, "pod-not-ready", "Pod not ready")
        }
        PodError::ContainerNotFound { .. } => shape(
            StatusCode::NOT_FOUND,
            "container-not-found",
            "Container not found",
        ),
        PodError::Forbidden(_) => shape(
            StatusCode::FORBIDDEN,
            "kube-forbidden",
            "Kubernetes API refused access",
        ),
        PodError::Unavailable(_) => shape(
            StatusCode::SERVICE_UNAVAILABLE,
            "kube-unavailable",
            "Kubernetes API unavailable",
        ),
        PodError::Backend(_) => shape(
            StatusCode::BAD_GATEWAY,
            "kube-error",
            "Kubernetes API error",
        ),
    }
}

fn error_shape(error: &ApiError) -> Shape {
    match error {
        ApiError::Service(service) => service_shape(service),
        ApiError::MalformedBody(_) => shape(
            StatusCode::BAD_REQUEST,
            "malformed-body",
            "Malformed request body",
        ),
        ApiError::UnsupportedMediaType => shape(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
        ),
        ApiError::PayloadTooLarge => shape(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "Payload too large",
        ),
        ApiError::BadParameter { .. } => shape(
            StatusCode::BAD_REQUEST,
            "bad-parameter",
            "Invalid parameter",
        ),
        ApiError::RouteNotFound => shape(StatusCode::NOT_FOUND, "not-found", "Not found"),
        ApiError::NotReady(_) => shape(StatusCode::SERVICE_UNAVAILABLE, "not-ready", "Not ready"),
        ApiError::TooManyFailedAuthentications(_) => shape(
            StatusCode::TOO_MANY_REQUESTS,
            "too-many-failed-authentications",
            "Too many failed authentications",
        ),
    }
}

fn problem_type(slug: &str) -> String {
    format!("urn:rdev:problem:{slug}")
}

fn cause_chain(error: &dyn std::error::Error) -> String {
    let mut chain = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        chain.push_str(": ");
        chain.push_str(&cause.to_string());
        source = cause.source();
    }
    chain
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let Shape {
            status,
            slug,
            title,
        } = error_shape(&self);
        let server_side = status.is_server_error()
            && !matches!(
                self,
                ApiError::Service(
                    ServiceError::QueueFull { .. }
                        | ServiceError::TooManyStreams
                        // Our own words (the breaker is open, the API is unreachable): they tell
                        // the caller what to expect.
                        | ServiceError::Pod(PodError::Unavailable(_))
                ) | ApiError::NotReady(_)
            );
        // A 5xx never carries driver text; the cause goes to the log instead.
        let detail = if server_side {
            Some("the server could not complete the request; it has been logged".to_owned())
        } else {
            Some(self.to_string())
        };
        let errors = match &self {
            ApiError::Service(ServiceError::Invalid(fields)) => Some(
                fields
                    .iter()
                    .map(|f| FieldErrorBody {
                        pointer: f.pointer.clone(),
                        message: f.message.clone(),
                    })
                    .collect(),
            ),
            _ => None,
        };
        let body = Problem {
            kind: problem_type(slug),
            title: title.to_owned(),
            status: status.as_u16(),
            detail,
            errors,
        };
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        match &self {
            ApiError::Service(ServiceError::QueueFull {
                retry_after_secs, ..
            }) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            ApiError::Service(ServiceError::RateLimited(decision)) => {
                super::limits::write_headers(decision, headers);
            }
            ApiError::TooManyFailedAuthentications(wait) => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(crate::domain::rate_limit::ceil_secs(*wait).max(1)),
                );
            }
            ApiError::Service(
                ServiceError::TooManyStreams
                | ServiceError::Unavailable(_)
                | ServiceError::Pod(PodError::Unavailable(_)),
            ) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            ApiError::Service(ServiceError::Unauthenticated(_))
                if status == StatusCode::UNAUTHORIZED =>
            {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        if server_side {
            response
                .extensions_mut()
                .insert(ErrorChain(cause_chain(&self)));
        }
        response
    }
}

/// A problem response for a bare status (used where a layer answered without a body).
pub fn status_problem(status: StatusCode) -> Response {
    let title = status.canonical_reason().unwrap_or("Error");
    let slug = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload-too-large",
        StatusCode::NOT_FOUND => "not-found",
        StatusCode::REQUEST_TIMEOUT => "timeout",
        s if s.is_server_error() => "internal",
        _ => "http-error",
    };
    let body = Problem {
        kind: problem_type(slug),
        title: title.to_owned(),
        status: status.as_u16(),
        detail: None,
        errors: None,
    };
    let mut response = (status, Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    response
}

/// The whole HTTP/1.1 response to a request head over `limit` bytes: a 431 problem, closing the
/// connection. The connection layer writes it itself, since the head never reaches a handler.
pub fn head_too_large_http1(limit: usize) -> bytes::Bytes {
    let status = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
    let body = serde_json::to_vec(&Problem {
        kind: problem_type("header-too-large"),
        title: status.canonical_reason().unwrap_or("Error").to_owned(),
        status: status.as_u16(),
        detail: Some(format!("the request line and headers exceed {limit} bytes")),
        errors: None,
    })
    .expect("a problem serializes");
    let mut response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {PROBLEM_JSON}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(&body);
    response.into()
}

/// Gives bodiless error responses from the framework and layers (405, 413, ...) a problem body,
/// and logs server errors with their cause chain (the edge layer calls it on every response).
pub fn normalize(method: &Method, path: &str, response: Response) -> Response {
    let status = response.status();
    if let Some(ErrorChain(chain)) = response.extensions().get::<ErrorChain>() {
        tracing::error!(%method, path, status = status.as_u16(), error = %chain, "request failed");
    }
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(PROBLEM_JSON.as_bytes()));
    if is_problem {
        return response;
    }
    let (parts, _) = response.into_parts();
    let mut problem = status_problem(status);
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            problem.headers_mut().insert(name.clone(), value.clone());
        }
    }
    problem
}

impl ApiError {
    pub fn from_domain(error: crate::domain::DomainError) -> Self {
        ApiError::Service(error.into())
    }
}
