//! The local-process executor: `sh -c <command>` in the project's workdir, in its own process
//! group so that stopping it reaches every child, with a high `oom_score_adj` so the kernel
//! picks a runaway command before the server.
//!
//! A command gets only what it is given: a cleared environment with the project's and the
//! command's variables on top of a small fixed base ([`BASE_ENV`]), never the server's own
//! (`RDEV_*`, `DATABASE_URL`, `OTEL_*`, `KUBECONFIG`). With [`RunAs`] it runs as another,
//! unprivileged user (its uid and gid, no supplementary groups), which keeps it away from the
//! database file and the server's `/proc/<pid>/environ`. That is a separate uid, not a sandbox:
//! the command still sees the filesystem and network that user may see.

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

/// `sh` could not be started (a missing or unreadable working directory, most often).
#[derive(Debug, thiserror::Error)]
#[error("cannot start `sh` in {workdir}")]
struct SpawnFailed {
    workdir: String,
    #[source]
    cause: std::io::Error,
}

/// The variables every command starts with (the project's and the command's come on top).
pub const BASE_ENV: [(&str, &str); 3] = [
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("LANG", "C.UTF-8"),
    ("TERM", "dumb"),
];

/// An unprivileged user commands run as (`RDEV_LOCAL_RUN_AS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

#[derive(Debug, thiserror::Error)]
#[error("no user `{0}` on this system (RDEV_LOCAL_RUN_AS)")]
pub struct UnknownUser(String);

impl RunAs {
    /// Looks the user up in the system's user database.
    pub fn lookup(name: &str) -> Result<Self, UnknownUser> {
        let unknown = || UnknownUser(name.to_owned());
        let c_name = std::ffi::CString::new(name).map_err(|_| unknown())?;
        // SAFETY: passwd is a plain C struct of integers and pointers; all-zero is a valid value.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buffer: Vec<libc::c_char> = vec![0; 16 * 1024];
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: getpwnam_r writes only into `entry` and `buffer`, whose sizes it is given, and
        // sets `found` to `&entry` or null; the strings read below point into `buffer`.
        let status = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                &mut entry,
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut found,
            )
        };
        if status != 0 || found.is_null() {
            return Err(unknown());
        }
        // SAFETY: on success pw_dir is a NUL-terminated string inside `buffer`.
        let home = unsafe { std::ffi::CStr::from_ptr(entry.pw_dir) }
            .to_string_lossy()
            .into_owned();
        Ok(Self {
            name: name.to_owned(),
            uid: entry.pw_uid,
            gid: entry.pw_gid,
            home,
        })
    }
}

#[derive(Debug, Default, Clone)]
pub struct LocalExecutor {
    run_as: Option<RunAs>,
}

impl LocalExecutor {
    pub fn new(run_as: Option<RunAs>) -> Self {
        Self { run_as }
    }

    /// `HOME` for commands: the run-as user's, else the server's own.
    fn home(&self) -> String {
        match &self.run_as {
            Some(user) => user.home.clone(),
            None => std::env::var("HOME").unwrap_or_else(|_| "/".into()),
        }
    }
}

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
            .env_clear()
            .envs(BASE_ENV)
            .env("HOME", self.home())
            .envs(request.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(user) = &self.run_as {
            // std drops the supplementary groups when a root parent sets the uid.
            command.uid(user.uid).gid(user.gid);
        }
        let mut child = command.spawn().map_err(|cause| {
            PortError::Refused(Box::new(SpawnFailed {
                workdir: request.workdir.clone(),
                cause,
            }))
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

/// A process as `/proc/PID/stat` shows it: its parent, and its start time (clock ticks since
/// boot), which tells a process from a later one that reuses its pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcStat {
    pid: i32,
    ppid: i32,
    started: u64,
}

impl ProcStat {
    fn read(pid: i32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may hold spaces and parentheses: fields start after the last ')'.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        Some(Self {
            pid,
            ppid: fields.get(1)?.parse().ok()?,
            started: fields.get(19)?.parse().ok()?,
        })
    }
}

/// Every live descendant of `root` (children, theirs, ...), found by parent links in `/proc`, so
/// that processes which left the command's process group or session (`setsid`, `setpgid`, as
/// `timeout` and `set -m` do) are found too.
fn descendants(root: i32) -> Vec<ProcStat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    let all: Vec<ProcStat> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter_map(ProcStat::read)
        .collect();
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for process in all.iter().filter(|p| p.ppid == parent) {
            found.push(*process);
            frontier.push(process.pid);
        }
    }
    found
}

