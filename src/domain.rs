//! Entities, value types and rules. No I/O and no async: everything here is a pure function of its
//! inputs, so it is unit-tested in place.

pub mod api_key;
pub mod audit;
pub mod command;
pub mod error;
pub mod ids;
pub mod project;
pub mod rate_limit;
pub mod trace;
pub mod validation;
pub mod webhook;

pub use error::DomainError;
pub use validation::{Checked, FieldError, Valid, Validation};
