//! Secrets that every replica sharing a database must agree on.

use async_trait::async_trait;

use super::PortError;

#[async_trait]
pub trait SharedSecrets: Send + Sync {
    /// The secret stored under `name`; when there is none yet, `candidate` is stored and
    /// returned (the first replica's candidate wins a race).
    async fn get_or_insert(&self, name: &str, candidate: &str) -> Result<String, PortError>;
}
