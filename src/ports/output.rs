//! Command output: the store (source of truth) and the bus that tells followers something new
//! was stored, plus the signal that wakes idle workers.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::PortError;
use crate::domain::command::{CommandStatus, OutputChunk};
use crate::domain::ids::{ApiKeyId, CommandId, ProjectId};

/// Running totals written with each batch, so a reader of the command sees them move.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutputProgress {
    pub last_seq: i64,
    pub stdout_bytes: i64,
    pub stderr_bytes: i64,
    pub dropped_bytes: i64,
    pub truncated: bool,
}

#[async_trait]
pub trait OutputStore: Send + Sync {
    /// Appends a batch (consecutive sequence numbers) and the progress, in one transaction.
    /// Fenced: nothing is written (`LeaseLost`) unless the command is running under `owner`'s
    /// lease, so a replica that lost its command cannot add output after its end.
    async fn append(
        &self,
        command: CommandId,
        owner: &str,
        chunks: &[OutputChunk],
        progress: OutputProgress,
    ) -> Result<(), PortError>;
    /// Up to `limit` chunks with `seq > after`, in order.
    async fn read_after(
        &self,
        command: CommandId,
        after: i64,
        limit: u32,
    ) -> Result<Vec<OutputChunk>, PortError>;
}

/// Something that happened to a command. Output is published only after it was stored.
#[derive(Debug, Clone)]
pub enum BusEvent {
    Output(Arc<OutputChunk>),
    /// The output cap was reached; later output is dropped.
    Truncated,
    Status(CommandStatus),
    CancelRequested,
    /// Output up to `last_seq` is in the store (a hint from another replica: read the store).
    Stored {
        last_seq: i64,
    },
}

/// What a subscription yields next.
#[derive(Debug, Clone)]
pub enum Received {
    Event(BusEvent),
    /// The subscriber fell behind the shared buffer and missed events: re-read the store.
    Lagged,
}

#[async_trait]
pub trait Subscription: Send {
    /// The next event; pending forever when nothing happens (callers select with other futures).
    async fn next(&mut self) -> Received;
}

#[async_trait]
pub trait OutputBus: Send + Sync {
    /// Delivers to this replica's subscribers of `command` and, where replicas share a database,
    /// to the others (coalesced, as a hint).
    async fn publish(&self, command: CommandId, event: BusEvent);
    /// Subscribe before reading the store, so nothing falls between the read and the follow.
    fn subscribe(&self, command: CommandId) -> Box<dyn Subscription>;
}

/// Wakes idle workers when work may be claimable (a command was queued or a slot was freed).
#[async_trait]
pub trait WorkSignal: Send + Sync {
    async fn announce(&self);
    /// Returns when work was announced, or after `timeout` (the poll fallback).
    async fn wait(&self, timeout: Duration);
}

/// A hint that crosses replicas sharing a database. Small by design: receivers re-read the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteHint {
    Stored {
        command: CommandId,
        last_seq: i64,
    },
    Status {
        command: CommandId,
        status: CommandStatus,
    },
    Cancel {
        command: CommandId,
    },
    Work,
    /// A stored key or project changed: drop what is cached of it.
    Changed(Changed),
}

/// Something cached elsewhere that a write made stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Changed {
    ApiKey(ApiKeyId),
    Project(ProjectId),
}

/// Tells every replica that a key or project changed, so revocations and scope, allowlist or
/// project changes take effect everywhere at once (best effort; the cache TTL bounds the rest).
pub trait ChangeNotices: Send + Sync {
    fn announce_change(&self, change: Changed);
}

/// Hears about changes made on other replicas.
pub trait ChangeListener: Send + Sync {
    fn changed(&self, change: Changed);
}

/// Sends hints to the other replicas.
#[async_trait]
pub trait Relay: Send + Sync {
    async fn send(&self, hints: Vec<RemoteHint>);
}

/// Receives hints from the other replicas.
pub trait RemoteInbox: Send + Sync {
    fn deliver(&self, hint: RemoteHint);
}
