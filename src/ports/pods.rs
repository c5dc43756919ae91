//! The pod behind a Kubernetes project: what state it is in, and restarting it.

use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::domain::project::KubeTarget;

type Cause = Box<dyn std::error::Error + Send + Sync>;

/// A pod as operators want to see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodStatus {
    pub namespace: String,
    pub name: String,
    /// `Pending`, `Running`, `Succeeded`, `Failed` or `Unknown`.
    pub phase: String,
    pub ready: bool,
    /// Container restarts, summed over the pod's containers.
    pub restarts: u32,
    pub node: Option<String>,
    pub started_at: Option<OffsetDateTime>,
    /// The container commands run in (the pod's first when the project names none).
    pub container: String,
}

/// Why a pod could not be found, used or reached.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("pod {namespace}/{name} not found")]
    PodNotFound { namespace: String, name: String },
    #[error("no pod in namespace {namespace} matches the selector `{selector}`")]
    NoPodMatches { namespace: String, selector: String },
    #[error("pod {namespace}/{name} is not ready (phase {phase}, ready {ready})")]
    NotReady {
        namespace: String,
        name: String,
        phase: String,
        ready: bool,
    },
    #[error(
        "{matching} pod(s) in namespace {namespace} match `{selector}`, none is Running and Ready"
    )]
    NoReadyPod {
        namespace: String,
        selector: String,
        matching: usize,
    },
    #[error("container {container} not found in pod {namespace}/{name} (it has: {available})")]
    ContainerNotFound {
        namespace: String,
        name: String,
        container: String,
        available: String,
    },
    #[error("no Ready pod replaced {namespace}/{name} within {} s", waited.as_secs())]
    RestartTimedOut {
        namespace: String,
        name: String,
        waited: Duration,
    },
    /// RBAC refused this server's service account.
    #[error("the Kubernetes API refused access: {0}")]
    Forbidden(String),
    /// The API could not be reached, answered 5xx, or the circuit breaker is open.
    #[error("the Kubernetes API is unavailable: {0}")]
    Unavailable(#[source] Cause),
    #[error("the Kubernetes API call failed")]
    Backend(#[source] Cause),
}

#[async_trait]
pub trait PodManager: Send + Sync {
    /// The pod a target points at: the named pod, or for a selector the newest Ready match
    /// (the newest match when none is Ready).
    async fn status(&self, target: &KubeTarget) -> Result<PodStatus, PodError>;
    /// Deletes the pod so that its controller recreates it, and waits up to `wait` for a Ready
    /// replacement, which it returns.
    async fn restart(&self, target: &KubeTarget, wait: Duration) -> Result<PodStatus, PodError>;
}
