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

/// An error and its causes on one line, `what: why: why`, a cause whose words the line already
/// holds left out (wrappers often repeat their source). For logs, records and the CLI.
pub fn one_line(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        let message = error.to_string();
        if !line.contains(&message) {
            line.push_str(": ");
            line.push_str(&message);
        }
        cause = error.source();
    }
    line
}

fn summarize(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("{}: {}", e.pointer, e.message))
        .collect::<Vec<_>>()
        .join("; ")
}
