//! What any port can fail with. Adapters translate their driver errors into these at their edge.

type Cause = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("not found")]
    NotFound,
    /// A uniqueness or state rule of the store refused the change.
    #[error("conflict: {0}")]
    Conflict(String),
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
