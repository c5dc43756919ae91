//! The capabilities the services need, as small async traits spoken in domain types. Adapters
//! implement them; services hold them as `Arc<dyn Port>`.

pub mod api_keys;
pub mod audit;
pub mod clock;
pub mod commands;
pub mod error;
pub mod executor;
pub mod metrics;
pub mod output;
pub mod pods;
pub mod projects;
pub mod rate_limit;
pub mod secrets;
pub mod webhooks;

pub use api_keys::ApiKeyRepository;
pub use audit::{AuditFilter, AuditHeads, AuditLog};
pub use clock::Clock;
pub use commands::{
    Claim, CommandFilter, CommandQueue, CommandStore, Finished, IdempotencyKey, ProjectLoad,
    QueueSummary, RenewedLeases, Submission, SubmitOutcome,
};
pub use error::PortError;
pub use executor::{ExecRequest, Execution, Executor};
pub use metrics::{
    CacheMetrics, CircuitMetrics, CircuitState, CommandMetrics, ConnectionMetrics, CpuProfiler,
    HeapProfiler, HttpRouteMetrics, OperatorMetrics, WebhookMetrics,
};
pub use output::{
    BusEvent, ChangeListener, ChangeNotices, Changed, OutputBus, OutputProgress, OutputStore,
    Received, Relay, RemoteHint, RemoteInbox, Subscription, WorkSignal,
};
pub use pods::{PodError, PodManager, PodStatus};
pub use projects::ProjectRepository;
pub use rate_limit::RateLimiter;
pub use secrets::SharedSecrets;
pub use webhooks::{
    AttemptReport, ClaimRequest, DeliveryFilter, DeliveryQueue, DueDelivery, LeaseToken, NextStep,
    OutgoingWebhook, SendError, WebhookEndpoints, WebhookSender,
};

/// A page of results and the cursor of the next one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}
