//! Projects: registering where commands run.

use std::sync::Arc;

use serde_json::json;

use crate::domain::Validation;
use crate::domain::api_key::Scope;
use crate::domain::audit::{NewAuditEvent, action};
use crate::domain::ids::ProjectId;
use crate::domain::project::{
    EnabledExecutors, EnvVars, ExecutorKind, KubeTarget, Project, ProjectName, Workdir,
};
use crate::ports::{Clock, ProjectRepository};

use super::{Caller, ServiceError};

/// A validated new project.
#[derive(Debug, Clone)]
pub struct NewProject {
    pub name: ProjectName,
    pub description: String,
    pub target: Option<KubeTarget>,
    pub workdir: Workdir,
    pub env: EnvVars,
    pub max_concurrency: u32,
    pub default_timeout_secs: u32,
    pub executor: ExecutorKind,
}

/// A validated partial update; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct ProjectChanges {
    pub name: Option<ProjectName>,
    pub description: Option<String>,
    /// `Some(None)` removes the target.
    pub target: Option<Option<KubeTarget>>,
    pub workdir: Option<Workdir>,
    pub env: Option<EnvVars>,
    pub max_concurrency: Option<u32>,
    pub default_timeout_secs: Option<u32>,
    pub executor: Option<ExecutorKind>,
}

pub struct ProjectService {
    projects: Arc<dyn ProjectRepository>,
    clock: Arc<dyn Clock>,
    /// `RDEV_EXECUTORS`: a project may only ask for these.
    enabled: EnabledExecutors,
    /// `RDEV_EXECUTOR`, one of `enabled`.
    default_executor: ExecutorKind,
}

impl ProjectService {
    pub fn new(
        projects: Arc<dyn ProjectRepository>,
        clock: Arc<dyn Clock>,
        enabled: EnabledExecutors,
        default_executor: ExecutorKind,
    ) -> Self {
        Self {
            projects,
            clock,
            enabled,
            default_executor,
        }
    }

    /// Refuses a project whose executor the server does not run, when it is written rather
    /// than at every command.
    fn check_executor_enabled(&self, project: &Project) -> Result<(), ServiceError> {
        if !self.enabled.allows(project.executor) {
            let mut v = Validation::new();
            let how = match project.executor {
                ExecutorKind::Kube => "; kube needs a Kubernetes API (in a cluster, or KUBECONFIG)",
                ExecutorKind::Local => "",
            };
            v.fail(
                "/executor",
                format!(
                    "executor `{}` is not enabled on this server (RDEV_EXECUTORS={}{how})",
                    project.executor.as_str(),
                    self.enabled
                ),
            );
            v.finish()?;
        }
        Ok(())
    }

    /// The executor of projects that do not name one (`RDEV_EXECUTOR`).
    pub fn default_executor(&self) -> ExecutorKind {
        self.default_executor
    }

    pub async fn create(&self, caller: &Caller, new: NewProject) -> Result<Project, ServiceError> {
        // A key limited to some projects could otherwise widen its own reach.
        caller.require_unrestricted_admin()?;
        let now = self.clock.now();
        let project = Project {
            id: ProjectId::new(),
            name: new.name,
            description: new.description,
            target: new.target,
            workdir: new.workdir,
            env: new.env,
            max_concurrency: new.max_concurrency,
            default_timeout_secs: new.default_timeout_secs,
            executor: new.executor,
            created_at: now,
            updated_at: now,
        };
        project.check_consistency()?;
        self.check_executor_enabled(&project)?;
        let audit = self.audit(caller, action::PROJECT_CREATED, &project);
        self.projects
            .insert(&project, audit)
            .await
            .map_err(|e| ServiceError::from_port(e, "project"))?;
        Ok(project)
    }

    pub async fn list(&self, caller: &Caller) -> Result<Vec<Project>, ServiceError> {
        caller.require(Scope::Read)?;
        Ok(self.projects.list(caller.reach()).await?)
    }

    /// A project the caller may see; others answer `NotFound`, as if they did not exist.
    pub async fn get(&self, caller: &Caller, id: ProjectId) -> Result<Project, ServiceError> {
        caller.require(Scope::Read)?;
        if !caller.can_access(id) {
            return Err(ServiceError::NotFound("project"));
        }
        self.projects
            .get(id)
            .await
            .map_err(|e| ServiceError::from_port(e, "project"))
    }

    pub async fn update(
        &self,
        caller: &Caller,
        id: ProjectId,
        changes: ProjectChanges,
    ) -> Result<Project, ServiceError> {
        let mut project = self.get(caller, id).await?;
        caller.require(Scope::Admin)?;
        let before = project.clone();
        let ProjectChanges {
            name,
            description,
            target,
            workdir,
            env,
            max_concurrency,
            default_timeout_secs,
            executor,
        } = changes;
        project.name = name.unwrap_or(project.name);
        project.description = description.unwrap_or(project.description);
        project.target = target.unwrap_or(project.target);
        project.workdir = workdir.unwrap_or(project.workdir);
        project.env = env.unwrap_or(project.env);
        project.max_concurrency = max_concurrency.unwrap_or(project.max_concurrency);
        project.default_timeout_secs = default_timeout_secs.unwrap_or(project.default_timeout_secs);
        project.executor = executor.unwrap_or(project.executor);
        // Another executor or pod is new reach, exactly as creating a project would be: a key
        // limited to this project could otherwise move it onto the server itself (`local`) or
        // into any pod the server may exec into.
        if project.executor != before.executor || project.target != before.target {
            caller.require_unrestricted_admin()?;
        }
        project.updated_at = self.clock.now();
        project.check_consistency()?;
        self.check_executor_enabled(&project)?;
        let mut audit = self.audit(caller, action::PROJECT_UPDATED, &project);
        audit.details["changed"] = project.changes_since(&before).into_value();
        self.projects
            .update(&project, audit)
            .await
            .map_err(|e| ServiceError::from_port(e, "project"))?;
        Ok(project)
    }

    pub async fn delete(&self, caller: &Caller, id: ProjectId) -> Result<(), ServiceError> {
        let project = self.get(caller, id).await?;
        caller.require(Scope::Admin)?;
        let audit = self.audit(caller, action::PROJECT_DELETED, &project);
        self.projects
            .delete(id, audit)
            .await
            .map_err(|e| ServiceError::from_port(e, "project"))
    }

    fn audit(&self, caller: &Caller, action: &'static str, project: &Project) -> NewAuditEvent {
        NewAuditEvent::new(
            &caller.context,
            self.clock.now(),
            action,
            ("project", project.id.to_string()),
            json!({
                "name": project.name.as_str(),
                "workdir": project.workdir.as_str(),
                "executor": project.executor.as_str(),
                "max_concurrency": project.max_concurrency,
            }),
        )
    }
}
