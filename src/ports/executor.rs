//! Running a process somewhere (a local shell, a pod) and streaming what it prints.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::PortError;
use crate::domain::command::OutputStream;
use crate::domain::ids::CommandId;
use crate::domain::project::KubeTarget;

/// What to run and where.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub command_id: CommandId,
    pub command: String,
    pub workdir: String,
    /// Project variables first, then the command's (which win).
    pub env: Vec<(String, String)>,
    pub target: Option<KubeTarget>,
}

#[async_trait]
pub trait Executor: Send + Sync {
    async fn start(&self, request: ExecRequest) -> Result<Box<dyn Execution>, PortError>;
}

/// A started process. Output flows through a bounded buffer: a slow consumer slows the process
/// instead of growing memory.
#[async_trait]
pub trait Execution: Send {
    /// The next piece of output; `None` once the process and everything it started are done
    /// writing. Cancel-safe.
    async fn next_output(&mut self) -> Option<(OutputStream, Bytes)>;
    /// Stops the whole process tree: SIGTERM, then SIGKILL after `grace`. Returns at once.
    /// Calling it again (a repeated cancel) tries again at once a stop that has not worked.
    async fn terminate(&mut self, grace: Duration);
    /// Why stopping has not worked so far, for the record when the caller gives up; `None`
    /// when nothing failed (or stopping cannot fail, as with local signals).
    fn stop_error(&self) -> Option<String> {
        None
    }
    /// The exit code, `None` when the process died from a signal. Call after `next_output`
    /// returned `None`. Cancel-safe.
    async fn wait(&mut self) -> Result<Option<i32>, PortError>;
}
