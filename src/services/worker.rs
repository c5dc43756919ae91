//! Queue workers: claim a command, run it with the project's executor, record its output, and
//! write how it ended. Also the reaper that turns expired leases into `lost` commands.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::domain::audit::{AuditContext, NewAuditEvent, action};
use crate::domain::error::one_line;
use bytes::Bytes;

use crate::domain::command::{
    Command, CommandOutcome, CommandStatus, OutputStream, TerminationReason,
};
use crate::domain::ids::CommandId;
use crate::domain::project::{ExecutorKind, Project};
use crate::ports::{
    BusEvent, Claim, Clock, CommandMetrics, CommandQueue, ExecRequest, Execution, Executor,
    Finished, OutputBus, OutputProgress, OutputStore, PortError, ProjectRepository, Received,
    RenewedLeases, Subscription, WorkSignal,
};
use crate::resilience::{Backoff, RetryPolicy, finish_within, retry};

use super::recorder::{Fence, OutputRecorder, RecorderPorts};

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub workers: usize,
    pub lease: Duration,
    pub kill_grace: Duration,
    pub max_output_bytes: u64,
    /// How long an idle worker sleeps before polling the queue again without a wake-up.
    pub poll_interval: Duration,
    /// After shutdown is requested, how long running commands may go on before they are stopped.
    pub drain: Duration,
    /// Free slots a busy claimer gathers (for up to 2 ms) before claiming.
    pub claim_batch: usize,
}

pub struct WorkerPorts {
    pub queue: Arc<dyn CommandQueue>,
    pub projects: Arc<dyn ProjectRepository>,
    pub output: Arc<dyn OutputStore>,
    pub bus: Arc<dyn OutputBus>,
    pub work: Arc<dyn WorkSignal>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<dyn CommandMetrics>,
    /// Each `None` where the operator did not enable it (`RDEV_EXECUTORS`): such projects'
    /// commands fail to start, saying so.
    pub local: Option<Arc<dyn Executor>>,
    pub kube: Option<Arc<dyn Executor>>,
}

/// What one lease renewal (`None`: it failed) means for a running command.
#[derive(Debug, PartialEq, Eq)]
struct RenewalVerdict {
    /// The lease runs from now.
    renewed: bool,
    /// Why the command must stop, if it must.
    stop: Option<TerminationReason>,
}

/// The heartbeat's policy: a command the reaper gave up (this replica stalled past its lease)
/// stops, since its slot is free again; one whose cancel was asked for stops; and after two
/// leases without a renewal (the lease, and the lease of grace reapers give after an outage)
/// another replica may have reaped it, so it stops as lost.
fn after_renewal(
    renewal: Option<&RenewedLeases>,
    id: CommandId,
    unrenewed_for: Duration,
    lease: Duration,
) -> RenewalVerdict {
    match renewal {
        Some(renewed) if renewed.lost.contains(&id) => RenewalVerdict {
            renewed: false,
            stop: Some(TerminationReason::Lost),
        },
        Some(renewed) => RenewalVerdict {
            renewed: true,
            stop: renewed
                .cancel_requested
                .contains(&id)
                .then_some(TerminationReason::Cancel),
        },
        None => RenewalVerdict {
            renewed: false,
            stop: (unrenewed_for >= lease * 2).then_some(TerminationReason::Lost),
        },
    }
}

