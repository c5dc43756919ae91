//! The pod manager: a project's pod as operators see it, and restarting it by deleting it so
//! that its controller (Deployment, StatefulSet) recreates it.

use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Pod;
use time::OffsetDateTime;

use super::{KubeApi, container_of, is_ready, newest, phase};
use crate::domain::project::{KubeTarget, PodRef};
use crate::ports::{PodError, PodManager, PodStatus};

/// How often a restart looks for the replacement.
const RESTART_POLL: Duration = Duration::from_millis(250);

pub struct KubePodManager {
    api: KubeApi,
}

impl KubePodManager {
    pub fn new(api: KubeApi) -> Self {
        Self { api }
    }

    /// The named pod, or the newest Ready match of the selector (the newest match when none
    /// is Ready).
    async fn current(&self, target: &KubeTarget) -> Result<Pod, PodError> {
        let namespace = target.namespace.as_str();
        match &target.pod {
            PodRef::Name(name) => self.api.get_pod(namespace, name.as_str()).await,
            PodRef::Selector(selector) => {
                let pods = self.api.list_pods(namespace, selector.as_str()).await?;
                let ready = newest(pods.iter().filter(|p| is_ready(p)).cloned());
                ready
                    .or_else(|| newest(pods.into_iter()))
                    .ok_or_else(|| PodError::NoPodMatches {
                        namespace: namespace.to_owned(),
                        selector: selector.as_str().to_owned(),
                    })
            }
        }
    }

    /// A Ready pod for the target other than the one with `old_uid`, if there is one yet.
    async fn replacement(
        &self,
        target: &KubeTarget,
        old_uid: &Option<String>,
    ) -> Result<Option<Pod>, PodError> {
        let namespace = target.namespace.as_str();
        let candidates = match &target.pod {
            PodRef::Name(name) => match self.api.get_pod(namespace, name.as_str()).await {
                Ok(pod) => vec![pod],
                Err(PodError::PodNotFound { .. }) => Vec::new(),
                Err(error) => return Err(error),
            },
            PodRef::Selector(selector) => self.api.list_pods(namespace, selector.as_str()).await?,
        };
        Ok(newest(candidates.into_iter().filter(|pod| {
            is_ready(pod) && pod.metadata.uid != *old_uid
        })))
    }
}

fn describe(pod: &Pod, container: String) -> PodStatus {
    let status = pod.status.as_ref();
    let restarts = status
        .and_then(|s| s.container_statuses.as_ref())
        .map(|statuses| {
            statuses
                .iter()
                .map(|c| u32::try_from(c.restart_count).unwrap_or(0))
                .sum()
        })
        .unwrap_or(0);
    PodStatus {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        phase: phase(pod),
        ready: is_ready(pod),
        restarts,
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        started_at: status
            .and_then(|s| s.start_time.as_ref())
            .and_then(|t| OffsetDateTime::from_unix_timestamp(t.0.as_second()).ok()),
        container,
    }
}

#[async_trait]
impl PodManager for KubePodManager {
    async fn status(&self, target: &KubeTarget) -> Result<PodStatus, PodError> {
        let pod = self.current(target).await?;
        let container = container_of(&pod, target)?;
        Ok(describe(&pod, container))
    }

    async fn restart(&self, target: &KubeTarget, wait: Duration) -> Result<PodStatus, PodError> {
        let old = self.current(target).await?;
        container_of(&old, target)?;
        let namespace = target.namespace.as_str();
        let name = old.metadata.name.clone().unwrap_or_default();
        self.api.delete_pod(namespace, &name).await?;
        tracing::info!(namespace, pod = %name, "pod deleted for a restart");
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            tokio::time::sleep(RESTART_POLL).await;
            // The API may flap while the pod is replaced; only the deadline ends the wait.
            match self.replacement(target, &old.metadata.uid).await {
                Ok(Some(pod)) => {
                    let container = container_of(&pod, target)?;
                    return Ok(describe(&pod, container));
                }
                Ok(None) => {}
                Err(error @ PodError::Forbidden(_)) => return Err(error),
                Err(error) => tracing::debug!(%error, "looking for the replacement pod failed"),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(PodError::RestartTimedOut {
                    namespace: namespace.to_owned(),
                    name,
                    waited: wait,
                });
            }
        }
    }
}
