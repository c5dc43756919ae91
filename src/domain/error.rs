//! The error a broken domain rule produces.

use super::validation::FieldError;

/// A domain rule that a value or a transition broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// One or more input fields broke their rules; each names its JSON pointer.
    #[error("invalid input: {}", summarize(.0))]
    Invalid(Vec<FieldError>),
    /// A lifecycle step that the current state does not allow.
    #[error("cannot go from {from} to {to}")]
    InvalidTransition {
        from: &'static str,
        to: &'static str,
    },
}

fn summarize(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("{}: {}", e.pointer, e.message))
        .collect::<Vec<_>>()
        .join("; ")
}
