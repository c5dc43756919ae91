//! Webhook endpoints, the outbox of deliveries the command stores fill, and the sender that
//! takes a delivery to its receiver.

use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;

use super::{Page, PortError};
use crate::domain::audit::NewAuditEvent;
use crate::domain::webhook::{
    Attempt, Delivery, DeliveryId, Webhook, WebhookId, WebhookSecret, WebhookUrl,
};

/// Storage of endpoints; every change is written with its audit event in one transaction.
#[async_trait]
pub trait WebhookEndpoints: Send + Sync {
    async fn insert(&self, webhook: &Webhook, audit: NewAuditEvent) -> Result<(), PortError>;
    /// Replaces the mutable fields (URL, filter, project, description, secret, enabled).
    async fn save(&self, webhook: &Webhook, audit: NewAuditEvent) -> Result<(), PortError>;
    /// Deletes the endpoint and its deliveries.
    async fn delete(&self, id: WebhookId, audit: NewAuditEvent) -> Result<(), PortError>;
    async fn get(&self, id: WebhookId) -> Result<Webhook, PortError>;
    async fn list(&self) -> Result<Vec<Webhook>, PortError>;
}

/// Names one claim of a delivery. A report carries it back, and applies only while it is the
/// delivery's latest claim: once a lease ran out and another dispatcher claimed the delivery,
/// the first one's reports change nothing, so no two dispatchers ever own one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseToken(uuid::Uuid);

impl LeaseToken {
    pub fn new() -> Self {
        Self(uuid::Uuid::new_v4())
    }

    pub fn from_uuid(uuid: uuid::Uuid) -> Self {
        Self(uuid)
    }

    pub fn as_uuid(self) -> uuid::Uuid {
        self.0
    }
}

impl Default for LeaseToken {
    fn default() -> Self {
        Self::new()
    }
}

/// A due delivery handed to a dispatcher, with what it needs to send it.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    pub delivery: Delivery,
    pub url: WebhookUrl,
    pub secret: WebhookSecret,
    /// This claim, for the report.
    pub lease: LeaseToken,
}

/// Which due deliveries a dispatcher takes.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    /// At most this many in all.
    pub limit: usize,
    /// At most this many of one endpoint.
    pub per_endpoint: usize,
    /// Endpoints whose deliveries must wait (their concurrency bound is reached, or their circuit
    /// is open).
    pub skip: Vec<WebhookId>,
    /// Claimed deliveries are not due again until this much later: a dispatcher that dies
    /// mid-attempt gives them back when it runs out.
    pub lease: Duration,
}

/// What became of one claimed delivery.
#[derive(Debug, Clone)]
pub struct AttemptReport {
    pub delivery: DeliveryId,
    pub webhook: WebhookId,
    /// The claim it reports on ([`DueDelivery::lease`]).
    pub lease: LeaseToken,
    /// `None` when it was not sent (its endpoint's circuit was open): nothing is logged and its
    /// attempt count stays, it only waits until `next` says.
    pub attempt: Option<Attempt>,
    pub next: NextStep,
}

#[derive(Debug, Clone)]
pub enum NextStep {
    Delivered,
    RetryAt(OffsetDateTime),
    Failed,
    /// Fail it and disable the endpoint, saying why, with the audit event of the change.
    DisableEndpoint {
        reason: String,
        audit: Box<NewAuditEvent>,
    },
}

/// A page of an endpoint's deliveries, newest first.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryFilter {
    pub webhook: WebhookId,
    pub before: Option<DeliveryId>,
    pub limit: u32,
}

/// The outbox: deliveries as dispatchers claim and report them, and as the log shows them.
#[async_trait]
pub trait DeliveryQueue: Send + Sync {
    /// Takes due pending deliveries of enabled endpoints, oldest due first, leasing them.
    async fn claim_due(&self, request: &ClaimRequest) -> Result<Vec<DueDelivery>, PortError>;
    /// Records attempts and their consequences, in one transaction. A report whose claim is
    /// no longer the delivery's latest (its lease ran out and another dispatcher claimed it)
    /// changes nothing and is not logged.
    async fn report(&self, reports: &[AttemptReport]) -> Result<(), PortError>;
    /// Queues a delivery outside the command events (a ping), due at once.
    async fn enqueue(&self, delivery: &Delivery) -> Result<(), PortError>;
    async fn get(&self, webhook: WebhookId, id: DeliveryId) -> Result<Delivery, PortError>;
    async fn list(&self, filter: &DeliveryFilter) -> Result<Page<Delivery>, PortError>;
    /// Every recorded attempt of a delivery, oldest first.
    async fn attempts(&self, id: DeliveryId) -> Result<Vec<Attempt>, PortError>;
    /// Makes a delivery pending and due at once again, whatever became of it. A live lease is
    /// left as it is: the attempt under way reports first, and only then is it claimed again.
    async fn redeliver(&self, webhook: WebhookId, id: DeliveryId) -> Result<Delivery, PortError>;
}

/// A signed request ready to leave.
#[derive(Debug, Clone)]
pub struct OutgoingWebhook {
    pub url: WebhookUrl,
    pub id: DeliveryId,
    /// Unix seconds, the `webhook-timestamp` header.
    pub timestamp: i64,
    pub signature: String,
    pub body: String,
    /// W3C `traceparent` of the attempt.
    pub traceparent: String,
}

/// Why a request got no HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The destination is (or resolves to) an address webhooks may not reach.
    #[error("refused destination: {0}")]
    Refused(String),
    #[error("timed out")]
    Timeout,
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("request failed: {0}")]
    Other(String),
}

/// Takes webhooks to their receivers over HTTP.
#[async_trait]
pub trait WebhookSender: Send + Sync {
    /// Sends one request and returns the answer's status code (any status is an answer).
    async fn send(&self, request: &OutgoingWebhook) -> Result<u16, SendError>;
    /// Checks, by resolving its host now, that a URL does not lead to a forbidden address.
    async fn check_destination(&self, url: &WebhookUrl) -> Result<(), SendError>;
}
