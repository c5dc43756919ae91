//! Storage of commands and the queue that hands them to workers.

use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;

use super::{Page, PortError};
use crate::domain::audit::{AuditContext, NewAuditEvent};
use crate::domain::command::{Command, CommandOutcome, CommandStatus, Priority};
use crate::domain::ids::{ApiKeyId, CommandId, ProjectId};

/// Everything `submit` writes in its one transaction.
#[derive(Debug, Clone)]
pub struct Submission {
    pub command: Command,
    pub audit: NewAuditEvent,
    pub idempotency: Option<IdempotencyKey>,
    /// Refuse (`SubmitOutcome::QueueFull`) when this many commands are already queued.
    pub max_queued: u64,
    /// Refuse (`SubmitOutcome::ProjectQueueFull`) when the project has this many queued.
    pub max_queued_per_project: u64,
}

/// A client-chosen key that makes a repeated submit return the first command.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    pub api_key: ApiKeyId,
    pub key: String,
    /// Hash of the request as sent: the same key with another request is a conflict.
    pub request_hash: String,
    /// Keys first used before this have expired and are forgotten.
    pub fresh_after: OffsetDateTime,
}

#[derive(Debug, Clone)]
pub enum SubmitOutcome {
    Created(Command),
    /// The idempotency key was seen before with the same request.
    Existing(Command),
    QueueFull {
        queued: u64,
    },
    ProjectQueueFull {
        queued: u64,
    },
}

#[derive(Debug, Clone, Default)]
pub struct CommandFilter {
    pub project_id: Option<ProjectId>,
    /// Restrict to these projects (the caller's reach); `None` is all.
    pub projects: Option<Vec<ProjectId>>,
    pub status: Option<CommandStatus>,
    /// Return commands older than this one (newest first paging).
    pub before: Option<CommandId>,
    pub limit: u32,
}

/// Queue depth and load, for `GET /queue` and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueSummary {
    pub queued_by_priority: Vec<(Priority, u64)>,
    pub running: u64,
    pub per_project: Vec<ProjectLoad>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectLoad {
    pub project_id: ProjectId,
    pub queued: u64,
    pub running: u64,
}

/// What the API side does with commands.
#[async_trait]
pub trait CommandStore: Send + Sync {
    async fn submit(&self, submission: Submission) -> Result<SubmitOutcome, PortError>;
    async fn get(&self, id: CommandId) -> Result<Command, PortError>;
    async fn list(&self, filter: &CommandFilter) -> Result<Page<Command>, PortError>;
    /// 1-based place in the claim order, `None` unless queued.
    async fn position(&self, id: CommandId) -> Result<Option<u64>, PortError>;
    async fn summary(&self, projects: Option<&[ProjectId]>) -> Result<QueueSummary, PortError>;
    /// Cancels a queued command at once (returns it `cancelled`), or flags a running one for its
    /// worker. A finished command is `AlreadyEnded`.
    async fn request_cancel(
        &self,
        id: CommandId,
        audit: NewAuditEvent,
    ) -> Result<Command, PortError>;
}

/// A claimed command and how long its lease lasts.
#[derive(Debug, Clone)]
pub struct Claim {
    pub command: Command,
    pub lease_until: OffsetDateTime,
}

/// What a lease renewal found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RenewedLeases {
    pub cancel_requested: Vec<CommandId>,
    pub lost: Vec<CommandId>,
}

/// A command's end as a worker reports it, with the audit event written alongside.
#[derive(Debug, Clone)]
pub struct Finished {
    pub id: CommandId,
    pub outcome: CommandOutcome,
    pub audit: NewAuditEvent,
}

/// What workers do with the queue.
#[async_trait]
pub trait CommandQueue: Send + Sync {
    /// Takes up to `limit` of the highest-priority, oldest queued commands whose projects have
    /// free slots, marks them running under `owner`'s lease. Empty when nothing is claimable.
    async fn claim(
        &self,
        owner: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Claim>, PortError>;
    /// Extends the leases of `owner`'s running commands; says which were asked to cancel and
    /// which are no longer `owner`'s running commands (the reaper marked them lost).
    async fn renew_leases(
        &self,
        owner: &str,
        ids: &[CommandId],
        lease: Duration,
    ) -> Result<RenewedLeases, PortError>;
    /// Writes final states with their audit events and frees their project slots, in one
    /// transaction. Fenced: each item fails alone (`LeaseLost`) when its command is no longer
    /// running under `owner`'s lease.
    async fn finish(
        &self,
        owner: &str,
        batch: &[Finished],
    ) -> Result<Vec<Result<Command, PortError>>, PortError>;
    /// Marks running commands whose lease ran out as `lost` (never re-run) and returns them.
    async fn expire_leases(&self, context: &AuditContext) -> Result<Vec<Command>, PortError>;
}
