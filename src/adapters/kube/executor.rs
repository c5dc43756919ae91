//! The pod executor: `sh -c` in the target container over `pods/exec`, the command in its own
//! process group (see [`super::script`]), stdout and stderr streamed as they arrive, the exit
//! code read from the status channel. Stopping it is a second exec that signals the group; a
//! stop that fails (the API down, its breaker open, a 5xx, a timeout) is tried again with
//! backoff until the group is gone, the command ends, or the worker gives the command up.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Status;
use kube::api::AttachedProcess;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{KubeApi, container_of, script};
use crate::adapters::pipe::pump;
use crate::domain::command::OutputStream;
use crate::ports::{ExecRequest, Execution, Executor, PodError, PortError};
use crate::resilience::Backoff;

const OUTPUT_BACKLOG: usize = 16;
/// The group id line is a number; anything longer is not it.
const MAX_GROUP_LINE: usize = 32;
/// How long a failed start may take to deliver its stderr and status.
const START_FAILURE_DRAIN: Duration = Duration::from_secs(5);
/// How long the stopping exec may run beyond the grace period.
const STOP_SLACK: Duration = Duration::from_secs(30);
/// How long output already on its way is still read after the stream broke.
const BROKEN_STREAM_DRAIN: Duration = Duration::from_millis(200);
/// The grace used when a broken stream leaves a command orphaned in its pod.
const ORPHAN_GRACE: Duration = Duration::from_secs(5);
/// How long an orphan's group is tried to be stopped; nobody waits for it.
const ORPHAN_STOP_FOR: Duration = Duration::from_secs(120);
/// Waits between stopping execs that failed.
const STOP_RETRY: Backoff = Backoff {
    first: Duration::from_millis(500),
    max: Duration::from_secs(10),
};

pub struct KubeExecutor {
    api: KubeApi,
}

impl KubeExecutor {
    pub fn new(api: KubeApi) -> Self {
        Self { api }
    }
}

/// A start failure as the worker records it: the breaker or an unreachable API is
/// `Unavailable`; a missing or unready pod or container is `Refused`, with a clear message.
fn start_error(error: PodError) -> PortError {
    match error {
        PodError::Unavailable(_) => PortError::Unavailable(Box::new(error)),
        PodError::Backend(_) => PortError::Backend(Box::new(error)),
        PodError::PodNotFound { .. }
        | PodError::NoPodMatches { .. }
        | PodError::NotReady { .. }
        | PodError::NoReadyPod { .. }
        | PodError::ContainerNotFound { .. }
        | PodError::RestartTimedOut { .. }
        | PodError::Forbidden(_) => PortError::Refused(Box::new(error)),
    }
}

#[async_trait]
impl Executor for KubeExecutor {
    async fn start(&self, request: ExecRequest) -> Result<Box<dyn Execution>, PortError> {
        let target = request
            .target
            .as_ref()
            .ok_or_else(|| PortError::Refused("a kube project needs a target".into()))?;
        let pod = self.api.usable_pod(target).await.map_err(start_error)?;
        let container = container_of(&pod, target).map_err(start_error)?;
        let namespace = target.namespace.as_str().to_owned();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone();
        let script = script::start(&request.command, &request.workdir, &request.env);
        // A long script goes through stdin: in the query string it could outgrow what a proxy
        // in front of the API server takes.
        let inline = script.len() <= script::MAX_INLINE_SCRIPT;
        let shell = if inline {
            script.clone()
        } else {
            script::from_stdin(script.len())
        };
        let argv = vec!["sh".to_owned(), "-c".to_owned(), shell];
        let mut process = self
            .api
            .exec(&namespace, &name, &container, argv, !inline)
            .await
            .map_err(start_error)?;
        if !inline {
            let mut stdin = process.stdin().expect("exec asked for stdin");
            let written = async {
                stdin.write_all(script.as_bytes()).await?;
                stdin.shutdown().await
            };
            written
                .await
                .map_err(|e| PortError::Unavailable(Box::new(e)))?;
        }
        let stdout = process.stdout().expect("exec asked for stdout");
        let stderr = process.stderr().expect("exec asked for stderr");
        let mut status: StatusFuture = Box::pin(process.take_status().expect("status taken once"));
        let (tx, mut output) = mpsc::channel(OUTPUT_BACKLOG);
        let (group_tx, group_rx) = oneshot::channel();
        tokio::spawn(pump_stdout(stdout, tx.clone(), group_tx));
        tokio::spawn(pump(stderr, OutputStream::Stderr, tx));
        let group = RemoteGroup {
            api: self.api.clone(),
            namespace,
            pod: name,
            container,
            uid,
        };
        let Ok(pgid) = group_rx.await else {
            return Err(start_failure(&group, &mut output, &mut status, &request.workdir).await);
        };
        tracing::debug!(command = %request.command_id, pod = %group.pod, pgid, "command started in pod");
        Ok(Box::new(KubeExecution {
            output,
            status: Some(status),
            exit: None,
            _process: process,
            group: Arc::new(group),
            pgid,
            stopping: StopControl::default(),
            terminated: false,
        }))
    }
}

