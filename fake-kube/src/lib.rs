//! A Kubernetes API server small enough to read in one sitting, faithful where rdev-api and
//! `kubectl` look: discovery (`/version`, `/api`, `/apis`, `/api/v1`), GET/LIST/DELETE of pods,
//! and `pods/{name}/exec` over WebSocket (`v5.channel.k8s.io`, falling back to `v4`), with
//! commands run as real local processes.
//!
//! What it models of a cluster: pods with labels, containers, phase and readiness; a controller
//! that recreates a deleted pod (a new name for pods made by a "deployment", the same name for
//! a "statefulset" pod); a deleted pod's processes die and its exec streams break without a
//! status; an API that can go down (503) or forbid a namespace (403, as RBAC would). Closing an
//! exec stream leaves the process running, as the kubelet does.
//!
//! Every process an exec starts carries `FAKE_KUBE_ID` and `FAKE_KUBE_POD` in its environment,
//! so [`FakeKube::live_processes`] finds what is still running "in the cluster" from the
//! outside, grandchildren included.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path as UrlPath, RawQuery, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, watch};

/// The Kubernetes version reported at `/version`. kubectl's dispatcher picks the client of the
/// server's minor, and only 1.30+ clients speak exec over WebSocket.
pub const SERVER_MINOR: u32 = 32;
const PROTOCOL_V5: &str = "v5.channel.k8s.io";
const PROTOCOL_V4: &str = "v4.channel.k8s.io";
const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const STATUS: u8 = 3;
const CLOSE: u8 = 255;
/// How long output is still forwarded after the exec'd process exited (a daemon it started may
/// hold the pipes open forever).
const PIPE_GRACE_AFTER_EXIT: Duration = Duration::from_secs(2);

/// Who recreates a pod after it is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    /// Nobody: a deleted pod stays gone.
    None,
    /// A ReplicaSet: the replacement gets a new generated name.
    Deployment,
    /// A StatefulSet: the replacement keeps the name.
    StatefulSet,
}

/// A pod as a test describes it.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub containers: Vec<String>,
    pub phase: String,
    pub ready: bool,
    pub controller: Controller,
    /// How long before now the pod was created (selectors prefer the newest pod).
    pub age: Duration,
}

impl PodSpec {
    /// A Running, Ready pod with one container `main` and no controller.
    pub fn running(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            labels: BTreeMap::new(),
            containers: vec!["main".into()],
            phase: "Running".into(),
            ready: true,
            controller: Controller::None,
            age: Duration::ZERO,
        }
    }

    pub fn age(mut self, age: Duration) -> Self {
        self.age = age;
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn containers(mut self, names: &[&str]) -> Self {
        self.containers = names.iter().map(|n| (*n).to_owned()).collect();
        self
    }

    pub fn ready(mut self, ready: bool) -> Self {
        self.ready = ready;
        self
    }

    pub fn phase(mut self, phase: &str) -> Self {
        self.phase = phase.into();
        self
    }

    pub fn controller(mut self, controller: Controller) -> Self {
        self.controller = controller;
        self
    }
}

struct Pod {
    spec: PodSpec,
    uid: String,
    created: time::OffsetDateTime,
    restarts: u32,
    /// Flipped to `true` when the pod is deleted: its exec streams break.
    deleted: watch::Sender<bool>,
}

impl Pod {
    fn new(spec: PodSpec) -> Self {
        Self {
            created: time::OffsetDateTime::now_utc() - spec.age,
            spec,
            uid: uuid::Uuid::new_v4().to_string(),
            restarts: 0,
            deleted: watch::channel(false).0,
        }
    }

    fn to_json(&self) -> Value {
        let created = rfc3339(self.created);
        let ready = if self.spec.ready { "True" } else { "False" };
        let running = self.spec.phase == "Running";
        json!({
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": {
                "name": self.spec.name,
                "namespace": self.spec.namespace,
                "uid": self.uid,
                "resourceVersion": "1",
                "creationTimestamp": created,
                "labels": self.spec.labels,
            },
            "spec": {
                "nodeName": "fake-node-1",
                "containers": self.spec.containers.iter()
                    .map(|c| json!({"name": c, "image": "debian:stable-slim"}))
                    .collect::<Vec<_>>(),
            },
            "status": {
                "phase": self.spec.phase,
                "startTime": created,
                "conditions": [{"type": "Ready", "status": ready}],
                "containerStatuses": self.spec.containers.iter().map(|c| json!({
                    "name": c,
                    "ready": self.spec.ready,
                    "started": running,
                    "restartCount": self.restarts,
                    "image": "debian:stable-slim",
                    "imageID": "",
                    "state": if running {
                        json!({"running": {"startedAt": created}})
                    } else {
                        json!({"waiting": {"reason": "ContainerCreating"}})
                    },
                })).collect::<Vec<_>>(),
            },
        })
    }
}

