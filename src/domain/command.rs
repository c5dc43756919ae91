//! Commands: what was asked to run, how urgently, and where in its lifecycle it is.

use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::DomainError;
use super::ids::{ApiKeyId, CommandId, ProjectId};
use super::project::EnvVars;
use super::validation::Rule;

/// Longest accepted command line.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// How long an `Idempotency-Key` is remembered: a retry within it returns the first command,
/// and after it the key is free again.
pub const IDEMPOTENCY_WINDOW: time::Duration = time::Duration::hours(24);

/// Queue priority; higher runs first, FIFO within one.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
    Critical,
}

impl Priority {
    pub const ALL: [Priority; 4] = [
        Priority::Critical,
        Priority::High,
        Priority::Normal,
        Priority::Low,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::Critical => "critical",
        }
    }

    /// Stored as a small integer so the queue index sorts by it.
    pub fn rank(self) -> i16 {
        match self {
            Priority::Low => 0,
            Priority::Normal => 1,
            Priority::High => 2,
            Priority::Critical => 3,
        }
    }

    pub fn from_rank(rank: i16) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.rank() == rank)
    }

    pub fn parse(raw: &str) -> Result<Self, Rule> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == raw)
            .ok_or_else(|| Rule::new("must be one of low, normal, high, critical"))
    }
}

/// Where a command is in its life: `queued -> running -> succeeded | failed | cancelled |
/// timed_out | lost`, or `queued -> cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
    Lost,
}

impl CommandStatus {
    pub const ALL: [CommandStatus; 7] = [
        CommandStatus::Queued,
        CommandStatus::Running,
        CommandStatus::Succeeded,
        CommandStatus::Failed,
        CommandStatus::Cancelled,
        CommandStatus::TimedOut,
        CommandStatus::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Queued => "queued",
            CommandStatus::Running => "running",
            CommandStatus::Succeeded => "succeeded",
            CommandStatus::Failed => "failed",
            CommandStatus::Cancelled => "cancelled",
            CommandStatus::TimedOut => "timed_out",
            CommandStatus::Lost => "lost",
        }
    }

    pub fn parse(raw: &str) -> Result<Self, Rule> {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str() == raw)
            .ok_or_else(|| {
                Rule::new(
                    "must be one of queued, running, succeeded, failed, cancelled, timed_out, lost",
                )
            })
    }

    pub fn is_final(self) -> bool {
        !matches!(self, CommandStatus::Queued | CommandStatus::Running)
    }

    /// The lifecycle as a state machine.
    pub fn transition(self, to: CommandStatus) -> Result<CommandStatus, DomainError> {
        use CommandStatus::*;
        let allowed = matches!(
            (self, to),
            (Queued, Running | Cancelled)
                | (Running, Succeeded | Failed | Cancelled | TimedOut | Lost)
        );
        if allowed {
            Ok(to)
        } else {
            Err(DomainError::InvalidTransition {
                from: self.as_str(),
                to: to.as_str(),
            })
        }
    }
}

impl fmt::Display for CommandStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a command stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TerminationReason {
    /// The process exited by itself (any exit code).
    Exit,
    /// The process was killed by a signal nobody here sent.
    Signal,
    Timeout,
    Cancel,
    /// The replica running it vanished; the lease expired.
    Lost,
    /// The process could not be started.
    StartFailed,
    /// The replica shut down and the process did not finish within the shutdown grace period.
    Shutdown,
}

impl TerminationReason {
    pub const ALL: [TerminationReason; 7] = [
        TerminationReason::Exit,
        TerminationReason::Signal,
        TerminationReason::Timeout,
        TerminationReason::Cancel,
        TerminationReason::Lost,
        TerminationReason::StartFailed,
        TerminationReason::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TerminationReason::Exit => "exit",
            TerminationReason::Signal => "signal",
            TerminationReason::Timeout => "timeout",
            TerminationReason::Cancel => "cancel",
            TerminationReason::Lost => "lost",
            TerminationReason::StartFailed => "start_failed",
            TerminationReason::Shutdown => "shutdown",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == raw)
    }
}

/// The shell command line: non-empty, at most [`MAX_COMMAND_BYTES`], no NUL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLine(String);

impl CommandLine {
    pub fn parse(raw: String) -> Result<Self, Rule> {
        if raw.trim().is_empty() {
            return Err(Rule::new("must not be empty"));
        }
        if raw.len() > MAX_COMMAND_BYTES {
            return Err(Rule::new(format!(
                "must be at most {MAX_COMMAND_BYTES} bytes"
            )));
        }
        if raw.contains('\0') {
            return Err(Rule::new("must not contain NUL"));
        }
        Ok(Self(raw))
    }

    pub fn from_trusted(raw: String) -> Self {
        Self(raw)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Which pipe a chunk of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputStream {
    Stdout,
    Stderr,
}

impl OutputStream {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        }
    }

    pub fn code(self) -> i16 {
        match self {
            OutputStream::Stdout => 1,
            OutputStream::Stderr => 2,
        }
    }

    pub fn from_code(code: i16) -> Option<Self> {
        match code {
            1 => Some(OutputStream::Stdout),
            2 => Some(OutputStream::Stderr),
            _ => None,
        }
    }

    pub fn parse(raw: &str) -> Result<Self, Rule> {
        match raw {
            "stdout" => Ok(OutputStream::Stdout),
            "stderr" => Ok(OutputStream::Stderr),
            _ => Err(Rule::new("must be stdout or stderr")),
        }
    }
}

