//! Commands from the API's side: submit, look at, cancel, and the queue's shape.

use std::sync::Arc;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::domain::FieldError;
use crate::domain::api_key::Scope;
use crate::domain::audit::{NewAuditEvent, action};
use crate::domain::command::{
    Command, CommandLine, CommandStatus, IDEMPOTENCY_WINDOW, OutputStream, Priority,
};
use crate::domain::ids::{CommandId, ProjectId};
use crate::domain::project::{EnvVars, MAX_TIMEOUT_SECS};
use crate::ports::{
    BusEvent, Clock, CommandFilter, CommandStore, IdempotencyKey, OutputBus, OutputStore, Page,
    ProjectRepository, QueueSummary, Submission, SubmitOutcome, WorkSignal,
};

use super::{Caller, ServiceError};

/// Commands listed per page at most.
pub const MAX_PAGE: u32 = 200;
/// Chunks read from the store per query when assembling stored output.
const OUTPUT_PAGE: u32 = 1000;

/// A validated submission.
#[derive(Debug, Clone)]
pub struct SubmitCommand {
    pub command: CommandLine,
    pub priority: Priority,
    pub timeout_secs: Option<u32>,
    pub env: EnvVars,
    pub idempotency_key: Option<String>,
}

/// A command and, while it waits, its place in the queue.
#[derive(Debug, Clone)]
pub struct QueuedCommand {
    pub command: Command,
    pub position: Option<u64>,
    /// False when an idempotency key returned an earlier submission.
    pub created: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct SubmitLimits {
    pub max_queued: u64,
    pub max_queued_per_project: u64,
}

/// What a caller asks `list` for; the service adds the caller's reach.
#[derive(Debug, Clone)]
pub struct ListCommands {
    pub project_id: Option<ProjectId>,
    pub status: Option<CommandStatus>,
    /// Commands older than this one (newest first paging).
    pub before: Option<CommandId>,
    /// Page size, clamped to 1-200.
    pub limit: u32,
}

pub struct CommandService {
    commands: Arc<dyn CommandStore>,
    output: Arc<dyn OutputStore>,
    projects: Arc<dyn ProjectRepository>,
    bus: Arc<dyn OutputBus>,
    work: Arc<dyn WorkSignal>,
    clock: Arc<dyn Clock>,
    limits: SubmitLimits,
}

pub struct CommandServicePorts {
    pub commands: Arc<dyn CommandStore>,
    pub output: Arc<dyn OutputStore>,
    pub projects: Arc<dyn ProjectRepository>,
    pub bus: Arc<dyn OutputBus>,
    pub work: Arc<dyn WorkSignal>,
    pub clock: Arc<dyn Clock>,
}

impl CommandService {
    pub fn new(ports: CommandServicePorts, limits: SubmitLimits) -> Self {
        let CommandServicePorts {
            commands,
            output,
            projects,
            bus,
            work,
            clock,
        } = ports;
        Self {
            commands,
            output,
            projects,
            bus,
            work,
            clock,
            limits,
        }
    }

    pub async fn submit(
        &self,
        caller: &Caller,
        project_id: ProjectId,
        request: SubmitCommand,
    ) -> Result<QueuedCommand, ServiceError> {
        caller.require(Scope::Execute)?;
        if !caller.can_access(project_id) {
            return Err(ServiceError::NotFound("project"));
        }
        let project = self
            .projects
            .get(project_id)
            .await
            .map_err(|e| ServiceError::from_port(e, "project"))?;
        let timeout_secs = request.timeout_secs.unwrap_or(project.default_timeout_secs);
        if !(1..=MAX_TIMEOUT_SECS).contains(&timeout_secs) {
            return Err(ServiceError::Invalid(vec![FieldError::new(
                "/timeout_secs",
                format!("must be between 1 and {MAX_TIMEOUT_SECS}"),
            )]));
        }
        let now = self.clock.now();
        let idempotency = request.idempotency_key.as_ref().map(|key| IdempotencyKey {
            api_key: caller.key_id,
            request_hash: request_fingerprint(project_id, &request),
            key: key.clone(),
            fresh_after: now - IDEMPOTENCY_WINDOW,
        });
        let command = Command {
            id: CommandId::new(),
            project_id,
            command: request.command,
            env: request.env,
            priority: request.priority,
            timeout_secs,
            status: CommandStatus::Queued,
            submitted_by: Some(caller.key_id),
            created_at: now,
            started_at: None,
            finished_at: None,
            exit_code: None,
            termination_reason: None,
            error: None,
            cancel_requested: false,
            stdout_bytes: 0,
            stderr_bytes: 0,
            dropped_bytes: 0,
            truncated: false,
            last_seq: 0,
        };
        let audit = NewAuditEvent::new(
            &caller.context,
            now,
            action::COMMAND_SUBMITTED,
            ("command", command.id.to_string()),
            json!({
                "project_id": project_id.to_string(),
                "command": command.command.as_str(),
                "priority": command.priority.as_str(),
                "timeout_secs": timeout_secs,
            }),
        );
        let submission = Submission {
            command,
            audit,
            idempotency,
            max_queued: self.limits.max_queued,
            max_queued_per_project: self.limits.max_queued_per_project,
        };
        let (command, created) = match self.commands.submit(submission).await? {
            SubmitOutcome::Created(command) => (command, true),
            SubmitOutcome::Existing(command) => (command, false),
            SubmitOutcome::QueueFull { queued } => {
                return Err(ServiceError::QueueFull {
                    queued,
                    retry_after_secs: 5,
                    limit: "RDEV_MAX_QUEUED",
                });
            }
            SubmitOutcome::ProjectQueueFull { queued } => {
                return Err(ServiceError::QueueFull {
                    queued,
                    retry_after_secs: 5,
                    limit: "RDEV_MAX_QUEUED_PER_PROJECT",
                });
            }
        };
        if created {
            self.work.announce().await;
        }
        let position = self.position_of(&command).await?;
        Ok(QueuedCommand {
            command,
            position,
            created,
        })
    }

