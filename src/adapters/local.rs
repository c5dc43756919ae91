//! The local-process executor: `sh -c <command>` in the project's workdir, in its own process
//! group so that stopping it reaches every child, with a high `oom_score_adj` so the kernel
//! picks a runaway command before the server.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::pipe::pump;
use crate::domain::command::OutputStream;
use crate::ports::{ExecRequest, Execution, Executor, PortError};

/// Pieces of output buffered between the pipes and the consumer; when full, the readers stop
/// reading and the process blocks on its writes.
const PIPE_BACKLOG: usize = 16;
/// How long output is still read after the shell exited, from descendants outside its group.
const PIPE_GRACE_AFTER_EXIT: Duration = Duration::from_secs(2);

#[derive(Debug, Default, Clone, Copy)]
pub struct LocalExecutor;

#[async_trait]
impl Executor for LocalExecutor {
    async fn start(&self, request: ExecRequest) -> Result<Box<dyn Execution>, PortError> {
        // An absolute path and no pre_exec hook let std spawn with posix_spawn (vfork-like)
        // instead of fork + exec, which matters on the submit-to-first-byte path.
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(&request.command)
            .current_dir(&request.workdir)
            .envs(request.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|e| {
            PortError::Conflict(format!("cannot start `sh` in {}: {e}", request.workdir))
        })?;
        let pgid = child
            .id()
            .ok_or_else(|| PortError::backend("child exited before it was seen"))?
            as i32;
        raise_oom_score(pgid);
        let (tx, rx) = mpsc::channel(PIPE_BACKLOG);
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let pumps = [
            tokio::spawn(pump(stdout, OutputStream::Stdout, tx.clone())),
            tokio::spawn(pump(stderr, OutputStream::Stderr, tx)),
        ];
        let exited = Arc::new(AtomicBool::new(false));
        let waiter = tokio::spawn(wait_then_clean_up(child, pgid, exited.clone(), pumps));
        Ok(Box::new(LocalExecution {
            pgid,
            output: rx,
            waiter: Some(waiter),
            exited,
        }))
    }
}

/// Makes the kernel's OOM killer pick this command (and what it starts, which inherits the
/// score) before the server. Raising a score needs no privilege; a child that exits first is
/// fine to miss.
fn raise_oom_score(pid: i32) {
    if let Err(error) = std::fs::write(format!("/proc/{pid}/oom_score_adj"), b"1000") {
        tracing::debug!(pid, %error, "could not raise oom_score_adj");
    }
}

fn signal_group(pgid: i32, signal: libc::c_int) {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    unsafe {
        libc::kill(-pgid, signal);
    }
}

/// Waits for the shell; once it is gone, kills what it left behind in its group so that
/// background children cannot hold the pipes (and the command) open. A descendant that left
/// the group (`setsid`, a daemon) is out of reach: its pipes are abandoned after a grace.
async fn wait_then_clean_up(
    mut child: Child,
    pgid: i32,
    exited: Arc<AtomicBool>,
    pumps: [tokio::task::JoinHandle<()>; 2],
) -> std::io::Result<Option<i32>> {
    let status = child.wait().await;
    exited.store(true, Ordering::Release);
    signal_group(pgid, libc::SIGKILL);
    tokio::spawn(async move {
        tokio::time::sleep(PIPE_GRACE_AFTER_EXIT).await;
        pumps.iter().for_each(tokio::task::JoinHandle::abort);
    });
    status.map(|s| s.code())
}

struct LocalExecution {
    pgid: i32,
    output: mpsc::Receiver<(OutputStream, Bytes)>,
    waiter: Option<tokio::task::JoinHandle<std::io::Result<Option<i32>>>>,
    exited: Arc<AtomicBool>,
}

#[async_trait]
impl Execution for LocalExecution {
    async fn next_output(&mut self) -> Option<(OutputStream, Bytes)> {
        self.output.recv().await
    }

    async fn terminate(&mut self, grace: Duration) {
        if self.exited.load(Ordering::Acquire) {
            return;
        }
        signal_group(self.pgid, libc::SIGTERM);
        let (pgid, exited) = (self.pgid, self.exited.clone());
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if !exited.load(Ordering::Acquire) {
                signal_group(pgid, libc::SIGKILL);
            }
        });
    }

    async fn wait(&mut self) -> Result<Option<i32>, PortError> {
        let waiter = self
            .waiter
            .as_mut()
            .ok_or_else(|| PortError::backend("waited twice"))?;
        // Awaiting the handle by reference keeps it if this future is dropped (cancel-safe).
        let result = waiter.await;
        self.waiter = None;
        result
            .map_err(PortError::backend)?
            .map_err(PortError::backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::CommandId;

    fn request(command: &str) -> ExecRequest {
        ExecRequest {
            command_id: CommandId::new(),
            command: command.into(),
            workdir: "/tmp".into(),
            env: vec![("GREETING".into(), "hi".into())],
            target: None,
        }
    }

    async fn run(command: &str) -> (String, String, Option<i32>) {
        let mut execution = LocalExecutor.start(request(command)).await.unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some((stream, bytes)) = execution.next_output().await {
            match stream {
                OutputStream::Stdout => out.extend_from_slice(&bytes),
                OutputStream::Stderr => err.extend_from_slice(&bytes),
            }
        }
        let code = execution.wait().await.unwrap();
        (
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
            code,
        )
    }

    #[tokio::test]
    async fn runs_in_workdir_with_env_and_reports_exit_code() {
        let (out, err, code) = run("pwd; echo $GREETING; echo oops >&2; exit 3").await;
        assert_eq!(out, "/tmp\nhi\n");
        assert_eq!(err, "oops\n");
        assert_eq!(code, Some(3));
    }

    #[tokio::test]
    async fn terminate_reaches_children_of_the_shell() {
        let mut execution = LocalExecutor
            .start(request("sleep 30 & sleep 30; echo never"))
            .await
            .unwrap();
        execution.terminate(Duration::from_secs(1)).await;
        while execution.next_output().await.is_some() {}
        assert_eq!(execution.wait().await.unwrap(), None);
    }

    #[tokio::test]
    async fn children_are_the_oom_killers_first_choice() {
        // Applied right after the spawn, so a command that allocates for long is covered.
        let (out, _, code) = run("sleep 0.2; cat /proc/self/oom_score_adj").await;
        assert_eq!((out.trim(), code), ("1000", Some(0)));
    }

    #[tokio::test]
    async fn a_daemon_outside_the_group_does_not_hold_the_command() {
        let started = std::time::Instant::now();
        let (out, _, code) = run("setsid sleep 30 & echo detached").await;
        assert_eq!((out.as_str(), code), ("detached\n", Some(0)));
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn a_missing_workdir_fails_to_start() {
        let mut req = request("true");
        req.workdir = "/definitely/not/here".into();
        assert!(LocalExecutor.start(req).await.is_err());
    }
}
