//! Counters the services move; the telemetry adapter exposes them.

use std::sync::Arc;
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

/// `rdev_http_connections_active`: open client connections, streaming or not.
pub trait ConnectionMetrics: Send + Sync {
    fn connection_opened(&self);
    fn connection_closed(&self);
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
    /// The request metrics of one route template and method; callers keep the handle.
    fn http_route(&self, method: &'static str, route: &str) -> Arc<dyn HttpRouteMetrics>;
    fn set_commands_queued(&self, queued: u64);
    /// A request presented no key or one that was refused (`reason`: a fixed name).
    fn auth_failure(&self, reason: &'static str);
    /// A presented key was looked up (the per-address guard let the request through).
    fn key_lookup(&self);
    /// A request was refused with 429 by `limiter`: `api_key` (the key's rate limit) or
    /// `client_ip` (too many failed authentications from its address).
    fn rate_limited(&self, limiter: &'static str);
    /// The Prometheus text exposition format.
    fn render(&self) -> String;
}

/// `rdev_http_requests_total` and `rdev_http_request_duration_seconds` of one route and method.
pub trait HttpRouteMetrics: Send + Sync {
    fn record(&self, status: u16, elapsed: Duration);
}

/// A heap profile of this process.
#[async_trait]
pub trait HeapProfiler: Send + Sync {
    /// Sampled live allocations as a gzipped pprof protobuf; `Unavailable` when the allocator
    /// does not profile.
    async fn heap_profile(&self) -> Result<Vec<u8>, PortError>;
}

/// `rdev_cache_requests_total{cache,result}`; `cache` is `api_key` or `project`.
pub trait CacheMetrics: Send + Sync {
    fn cache_lookup(&self, cache: &'static str, hit: bool);
}

/// A CPU profile of this process.
#[async_trait]
pub trait CpuProfiler: Send + Sync {
    /// Samples every thread for `duration`, as a pprof protobuf; `AlreadyExists` while another
    /// profile is being taken.
    async fn cpu_profile(&self, duration: Duration) -> Result<Vec<u8>, PortError>;
}