type StatusFuture = Pin<Box<dyn Future<Output = Option<Status>> + Send>>;

/// The start script ended before reporting the group: `cd` or `setsid` failed. Its stderr
/// says why.
async fn start_failure(
    group: &RemoteGroup,
    output: &mut mpsc::Receiver<(OutputStream, Bytes)>,
    status: &mut StatusFuture,
    workdir: &str,
) -> PortError {
    let mut stderr = Vec::new();
    let _ = tokio::time::timeout(START_FAILURE_DRAIN, async {
        while let Some((stream, bytes)) = output.recv().await {
            if stream == OutputStream::Stderr && stderr.len() < 4096 {
                stderr.extend_from_slice(&bytes);
            }
        }
    })
    .await;
    let code = tokio::time::timeout(START_FAILURE_DRAIN, status.as_mut())
        .await
        .ok()
        .flatten()
        .and_then(|s| exit_code(&s).ok().flatten());
    let stderr = String::from_utf8_lossy(&stderr);
    PortError::Refused(
        format!(
            "cannot start `sh` in {workdir} in pod {}/{} (exit {}): {}",
            group.namespace,
            group.pod,
            code.map_or_else(|| "unknown".to_owned(), |c| c.to_string()),
            stderr.trim()
        )
        .into(),
    )
}

/// The exit code in an exec's final `Status`: `Success` is 0; `NonZeroExitCode` carries the
/// code as an `ExitCode` cause. Any other failure is the API's, not the command's.
fn exit_code(status: &Status) -> Result<Option<i32>, String> {
    if status.status.as_deref() == Some("Success") {
        return Ok(Some(0));
    }
    if status.reason.as_deref() == Some("NonZeroExitCode") {
        let code = status
            .details
            .as_ref()
            .and_then(|d| d.causes.as_ref())
            .and_then(|causes| {
                causes
                    .iter()
                    .find(|c| c.reason.as_deref() == Some("ExitCode"))
            })
            .and_then(|c| c.message.as_deref())
            .and_then(|m| m.trim().parse::<i32>().ok());
        return code
            .map(Some)
            .ok_or_else(|| "a non-zero exit status without an exit code".to_owned());
    }
    Err(status
        .message
        .clone()
        .unwrap_or_else(|| "the exec failed without a message".to_owned()))
}