/// How supervising a process ended.
enum Ended {
    Exited(Result<Option<i32>, PortError>),
    /// It was being stopped and did not end in time.
    GaveUp,
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_if(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// What a running process did next.
enum Step {
    Output(Option<(OutputStream, Bytes)>),
    Exited(Result<Option<i32>, PortError>),
}

/// Reads output while the pipes are open, then waits for the exit (both cancel-safe).
async fn next_step(execution: &mut dyn Execution, output_open: bool) -> Step {
    if output_open {
        Step::Output(execution.next_output().await)
    } else {
        Step::Exited(execution.wait().await)
    }
}

/// The workers of one replica: one claimer takes as many commands as there are free worker
/// slots in one transaction, each command runs in its own task, and one finisher writes the
/// ends of whichever commands finished meanwhile in one transaction (group commit).
pub struct WorkerPool {
    ports: WorkerPorts,
    settings: WorkerSettings,
    /// Lease owner name, unique per process.
    owner: String,
    active: AtomicUsize,
}

/// Finishes written per transaction at most.
const MAX_FINISH_BATCH: usize = 128;
/// A failed write of command ends is tried again: the commands would otherwise be reaped as
/// `lost` and their real ends forgotten.
const FINISH_RETRY: RetryPolicy = RetryPolicy {
    backoff: Backoff {
        first: Duration::from_millis(100),
        max: Duration::from_millis(800),
    },
    tries: Some(5),
    for_at_most: None,
};
/// How long a busy claimer waits for more free slots before claiming.
const CLAIM_GATHER: Duration = Duration::from_millis(2);

struct FinishRequest {
    finished: Finished,
    reply: oneshot::Sender<Result<Command, FinishError>>,
}

/// Why the end of a command was not recorded.
#[derive(Debug, Clone, thiserror::Error)]
enum FinishError {
    #[error("the finisher stopped")]
    FinisherStopped,
    /// The batch could not be written, even after retries.
    #[error("writing the batch of command ends failed")]
    Batch(#[source] Arc<PortError>),
    /// The store refused this command's end (its lease is gone: the reaper already ended it).
    #[error("the end was refused")]
    Refused(#[source] Arc<PortError>),
}

/// Why a claimed command could not be started.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("the project is unavailable")]
    Project(#[source] PortError),
    #[error("executor `{0}` is not enabled on this server (RDEV_EXECUTORS)")]
    NotEnabled(&'static str),
    #[error("the executor could not start the command")]
    Executor(#[source] PortError),
}

/// The span of one command's run, from its claim to its recorded end; output flushes are its
/// children. (Webhook deliveries, run elsewhere, follow the same pattern: an `info_span!` named
/// `webhook.deliver` with the command id, `.instrument`ed onto the delivery future.)
fn execution_span(command: &Command) -> tracing::Span {
    tracing::info_span!(
        "command.execute",
        otel.kind = "internal",
        command = %command.id,
        project = %command.project_id,
        status = tracing::field::Empty,
        exit_code = tracing::field::Empty,
    )
}

impl WorkerPool {
    pub fn new(ports: WorkerPorts, settings: WorkerSettings, owner: String) -> Arc<Self> {
        Arc::new(Self {
            ports,
            settings,
            owner,
            active: AtomicUsize::new(0),
        })
    }

    /// Commands running on this replica now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Runs the claimer, the finisher and the reaper until `draining` (from then on this
    /// replica starts no claim, and queued commands wait for the others; a claim already under
    /// way completes and its commands run); then lets running
    /// commands finish for the drain period and stops the rest (reason `shutdown`).
    pub async fn run(self: Arc<Self>, draining: CancellationToken) {
        let stop_running = CancellationToken::new();
        let (finish_tx, finish_rx) = mpsc::channel(MAX_FINISH_BATCH * 2);
        let finisher = tokio::spawn(self.clone().finish_loop(finish_rx));
        let reaper = tokio::spawn(self.clone().reap_loop(draining.clone()));
        let slots = Arc::new(Semaphore::new(self.settings.workers));
        let mut running = JoinSet::new();
        let mut found_work = true;
        loop {
            while running.try_join_next().is_some() {}
            // `biased`: once draining, a free slot must not win the race and claim.
            let first = tokio::select! {
                biased;
                _ = draining.cancelled() => break,
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let mut permits = vec![first];
            while let Ok(permit) = slots.clone().try_acquire_owned() {
                permits.push(permit);
            }
            // Under load slots free up one at a time; waiting a moment for a few more turns
            // many one-command claims into one batch. An idle pool claims at once.
            if permits.len() < self.settings.claim_batch && !running.is_empty() {
                let until = tokio::time::Instant::now() + CLAIM_GATHER;
                while permits.len() < self.settings.claim_batch {
                    match tokio::time::timeout_at(until, slots.clone().acquire_owned()).await {
                        Ok(Ok(permit)) => permits.push(permit),
                        _ => break,
                    }
                }
            }
            if draining.is_cancelled() {
                break;
            }
            // An idle replica's polls are not traced (one span a second per replica says
            // nothing); claims while commands run, or right after one found work, are.
            let claim_span = if running.is_empty() && !found_work {
                tracing::debug_span!(
                    "queue.claim",
                    otel.kind = "internal",
                    wanted = permits.len(),
                    claimed = tracing::field::Empty
                )
            } else {
                tracing::info_span!(
                    "queue.claim",
                    otel.kind = "internal",
                    wanted = permits.len(),
                    claimed = tracing::field::Empty
                )
            };
            let claimed = self
                .ports
                .queue
                .claim(&self.owner, self.settings.lease, permits.len())
                .instrument(claim_span.clone())
                .await;
            if let Ok(claims) = &claimed {
                claim_span.record("claimed", claims.len());
            }
            found_work = claimed.as_ref().is_ok_and(|claims| !claims.is_empty());
            drop(claim_span);
            match claimed {
                Ok(claims) if !claims.is_empty() => {
                    for (claim, permit) in claims.into_iter().zip(permits) {
                        let pool = self.clone();
                        let (stop_running, finish_tx) = (stop_running.clone(), finish_tx.clone());
                        let span = execution_span(&claim.command);
                        running.spawn(
                            async move {
                                pool.run_claimed(claim, &stop_running, &finish_tx).await;
                                drop(permit);
                            }
                            .instrument(span),
                        );
                    }
                }
                Ok(_) => {
                    drop(permits);
                    tokio::select! {
                        biased;
                        _ = draining.cancelled() => break,
                        _ = self.ports.work.wait(self.settings.poll_interval) => {}
                    }
                }
                Err(error) => {
                    drop(permits);
                    tracing::warn!(error = %error, "claiming failed; backing off");
                    tokio::select! {
                        biased;
                        _ = draining.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        if !finish_within(&mut running, self.settings.drain).await {
            tracing::warn!(
                active = self.active(),
                "drain period over, stopping running commands"
            );
            stop_running.cancel();
            while running.join_next().await.is_some() {}
        }
        drop(finish_tx);
        let _ = finisher.await;
        reaper.abort();
    }

    /// Writes finished commands in batches: whatever arrived while the last batch was written.
    async fn finish_loop(self: Arc<Self>, mut requests: mpsc::Receiver<FinishRequest>) {
        let mut batch = Vec::with_capacity(MAX_FINISH_BATCH);
        while requests.recv_many(&mut batch, MAX_FINISH_BATCH).await > 0 {
            let items: Vec<Finished> = batch.iter().map(|r| r.finished.clone()).collect();
            match self.finish_with_retry(&items).await {
                Ok(results) => {
                    for (request, result) in batch.drain(..).zip(results) {
                        let result = result.map_err(|e| FinishError::Refused(Arc::new(e)));
                        let _ = request.reply.send(result);
                    }
                }
                Err(error) => {
                    let error = Arc::new(error);
                    for request in batch.drain(..) {
                        let _ = request.reply.send(Err(FinishError::Batch(error.clone())));
                    }
                }
            }
        }
    }

    /// A failed write is retried: the command would otherwise be reaped as `lost` and its real
    /// end forgotten. Commands already ended come back as per-item conflicts, not errors.
    async fn finish_with_retry(
        &self,
        items: &[Finished],
    ) -> Result<Vec<Result<Command, PortError>>, PortError> {
        retry(
            FINISH_RETRY,
            || self.ports.queue.finish(&self.owner, items),
            |error, attempt| {
                tracing::warn!(%error, attempt, "writing command ends failed, retrying");
                true
            },
        )
        .await
    }

    /// Marks commands whose lease expired `lost`. When this replica has been out of contact
    /// with the database (an outage, or the process was paused), it reaps nothing until a whole
    /// lease after contact is back: the replicas running those commands were likely as blind,
    /// and get that long to renew.
    async fn reap_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let every = (self.settings.lease / 2).max(Duration::from_millis(500));
        let mut last_contact = Instant::now();
        let mut reap_after = Instant::now();
        loop {
            if last_contact.elapsed() > every * 2 {
                if self.in_contact().await {
                    last_contact = Instant::now();
                    reap_after = last_contact + self.settings.lease;
                    tracing::info!(grace = ?self.settings.lease, "database reachable again; reaping resumes after a lease");
                }
            } else if Instant::now() >= reap_after {
                if self.reap_once().await {
                    last_contact = Instant::now();
                }
            } else if self.in_contact().await {
                // Waiting out the grace: contact kept up here does not start the grace again.
                last_contact = Instant::now();
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Whether the database answers: a renewal of no leases is a round trip that changes
    /// nothing.
    async fn in_contact(&self) -> bool {
        self.ports
            .queue
            .renew_leases(&self.owner, &[], self.settings.lease)
            .await
            .is_ok()
    }

    /// True when the database answered.
    async fn reap_once(&self) -> bool {
        match self
            .ports
            .queue
            .expire_leases(&AuditContext::system())
            .await
        {
            Ok(lost) => {
                for command in &lost {
                    tracing::warn!(command = %command.id, "lease expired: command marked lost");
                    self.ports
                        .bus
                        .publish(command.id, BusEvent::Status(CommandStatus::Lost))
                        .await;
                }
                if !lost.is_empty() {
                    self.ports.work.announce().await;
                }
                true
            }
            Err(error) => {
                tracing::warn!(error = %error, "expiring leases failed");
                false
            }
        }
    }

    async fn run_claimed(
        &self,
        claim: Claim,
        stop_running: &CancellationToken,
        finisher: &mpsc::Sender<FinishRequest>,
    ) {
        let command = claim.command;
        let id = command.id;
        self.active.fetch_add(1, Ordering::Relaxed);
        self.ports.metrics.command_started();
        let started = Instant::now();
        tracing::info!(command = %id, project = %command.project_id, "command started");
        self.ports
            .bus
            .publish(id, BusEvent::Status(CommandStatus::Running))
            .await;

        // Subscribed before the start, so a cancel sent while the process starts is seen.
        let events = self.ports.bus.subscribe(id);
        let outcome = match self.start(&command).await {
            Ok(execution) => {
                self.supervise(&command, execution, events, stop_running)
                    .await
            }
            Err(error) => {
                let message = one_line(&error);
                tracing::warn!(command = %id, error = message, "command could not be started");
                self.outcome(
                    None,
                    Some(TerminationReason::StartFailed),
                    Some(message),
                    OutputProgress::default(),
                )
            }
        };
        let audit = NewAuditEvent::new(
            &AuditContext::system(),
            self.ports.clock.now(),
            action::COMMAND_FINISHED,
            ("command", id.to_string()),
            json!({
                "status": outcome.status.as_str(),
                "exit_code": outcome.exit_code,
                "termination_reason": outcome.reason.as_str(),
                "stdout_bytes": outcome.stdout_bytes,
                "stderr_bytes": outcome.stderr_bytes,
            }),
        );
        let (reply, written) = oneshot::channel();
        let request = FinishRequest {
            finished: Finished {
                id,
                outcome: outcome.clone(),
                audit,
            },
            reply,
        };
        let result = match finisher.send(request).await {
            Ok(()) => written.await.unwrap_or(Err(FinishError::FinisherStopped)),
            Err(_) => Err(FinishError::FinisherStopped),
        };
        let span = tracing::Span::current();
        span.record("status", outcome.status.as_str());
        if let Some(code) = outcome.exit_code {
            span.record("exit_code", code);
        }
        match result {
            Ok(_) => tracing::info!(
                command = %id,
                status = outcome.status.as_str(),
                exit_code = ?outcome.exit_code,
                "command finished"
            ),
            Err(error) => tracing::error!(
                command = %id,
                error = one_line(&error),
                "recording the end of a command failed"
            ),
        }
        self.ports
            .bus
            .publish(id, BusEvent::Status(outcome.status))
            .await;
        self.ports
            .metrics
            .command_finished(outcome.status, started.elapsed());
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.ports.work.announce().await;
    }

    async fn start(&self, command: &Command) -> Result<Box<dyn Execution>, StartError> {
        let project = self
            .ports
            .projects
            .get(command.project_id)
            .await
            .map_err(StartError::Project)?;
        let executor = self.executor_for(&project)?;
        let env = project
            .env
            .iter()
            .chain(command.env.iter())
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let request = ExecRequest {
            command_id: command.id,
            command: command.command.as_str().to_owned(),
            workdir: project.workdir.as_str().to_owned(),
            env,
            target: project.target.clone(),
        };
        executor.start(request).await.map_err(StartError::Executor)
    }

    fn executor_for(&self, project: &Project) -> Result<&Arc<dyn Executor>, StartError> {
        let executor = match project.executor {
            ExecutorKind::Local => &self.ports.local,
            ExecutorKind::Kube => &self.ports.kube,
        };
        executor
            .as_ref()
            .ok_or(StartError::NotEnabled(project.executor.as_str()))
    }

    /// Streams output until the process is done, enforcing the timeout, cancel requests, the
    /// lease heartbeat and the shutdown deadline.
    async fn supervise(
        &self,
        command: &Command,
        mut execution: Box<dyn Execution>,
        mut events: Box<dyn Subscription>,
        stop_running: &CancellationToken,
    ) -> CommandOutcome {
        let id = command.id;
        let lease_lost = CancellationToken::new();
        let mut recorder = OutputRecorder::start(
            id,
            self.settings.max_output_bytes,
            Fence {
                owner: self.owner.clone(),
                lost: lease_lost.clone(),
                retry_for: self.settings.lease * 2,
            },
            RecorderPorts {
                store: self.ports.output.clone(),
                bus: self.ports.bus.clone(),
                metrics: self.ports.metrics.clone(),
            },
        );
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(command.timeout_secs.into());
        let mut heartbeat = tokio::time::interval(self.settings.lease / 3);
        heartbeat.tick().await;
        // The claim was a renewal: from here, a long stretch without a successful renewal means
        // another replica may have reaped the command, so this one stops it (self-fencing).
        let mut renewed_at = Instant::now();
        let mut stopped_by = command
            .cancel_requested
            .then_some(TerminationReason::Cancel);
        // Once stopping, how long the process may take to go: past this the command is given up
        // as `lost` (a stop that keeps failing must not hold the slot, or a shutdown, forever).
        let stop_for = self.settings.kill_grace + self.settings.lease;
        let mut give_up_at = None;
        if stopped_by.is_some() {
            execution.terminate(self.settings.kill_grace).await;
            give_up_at = Some(tokio::time::Instant::now() + stop_for);
        }
        // Output first; once both pipes are closed, the exit. Timeout, cancel, shutdown and the
        // lease heartbeat stay in force until the process is gone.
        let mut output_open = true;
        let ended = loop {
            let reason = tokio::select! {
                step = next_step(execution.as_mut(), output_open) => match step {
                    Step::Output(Some((stream, bytes))) => {
                        recorder.record(stream, &bytes).await;
                        None
                    }
                    Step::Output(None) => {
                        output_open = false;
                        None
                    }
                    Step::Exited(exit) => break Ended::Exited(exit),
                },
                _ = sleep_until_if(give_up_at) => break Ended::GaveUp,
                _ = tokio::time::sleep_until(deadline), if stopped_by.is_none() => {
                    Some(TerminationReason::Timeout)
                }
                received = events.next() => match received {
                    // A repeated cancel tries a stop that has not worked yet again, at once.
                    Received::Event(BusEvent::CancelRequested) if stopped_by.is_some() => {
                        execution.terminate(self.settings.kill_grace).await;
                        None
                    }
                    Received::Event(BusEvent::CancelRequested) => Some(TerminationReason::Cancel),
                    _ => None,
                },
                _ = stop_running.cancelled(), if stopped_by.is_none() => Some(TerminationReason::Shutdown),
                // The store refused output: the lease is gone.
                _ = lease_lost.cancelled(), if stopped_by.is_none() => Some(TerminationReason::Lost),
                _ = heartbeat.tick() => {
                    let renewal = self.ports.queue.renew_leases(&self.owner, &[id], self.settings.lease).await;
                    let verdict = after_renewal(renewal.as_ref().ok(), id, renewed_at.elapsed(), self.settings.lease);
                    match (&renewal, verdict.stop) {
                        (Err(error), Some(_)) => tracing::warn!(command = %id, %error, "no lease renewal for two leases: stopping the command"),
                        (Err(error), None) => tracing::warn!(command = %id, %error, "lease renewal failed"),
                        (Ok(_), _) => {}
                    }
                    if verdict.renewed {
                        renewed_at = Instant::now();
                    }
                    verdict.stop
                }
            };
            if let Some(reason) = reason
                && stopped_by.is_none()
            {
                tracing::info!(command = %id, reason = reason.as_str(), "stopping command");
                stopped_by = Some(reason);
                execution.terminate(self.settings.kill_grace).await;
                give_up_at = Some(tokio::time::Instant::now() + stop_for);
            }
        };
        let progress = recorder.finish().await;
        let exit = match ended {
            Ended::Exited(exit) => exit,
            Ended::GaveUp => {
                let why = execution
                    .stop_error()
                    .map_or_else(String::new, |error| format!(": {error}"));
                let message = format!(
                    "the command did not end within {}s of being stopped ({}){why}; it may still run where it ran",
                    stop_for.as_secs(),
                    stopped_by.map_or("stop", TerminationReason::as_str),
                );
                tracing::warn!(command = %id, error = message, "giving the command up as lost");
                return self.outcome(None, Some(TerminationReason::Lost), Some(message), progress);
            }
        };
        match exit {
            Ok(code) => self.outcome(code, stopped_by, None, progress),
            // The executor lost track of the process (its pod vanished, its stream broke): how
            // it ended is unknown, which is what `lost` means.
            Err(error @ PortError::Unavailable(_)) => {
                tracing::warn!(command = %id, error = %one_line(&error), "lost track of the command");
                let reason = stopped_by.or(Some(TerminationReason::Lost));
                self.outcome(None, reason, Some(one_line(&error)), progress)
            }
            Err(error) => self.outcome(None, stopped_by, Some(one_line(&error)), progress),
        }
    }

    fn outcome(
        &self,
        exit_code: Option<i32>,
        stopped_by: Option<TerminationReason>,
        error: Option<String>,
        progress: OutputProgress,
    ) -> CommandOutcome {
        let (status, reason) = CommandOutcome::status_for(exit_code, stopped_by);
        CommandOutcome {
            status,
            exit_code,
            reason,
            error,
            finished_at: self.ports.clock.now(),
            stdout_bytes: progress.stdout_bytes,
            stderr_bytes: progress.stderr_bytes,
            dropped_bytes: progress.dropped_bytes,
            truncated: progress.truncated,
            last_seq: progress.last_seq,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(30);

    fn renewed(cancel: &[CommandId], lost: &[CommandId]) -> RenewedLeases {
        RenewedLeases {
            cancel_requested: cancel.to_vec(),
            lost: lost.to_vec(),
        }
    }

    #[test]
    fn a_renewal_keeps_the_command_running_unless_it_was_cancelled_or_reaped() {
        let (id, other) = (CommandId::new(), CommandId::new());
        let quiet = Duration::ZERO;
        let running = after_renewal(Some(&renewed(&[other], &[other])), id, quiet, LEASE);
        assert_eq!(
            running,
            RenewalVerdict {
                renewed: true,
                stop: None
            }
        );
        let cancelled = after_renewal(Some(&renewed(&[id], &[])), id, quiet, LEASE);
        assert_eq!(cancelled.stop, Some(TerminationReason::Cancel));
        assert!(cancelled.renewed);
        let reaped = after_renewal(Some(&renewed(&[], &[id])), id, quiet, LEASE);
        assert_eq!(
            reaped,
            RenewalVerdict {
                renewed: false,
                stop: Some(TerminationReason::Lost)
            }
        );
    }

    #[test]
    fn failed_renewals_stop_the_command_after_two_leases() {
        let id = CommandId::new();
        let brief = after_renewal(None, id, LEASE, LEASE);
        assert_eq!(
            brief,
            RenewalVerdict {
                renewed: false,
                stop: None
            }
        );
        let long = after_renewal(None, id, LEASE * 2, LEASE);
        assert_eq!(long.stop, Some(TerminationReason::Lost));
    }
}
