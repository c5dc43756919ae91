//! Storage of projects.

use async_trait::async_trait;

use super::PortError;
use crate::domain::audit::NewAuditEvent;
use crate::domain::ids::ProjectId;
use crate::domain::project::Project;

#[async_trait]
pub trait ProjectRepository: Send + Sync {
    /// Stores a new project with its audit event; a taken name is a `Conflict`.
    async fn insert(&self, project: &Project, audit: NewAuditEvent) -> Result<(), PortError>;
    async fn update(&self, project: &Project, audit: NewAuditEvent) -> Result<(), PortError>;
    /// Deletes a project and its finished commands; refuses (`Conflict`) while commands are
    /// queued or running.
    async fn delete(&self, id: ProjectId, audit: NewAuditEvent) -> Result<(), PortError>;
    async fn get(&self, id: ProjectId) -> Result<Project, PortError>;
    /// All projects, or only those in `only` when given.
    async fn list(&self, only: Option<&[ProjectId]>) -> Result<Vec<Project>, PortError>;
}
