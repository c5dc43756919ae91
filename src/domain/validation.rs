//! Collects every broken field of an input, so a client learns about all of them at once.

use serde::Serialize;

use super::DomainError;

/// One invalid field: where it is (RFC 6901 JSON pointer into the request body) and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub pointer: String,
    pub message: String,
}

impl FieldError {
    pub fn new(pointer: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            pointer: pointer.into(),
            message: message.into(),
        }
    }
}

/// The reason a single value was refused, without knowing where it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rule(pub String);

impl Rule {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// Gathers the outcome of many parses; [`Validation::finish`] fails if any of them did.
#[derive(Debug, Default)]
pub struct Validation {
    errors: Vec<FieldError>,
}

impl Validation {
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps the value, or records the rule it broke under `pointer`.
    pub fn check<T>(&mut self, pointer: &str, parsed: Result<T, Rule>) -> Option<T> {
        match parsed {
            Ok(value) => Some(value),
            Err(rule) => {
                self.errors.push(FieldError::new(pointer, rule.0));
                None
            }
        }
    }

    /// Records a failure that is not the result of a parse.
    pub fn fail(&mut self, pointer: &str, message: impl Into<String>) {
        self.errors.push(FieldError::new(pointer, message));
    }

    pub fn finish(self) -> Result<(), DomainError> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(DomainError::Invalid(self.errors))
        }
    }

    /// Finishes and hands out the value built from the checked parts. `build` only runs when every
    /// check passed, so it may unwrap the `Option`s that [`Validation::check`] returned.
    pub fn finish_with<T>(self, build: impl FnOnce() -> T) -> Result<T, DomainError> {
        self.finish().map(|()| build())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_failed_field_in_order() {
        let mut v = Validation::new();
        let a: Option<u8> = v.check("/a", Err(Rule::new("bad a")));
        let b = v.check("/b", Ok(2));
        v.fail("/c", "bad c");
        assert_eq!(a, None);
        assert_eq!(b, Some(2));
        let Err(DomainError::Invalid(errors)) = v.finish() else {
            panic!("expected invalid")
        };
        assert_eq!(
            errors
                .iter()
                .map(|e| e.pointer.as_str())
                .collect::<Vec<_>>(),
            ["/a", "/c"]
        );
    }
}
