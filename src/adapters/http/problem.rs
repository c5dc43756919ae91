//! RFC 9457 problem details: the one shape every error leaves this server in.

use axum::Json;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::FieldError;
use crate::domain::api_key::KeyRejection;
use crate::domain::error::one_line;
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

/// Declares the problem kinds: each with its status, `type` slug and title, from one table,
/// so that the list the OpenAPI document gives ([`ProblemKind::ALL`]) cannot drift from them.
macro_rules! problem_kinds {
    ($($kind:ident => ($status:ident, $slug:literal, $title:literal),)*) => {
        /// What went wrong, as a client tells problems apart (`urn:rdev:problem:<slug>`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum ProblemKind {
            $($kind,)*
        }

        impl ProblemKind {
            pub const ALL: &'static [ProblemKind] = &[$(ProblemKind::$kind,)*];

            pub fn status(self) -> StatusCode {
                match self {
                    $(ProblemKind::$kind => StatusCode::$status,)*
                }
            }

            pub fn slug(self) -> &'static str {
                match self {
                    $(ProblemKind::$kind => $slug,)*
                }
            }

            pub fn title(self) -> &'static str {
                match self {
                    $(ProblemKind::$kind => $title,)*
                }
            }

            /// The `type` member: `urn:rdev:problem:<slug>`.
            pub fn uri(self) -> String {
                problem_type(self.slug())
            }
        }
    };
}

// The conflicts share their title (what a client that does not know the type shows); the type
// tells them apart.
problem_kinds! {
    Validation => (UNPROCESSABLE_ENTITY, "validation", "Invalid input"),
    MalformedBody => (BAD_REQUEST, "malformed-body", "Malformed request body"),
    BadParameter => (BAD_REQUEST, "bad-parameter", "Invalid parameter"),
    UnsupportedMediaType => (UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type", "Unsupported media type"),
    PayloadTooLarge => (PAYLOAD_TOO_LARGE, "payload-too-large", "Payload too large"),
    HeaderTooLarge => (REQUEST_HEADER_FIELDS_TOO_LARGE, "header-too-large", "Request Header Fields Too Large"),
    Unauthenticated => (UNAUTHORIZED, "unauthenticated", "Authentication required"),
    AddressNotAllowed => (FORBIDDEN, "address-not-allowed", "Client address not allowed"),
    Forbidden => (FORBIDDEN, "forbidden", "Insufficient scope"),
    NotFound => (NOT_FOUND, "not-found", "Not found"),
    MethodNotAllowed => (METHOD_NOT_ALLOWED, "method-not-allowed", "Method Not Allowed"),
    AlreadyExists => (CONFLICT, "already-exists", "Conflict"),
    MissingReference => (CONFLICT, "missing-reference", "Conflict"),
    ProjectBusy => (CONFLICT, "project-busy", "Conflict"),
    AlreadyEnded => (CONFLICT, "already-ended", "Conflict"),
    IdempotencyMismatch => (CONFLICT, "idempotency-mismatch", "Conflict"),
    InvalidTransition => (CONFLICT, "invalid-transition", "Conflict"),
    KeyRevoked => (CONFLICT, "key-revoked", "Conflict"),
    NoKubeTarget => (CONFLICT, "no-kube-target", "Conflict"),
    KubeNotConfigured => (CONFLICT, "kube-not-configured", "Kubernetes not configured"),
    PodNotFound => (NOT_FOUND, "pod-not-found", "Pod not found"),
    ContainerNotFound => (NOT_FOUND, "container-not-found", "Container not found"),
    PodNotReady => (CONFLICT, "pod-not-ready", "Pod not ready"),
    KubeForbidden => (FORBIDDEN, "kube-forbidden", "Kubernetes API refused access"),
    KubeUnavailable => (SERVICE_UNAVAILABLE, "kube-unavailable", "Kubernetes API unavailable"),
    KubeError => (BAD_GATEWAY, "kube-error", "Kubernetes API error"),
    RateLimited => (TOO_MANY_REQUESTS, "rate-limited", "Rate limit reached"),
    TooManyFailedAuthentications => (TOO_MANY_REQUESTS, "too-many-failed-authentications", "Too many failed authentications"),
    QueueFull => (SERVICE_UNAVAILABLE, "queue-full", "Queue full"),
    TooManyStreams => (SERVICE_UNAVAILABLE, "too-many-streams", "Too many event streams"),
    NotReady => (SERVICE_UNAVAILABLE, "not-ready", "Not ready"),
    Unavailable => (SERVICE_UNAVAILABLE, "unavailable", "Service unavailable"),
    Timeout => (REQUEST_TIMEOUT, "timeout", "Request Timeout"),
    Internal => (INTERNAL_SERVER_ERROR, "internal", "Internal error"),
}

/// What the client reads in `detail`.
enum Detail {
    /// The error's own words.
    Shown,
    /// A fixed sentence; the cause chain goes to the log (a 5xx never carries driver text).
    Logged,
}

/// Everything an error's response says, decided in [`ApiError::spec`].
struct ProblemSpec<'e> {
    kind: ProblemKind,
    detail: Detail,
    /// The invalid fields, for validation problems.
    fields: &'e [FieldError],
    /// `Retry-After`, `WWW-Authenticate`, the rate-limit headers.
    headers: HeaderMap,
}

