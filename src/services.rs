//! Use cases. Each service takes the ports it needs and speaks domain types; none of them knows
//! which database, executor or web framework sits behind the ports.

pub mod api_keys;
pub mod audit;
pub mod auth_failures;
pub mod caller;
pub mod commands;
pub mod dispatcher;
pub mod error;
pub mod follow;
pub mod pods;
pub mod projects;
pub mod rate_limits;
pub mod recorder;
pub mod webhooks;
pub mod worker;

pub use caller::Caller;
pub use error::ServiceError;