fn rfc3339(at: time::OffsetDateTime) -> String {
    at.replace_nanosecond(0)
        .unwrap_or(at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

struct Inner {
    id: String,
    pods: Mutex<BTreeMap<(String, String), Pod>>,
    down: AtomicBool,
    forbidden_namespaces: Mutex<Vec<String>>,
    requests: AtomicU64,
    execs: AtomicU64,
    /// How long a recreated pod takes to become ready.
    ready_delay: Mutex<Duration>,
    /// Execs whose command contains the text are answered 500 this many more times.
    failing_execs: Mutex<Vec<(String, u32)>>,
    failed_execs: AtomicU64,
    /// The longest exec query string seen, in bytes.
    longest_exec_query: AtomicU64,
    address: SocketAddr,
}

/// A running fake API server; it stops, and kills what its execs started, when dropped.
pub struct FakeKube {
    inner: Arc<Inner>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeKube {
    /// Starts the server on a random loopback port.
    pub async fn start() -> FakeKube {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let address = listener.local_addr().expect("bound");
        let inner = Arc::new(Inner {
            id: uuid::Uuid::new_v4().simple().to_string(),
            pods: Mutex::new(BTreeMap::new()),
            down: AtomicBool::new(false),
            forbidden_namespaces: Mutex::new(Vec::new()),
            requests: AtomicU64::new(0),
            execs: AtomicU64::new(0),
            ready_delay: Mutex::new(Duration::from_millis(300)),
            failing_execs: Mutex::new(Vec::new()),
            failed_execs: AtomicU64::new(0),
            longest_exec_query: AtomicU64::new(0),
            address,
        });
        let router = Router::new()
            .route("/version", get(version))
            .route("/api", get(api_versions))
            .route("/apis", get(api_groups))
            .route("/api/v1", get(api_resources))
            .route("/api/v1/namespaces/{namespace}", get(get_namespace))
            .route("/api/v1/namespaces/{namespace}/pods", get(list_pods))
            .route(
                "/api/v1/namespaces/{namespace}/pods/{name}",
                get(get_pod).delete(delete_pod),
            )
            .route(
                "/api/v1/namespaces/{namespace}/pods/{name}/exec",
                get(exec).post(exec),
            )
            .fallback(|request: Request| async move {
                status_response(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!(
                        "the server could not find the requested resource ({} {})",
                        request.method(),
                        request.uri()
                    ),
                )
            })
            .layer(middleware::from_fn_with_state(inner.clone(), gate))
            .with_state(inner.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        FakeKube { inner, server }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.address)
    }

    /// Writes a kubeconfig for this server (plain http, a dummy token) into `dir`.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url()}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "default"}}],
            "current-context": "fake",
        });
        let path = dir.join("kubeconfig");
        std::fs::write(&path, config.to_string()).expect("write kubeconfig");
        path
    }

    pub fn add_pod(&self, spec: PodSpec) {
        let key = (spec.namespace.clone(), spec.name.clone());
        self.inner.pods.lock().unwrap().insert(key, Pod::new(spec));
    }

    pub fn set_ready(&self, namespace: &str, name: &str, ready: bool) {
        if let Some(pod) = self
            .inner
            .pods
            .lock()
            .unwrap()
            .get_mut(&(namespace.into(), name.into()))
        {
            pod.spec.ready = ready;
        }
    }

    /// Deletes a pod as `kubectl delete pod` would: its processes die, its exec streams break,
    /// and its controller (if any) recreates it.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> bool {
        delete(&self.inner, namespace, name).is_some()
    }

    /// Names of the pods in a namespace.
    pub fn pod_names(&self, namespace: &str) -> Vec<String> {
        let pods = self.inner.pods.lock().unwrap();
        pods.keys()
            .filter(|(ns, _)| ns == namespace)
            .map(|(_, name)| name.clone())
            .collect()
    }

    /// While down, every request is answered 503, as an API server behind a failing load
    /// balancer would.
    pub fn set_down(&self, down: bool) {
        self.inner.down.store(down, Ordering::SeqCst);
    }

    /// Every request in `namespace` is answered 403, as RBAC without a RoleBinding would.
    pub fn forbid_namespace(&self, namespace: &str) {
        self.inner
            .forbidden_namespaces
            .lock()
            .unwrap()
            .push(namespace.into());
    }

    /// How long a recreated pod takes to become ready.
    pub fn set_ready_delay(&self, delay: Duration) {
        *self.inner.ready_delay.lock().unwrap() = delay;
    }

    /// The next `times` execs whose command contains `text` are answered 500, as an API server
    /// whose kubelet connection fails would.
    pub fn fail_execs(&self, text: &str, times: u32) {
        self.inner
            .failing_execs
            .lock()
            .unwrap()
            .push((text.to_owned(), times));
    }

    /// The longest exec request query string seen so far, in bytes.
    pub fn longest_exec_query(&self) -> u64 {
        self.inner.longest_exec_query.load(Ordering::SeqCst)
    }

    /// Execs answered 500 by [`FakeKube::fail_execs`] so far.
    pub fn failed_execs(&self) -> u64 {
        self.inner.failed_execs.load(Ordering::SeqCst)
    }

    /// Requests served so far (all paths, refused ones included).
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::SeqCst)
    }

    /// Exec streams opened so far.
    pub fn execs(&self) -> u64 {
        self.inner.execs.load(Ordering::SeqCst)
    }

    /// Processes started by this server's execs that are still alive (zombies count as gone:
    /// PID 1 on these machines does not reap orphans).
    pub fn live_processes(&self) -> Vec<u32> {
        processes_with_marker(&format!("FAKE_KUBE_ID={}", self.inner.id))
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.server.abort();
        for pid in self.live_processes() {
            // SAFETY: kill(2) on a pid found in /proc; no memory is involved.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
    }
}