/// Signals every process that was a descendant when the stop began (unless its pid now belongs
/// to another process).
fn signal_tree(tree: &[ProcStat], signal: libc::c_int) {
    for process in tree {
        if ProcStat::read(process.pid).is_some_and(|now| now.started == process.started) {
            // SAFETY: kill(2) on a pid just checked to be the same process; no memory is involved.
            unsafe {
                libc::kill(process.pid, signal);
            }
        }
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
        // Taken before the first signal: once the shell dies, its children are re-parented and
        // can no longer be told apart from anyone else's.
        let tree = descendants(self.pgid);
        signal_group(self.pgid, libc::SIGTERM);
        signal_tree(&tree, libc::SIGTERM);
        let (pgid, exited) = (self.pgid, self.exited.clone());
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            // Once the shell is reaped its pgid may be reused: the group was killed then anyway.
            if !exited.load(Ordering::Acquire) {
                signal_group(pgid, libc::SIGKILL);
            }
            signal_tree(&tree, libc::SIGKILL);
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
        let mut execution = LocalExecutor::default()
            .start(request(command))
            .await
            .unwrap();
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
        let mut execution = LocalExecutor::default()
            .start(request("sleep 30 & sleep 30; echo never"))
            .await
            .unwrap();
        execution.terminate(Duration::from_secs(1)).await;
        while execution.next_output().await.is_some() {}
        assert_eq!(execution.wait().await.unwrap(), None);
    }

    /// Gone, or a zombie nobody reaps (PID 1 here does not reap orphans).
    fn is_gone(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        }
    }

    #[tokio::test]
    async fn terminate_reaches_descendants_that_left_the_group() {
        // `setsid` starts a new session, `timeout` a new process group; the last one is a
        // grandchild in a session of its own.
        let mut execution = LocalExecutor::default()
            .start(request(
                "echo $$; setsid sleep 300 & echo $!; timeout 300 sleep 300 & echo $!; \
                 sh -c 'setsid sleep 300 & wait' & echo $!; wait",
            ))
            .await
            .unwrap();
        let mut printed = String::new();
        while printed.lines().count() < 4 {
            let (stream, bytes) = execution.next_output().await.unwrap();
            if stream == OutputStream::Stdout {
                printed.push_str(std::str::from_utf8(&bytes).unwrap());
            }
        }
        let pids: Vec<i32> = printed.lines().map(|l| l.trim().parse().unwrap()).collect();
        // Let `setsid` exec and `timeout` start its child.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let tree: Vec<i32> = descendants(pids[0]).iter().map(|p| p.pid).collect();
        execution.terminate(Duration::from_millis(500)).await;
        let drained = tokio::time::timeout(Duration::from_secs(10), async {
            while execution.next_output().await.is_some() {}
            execution.wait().await.unwrap()
        });
        assert_eq!(drained.await.expect("the pipes close"), None);
        tokio::time::sleep(Duration::from_millis(800)).await;
        for pid in pids.iter().chain(&tree) {
            assert!(is_gone(*pid), "process {pid} outlived the stop");
        }
        assert!(tree.len() >= 4, "the walk found the whole tree: {tree:?}");
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
        assert!(LocalExecutor::default().start(req).await.is_err());
    }
}
