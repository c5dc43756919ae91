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

/// A value a [`Validation`] checked. It opens only inside [`Validation::finish_with`], which
/// runs its builder only once every check passed: no caller unwraps what it merely believes
/// is there.
#[derive(Debug)]
#[must_use]
pub struct Checked<T>(Option<T>);

impl<T> Checked<T> {
    /// A value that needed no check.
    pub fn given(value: T) -> Self {
        Self(Some(value))
    }

    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Checked<U> {
        Checked(self.0.map(f))
    }

    /// Both values, checked together.
    pub fn and<U>(self, other: Checked<U>) -> Checked<(T, U)> {
        Checked(self.0.zip(other.0))
    }

    /// An optional checked value as a checked option.
    pub fn transpose(checked: Option<Checked<T>>) -> Checked<Option<T>> {
        match checked {
            None => Checked(Some(None)),
            Some(Checked(value)) => Checked(value.map(Some)),
        }
    }
}

/// The proof that every check of a [`Validation`] passed, which opens its [`Checked`] values.
pub struct Valid(());

impl Valid {
    pub fn open<T>(&self, checked: Checked<T>) -> T {
        checked
            .0
            .expect("a Valid exists only once every check passed")
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
    pub fn check<T>(&mut self, pointer: &str, parsed: Result<T, Rule>) -> Checked<T> {
        match parsed {
            Ok(value) => Checked(Some(value)),
            Err(rule) => {
                self.errors.push(FieldError::new(pointer, rule.0));
                Checked(None)
            }
        }
    }

    /// Records a failure that is not the result of a parse.
    pub fn fail(&mut self, pointer: &str, message: impl Into<String>) {
        self.errors.push(FieldError::new(pointer, message));
    }

    /// Records a failure and stands for the value that could not be had.
    pub fn refuse<T>(&mut self, pointer: &str, message: impl Into<String>) -> Checked<T> {
        self.fail(pointer, message);
        Checked(None)
    }

    pub fn finish(self) -> Result<(), DomainError> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(DomainError::Invalid(self.errors))
        }
    }

    /// Finishes and hands out the value built from the checked parts: `build` runs only when
    /// every check passed, with the [`Valid`] that opens them.
    pub fn finish_with<T>(self, build: impl FnOnce(&Valid) -> T) -> Result<T, DomainError> {
        self.finish().map(|()| build(&Valid(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_failed_field_in_order() {
        let mut v = Validation::new();
        let a: Checked<u8> = v.check("/a", Err(Rule::new("bad a")));
        let b = v.check("/b", Ok(2));
        v.fail("/c", "bad c");
        assert!(a.0.is_none());
        assert_eq!(b.0, Some(2));
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