/// Where a reader of a command's output resumes: after output number `seq`, 0 meaning from the
/// start. It arrives as text (an SSE `Last-Event-ID`), so it has a parser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResumePoint(i64);

impl ResumePoint {
    pub fn parse(raw: &str) -> Result<Self, Rule> {
        raw.trim()
            .parse::<i64>()
            .ok()
            .filter(|seq| *seq >= 0)
            .map(Self)
            .ok_or_else(|| Rule::new(format!("`{raw}` is not an output sequence number")))
    }

    /// The last output already seen; the reader wants everything after it.
    pub fn after_seq(self) -> i64 {
        self.0
    }
}

/// One stored piece of output. `seq` starts at 1 and has no gaps within a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    pub seq: i64,
    pub stream: OutputStream,
    pub data: String,
}

/// A command as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub id: CommandId,
    pub project_id: ProjectId,
    pub command: CommandLine,
    pub env: EnvVars,
    pub priority: Priority,
    pub timeout_secs: u32,
    pub status: CommandStatus,
    pub submitted_by: Option<ApiKeyId>,
    pub created_at: OffsetDateTime,
    pub started_at: Option<OffsetDateTime>,
    pub finished_at: Option<OffsetDateTime>,
    pub exit_code: Option<i32>,
    pub termination_reason: Option<TerminationReason>,
    pub error: Option<String>,
    pub cancel_requested: bool,
    pub stdout_bytes: i64,
    pub stderr_bytes: i64,
    /// Output bytes not stored because the cap was reached.
    pub dropped_bytes: i64,
    pub truncated: bool,
    /// Highest stored output sequence number (0 when none).
    pub last_seq: i64,
}

/// How a run ended, as the worker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutcome {
    pub status: CommandStatus,
    pub exit_code: Option<i32>,
    pub reason: TerminationReason,
    pub error: Option<String>,
    pub finished_at: OffsetDateTime,
    pub stdout_bytes: i64,
    pub stderr_bytes: i64,
    pub dropped_bytes: i64,
    pub truncated: bool,
    pub last_seq: i64,
}

impl CommandOutcome {
    /// The final status for a process that ended, given why it was stopped (if it was).
    pub fn status_for(
        exit_code: Option<i32>,
        stopped_by: Option<TerminationReason>,
    ) -> (CommandStatus, TerminationReason) {
        match stopped_by {
            Some(TerminationReason::Timeout) => {
                (CommandStatus::TimedOut, TerminationReason::Timeout)
            }
            Some(TerminationReason::Cancel) => {
                (CommandStatus::Cancelled, TerminationReason::Cancel)
            }
            Some(TerminationReason::Shutdown) => {
                (CommandStatus::Cancelled, TerminationReason::Shutdown)
            }
            Some(TerminationReason::Lost) => (CommandStatus::Lost, TerminationReason::Lost),
            Some(TerminationReason::StartFailed) => {
                (CommandStatus::Failed, TerminationReason::StartFailed)
            }
            Some(TerminationReason::Exit | TerminationReason::Signal) | None => match exit_code {
                Some(0) => (CommandStatus::Succeeded, TerminationReason::Exit),
                Some(_) => (CommandStatus::Failed, TerminationReason::Exit),
                None => (CommandStatus::Failed, TerminationReason::Signal),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_points_are_non_negative_sequence_numbers() {
        assert_eq!(ResumePoint::parse(" 42 ").unwrap().after_seq(), 42);
        assert_eq!(ResumePoint::parse("0").unwrap(), ResumePoint::default());
        for bad in ["-1", "abc", "", "1.5"] {
            assert!(ResumePoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lifecycle_allows_only_forward_steps() {
        use CommandStatus::*;
        assert_eq!(Queued.transition(Running), Ok(Running));
        assert_eq!(Queued.transition(Cancelled), Ok(Cancelled));
        assert_eq!(Running.transition(Lost), Ok(Lost));
        assert!(Queued.transition(Succeeded).is_err());
        assert!(Succeeded.transition(Running).is_err());
        assert!(Lost.transition(Queued).is_err());
    }

    #[test]
    fn priorities_round_trip_and_order() {
        for p in Priority::ALL {
            assert_eq!(Priority::from_rank(p.rank()), Some(p));
            assert_eq!(Priority::parse(p.as_str()), Ok(p));
        }
        assert!(Priority::Critical > Priority::Low);
        assert!(Priority::parse("urgent").is_err());
    }

    #[test]
    fn command_lines_must_have_content() {
        assert!(CommandLine::parse("echo hi".into()).is_ok());
        assert!(CommandLine::parse("  ".into()).is_err());
        assert!(CommandLine::parse("a\0b".into()).is_err());
        assert!(CommandLine::parse("x".repeat(MAX_COMMAND_BYTES + 1)).is_err());
    }

    #[test]
    fn outcome_status_follows_exit_code_unless_stopped() {
        use CommandStatus::*;
        assert_eq!(CommandOutcome::status_for(Some(0), None).0, Succeeded);
        assert_eq!(CommandOutcome::status_for(Some(3), None).0, Failed);
        assert_eq!(
            CommandOutcome::status_for(None, None),
            (Failed, TerminationReason::Signal)
        );
        assert_eq!(
            CommandOutcome::status_for(None, Some(TerminationReason::Timeout)).0,
            TimedOut
        );
        assert_eq!(
            CommandOutcome::status_for(Some(0), Some(TerminationReason::Cancel)).0,
            Cancelled
        );
    }
}
