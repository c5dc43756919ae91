//! What any port can fail with. Adapters translate their driver errors into these at their edge,
//! naming the condition, so services can act on it without parsing messages.

use crate::domain::command::CommandStatus;

type Cause = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("not found")]
    NotFound,
    /// A uniqueness rule refused the change; says what is taken ("a project with this name").
    #[error("{0} already exists")]
    AlreadyExists(&'static str),
    /// The change names a row that does not exist (a foreign key).
    #[error("a referenced resource does not exist")]
    MissingReference,
    /// A project still has queued or running commands.
    #[error("the project has {active} queued or running commands; cancel them first")]
    ProjectBusy { active: i64 },
    /// The command already reached a final state.
    #[error("the command already ended ({0})")]
    AlreadyEnded(CommandStatus),
    /// The command is not a running command under this lease owner any more (it was reaped, or
    /// another replica owns it): the write is fenced off.
    #[error("the command is no longer running under this replica's lease")]
    LeaseLost,
    /// An `Idempotency-Key` was used before with a different request.
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyMismatch,
    /// The request cannot be carried out as given (a missing working directory, a container that
    /// does not exist); retrying will not help.
    #[error("refused")]
    Refused(#[source] Cause),
    /// The backing service cannot be reached or is saturated; retrying later may work.
    #[error("backend unavailable")]
    Unavailable(#[source] Cause),
    /// Anything else the backend reported.
    #[error("backend failure")]
    Backend(#[source] Cause),
}

impl PortError {
    pub fn backend(cause: impl Into<Cause>) -> Self {
        PortError::Backend(cause.into())
    }
}