/// Reads stdout, taking the first line as the command's process group id; the rest is output.
async fn pump_stdout(
    mut pipe: impl AsyncRead + Unpin,
    tx: mpsc::Sender<(OutputStream, Bytes)>,
    group: oneshot::Sender<i32>,
) {
    let mut line = BytesMut::with_capacity(MAX_GROUP_LINE);
    loop {
        match pipe.read_buf(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if let Some(end) = line.iter().position(|b| *b == b'\n') {
            let rest = line.split_off(end + 1);
            let Some(pgid) = std::str::from_utf8(&line[..end])
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
                .filter(|pgid| *pgid > 1)
            else {
                return;
            };
            let _ = group.send(pgid);
            if !rest.is_empty()
                && tx
                    .send((OutputStream::Stdout, rest.freeze()))
                    .await
                    .is_err()
            {
                return;
            }
            break;
        }
        if line.len() > MAX_GROUP_LINE {
            return;
        }
    }
    pump(pipe, OutputStream::Stdout, tx).await;
}

/// Where a command runs: enough to reach its process group again.
struct RemoteGroup {
    api: KubeApi,
    namespace: String,
    pod: String,
    container: String,
    uid: Option<String>,
}

/// What a stop in progress shares with its execution.
#[derive(Clone, Default)]
struct StopControl {
    /// Set once the exit status arrived: nothing is left to stop.
    finished: Arc<AtomicBool>,
    /// A repeated cancel: try again now instead of after the backoff.
    again: Arc<Notify>,
    /// The worker gave the command up (the execution was dropped): stop trying.
    abandoned: CancellationToken,
    /// Why the last try failed, for the command's record if the worker gives up.
    last_error: Arc<Mutex<Option<String>>>,
}

impl RemoteGroup {
    /// TERM, then KILL after `grace`, then a check that nothing of the group is left; all in
    /// one exec so that a flapping API cannot leave it half done.
    async fn stop_once(&self, pgid: i32, grace: Duration) -> Result<(), String> {
        let argv = vec!["sh".to_owned(), "-c".to_owned(), script::stop(pgid, grace)];
        let stopped = tokio::time::timeout(grace + STOP_SLACK, async {
            let mut process = self
                .api
                .exec(&self.namespace, &self.pod, &self.container, argv, false)
                .await
                .map_err(|e| e.to_string())?;
            let status = process.take_status().expect("status taken once");
            let mut stderr = process.stderr().expect("exec asked for stderr");
            let mut message = String::new();
            let _ = stderr.read_to_string(&mut message).await;
            match status.await {
                Some(status) if exit_code(&status) == Ok(Some(0)) => Ok(()),
                Some(_) => Err(message.trim().to_owned()),
                None => Err("the stopping exec ended without a status".to_owned()),
            }
        })
        .await;
        stopped.unwrap_or_else(|_| Err("the stopping exec timed out".to_owned()))
    }

    /// Stops the group, trying again with backoff until it is confirmed gone, the command ends
    /// by itself, or `control` says nobody waits any more.
    async fn stop(self: Arc<Self>, pgid: i32, grace: Duration, control: StopControl) {
        let mut failures = 0;
        while !control.finished.load(Ordering::Acquire) {
            match self.stop_once(pgid, grace).await {
                Ok(()) => {
                    tracing::info!(pod = %self.pod, pgid, "remote process group stopped");
                    return;
                }
                Err(error) => {
                    failures += 1;
                    let wait = STOP_RETRY.delay(failures);
                    tracing::warn!(pod = %self.pod, pgid, %error, retry_in = ?wait, "stopping the remote process group failed");
                    *control.last_error.lock().expect("never poisoned") = Some(error);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = control.again.notified() => {}
                        _ = control.abandoned.cancelled() => return,
                    }
                }
            }
        }
    }

    /// Why the stream ended without a status: the pod was deleted or replaced, or the
    /// connection broke (then the command may still run and is stopped).
    async fn lost(self: &Arc<Self>, pgid: i32) -> PortError {
        let message = match self.api.get_pod(&self.namespace, &self.pod).await {
            Ok(pod) if pod.metadata.uid == self.uid => {
                let control = StopControl::default();
                let give_up = control.abandoned.clone();
                tokio::spawn(self.clone().stop(pgid, ORPHAN_GRACE, control));
                tokio::spawn(async move {
                    tokio::time::sleep(ORPHAN_STOP_FOR).await;
                    give_up.cancel();
                });
                format!(
                    "the exec stream to pod {}/{} broke without an exit status; the command's end is unknown and its process group is being stopped",
                    self.namespace, self.pod
                )
            }
            Ok(_) | Err(PodError::PodNotFound { .. }) => format!(
                "pod {}/{} was deleted while the command ran",
                self.namespace, self.pod
            ),
            Err(error) => format!(
                "the exec stream to pod {}/{} broke and the pod cannot be checked: {error}",
                self.namespace, self.pod
            ),
        };
        PortError::Unavailable(message.into())
    }
}

struct KubeExecution {
    output: mpsc::Receiver<(OutputStream, Bytes)>,
    status: Option<StatusFuture>,
    /// The status once it resolved while output was read: `Some(None)` when the stream broke.
    exit: Option<Option<Status>>,
    /// Owns the stream; dropping it closes the connection.
    _process: AttachedProcess,
    group: Arc<RemoteGroup>,
    pgid: i32,
    stopping: StopControl,
    terminated: bool,
}