impl<'e> ProblemSpec<'e> {
    fn new(kind: ProblemKind) -> Self {
        Self {
            kind,
            detail: Detail::Shown,
            fields: &[],
            headers: HeaderMap::new(),
        }
    }

    fn logged(mut self) -> Self {
        self.detail = Detail::Logged;
        self
    }

    fn header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Try again in a few seconds (a saturated or unreachable backend).
    fn retry_soon(self) -> Self {
        self.header(header::RETRY_AFTER, HeaderValue::from_static("5"))
    }
}

impl ApiError {
    /// The one place an error's response is decided: its kind, what its detail shows, its
    /// fields and headers. Exhaustive, so a new variant does not compile until it is placed.
    fn spec(&self) -> ProblemSpec<'_> {
        use ProblemKind as K;
        match self {
            ApiError::Service(error) => match error {
                ServiceError::Invalid(fields) => ProblemSpec {
                    fields,
                    ..ProblemSpec::new(K::Validation)
                },
                ServiceError::Unauthenticated(KeyRejection::AddressNotAllowed) => {
                    ProblemSpec::new(K::AddressNotAllowed)
                }
                ServiceError::Unauthenticated(
                    KeyRejection::Missing
                    | KeyRejection::Invalid
                    | KeyRejection::Expired
                    | KeyRejection::Revoked,
                ) => ProblemSpec::new(K::Unauthenticated)
                    .header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")),
                ServiceError::MissingScope(_) | ServiceError::LimitedKey => {
                    ProblemSpec::new(K::Forbidden)
                }
                ServiceError::NotFound(_) => ProblemSpec::new(K::NotFound),
                ServiceError::AlreadyExists(_) => ProblemSpec::new(K::AlreadyExists),
                ServiceError::MissingReference => ProblemSpec::new(K::MissingReference),
                ServiceError::ProjectBusy { .. } => ProblemSpec::new(K::ProjectBusy),
                ServiceError::AlreadyEnded(_) => ProblemSpec::new(K::AlreadyEnded),
                ServiceError::IdempotencyMismatch => ProblemSpec::new(K::IdempotencyMismatch),
                ServiceError::InvalidTransition { .. } => ProblemSpec::new(K::InvalidTransition),
                ServiceError::NoKubeTarget => ProblemSpec::new(K::NoKubeTarget),
                ServiceError::KeyRevoked => ProblemSpec::new(K::KeyRevoked),
                ServiceError::QueueFull {
                    retry_after_secs, ..
                } => ProblemSpec::new(K::QueueFull)
                    .header(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs)),
                ServiceError::RateLimited(decision) => {
                    let mut spec = ProblemSpec::new(K::RateLimited);
                    super::limits::write_headers(decision, &mut spec.headers);
                    spec
                }
                ServiceError::TooManyStreams => ProblemSpec::new(K::TooManyStreams).retry_soon(),
                ServiceError::KubeNotConfigured => ProblemSpec::new(K::KubeNotConfigured),
                ServiceError::Pod(error) => pod_spec(error),
                ServiceError::Unavailable(_) => {
                    ProblemSpec::new(K::Unavailable).logged().retry_soon()
                }
                ServiceError::Internal(_) => ProblemSpec::new(K::Internal).logged(),
            },
            ApiError::MalformedBody(_) => ProblemSpec::new(K::MalformedBody),
            ApiError::UnsupportedMediaType => ProblemSpec::new(K::UnsupportedMediaType),
            ApiError::PayloadTooLarge => ProblemSpec::new(K::PayloadTooLarge),
            ApiError::BadParameter { .. } => ProblemSpec::new(K::BadParameter),
            ApiError::RouteNotFound => ProblemSpec::new(K::NotFound),
            ApiError::NotReady(_) => ProblemSpec::new(K::NotReady),
            ApiError::TooManyFailedAuthentications(wait) => {
                ProblemSpec::new(K::TooManyFailedAuthentications).header(
                    header::RETRY_AFTER,
                    HeaderValue::from(crate::domain::rate_limit::ceil_secs(*wait).max(1)),
                )
            }
        }
    }
}