/// Pids of live, non-zombie processes whose environment holds `marker` (`NAME=value`).
fn processes_with_marker(marker: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if !environ
            .split(|b| *b == 0)
            .any(|var| var == marker.as_bytes())
        {
            continue;
        }
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(") ")
                    .map(|(_, rest)| rest.starts_with('Z'))
            })
            .unwrap_or(true);
        if !zombie {
            found.push(pid);
        }
    }
    found
}

fn delete(inner: &Arc<Inner>, namespace: &str, name: &str) -> Option<Value> {
    let key = (namespace.to_owned(), name.to_owned());
    let pod = inner.pods.lock().unwrap().remove(&key)?;
    let _ = pod.deleted.send(true);
    for pid in processes_with_marker(&format!("FAKE_KUBE_POD={}", pod.uid)) {
        // SAFETY: kill(2) on a pid found in /proc; no memory is involved.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
    let body = pod.to_json();
    let replacement = match pod.spec.controller {
        Controller::None => None,
        Controller::StatefulSet => Some(pod.spec.clone()),
        Controller::Deployment => {
            let base = pod
                .spec
                .name
                .rsplit_once('-')
                .map_or(pod.spec.name.as_str(), |(b, _)| b);
            let suffix = &uuid::Uuid::new_v4().simple().to_string()[..5];
            Some(PodSpec {
                name: format!("{base}-{suffix}"),
                ..pod.spec.clone()
            })
        }
    };
    if let Some(spec) = replacement {
        let delay = *inner.ready_delay.lock().unwrap();
        let key = (spec.namespace.clone(), spec.name.clone());
        let mut pod = Pod::new(PodSpec {
            ready: false,
            phase: "Pending".into(),
            age: Duration::ZERO,
            ..spec
        });
        pod.restarts = 0;
        inner.pods.lock().unwrap().insert(key.clone(), pod);
        let inner = inner.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Some(pod) = inner.pods.lock().unwrap().get_mut(&key) {
                pod.spec.phase = "Running".into();
                pod.spec.ready = true;
            }
        });
    }
    Some(body)
}