impl Drop for KubeExecution {
    fn drop(&mut self) {
        self.stopping.abandoned.cancel();
    }
}

#[async_trait]
impl Execution for KubeExecution {
    async fn next_output(&mut self) -> Option<(OutputStream, Bytes)> {
        loop {
            match &self.exit {
                // After a status, kube-rs closes the pipes: read them to the end.
                Some(Some(_)) => return self.output.recv().await,
                // A broken stream may leave the pipes open forever: take what is buffered.
                Some(None) => {
                    return tokio::time::timeout(BROKEN_STREAM_DRAIN, self.output.recv())
                        .await
                        .ok()
                        .flatten();
                }
                None => {}
            }
            let status = self.status.as_mut()?;
            tokio::select! {
                biased;
                item = self.output.recv() => return item,
                exit = status.as_mut() => {
                    self.status = None;
                    self.exit = Some(exit);
                }
            }
        }
    }

    async fn terminate(&mut self, grace: Duration) {
        if self.stopping.finished.load(Ordering::Acquire) {
            return;
        }
        if self.terminated {
            self.stopping.again.notify_one();
            return;
        }
        self.terminated = true;
        tokio::spawn(
            self.group
                .clone()
                .stop(self.pgid, grace, self.stopping.clone()),
        );
    }

    fn stop_error(&self) -> Option<String> {
        self.stopping
            .last_error
            .lock()
            .expect("never poisoned")
            .clone()
    }

    async fn wait(&mut self) -> Result<Option<i32>, PortError> {
        let status = match (self.exit.take(), self.status.as_mut()) {
            (Some(exit), _) => exit,
            // Polling the boxed future by reference keeps it if this future is dropped.
            (None, Some(status)) => status.as_mut().await,
            (None, None) => return Err(PortError::backend("waited twice")),
        };
        self.status = None;
        self.stopping.finished.store(true, Ordering::Release);
        match status {
            Some(status) => {
                let code = exit_code(&status).map_err(PortError::backend)?;
                // Killed by our SIGTERM or SIGKILL: reported as a signal, like a local process.
                let signalled = matches!(code, Some(code) if code == 128 + libc::SIGTERM || code == 128 + libc::SIGKILL);
                Ok(if self.terminated && signalled {
                    None
                } else {
                    code
                })
            }
            None => Err(self.group.lost(self.pgid).await),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{StatusCause, StatusDetails};

    fn failure(reason: &str, exit: Option<&str>) -> Status {
        Status {
            status: Some("Failure".into()),
            reason: Some(reason.into()),
            message: Some("boom".into()),
            details: exit.map(|code| StatusDetails {
                causes: Some(vec![StatusCause {
                    reason: Some("ExitCode".into()),
                    message: Some(code.into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn exit_codes_come_from_the_status_channel() {
        let success = Status {
            status: Some("Success".into()),
            ..Default::default()
        };
        assert_eq!(exit_code(&success), Ok(Some(0)));
        assert_eq!(
            exit_code(&failure("NonZeroExitCode", Some("3"))),
            Ok(Some(3))
        );
        assert!(exit_code(&failure("NonZeroExitCode", None)).is_err());
        assert_eq!(
            exit_code(&failure("InternalError", None)),
            Err("boom".into())
        );
    }

    #[tokio::test]
    async fn the_first_stdout_line_is_the_group_and_the_rest_is_output() {
        let (tx, mut rx) = mpsc::channel(4);
        let (group_tx, group_rx) = oneshot::channel();
        let input: &[u8] = b"4242\nhello\n";
        pump_stdout(input, tx, group_tx).await;
        assert_eq!(group_rx.await.unwrap(), 4242);
        let (stream, bytes) = rx.recv().await.unwrap();
        assert_eq!(
            (stream, &bytes[..]),
            (OutputStream::Stdout, &b"hello\n"[..])
        );
    }

    #[tokio::test]
    async fn a_stream_without_the_group_line_reports_no_group() {
        let (tx, _rx) = mpsc::channel(4);
        let (group_tx, group_rx) = oneshot::channel();
        let input: &[u8] = b"";
        pump_stdout(input, tx, group_tx).await;
        assert!(group_rx.await.is_err());
    }
}
