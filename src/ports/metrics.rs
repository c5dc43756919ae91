//! Counters the services move; the telemetry adapter exposes them.

use std::time::Duration;

use async_trait::async_trait;

use super::PortError;
use crate::domain::command::CommandStatus;

pub trait CommandMetrics: Send + Sync {
    fn command_started(&self);
    fn command_finished(&self, status: CommandStatus, ran_for: Duration);
    fn output_bytes(&self, bytes: u64);
    fn stream_opened(&self);
    fn stream_closed(&self);
}

/// Where a circuit breaker stands; the gauge shows the number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Calls go through (gauge 0).
    Closed,
    /// Calls fail fast (gauge 1).
    Open,
    /// One probe call is let through to test the backend (gauge 2).
    HalfOpen,
}

impl CircuitState {
    pub fn gauge_value(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::Open => 1,
            CircuitState::HalfOpen => 2,
        }
    }
}

/// `rdev_circuit_breaker_state{target}`.
pub trait CircuitMetrics: Send + Sync {
    fn circuit_state(&self, target: &'static str, state: CircuitState);
}

/// Webhook delivery counters and the state of the per-endpoint circuit breakers.
pub trait WebhookMetrics: Send + Sync {
    /// One attempt ended; `outcome` is `delivered`, `retry`, `failed`, `gone` or `refused`.
    fn webhook_attempt(&self, outcome: &'static str, latency: Duration);
    /// How many endpoint breakers are in each state.
    fn webhook_circuits(&self, closed: u64, open: u64, half_open: u64);
}

/// What operators scrape: request counters, queue depth, and the exposition text.
pub trait OperatorMetrics: Send + Sync {
    fn http_request(&self, method: &str, route: &str, status: u16, elapsed: Duration);
    fn set_commands_queued(&self, queued: u64);
    /// A request presented no key or one that was refused (`reason`: a fixed name).
    fn auth_failure(&self, reason: &'static str);
    /// The Prometheus text exposition format.
    fn render(&self) -> String;
}

/// A heap profile of this process.
#[async_trait]
pub trait HeapProfiler: Send + Sync {
    /// Sampled live allocations as a gzipped pprof protobuf; `Unavailable` when the allocator
    /// does not profile.
    async fn heap_profile(&self) -> Result<Vec<u8>, PortError>;
}