/// Counts requests, answers 503 while down and 403 in forbidden namespaces.
async fn gate(State(inner): State<Arc<Inner>>, request: Request, next: Next) -> Response {
    inner.requests.fetch_add(1, Ordering::SeqCst);
    if inner.down.load(Ordering::SeqCst) {
        return status_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the API server is shutting down or overloaded",
        );
    }
    let path = request.uri().path().to_owned();
    let forbidden = inner
        .forbidden_namespaces
        .lock()
        .unwrap()
        .iter()
        .find(|ns| path.starts_with(&format!("/api/v1/namespaces/{ns}/")))
        .cloned();
    if let Some(namespace) = forbidden {
        return status_response(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!(
                "pods is forbidden: User \"system:serviceaccount:rdev:rdev-api\" cannot access resource \"pods\" in API group \"\" in the namespace \"{namespace}\""
            ),
        );
    }
    next.run(request).await
}

fn status_json(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

fn status_response(code: StatusCode, reason: &str, message: &str) -> Response {
    (code, axum::Json(status_json(code, reason, message))).into_response()
}

fn pod_not_found(name: &str) -> Response {
    status_response(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("pods \"{name}\" not found"),
    )
}

async fn version() -> axum::Json<Value> {
    axum::Json(json!({
        "major": "1",
        "minor": SERVER_MINOR.to_string(),
        "gitVersion": format!("v1.{SERVER_MINOR}.4"),
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.23.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    }))
}

async fn api_versions(State(inner): State<Arc<Inner>>) -> axum::Json<Value> {
    axum::Json(json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": inner.address.to_string()}],
    }))
}

async fn api_groups() -> axum::Json<Value> {
    axum::Json(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}))
}

async fn api_resources() -> axum::Json<Value> {
    let resource = |name: &str, kind: &str, namespaced: bool, verbs: &[&str]| json!({"name": name, "singularName": "", "namespaced": namespaced, "kind": kind, "verbs": verbs});
    axum::Json(json!({
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            resource("namespaces", "Namespace", false, &["get", "list"]),
            resource("pods", "Pod", true, &["delete", "get", "list"]),
            resource("pods/exec", "PodExecOptions", true, &["create", "get"]),
        ],
    }))
}

/// Query pairs, tolerating the empty pair kube-rs sends (`?&command=...`).
fn query_pairs(raw: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Equality-based selectors: `k=v`, `k==v`, `k!=v`, and `k` / `!k` for existence.
fn selector_matches(selector: &str, labels: &BTreeMap<String, String>) -> bool {
    selector
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .all(|part| {
            if let Some((key, value)) = part.split_once("!=") {
                labels.get(key.trim()).map(String::as_str) != Some(value.trim())
            } else if let Some((key, value)) =
                part.split_once("==").or_else(|| part.split_once('='))
            {
                labels.get(key.trim()).map(String::as_str) == Some(value.trim())
            } else if let Some(key) = part.strip_prefix('!') {
                !labels.contains_key(key)
            } else {
                labels.contains_key(part)
            }
        })
}

async fn list_pods(
    State(inner): State<Arc<Inner>>,
    UrlPath(namespace): UrlPath<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let selector = query_pairs(query.as_deref())
        .into_iter()
        .find(|(k, _)| k == "labelSelector")
        .map(|(_, v)| v)
        .unwrap_or_default();
    let pods = inner.pods.lock().unwrap();
    let items: Vec<Value> = pods
        .iter()
        .filter(|((ns, _), pod)| *ns == namespace && selector_matches(&selector, &pod.spec.labels))
        .map(|(_, pod)| pod.to_json())
        .collect();
    axum::Json(json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": "1"},
        "items": items,
    }))
    .into_response()
}

/// Every namespace exists (kubectl asks after a pod was not found, to word its message).
async fn get_namespace(UrlPath(namespace): UrlPath<String>) -> axum::Json<Value> {
    axum::Json(json!({
        "kind": "Namespace",
        "apiVersion": "v1",
        "metadata": {"name": namespace},
        "status": {"phase": "Active"},
    }))
}

async fn get_pod(
    State(inner): State<Arc<Inner>>,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
) -> Response {
    let pods = inner.pods.lock().unwrap();
    match pods.get(&(namespace, name.clone())) {
        Some(pod) => axum::Json(pod.to_json()).into_response(),
        None => pod_not_found(&name),
    }
}

async fn delete_pod(
    State(inner): State<Arc<Inner>>,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
) -> Response {
    match delete(&inner, &namespace, &name) {
        Some(body) => axum::Json(body).into_response(),
        None => pod_not_found(&name),
    }
}

/// What an exec asked for, from its query.
struct ExecOptions {
    command: Vec<String>,
    container: Option<String>,
    stdin: bool,
    stdout: bool,
    stderr: bool,
}

