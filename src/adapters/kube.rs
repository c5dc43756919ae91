//! Kubernetes: the pod executor (`pods/exec` over WebSocket, through kube-rs) and the pod
//! manager. Every API call goes through one circuit breaker, so a struggling API server makes
//! commands fail fast with a clear reason instead of piling up on timeouts.

mod executor;
mod pods;
mod script;

use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::domain::project::{KubeTarget, PodRef};
use crate::ports::{CircuitMetrics, PodError};
use crate::resilience::{BreakerSettings, CircuitBreaker, Guarded};

pub use executor::KubeExecutor;
pub use pods::KubePodManager;

/// A Kubernetes API that does not accept a connection within this is counted as down.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The breaker's label in `rdev_circuit_breaker_state{target}`.
pub const BREAKER_TARGET: &str = "kubernetes";

#[derive(Debug, thiserror::Error)]
pub enum KubeSetupError {
    #[error("cannot read the kubeconfig {0} (KUBECONFIG)")]
    Kubeconfig(PathBuf, #[source] kube::config::KubeconfigError),
    #[error("the kubeconfig (KUBECONFIG) is not usable")]
    Config(#[source] kube::config::KubeconfigError),
    #[error("the in-cluster service account is not usable")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("cannot build the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// Where the Kubernetes client configuration comes from.
#[derive(Debug, Clone)]
pub enum KubeSource {
    /// Kubeconfig files (`KUBECONFIG`, merged in order).
    Kubeconfig(Vec<PathBuf>),
    /// The pod's service account.
    InCluster,
}

impl KubeSource {
    /// `KUBECONFIG` when given, else the service account when running in a pod, else none.
    pub fn detect(kubeconfig: &[PathBuf]) -> Option<Self> {
        if !kubeconfig.is_empty() {
            Some(KubeSource::Kubeconfig(kubeconfig.to_vec()))
        } else if std::path::Path::new("/var/run/secrets/kubernetes.io/serviceaccount/token")
            .exists()
            && kube::Config::incluster().is_ok()
        {
            Some(KubeSource::InCluster)
        } else {
            None
        }
    }
}

/// A kube-rs client whose every call passes the circuit breaker.
#[derive(Clone)]
pub struct KubeApi {
    client: kube::Client,
    breaker: Arc<CircuitBreaker>,
}

impl KubeApi {
    pub async fn connect(
        source: &KubeSource,
        breaker: BreakerSettings,
        metrics: Arc<dyn CircuitMetrics>,
    ) -> Result<Self, KubeSetupError> {
        let config = match source {
            KubeSource::Kubeconfig(paths) => {
                let mut merged: Option<Kubeconfig> = None;
                for path in paths {
                    let next = Kubeconfig::read_from(path)
                        .map_err(|e| KubeSetupError::Kubeconfig(path.clone(), e))?;
                    merged = Some(match merged {
                        None => next,
                        Some(config) => config.merge(next).map_err(KubeSetupError::Config)?,
                    });
                }
                let merged = merged.expect("at least one kubeconfig path");
                kube::Config::from_custom_kubeconfig(merged, &KubeConfigOptions::default())
                    .await
                    .map_err(KubeSetupError::Config)?
            }
            KubeSource::InCluster => {
                kube::Config::incluster().map_err(KubeSetupError::InCluster)?
            }
        };
        let mut config = config;
        // kube-rs retries 429/503/504 up to 15 times with backoff by default: minutes during
        // which a command neither starts nor fails. The circuit breaker is the policy here.
        config.default_retry = false;
        config.connect_timeout = Some(CONNECT_TIMEOUT);
        let client = kube::Client::try_from(config).map_err(KubeSetupError::Client)?;
        Ok(Self {
            client,
            breaker: Arc::new(CircuitBreaker::new(BREAKER_TARGET, breaker, metrics)),
        })
    }

    fn pods(&self, namespace: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), namespace)
    }

    pub async fn get_pod(&self, namespace: &str, name: &str) -> Result<Pod, PodError> {
        let api = self.pods(namespace);
        self.guarded(api.get(name)).await.map_err(|e| match e {
            ApiFailure::NotFound => PodError::PodNotFound {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            },
            other => other.into_pod_error(),
        })
    }

    pub async fn list_pods(&self, namespace: &str, selector: &str) -> Result<Vec<Pod>, PodError> {
        let api = self.pods(namespace);
        let list = self
            .guarded(api.list(&ListParams::default().labels(selector)))
            .await
            .map_err(ApiFailure::into_pod_error)?;
        Ok(list.items)
    }

    pub async fn delete_pod(&self, namespace: &str, name: &str) -> Result<(), PodError> {
        let api = self.pods(namespace);
        self.guarded(api.delete(name, &DeleteParams::default()))
            .await
            .map(drop)
            .map_err(|e| match e {
                ApiFailure::NotFound => PodError::PodNotFound {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                },
                other => other.into_pod_error(),
            })
    }

    /// Starts `argv` in a container; output and the exit status come over the stream, and,
    /// with `stdin`, input goes to it.
    pub async fn exec(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        argv: Vec<String>,
        stdin: bool,
    ) -> Result<kube::api::AttachedProcess, PodError> {
        let api = self.pods(namespace);
        let params = kube::api::AttachParams {
            container: Some(container.to_owned()),
            stdin,
            stdout: true,
            stderr: true,
            tty: false,
            // The default 1 KiB pipes cost a task wake-up per KiB of output.
            max_stdout_buf_size: Some(64 * 1024),
            max_stderr_buf_size: Some(64 * 1024),
            ..Default::default()
        };
        self.guarded(api.exec(pod, argv, &params))
            .await
            .map_err(|e| match e {
                ApiFailure::NotFound => PodError::PodNotFound {
                    namespace: namespace.to_owned(),
                    name: pod.to_owned(),
                },
                other => other.into_pod_error(),
            })
    }

    async fn guarded<T>(
        &self,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, ApiFailure> {
        match self.breaker.call(counts_against_the_api, call).await {
            Ok(value) => Ok(value),
            Err(Guarded::Open(open)) => Err(ApiFailure::Unavailable(Box::new(open))),
            Err(Guarded::Failed(error)) => Err(ApiFailure::from(error)),
        }
    }

    /// The pod a target points at, checked usable: Running and Ready, with the container.
    /// A selector picks the newest Running and Ready match.
    pub async fn usable_pod(&self, target: &KubeTarget) -> Result<Pod, PodError> {
        let namespace = target.namespace.as_str();
        let pod = match &target.pod {
            PodRef::Name(name) => {
                let pod = self.get_pod(namespace, name.as_str()).await?;
                if !is_ready(&pod) {
                    return Err(PodError::NotReady {
                        namespace: namespace.to_owned(),
                        name: name.as_str().to_owned(),
                        phase: phase(&pod),
                        ready: false,
                    });
                }
                pod
            }
            PodRef::Selector(selector) => {
                let pods = self.list_pods(namespace, selector.as_str()).await?;
                let matching = pods.len();
                if matching == 0 {
                    return Err(PodError::NoPodMatches {
                        namespace: namespace.to_owned(),
                        selector: selector.as_str().to_owned(),
                    });
                }
                newest(pods.into_iter().filter(is_ready)).ok_or_else(|| PodError::NoReadyPod {
                    namespace: namespace.to_owned(),
                    selector: selector.as_str().to_owned(),
                    matching,
                })?
            }
        };
        container_of(&pod, target)?;
        Ok(pod)
    }
}

/// A transport failure, a 5xx or a 429 counts against the API; any other answer is an answer,
/// and a request that could not be built never reached it.
fn counts_against_the_api(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code >= 500 || status.code == 429,
        kube::Error::BuildRequest(_) | kube::Error::HttpError(_) => false,
        _ => true,
    }
}

/// A kube-rs error sorted by what callers do about it.
#[derive(Debug)]
enum ApiFailure {
    NotFound,
    Forbidden(String),
    Unavailable(Box<dyn std::error::Error + Send + Sync>),
    Other(kube::Error),
}

impl From<kube::Error> for ApiFailure {
    fn from(error: kube::Error) -> Self {
        match &error {
            kube::Error::Api(status) if status.code == 404 => ApiFailure::NotFound,
            kube::Error::Api(status) if status.code == 401 || status.code == 403 => {
                ApiFailure::Forbidden(status.message.clone())
            }
            _ if counts_against_the_api(&error) => ApiFailure::Unavailable(Box::new(error)),
            _ => ApiFailure::Other(error),
        }
    }
}

impl ApiFailure {
    fn into_pod_error(self) -> PodError {
        match self {
            ApiFailure::NotFound => PodError::Backend("the API answered 404".into()),
            ApiFailure::Forbidden(message) => PodError::Forbidden(message),
            ApiFailure::Unavailable(cause) => PodError::Unavailable(cause),
            ApiFailure::Other(error) => PodError::Backend(Box::new(error)),
        }
    }
}

fn phase(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Unknown".into())
}

/// Running, with the `Ready` condition true.
fn is_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
    running && ready && pod.metadata.deletion_timestamp.is_none()
}

