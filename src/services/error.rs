//! What a use case reports. The HTTP adapter maps each variant to one problem type.

use crate::domain::api_key::{KeyRejection, Scope};
use crate::domain::command::CommandStatus;
use crate::domain::rate_limit::{RateDecision, ceil_secs};
use crate::domain::{DomainError, FieldError};
use crate::ports::{PodError, PortError};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("invalid input")]
    Invalid(Vec<FieldError>),
    #[error("{0}")]
    Unauthenticated(KeyRejection),
    #[error("this API key lacks the `{0}` scope")]
    MissingScope(Scope),
    #[error(
        "a key limited to some projects cannot manage API keys, create projects or read the audit log"
    )]
    LimitedKey,
    #[error("{0} not found")]
    NotFound(&'static str),
    /// A uniqueness rule refused the change; says what is taken.
    #[error("{0} already exists")]
    AlreadyExists(&'static str),
    /// The change names a row that does not exist.
    #[error("a referenced resource does not exist")]
    MissingReference,
    #[error("the project has {active} queued or running commands; cancel them first")]
    ProjectBusy { active: i64 },
    #[error("the command already ended ({0})")]
    AlreadyEnded(CommandStatus),
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyMismatch,
    /// A lifecycle step the current state does not allow.
    #[error("cannot go from {from} to {to}")]
    InvalidTransition {
        from: &'static str,
        to: &'static str,
    },
    #[error("this project has no Kubernetes target")]
    NoKubeTarget,
    #[error("a revoked key cannot be rotated")]
    KeyRevoked,
    #[error("the queue is full ({queued} commands waiting; {limit})")]
    QueueFull {
        queued: u64,
        retry_after_secs: u64,
        /// The setting that was reached.
        limit: &'static str,
    },
    #[error(
        "rate limit of this API key reached ({}); retry in {} s",
        .0.rate,
        ceil_secs(.0.retry_after)
    )]
    RateLimited(RateDecision),
    #[error("too many open event streams")]
    TooManyStreams,
    #[error(
        "no Kubernetes API is configured on this server (in-cluster service account or KUBECONFIG)"
    )]
    KubeNotConfigured,
    #[error(transparent)]
    Pod(PodError),
    #[error("a backend is unavailable")]
    Unavailable(#[source] PortError),
    #[error("internal error")]
    Internal(#[source] PortError),
}

impl From<DomainError> for ServiceError {
    fn from(error: DomainError) -> Self {
        match error {
            DomainError::Invalid(fields) => ServiceError::Invalid(fields),
            DomainError::InvalidTransition { from, to } => {
                ServiceError::InvalidTransition { from, to }
            }
        }
    }
}

impl ServiceError {
    /// Translates a port failure, naming the resource in a `NotFound`.
    pub fn from_port(error: PortError, what: &'static str) -> Self {
        match error {
            PortError::NotFound => ServiceError::NotFound(what),
            PortError::AlreadyExists(taken) => ServiceError::AlreadyExists(taken),
            PortError::MissingReference => ServiceError::MissingReference,
            PortError::ProjectBusy { active } => ServiceError::ProjectBusy { active },
            PortError::AlreadyEnded(status) => ServiceError::AlreadyEnded(status),
            PortError::IdempotencyMismatch => ServiceError::IdempotencyMismatch,
            PortError::Unavailable(_) => ServiceError::Unavailable(error),
            // Internal to the queue and executors: a request never meets these.
            PortError::LeaseLost | PortError::Refused(_) | PortError::Backend(_) => {
                ServiceError::Internal(error)
            }
        }
    }
}

/// `?` on a port call inside a service: unknown rows become a generic `NotFound`.
impl From<PortError> for ServiceError {
    fn from(error: PortError) -> Self {
        ServiceError::from_port(error, "resource")
    }
}
