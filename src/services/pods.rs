//! Pod management: the state of a project's pod, and restarting it.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::domain::api_key::Scope;
use crate::domain::audit::{NewAuditEvent, action};
use crate::domain::ids::ProjectId;
use crate::domain::project::{KubeTarget, Project};
use crate::ports::{AuditLog, Clock, PodManager, PodStatus};

use super::projects::ProjectService;
use super::{Caller, ServiceError};

pub struct PodServicePorts {
    pub projects: Arc<ProjectService>,
    /// `None` where this server has no Kubernetes API configured.
    pub pods: Option<Arc<dyn PodManager>>,
    pub audit: Arc<dyn AuditLog>,
    pub clock: Arc<dyn Clock>,
}

pub struct PodService {
    ports: PodServicePorts,
    restart_wait: Duration,
}

impl PodService {
    /// `restart_wait` bounds how long a restart waits for the replacement to be Ready.
    pub fn new(ports: PodServicePorts, restart_wait: Duration) -> Self {
        Self {
            ports,
            restart_wait,
        }
    }

    /// The pod of a project the caller may see.
    pub async fn status(&self, caller: &Caller, id: ProjectId) -> Result<PodStatus, ServiceError> {
        let project = self.ports.projects.get(caller, id).await?;
        let (pods, target) = self.kube_target(&project)?;
        pods.status(target).await.map_err(ServiceError::Pod)
    }

    /// Deletes the project's pod so that its controller recreates it, waits for a Ready
    /// replacement, and records who did it. Needs `execute`: a key that may run commands in
    /// the pod may as well restart it.
    pub async fn restart(&self, caller: &Caller, id: ProjectId) -> Result<PodStatus, ServiceError> {
        let project = self.ports.projects.get(caller, id).await?;
        caller.require(Scope::Execute)?;
        let (pods, target) = self.kube_target(&project)?;
        let before = pods.status(target).await.map_err(ServiceError::Pod)?;
        let after = pods
            .restart(target, self.restart_wait)
            .await
            .map_err(ServiceError::Pod)?;
        let event = NewAuditEvent::new(
            &caller.context,
            self.ports.clock.now(),
            action::POD_RESTARTED,
            ("project", project.id.to_string()),
            json!({
                "namespace": after.namespace,
                "deleted_pod": before.name,
                "replacement_pod": after.name,
            }),
        );
        self.ports.audit.append(event).await?;
        Ok(after)
    }

    fn kube_target<'p>(
        &self,
        project: &'p Project,
    ) -> Result<(&Arc<dyn PodManager>, &'p KubeTarget), ServiceError> {
        let pods = self
            .ports
            .pods
            .as_ref()
            .ok_or(ServiceError::KubeNotConfigured)?;
        let target = project.target.as_ref().ok_or(ServiceError::NoKubeTarget)?;
        Ok((pods, target))
    }
}