/// The most recently created pod.
fn newest(pods: impl Iterator<Item = Pod>) -> Option<Pod> {
    pods.max_by_key(|pod| {
        pod.metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second())
    })
}

/// The target's container, or the pod's first; an error when the pod has no such container.
fn container_of(pod: &Pod, target: &KubeTarget) -> Result<String, PodError> {
    let names: Vec<&str> = pod
        .spec
        .as_ref()
        .map(|spec| spec.containers.iter().map(|c| c.name.as_str()).collect())
        .unwrap_or_default();
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    match &target.container {
        Some(wanted) if names.contains(&wanted.as_str()) => Ok(wanted.as_str().to_owned()),
        Some(wanted) => Err(PodError::ContainerNotFound {
            namespace: target.namespace.as_str().to_owned(),
            name: pod_name,
            container: wanted.as_str().to_owned(),
            available: names.join(", "),
        }),
        None => names
            .first()
            .map(|n| (*n).to_owned())
            .ok_or_else(|| PodError::ContainerNotFound {
                namespace: target.namespace.as_str().to_owned(),
                name: pod_name,
                container: "(any)".into(),
                available: String::new(),
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::CircuitState;

    struct NoMetrics;

    impl CircuitMetrics for NoMetrics {
        fn circuit_state(&self, _target: &'static str, _state: CircuitState) {}
    }

    /// With only `ring` compiled in, rustls must still find its crypto provider when the
    /// client builds its TLS connector (a missing provider panics at that point).
    #[tokio::test]
    async fn an_https_kubeconfig_builds_a_client_on_ring() {
        let dir = std::env::temp_dir().join(format!("rdev-kube-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            r#"{"apiVersion": "v1", "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": true}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x"}"#,
        )
        .unwrap();
        let settings = BreakerSettings {
            failure_threshold: 1,
            open_for: std::time::Duration::from_secs(1),
        };
        let source = KubeSource::detect(std::slice::from_ref(&path)).unwrap();
        let connected = KubeApi::connect(&source, settings, Arc::new(NoMetrics)).await;
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(connected.is_ok());
    }

    #[test]
    fn a_request_that_could_not_be_built_does_not_count_against_the_api() {
        let unbuildable = axum::http::Request::builder()
            .uri("http://in valid/")
            .body(())
            .unwrap_err();
        assert!(!counts_against_the_api(&kube::Error::HttpError(
            unbuildable
        )));
        let status = |code| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..Default::default()
            }))
        };
        assert!(counts_against_the_api(&status(503)));
        assert!(counts_against_the_api(&status(429)));
        assert!(!counts_against_the_api(&status(404)));
    }

    #[test]
    fn without_kubeconfig_or_service_account_there_is_no_kubernetes() {
        if !std::path::Path::new("/var/run/secrets/kubernetes.io/serviceaccount/token").exists() {
            assert!(KubeSource::detect(&[]).is_none());
        }
    }
}