fn pod_spec(error: &PodError) -> ProblemSpec<'static> {
    use ProblemKind as K;
    match error {
        PodError::PodNotFound { .. } | PodError::NoPodMatches { .. } => {
            ProblemSpec::new(K::PodNotFound)
        }
        PodError::NotReady { .. }
        | PodError::NoReadyPod { .. }
        | PodError::RestartTimedOut { .. } => ProblemSpec::new(K::PodNotReady),
        PodError::ContainerNotFound { .. } => ProblemSpec::new(K::ContainerNotFound),
        PodError::Forbidden(_) => ProblemSpec::new(K::KubeForbidden),
        // Our own words (the breaker is open, the API is unreachable): they tell the caller
        // what to expect.
        PodError::Unavailable(_) => ProblemSpec::new(K::KubeUnavailable).retry_soon(),
        PodError::Backend(_) => ProblemSpec::new(K::KubeError).logged(),
    }
}

fn problem_type(slug: &str) -> String {
    format!("urn:rdev:problem:{slug}")
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let ProblemSpec {
            kind,
            detail,
            fields,
            headers,
        } = self.spec();
        let (detail, chain) = match detail {
            Detail::Shown => (self.to_string(), None),
            Detail::Logged => (
                "the server could not complete the request; it has been logged".to_owned(),
                Some(ErrorChain(one_line(&self))),
            ),
        };
        let errors = (!fields.is_empty()).then(|| {
            fields
                .iter()
                .map(|f| FieldErrorBody {
                    pointer: f.pointer.clone(),
                    message: f.message.clone(),
                })
                .collect()
        });
        let body = Problem {
            kind: kind.uri(),
            title: kind.title().to_owned(),
            status: kind.status().as_u16(),
            detail: Some(detail),
            errors,
        };
        let mut response = (kind.status(), Json(body)).into_response();
        response.headers_mut().extend(headers);
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(chain) = chain {
            response.extensions_mut().insert(chain);
        }
        response
    }
}

/// A problem response for a bare status (used where a layer answered without a body): the
/// kind of that status where there is one, else a generic `http-error` with the status's name.
pub fn status_problem(status: StatusCode) -> Response {
    let kind = match status {
        StatusCode::METHOD_NOT_ALLOWED => Some(ProblemKind::MethodNotAllowed),
        StatusCode::PAYLOAD_TOO_LARGE => Some(ProblemKind::PayloadTooLarge),
        StatusCode::NOT_FOUND => Some(ProblemKind::NotFound),
        StatusCode::REQUEST_TIMEOUT => Some(ProblemKind::Timeout),
        s if s.is_server_error() => Some(ProblemKind::Internal),
        _ => None,
    };
    let body = Problem {
        kind: kind.map_or_else(|| problem_type("http-error"), ProblemKind::uri),
        title: status.canonical_reason().unwrap_or("Error").to_owned(),
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
    let kind = ProblemKind::HeaderTooLarge;
    let body = serde_json::to_vec(&Problem {
        kind: kind.uri(),
        title: kind.title().to_owned(),
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