    /// A command the caller may see; one of another project answers `NotFound`.
    pub async fn get(&self, caller: &Caller, id: CommandId) -> Result<QueuedCommand, ServiceError> {
        let command = self.visible(caller, id).await?;
        let position = self.position_of(&command).await?;
        Ok(QueuedCommand {
            command,
            position,
            created: false,
        })
    }

    /// A page of the commands the caller may see: the caller's reach is always part of the
    /// filter, whatever was asked.
    pub async fn list(
        &self,
        caller: &Caller,
        asked: ListCommands,
    ) -> Result<Page<Command>, ServiceError> {
        caller.require(Scope::Read)?;
        if let Some(project) = asked.project_id
            && !caller.can_access(project)
        {
            return Ok(Page {
                items: vec![],
                next_cursor: None,
            });
        }
        let filter = CommandFilter {
            project_id: asked.project_id,
            projects: caller.reach().map(<[ProjectId]>::to_vec),
            status: asked.status,
            before: asked.before,
            limit: asked.limit.clamp(1, MAX_PAGE),
        };
        Ok(self.commands.list(&filter).await?)
    }

    /// The stored output as text, optionally one stream only.
    pub async fn output(
        &self,
        caller: &Caller,
        id: CommandId,
        only: Option<OutputStream>,
    ) -> Result<String, ServiceError> {
        self.visible(caller, id).await?;
        let mut text = String::new();
        let mut after = 0;
        loop {
            let page = self.output.read_after(id, after, OUTPUT_PAGE).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            let full = page.len() == OUTPUT_PAGE as usize;
            page.into_iter()
                .filter(|chunk| only.is_none_or(|s| s == chunk.stream))
                .for_each(|chunk| text.push_str(&chunk.data));
            if !full {
                break;
            }
        }
        Ok(text)
    }

    pub async fn cancel(&self, caller: &Caller, id: CommandId) -> Result<Command, ServiceError> {
        let command = self.visible(caller, id).await?;
        caller.require(Scope::Execute)?;
        let audit = NewAuditEvent::new(
            &caller.context,
            self.clock.now(),
            action::COMMAND_CANCEL_REQUESTED,
            ("command", id.to_string()),
            json!({"status": command.status.as_str()}),
        );
        let command = self
            .commands
            .request_cancel(id, audit)
            .await
            .map_err(|e| ServiceError::from_port(e, "command"))?;
        let event = if command.status == CommandStatus::Cancelled {
            BusEvent::Status(CommandStatus::Cancelled)
        } else {
            BusEvent::CancelRequested
        };
        self.bus.publish(id, event).await;
        Ok(command)
    }

    pub async fn queue(&self, caller: &Caller) -> Result<QueueSummary, ServiceError> {
        caller.require(Scope::Read)?;
        Ok(self.commands.summary(caller.reach()).await?)
    }

    /// Commands waiting in the whole queue (for operators' metrics).
    pub async fn queued_total(&self) -> Result<u64, ServiceError> {
        let summary = self.commands.summary(None).await?;
        Ok(summary.queued_by_priority.iter().map(|(_, n)| n).sum())
    }

    /// Checks the caller may see the command (read scope, project in reach).
    pub async fn visible(&self, caller: &Caller, id: CommandId) -> Result<Command, ServiceError> {
        caller.require(Scope::Read)?;
        let command = self
            .commands
            .get(id)
            .await
            .map_err(|e| ServiceError::from_port(e, "command"))?;
        if caller.can_access(command.project_id) {
            Ok(command)
        } else {
            Err(ServiceError::NotFound("command"))
        }
    }

    async fn position_of(&self, command: &Command) -> Result<Option<u64>, ServiceError> {
        if command.status == CommandStatus::Queued {
            Ok(self.commands.position(command.id).await?)
        } else {
            Ok(None)
        }
    }
}

/// What makes two submissions "the same request" for idempotency.
/// The request as the client sent it (an omitted timeout stays omitted, so a later change of
/// the project's default does not turn a retry into a conflict).
fn request_fingerprint(project: ProjectId, request: &SubmitCommand) -> String {
    let mut hasher = Sha256::new();
    hasher.update(project.to_string());
    hasher.update([0]);
    hasher.update(request.command.as_str());
    hasher.update([0]);
    hasher.update(request.priority.as_str());
    hasher.update([0]);
    hasher.update(
        request
            .timeout_secs
            .map(|t| t.to_string())
            .unwrap_or_default(),
    );
    hasher.update([0]);
    hasher.update(request.env.to_json());
    hex::encode(hasher.finalize())
}