impl ExecOptions {
    fn parse(query: Option<&str>) -> Self {
        let mut options = ExecOptions {
            command: Vec::new(),
            container: None,
            stdin: false,
            stdout: false,
            stderr: false,
        };
        for (key, value) in query_pairs(query) {
            match key.as_str() {
                "command" => options.command.push(value),
                "container" => options.container = Some(value),
                "stdin" => options.stdin = value == "true" || value == "1",
                "stdout" => options.stdout = value == "true" || value == "1",
                "stderr" => options.stderr = value == "true" || value == "1",
                _ => {}
            }
        }
        options
    }
}

async fn exec(
    State(inner): State<Arc<Inner>>,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
    RawQuery(query): RawQuery,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let query_len = query.as_deref().map_or(0, str::len) as u64;
    inner
        .longest_exec_query
        .fetch_max(query_len, Ordering::SeqCst);
    let options = ExecOptions::parse(query.as_deref());
    let (uid, deleted, default_container, containers, running) = {
        let pods = inner.pods.lock().unwrap();
        let Some(pod) = pods.get(&(namespace.clone(), name.clone())) else {
            return pod_not_found(&name);
        };
        (
            pod.uid.clone(),
            pod.deleted.subscribe(),
            pod.spec.containers.first().cloned().unwrap_or_default(),
            pod.spec.containers.clone(),
            pod.spec.phase == "Running",
        )
    };
    let container = options.container.clone().unwrap_or(default_container);
    if !containers.contains(&container) {
        return status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("container {container} is not valid for pod {name}"),
        );
    }
    if !running {
        return status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("unable to upgrade connection: container not found (\"{container}\")"),
        );
    }
    if options.command.is_empty() {
        return status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "you must specify at least 1 command",
        );
    }
    if take_failure(&inner, &options.command.join(" ")) {
        return status_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "error dialing backend: the kubelet did not answer (fake-kube)",
        );
    }
    // Without a WebSocket upgrade (SPDY clients POST with `Upgrade: SPDY/3.1`) the request is
    // refused, which makes kubectl report the failed upgrade instead of hanging.
    let Ok(upgrade) = upgrade else {
        return status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "Upgrade request required (this fake speaks WebSocket only)",
        );
    };
    let upgrade = upgrade.protocols([PROTOCOL_V5, PROTOCOL_V4]);
    if upgrade.selected_protocol().is_none() {
        return status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "no supported subprotocol: offer v5.channel.k8s.io or v4.channel.k8s.io",
        );
    }
    inner.execs.fetch_add(1, Ordering::SeqCst);
    let env = vec![
        (
            "PATH".to_owned(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
        ),
        ("HOME".to_owned(), "/root".to_owned()),
        ("HOSTNAME".to_owned(), name.clone()),
        ("FAKE_KUBE_ID".to_owned(), inner.id.clone()),
        ("FAKE_KUBE_POD".to_owned(), uid),
    ];
    upgrade.on_upgrade(move |socket| run_exec(socket, options, env, deleted))
}

/// Whether an exec of `command` is to fail now (see [`FakeKube::fail_execs`]).
fn take_failure(inner: &Inner, command: &str) -> bool {
    let mut failing = inner.failing_execs.lock().unwrap();
    match failing
        .iter_mut()
        .find(|(text, times)| *times > 0 && command.contains(text.as_str()))
    {
        Some((_, times)) => {
            *times -= 1;
            inner.failed_execs.fetch_add(1, Ordering::SeqCst);
            true
        }
        None => false,
    }
}

/// A close frame with status 1000: kubectl reads a close without a code (1005) as an error.
fn normal_close() -> Message {
    Message::Close(Some(axum::extract::ws::CloseFrame {
        code: axum::extract::ws::close_code::NORMAL,
        reason: "".into(),
    }))
}

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut bytes = Vec::with_capacity(data.len() + 1);
    bytes.push(channel);
    bytes.extend_from_slice(data);
    Message::Binary(Bytes::from(bytes))
}

fn exit_status(code: i32, command: &[String]) -> Value {
    if code == 0 {
        json!({"metadata": {}, "status": "Success"})
    } else {
        json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("command terminated with non-zero exit code: error executing command {command:?}, exit code {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        })
    }
}

async fn pump(mut pipe: impl AsyncRead + Unpin, channel: u8, tx: mpsc::Sender<Message>) {
    let mut buffer = vec![0u8; 32 * 1024];
    loop {
        match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                // The client may be gone: the process keeps running and its output is dropped.
                let _ = tx.send(frame(channel, &buffer[..n])).await;
            }
        }
    }
}

