//! Counters the services move; the telemetry adapter exposes them.

use std::time::Duration;

use crate::domain::command::CommandStatus;

pub trait CommandMetrics: Send + Sync {
    fn command_started(&self);
    fn command_finished(&self, status: CommandStatus, ran_for: Duration);
    fn output_bytes(&self, bytes: u64);
    fn stream_opened(&self);
    fn stream_closed(&self);
}