async fn run_exec(
    socket: WebSocket,
    options: ExecOptions,
    env: Vec<(String, String)>,
    mut deleted: watch::Receiver<bool>,
) {
    let (mut sender, mut receiver) = socket.split();
    let mut command = tokio::process::Command::new(&options.command[0]);
    command
        .args(&options.command[1..])
        .env_clear()
        .envs(env)
        .current_dir("/")
        .stdin(if options.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(if options.stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(if options.stderr {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        // Its own group, as in a container: nothing it does can signal the server's group.
        .process_group(0);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            let status = json!({
                "metadata": {},
                "status": "Failure",
                "message": format!("failed to exec in container: starting container process caused: exec: {:?}: {error}", options.command[0]),
                "reason": "InternalError",
                "code": 500,
            });
            let _ = sender
                .send(frame(STATUS, status.to_string().as_bytes()))
                .await;
            let _ = sender.send(normal_close()).await;
            return;
        }
    };
    let (tx, mut rx) = mpsc::channel::<Message>(16);
    let mut pumps = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        pumps.push(tokio::spawn(pump(stdout, STDOUT, tx.clone())));
    }
    if let Some(stderr) = child.stderr.take() {
        pumps.push(tokio::spawn(pump(stderr, STDERR, tx.clone())));
    }
    drop(tx);
    let mut stdin = child.stdin.take();
    // Reading drives the WebSocket's automatic answers to pings; stdin frames go to the process.
    let reader = tokio::spawn(async move {
        while let Some(Ok(message)) = receiver.next().await {
            if let Message::Binary(data) = message {
                match data.first() {
                    Some(&STDIN) => {
                        if let Some(pipe) = stdin.as_mut() {
                            let _ = tokio::io::AsyncWriteExt::write_all(pipe, &data[1..]).await;
                        }
                    }
                    Some(&CLOSE) if data.get(1) == Some(&STDIN) => stdin = None,
                    _ => {}
                }
            }
        }
    });
    let mut exited: Option<i32> = None;
    let mut output_open = true;
    let mut grace = Box::pin(tokio::time::sleep(Duration::from_secs(365 * 24 * 3600)));
    loop {
        tokio::select! {
            message = rx.recv(), if output_open => match message {
                Some(message) => {
                    if sender.send(message).await.is_err() {
                        // The client left; the process goes on, as in a cluster.
                    }
                }
                None => output_open = false,
            },
            status = child.wait(), if exited.is_none() => {
                use std::os::unix::process::ExitStatusExt;
                let status = status.ok();
                exited = Some(status.map_or(1, |s| s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))));
                grace.as_mut().reset(tokio::time::Instant::now() + PIPE_GRACE_AFTER_EXIT);
            }
            _ = &mut grace, if exited.is_some() && output_open => output_open = false,
            changed = deleted.changed() => {
                if changed.is_err() || *deleted.borrow() {
                    // The pod is gone: the stream breaks without a status, as when the node
                    // or the kubelet drops it.
                    reader.abort();
                    pumps.iter().for_each(tokio::task::JoinHandle::abort);
                    return;
                }
            }
        }
        if let (Some(code), false) = (exited, output_open) {
            let status = exit_status(code, &options.command);
            let _ = sender
                .send(frame(STATUS, status.to_string().as_bytes()))
                .await;
            let _ = sender.send(normal_close()).await;
            break;
        }
    }
    pumps.iter().for_each(tokio::task::JoinHandle::abort);
    reader.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_match_equalities_and_existence() {
        let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
        assert!(selector_matches("app=web", &labels));
        assert!(selector_matches("app==web", &labels));
        assert!(!selector_matches("app!=web", &labels));
        assert!(selector_matches("app", &labels));
        assert!(!selector_matches("app=db", &labels));
        assert!(selector_matches("", &labels));
    }

    #[test]
    fn queries_tolerate_the_empty_pair() {
        let options =
            ExecOptions::parse(Some("&command=sh&command=-c&command=echo%20hi&stdout=true"));
        assert_eq!(options.command, ["sh", "-c", "echo hi"]);
        assert!(options.stdout && !options.stderr);
    }
}
