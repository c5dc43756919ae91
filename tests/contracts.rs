//! Port contract tests: one body per behaviour of the storage ports, run against SQLite and
//! Postgres below HTTP. Time is moved with a manual clock, so expiry needs no sleeping (Postgres
//! leases run on the database clock: a lease of zero has expired by the next statement).

mod support;

use std::sync::Arc;
use std::time::Duration;

use rdev_api::adapters::postgres::PgDatabase;
use rdev_api::adapters::sql::Sealing;
use rdev_api::adapters::sqlite::SqliteDatabase;
use rdev_api::domain::audit::{
    AuditContext, AuditHead, AuditKey, ExpectedHead, NewAuditEvent, action,
};
use rdev_api::domain::command::{
    Command, CommandLine, CommandOutcome, CommandStatus, OutputChunk, OutputStream, Priority,
    TerminationReason,
};
use rdev_api::domain::ids::{ApiKeyId, CommandId, ProjectId};
use rdev_api::domain::project::{EnvVars, ExecutorKind, Project, ProjectName, Workdir};
use rdev_api::domain::webhook::{
    Attempt, DeliveryId, DeliveryStatus, EventFilter, Webhook, WebhookId, WebhookSecret, WebhookUrl,
};
use rdev_api::ports::clock::ManualClock;
use rdev_api::ports::{
    AttemptReport, ClaimRequest, DeliveryFilter, DeliveryQueue, DueDelivery, NextStep,
    WebhookEndpoints,
};
use rdev_api::ports::{
    AuditFilter, AuditHeads, AuditLog, Clock, CommandQueue, CommandStore, Finished, IdempotencyKey,
    OutputProgress, OutputStore, PortError, ProjectRepository, Submission, SubmitOutcome,
};
use support::{Backend, TestDb};

/// Keeps every head the stores publish.
#[derive(Default)]
struct Heads(std::sync::Mutex<Vec<AuditHead>>);

impl AuditHeads for Heads {
    fn published(&self, head: AuditHead) {
        self.0.lock().unwrap().push(head);
    }
}

impl Heads {
    fn last(&self) -> AuditHead {
        self.0
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a head was published")
    }
}

fn sealing(heads: Arc<Heads>) -> Arc<Sealing> {
    Arc::new(Sealing {
        key: AuditKey::new(b"contract test key".to_vec()),
        heads,
    })
}

/// The storage ports of one backend, as the services see them.
struct Stores {
    projects: Arc<dyn ProjectRepository>,
    audit: Arc<dyn AuditLog>,
    commands: Arc<dyn CommandStore>,
    queue: Arc<dyn CommandQueue>,
    output: Arc<dyn OutputStore>,
    webhooks: Arc<dyn WebhookEndpoints>,
    deliveries: Arc<dyn DeliveryQueue>,
    clock: Arc<ManualClock>,
    heads: Arc<Heads>,
    backend: Backend,
    db: TestDb,
}

impl Stores {
    async fn open(backend: Backend) -> Option<Stores> {
        let db = TestDb::new(backend).await?;
        let clock = Arc::new(ManualClock::default());
        let as_clock: Arc<dyn Clock> = clock.clone();
        let heads = Arc::new(Heads::default());
        let stores = match backend {
            Backend::Sqlite => {
                let sqlite = SqliteDatabase::connect(&db.url, sealing(heads.clone()))
                    .await
                    .unwrap();
                Stores {
                    projects: Arc::new(sqlite.projects()),
                    audit: Arc::new(sqlite.audit_log()),
                    commands: Arc::new(sqlite.command_store(as_clock.clone())),
                    queue: Arc::new(sqlite.command_queue(as_clock.clone())),
                    output: Arc::new(sqlite.output_store()),
                    webhooks: Arc::new(sqlite.webhook_endpoints()),
                    deliveries: Arc::new(sqlite.delivery_queue(as_clock)),
                    clock,
                    heads,
                    backend,
                    db,
                }
            }
            Backend::Postgres => {
                let pg = PgDatabase::connect(&db.url, 4, sealing(heads.clone()))
                    .await
                    .unwrap();
                Stores {
                    projects: Arc::new(pg.projects()),
                    audit: Arc::new(pg.audit_log()),
                    commands: Arc::new(pg.command_store(as_clock)),
                    queue: Arc::new(pg.command_queue()),
                    output: Arc::new(pg.output_store()),
                    webhooks: Arc::new(pg.webhook_endpoints()),
                    deliveries: Arc::new(pg.delivery_queue()),
                    clock,
                    heads,
                    backend,
                    db,
                }
            }
        };
        Some(stores)
    }

    /// The audit log as a server starting anew on the same database sees it.
    async fn reopened_audit_log(&self) -> Arc<dyn AuditLog> {
        let heads = Arc::new(Heads::default());
        match self.backend {
            Backend::Sqlite => Arc::new(
                SqliteDatabase::connect(&self.db.url, sealing(heads))
                    .await
                    .unwrap()
                    .audit_log(),
            ),
            Backend::Postgres => Arc::new(
                PgDatabase::connect(&self.db.url, 2, sealing(heads))
                    .await
                    .unwrap()
                    .audit_log(),
            ),
        }
    }

    fn event(&self, action: &'static str, target: String) -> NewAuditEvent {
        NewAuditEvent::new(
            &AuditContext::system(),
            self.clock.now(),
            action,
            ("test", target),
            serde_json::json!({}),
        )
    }

    async fn project(&self, name: &str, max_concurrency: u32) -> ProjectId {
        let now = self.clock.now();
        let project = Project {
            id: ProjectId::new(),
            name: ProjectName::parse(name.into()).unwrap(),
            description: String::new(),
            target: None,
            workdir: Workdir::parse("/tmp".into()).unwrap(),
            env: EnvVars::default(),
            max_concurrency,
            default_timeout_secs: 60,
            executor: ExecutorKind::Local,
            created_at: now,
            updated_at: now,
        };
        let event = self.event(action::PROJECT_CREATED, project.id.to_string());
        self.projects.insert(&project, event).await.unwrap();
        project.id
    }

    fn command(&self, project: ProjectId, priority: Priority, text: &str) -> Command {
        Command {
            id: CommandId::new(),
            project_id: project,
            command: CommandLine::parse(text.into()).unwrap(),
            env: EnvVars::default(),
            priority,
            timeout_secs: 60,
            status: CommandStatus::Queued,
            submitted_by: None,
            created_at: self.clock.now(),
            started_at: None,
            finished_at: None,
            exit_code: None,
            termination_reason: None,
            error: None,
            cancel_requested: false,
            stdout_bytes: 0,
            stderr_bytes: 0,
            dropped_bytes: 0,
            truncated: false,
            last_seq: 0,
        }
    }

    async fn submit_with(
        &self,
        command: Command,
        idempotency: Option<IdempotencyKey>,
    ) -> Result<SubmitOutcome, PortError> {
        let event = self.event(action::COMMAND_SUBMITTED, command.id.to_string());
        self.commands
            .submit(Submission {
                command,
                audit: event,
                idempotency,
                max_queued: 1000,
                max_queued_per_project: 1000,
            })
            .await
    }

    /// Queues a command (named by its command line) and returns its id.
    async fn submit(&self, project: ProjectId, priority: Priority, text: &str) -> CommandId {
        let command = self.command(project, priority, text);
        let id = command.id;
        match self.submit_with(command, None).await.unwrap() {
            SubmitOutcome::Created(_) => id,
            other => panic!("expected a new command, got {other:?}"),
        }
    }

    /// Claims and returns the claimed command lines in claim order.
    async fn claim(&self, owner: &str, lease: Duration, limit: usize) -> Vec<String> {
        self.queue
            .claim(owner, lease, limit)
            .await
            .unwrap()
            .into_iter()
            .map(|claim| claim.command.command.as_str().to_owned())
            .collect()
    }

    fn finished(&self, id: CommandId, exit_code: i32) -> Finished {
        let (status, reason) = CommandOutcome::status_for(Some(exit_code), None);
        Finished {
            id,
            outcome: CommandOutcome {
                status,
                exit_code: Some(exit_code),
                reason,
                error: None,
                finished_at: self.clock.now(),
                stdout_bytes: 0,
                stderr_bytes: 0,
                dropped_bytes: 0,
                truncated: false,
                last_seq: 0,
            },
            audit: self.event(action::COMMAND_FINISHED, id.to_string()),
        }
    }
}

impl Stores {
    /// Adds an endpoint and returns its id.
    async fn webhook(
        &self,
        events: &[&str],
        project: Option<ProjectId>,
        enabled: bool,
    ) -> WebhookId {
        let now = self.clock.now();
        let names: Vec<String> = events.iter().map(|e| (*e).to_owned()).collect();
        let webhook = Webhook {
            id: WebhookId::new(),
            url: WebhookUrl::parse("http://127.0.0.1:9/hook", true).unwrap(),
            events: EventFilter::parse(&names).unwrap(),
            project_id: project,
            description: String::new(),
            secret: WebhookSecret::generate(&mut rand::rng()),
            enabled,
            disabled_reason: None,
            created_at: now,
            updated_at: now,
        };
        let event = self.event(action::WEBHOOK_CREATED, webhook.id.to_string());
        self.webhooks.insert(&webhook, event).await.unwrap();
        webhook.id
    }

    /// An endpoint's deliveries, oldest first, as (event type, payload).
    async fn delivered_events(&self, webhook: WebhookId) -> Vec<(String, serde_json::Value)> {
        let mut page = self
            .deliveries
            .list(&DeliveryFilter {
                webhook,
                before: None,
                limit: 500,
            })
            .await
            .unwrap()
            .items;
        page.reverse();
        page.into_iter()
            .map(|d| (d.event_type, serde_json::from_str(&d.payload).unwrap()))
            .collect()
    }

    fn claim_request(
        &self,
        limit: usize,
        per_endpoint: usize,
        skip: Vec<WebhookId>,
    ) -> ClaimRequest {
        ClaimRequest {
            limit,
            per_endpoint,
            skip,
            lease: LONG,
        }
    }

    /// A claim whose lease runs out at once, as a dispatcher's that stalls right after claiming.
    fn expiring_claim_request(&self, limit: usize) -> ClaimRequest {
        ClaimRequest {
            lease: Duration::ZERO,
            ..self.claim_request(limit, limit, vec![])
        }
    }

    /// A delivery's log as (attempt number, status code), oldest first.
    async fn attempt_log(&self, delivery: DeliveryId) -> Vec<(u32, Option<u16>)> {
        let log = self.deliveries.attempts(delivery).await.unwrap();
        log.iter().map(|a| (a.number, a.status_code)).collect()
    }

    fn report(&self, due: &DueDelivery, code: Option<u16>, next: NextStep) -> AttemptReport {
        AttemptReport {
            delivery: due.delivery.id,
            webhook: due.delivery.webhook_id,
            lease: due.lease,
            attempt: Some(Attempt {
                number: due.delivery.attempts + 1,
                at: self.clock.now(),
                status_code: code,
                latency_ms: 7,
                error: code.is_none().then(|| "connection refused".to_owned()),
            }),
            next,
        }
    }
}

fn chunk(seq: i64, data: &str) -> OutputChunk {
    OutputChunk {
        seq,
        stream: OutputStream::Stdout,
        data: data.into(),
    }
}

fn progress(last_seq: i64) -> OutputProgress {
    OutputProgress {
        last_seq,
        ..OutputProgress::default()
    }
}

const LONG: Duration = Duration::from_secs(60);

/// Stamps each body (`async fn name(stores: Stores)`) for both stores.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(stores) = super::Stores::open(super::Backend::Sqlite).await {
                        super::$name(stores).await
                    }
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(stores) = super::Stores::open(super::Backend::Postgres).await {
                        super::$name(stores).await
                    }
                }
            )*
        }
    };
}

contract!(
    command_events_write_deliveries_for_matching_endpoints_only,
    due_deliveries_are_leased_retried_and_logged,
    a_late_report_does_not_undo_a_later_attempt,
    a_late_report_of_the_same_attempt_does_not_undo_a_delivery,
    a_lost_lease_neither_reports_nor_frees_the_new_owners_claim,
    claims_bound_each_endpoint_and_skip_the_ones_asked,
    gone_disables_the_endpoint_and_its_deliveries_wait,
    redelivery_makes_a_finished_delivery_due_again,
    a_report_after_its_endpoint_was_deleted_writes_nothing,
    claims_take_the_best_priority_across_projects,
    projects_with_a_backlog_share_the_workers,
    claims_respect_max_concurrency_and_finishes_free_the_slot,
    finishes_are_fenced_by_the_lease_owner,
    expired_leases_become_lost_and_fence_their_owner_out,
    renewals_keep_a_lease_and_report_cancel_requests,
    output_is_paged_by_seq_and_appends_are_idempotent,
    idempotency_keys_return_the_first_command_until_they_expire,
    cancel_ends_a_queued_command_and_refuses_an_ended_one,
    a_project_with_active_commands_cannot_be_deleted,
    the_audit_chain_covers_every_write_and_pages_newest_first,
    a_chain_from_before_the_key_is_moved_onto_it_once,
    one_project_cannot_fill_the_shared_queue,
);

async fn claims_take_the_best_priority_across_projects(s: Stores) {
    let a = s.project("a", 10).await;
    let b = s.project("b", 10).await;
    s.submit(a, Priority::Critical, "a-critical").await;
    s.submit(a, Priority::Low, "a-low-1").await;
    s.submit(a, Priority::Low, "a-low-2").await;
    s.submit(b, Priority::High, "b-high").await;
    assert_eq!(
        s.claim("r1", LONG, 3).await,
        ["a-critical", "b-high", "a-low-1"],
        "one claim does not fill every slot from the project owning the best command"
    );
    assert_eq!(s.claim("r1", LONG, 3).await, ["a-low-2"]);
    assert!(s.claim("r1", LONG, 3).await.is_empty());
}

async fn projects_with_a_backlog_share_the_workers(s: Stores) {
    let a = s.project("a", 10).await;
    let b = s.project("b", 10).await;
    for i in 1..=3 {
        s.submit(a, Priority::Normal, &format!("a{i}")).await;
    }
    for i in 1..=3 {
        s.submit(b, Priority::Normal, &format!("b{i}")).await;
    }
    // Fewest running first within a priority: a's older backlog does not starve b.
    assert_eq!(s.claim("r1", LONG, 4).await, ["a1", "b1", "a2", "b2"]);
    assert_eq!(s.claim("r1", LONG, 1).await, ["a3"]);
}

async fn claims_respect_max_concurrency_and_finishes_free_the_slot(s: Stores) {
    let p = s.project("p", 1).await;
    let first = s.submit(p, Priority::Normal, "first").await;
    s.submit(p, Priority::Normal, "second").await;
    assert_eq!(s.claim("r1", LONG, 4).await, ["first"]);
    assert!(
        s.claim("r1", LONG, 4).await.is_empty(),
        "the project's one slot is taken"
    );
    let results = s.queue.finish("r1", &[s.finished(first, 0)]).await.unwrap();
    let ended = results.into_iter().next().unwrap().unwrap();
    assert_eq!(ended.status, CommandStatus::Succeeded);
    assert_eq!(s.claim("r1", LONG, 4).await, ["second"]);
}

async fn finishes_are_fenced_by_the_lease_owner(s: Stores) {
    let p = s.project("p", 1).await;
    let id = s.submit(p, Priority::Normal, "c").await;
    assert_eq!(s.claim("r1", LONG, 1).await, ["c"]);
    let stranger = s.queue.finish("r2", &[s.finished(id, 0)]).await.unwrap();
    assert!(matches!(stranger[0], Err(PortError::LeaseLost)));
    assert_eq!(
        s.commands.get(id).await.unwrap().status,
        CommandStatus::Running
    );
    let owner = s.queue.finish("r1", &[s.finished(id, 3)]).await.unwrap();
    assert_eq!(owner[0].as_ref().unwrap().status, CommandStatus::Failed);
    let again = s.queue.finish("r1", &[s.finished(id, 0)]).await.unwrap();
    assert!(matches!(again[0], Err(PortError::LeaseLost)));
    let stored = s.commands.get(id).await.unwrap();
    assert_eq!(
        (stored.status, stored.exit_code),
        (CommandStatus::Failed, Some(3))
    );
}

async fn expired_leases_become_lost_and_fence_their_owner_out(s: Stores) {
    let p = s.project("p", 1).await;
    let stale = s.submit(p, Priority::Normal, "stale").await;
    s.submit(p, Priority::Normal, "next").await;
    assert_eq!(s.claim("r1", Duration::ZERO, 1).await, ["stale"]);
    s.clock.advance(Duration::from_secs(1));
    let lost = s
        .queue
        .expire_leases(&AuditContext::system())
        .await
        .unwrap();
    assert_eq!(lost.iter().map(|c| c.id).collect::<Vec<_>>(), [stale]);
    let command = s.commands.get(stale).await.unwrap();
    assert_eq!(command.status, CommandStatus::Lost);
    assert_eq!(command.termination_reason, Some(TerminationReason::Lost));

    // The replica that stalled comes back: none of its writes land.
    let renewed = s.queue.renew_leases("r1", &[stale], LONG).await.unwrap();
    assert_eq!(renewed.lost, [stale]);
    let append = s
        .output
        .append(stale, "r1", &[chunk(1, "late\n")], progress(1))
        .await;
    assert!(matches!(append, Err(PortError::LeaseLost)));
    assert!(s.output.read_after(stale, 0, 10).await.unwrap().is_empty());
    let finish = s.queue.finish("r1", &[s.finished(stale, 0)]).await.unwrap();
    assert!(matches!(finish[0], Err(PortError::LeaseLost)));
    assert_eq!(
        s.commands.get(stale).await.unwrap().status,
        CommandStatus::Lost
    );
    // Its slot was given back exactly once.
    assert_eq!(s.claim("r2", LONG, 4).await, ["next"]);
}

async fn renewals_keep_a_lease_and_report_cancel_requests(s: Stores) {
    let p = s.project("p", 2).await;
    let id = s.submit(p, Priority::Normal, "c").await;
    s.claim("r1", LONG, 1).await;
    s.clock.advance(Duration::from_secs(1));
    assert!(
        s.queue
            .expire_leases(&AuditContext::system())
            .await
            .unwrap()
            .is_empty()
    );
    let renewed = s.queue.renew_leases("r1", &[id], LONG).await.unwrap();
    assert!(renewed.lost.is_empty() && renewed.cancel_requested.is_empty());
    let event = s.event(action::COMMAND_CANCEL_REQUESTED, id.to_string());
    let flagged = s.commands.request_cancel(id, event).await.unwrap();
    assert_eq!(
        (flagged.status, flagged.cancel_requested),
        (CommandStatus::Running, true)
    );
    let renewed = s.queue.renew_leases("r1", &[id], LONG).await.unwrap();
    assert_eq!(renewed.cancel_requested, [id]);
    let stranger = s.queue.renew_leases("r2", &[id], LONG).await.unwrap();
    assert_eq!(stranger.lost, [id], "only the owner renews");
}

async fn output_is_paged_by_seq_and_appends_are_idempotent(s: Stores) {
    let p = s.project("p", 1).await;
    let id = s.submit(p, Priority::Normal, "c").await;
    s.claim("r1", LONG, 1).await;
    let batch: Vec<_> = (1..=5).map(|seq| chunk(seq, &format!("{seq}\n"))).collect();
    s.output
        .append(id, "r1", &batch, progress(5))
        .await
        .unwrap();
    // A retried batch whose first commit landed is not an error, and adds nothing.
    s.output
        .append(id, "r1", &batch, progress(5))
        .await
        .unwrap();
    let first = s.output.read_after(id, 0, 2).await.unwrap();
    assert_eq!(first.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 2]);
    let rest = s.output.read_after(id, 2, 10).await.unwrap();
    assert_eq!(rest.iter().map(|c| c.seq).collect::<Vec<_>>(), [3, 4, 5]);
    assert_eq!(rest[0], chunk(3, "3\n"));
    assert_eq!(s.commands.get(id).await.unwrap().last_seq, 5);
    let stranger = s
        .output
        .append(id, "r2", &[chunk(6, "x")], progress(6))
        .await;
    assert!(matches!(stranger, Err(PortError::LeaseLost)));
    assert_eq!(s.output.read_after(id, 5, 10).await.unwrap(), []);
}

async fn idempotency_keys_return_the_first_command_until_they_expire(s: Stores) {
    let p = s.project("p", 1).await;
    let key = |hash: &str, clock: &ManualClock| IdempotencyKey {
        api_key: ApiKeyId::from_uuid(uuid::Uuid::nil()),
        key: "retry-1".into(),
        request_hash: hash.into(),
        fresh_after: clock.now() - time::Duration::hours(24),
    };
    let first = s.command(p, Priority::Normal, "c");
    let first_id = first.id;
    let created = s
        .submit_with(first, Some(key("h1", &s.clock)))
        .await
        .unwrap();
    assert!(matches!(created, SubmitOutcome::Created(c) if c.id == first_id));
    let replay = s
        .submit_with(
            s.command(p, Priority::Normal, "c"),
            Some(key("h1", &s.clock)),
        )
        .await
        .unwrap();
    assert!(matches!(replay, SubmitOutcome::Existing(c) if c.id == first_id));
    let other = s
        .submit_with(
            s.command(p, Priority::Normal, "d"),
            Some(key("h2", &s.clock)),
        )
        .await;
    assert!(matches!(other, Err(PortError::IdempotencyMismatch)));
    s.clock.advance(Duration::from_secs(25 * 3600));
    let later = s.command(p, Priority::Normal, "d");
    let later_id = later.id;
    let fresh = s
        .submit_with(later, Some(key("h2", &s.clock)))
        .await
        .unwrap();
    assert!(matches!(fresh, SubmitOutcome::Created(c) if c.id == later_id));
}

async fn cancel_ends_a_queued_command_and_refuses_an_ended_one(s: Stores) {
    let p = s.project("p", 1).await;
    let id = s.submit(p, Priority::Normal, "c").await;
    let event = || s.event(action::COMMAND_CANCEL_REQUESTED, id.to_string());
    s.clock.advance(Duration::from_secs(3600));
    let before = s.clock.now();
    let cancelled = s.commands.request_cancel(id, event()).await.unwrap();
    assert_eq!(cancelled.status, CommandStatus::Cancelled);
    assert_eq!(
        cancelled.termination_reason,
        Some(TerminationReason::Cancel)
    );
    let finished = cancelled.finished_at.unwrap();
    assert!(
        (before..=s.clock.now()).contains(&finished),
        "stamped by the store's clock"
    );
    assert!(matches!(
        s.commands.request_cancel(id, event()).await,
        Err(PortError::AlreadyEnded(CommandStatus::Cancelled))
    ));
    assert!(
        s.claim("r1", LONG, 1).await.is_empty(),
        "a cancelled command is never claimed"
    );
}

async fn a_project_with_active_commands_cannot_be_deleted(s: Stores) {
    let p = s.project("p", 1).await;
    let id = s.submit(p, Priority::Normal, "c").await;
    let event = || s.event(action::PROJECT_DELETED, p.to_string());
    assert!(matches!(
        s.projects.delete(p, event()).await,
        Err(PortError::ProjectBusy { active: 1 })
    ));
    let cancel = s.event(action::COMMAND_CANCEL_REQUESTED, id.to_string());
    s.commands.request_cancel(id, cancel).await.unwrap();
    s.projects.delete(p, event()).await.unwrap();
    assert!(matches!(s.projects.get(p).await, Err(PortError::NotFound)));
    assert!(matches!(
        s.projects.delete(p, event()).await,
        Err(PortError::NotFound)
    ));
}

async fn the_audit_chain_covers_every_write_and_pages_newest_first(s: Stores) {
    let p = s.project("p", 1).await;
    let id = s.submit(p, Priority::Normal, "c").await;
    s.claim("r1", LONG, 1).await;
    s.queue.finish("r1", &[s.finished(id, 0)]).await.unwrap();
    let report = s.audit.verify(None).await.unwrap();
    assert_eq!((report.checked, report.first_broken), (3, None));
    let head = s.heads.last();
    assert_eq!(head.seq, 3, "each commit publishes the head");

    let page = s
        .audit
        .list(&AuditFilter {
            limit: 2,
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    let actions: Vec<_> = page.items.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [action::COMMAND_FINISHED, action::COMMAND_SUBMITTED]
    );
    let older = s
        .audit
        .list(&AuditFilter {
            limit: 2,
            before_seq: page.next_cursor.map(|c| c.parse().unwrap()),
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(older.items.len(), 1);
    assert_eq!(older.items[0].action, action::PROJECT_CREATED);
    assert_eq!(older.next_cursor, None);
    // A database writer deletes the newest row: the rest still chains, the head does not.
    s.db.execute("DELETE FROM audit_log WHERE seq = 3").await;
    assert_eq!(s.audit.verify(None).await.unwrap().first_broken, None);
    let published = ExpectedHead {
        seq: head.seq,
        hash: Some(head.hash),
    };
    let truncated = s.audit.verify(Some(published)).await.unwrap();
    assert_eq!(truncated.first_broken.unwrap().seq, 3);
}

async fn a_chain_from_before_the_key_is_moved_onto_it_once(s: Stores) {
    let p = s.project("p", 1).await;
    s.submit(p, Priority::Normal, "c").await;
    // Turn the chain into one written before keys existed: unkeyed hashes, no marker.
    let mut rows = s
        .audit
        .list(&AuditFilter {
            limit: 10,
            ..AuditFilter::default()
        })
        .await
        .unwrap()
        .items;
    rows.reverse();
    let mut prev = "0".repeat(64);
    for row in &mut rows {
        row.prev_hash = prev.clone();
        row.hash = row.legacy_hash();
        prev = row.hash.clone();
        s.db.execute(&format!(
            "UPDATE audit_log SET prev_hash = '{}', hash = '{}' WHERE seq = {}",
            row.prev_hash, row.hash, row.seq
        ))
        .await;
    }
    s.db.execute("DELETE FROM shared_secrets WHERE name = 'audit_chain_keyed'")
        .await;
    assert!(
        s.audit.verify(None).await.unwrap().first_broken.is_some(),
        "unkeyed rows do not pass as keyed"
    );

    let audit = s.reopened_audit_log().await;
    let report = audit.verify(None).await.unwrap();
    assert_eq!((report.checked, report.first_broken), (2, None));
    // Once moved, a reopened server does not touch the chain again.
    let again = s.reopened_audit_log().await;
    assert_eq!(again.verify(None).await.unwrap().first_broken, None);
}

async fn one_project_cannot_fill_the_shared_queue(s: Stores) {
    let busy = s.project("busy", 1).await;
    let quiet = s.project("quiet", 1).await;
    let submit = |project| {
        let command = s.command(project, Priority::Normal, "c");
        let audit = s.event(action::COMMAND_SUBMITTED, command.id.to_string());
        s.commands.submit(Submission {
            command,
            audit,
            idempotency: None,
            max_queued: 3,
            max_queued_per_project: 2,
        })
    };
    for _ in 0..2 {
        assert!(matches!(
            submit(busy).await.unwrap(),
            SubmitOutcome::Created(_)
        ));
    }
    assert!(matches!(
        submit(busy).await.unwrap(),
        SubmitOutcome::ProjectQueueFull { queued: 2 }
    ));
    assert!(matches!(
        submit(quiet).await.unwrap(),
        SubmitOutcome::Created(_)
    ));
    assert!(matches!(
        submit(quiet).await.unwrap(),
        SubmitOutcome::QueueFull { queued: 3 }
    ));
}

async fn command_events_write_deliveries_for_matching_endpoints_only(s: Stores) {
    let a = s.project("a", 5).await;
    let b = s.project("b", 5).await;
    let every = s.webhook(&["*"], None, true).await;
    let a_failures = s.webhook(&["command.failed"], Some(a), true).await;
    let off = s.webhook(&["*"], None, false).await;
    let ok = s.submit(a, Priority::Normal, "ok").await;
    let bad = s.submit(a, Priority::Normal, "bad").await;
    let other = s.submit(b, Priority::Normal, "other").await;
    assert_eq!(s.claim("r1", LONG, 3).await.len(), 3);
    let results = s
        .queue
        .finish("r1", &[s.finished(ok, 0), s.finished(bad, 1)])
        .await
        .unwrap();
    assert!(results.iter().all(Result::is_ok));
    let cancelled = s.submit(b, Priority::Normal, "gone").await;
    let event = s.event(action::COMMAND_CANCEL_REQUESTED, cancelled.to_string());
    s.commands.request_cancel(cancelled, event).await.unwrap();
    // A running command asked to cancel has not changed state yet: no event.
    let event = s.event(action::COMMAND_CANCEL_REQUESTED, other.to_string());
    s.commands.request_cancel(other, event).await.unwrap();

    let seen = s.delivered_events(every).await;
    let mut per_command: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (event_type, payload) in &seen {
        assert_eq!(payload["type"], event_type.as_str());
        assert!(payload["timestamp"].as_str().unwrap().contains('T'));
        let status = payload["data"]["status"].as_str().unwrap();
        assert_eq!(
            event_type.as_str(),
            format!(
                "command.{}",
                if status == "running" {
                    "started"
                } else {
                    status
                }
            )
        );
        per_command
            .entry(payload["data"]["id"].as_str().unwrap().to_owned())
            .or_default()
            .push(event_type.clone());
    }
    let events = |id: CommandId| {
        per_command
            .get(&id.to_string())
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(
        events(ok),
        ["command.queued", "command.started", "command.succeeded"]
    );
    assert_eq!(
        events(bad),
        ["command.queued", "command.started", "command.failed"]
    );
    assert_eq!(events(other), ["command.queued", "command.started"]);
    assert_eq!(events(cancelled), ["command.queued", "command.cancelled"]);

    let only_failures = s.delivered_events(a_failures).await;
    assert_eq!(only_failures.len(), 1, "{only_failures:?}");
    assert_eq!(only_failures[0].1["data"]["id"], bad.to_string());
    assert_eq!(only_failures[0].1["data"]["exit_code"], 1);
    assert!(
        s.delivered_events(off).await.is_empty(),
        "a disabled endpoint gets nothing"
    );
}

async fn due_deliveries_are_leased_retried_and_logged(s: Stores) {
    let p = s.project("p", 5).await;
    let hook = s.webhook(&["command.queued"], None, true).await;
    s.submit(p, Priority::Normal, "c").await;
    let claimed = s
        .deliveries
        .claim_due(&s.claim_request(10, 10, vec![]))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let due = &claimed[0];
    assert_eq!(due.delivery.attempts, 0);
    assert_eq!(due.url.as_str(), "http://127.0.0.1:9/hook");
    assert!(
        s.deliveries
            .claim_due(&s.claim_request(10, 10, vec![]))
            .await
            .unwrap()
            .is_empty(),
        "a leased delivery is not claimed twice"
    );
    let retry_at = s.clock.now() - time::Duration::hours(1);
    s.deliveries
        .report(&[s.report(due, Some(500), NextStep::RetryAt(retry_at))])
        .await
        .unwrap();
    let again = s
        .deliveries
        .claim_due(&s.claim_request(10, 10, vec![]))
        .await
        .unwrap();
    assert_eq!(again.len(), 1, "due again after the retry time");
    assert_eq!(again[0].delivery.attempts, 1);
    assert_eq!(again[0].delivery.last_status_code, Some(500));
    s.deliveries
        .report(&[s.report(&again[0], Some(204), NextStep::Delivered)])
        .await
        .unwrap();
    let done = s.deliveries.get(hook, due.delivery.id).await.unwrap();
    assert_eq!(done.status, DeliveryStatus::Delivered);
    assert_eq!(done.attempts, 2);
    assert!(done.delivered_at.is_some());
    assert_eq!(
        s.attempt_log(due.delivery.id).await,
        [(1, Some(500)), (2, Some(204))]
    );
    assert!(
        s.deliveries
            .claim_due(&s.claim_request(10, 10, vec![]))
            .await
            .unwrap()
            .is_empty()
    );

    // A dispatcher that dies gives its claim back when the lease runs out.
    s.submit(p, Priority::Normal, "d").await;
    let short = s.expiring_claim_request(10);
    assert_eq!(s.deliveries.claim_due(&short).await.unwrap().len(), 1);
    assert_eq!(s.deliveries.claim_due(&short).await.unwrap().len(), 1);
}

async fn a_late_report_does_not_undo_a_later_attempt(s: Stores) {
    let p = s.project("p", 5).await;
    let hook = s.webhook(&["command.queued"], None, true).await;
    s.submit(p, Priority::Normal, "c").await;
    // One dispatcher claims and stalls past its lease; others take the delivery over.
    let stalled = s
        .deliveries
        .claim_due(&s.expiring_claim_request(1))
        .await
        .unwrap()
        .remove(0);
    let claim = || async {
        let mut claimed = s
            .deliveries
            .claim_due(&s.claim_request(1, 1, vec![]))
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1);
        claimed.remove(0)
    };
    let first = claim().await;
    let retry_at = s.clock.now() - time::Duration::hours(1);
    s.deliveries
        .report(&[s.report(&first, Some(500), NextStep::RetryAt(retry_at))])
        .await
        .unwrap();
    let second = claim().await;
    assert_eq!(second.delivery.attempts, 1);
    s.deliveries
        .report(&[s.report(&second, Some(204), NextStep::Delivered)])
        .await
        .unwrap();
    // The stalled dispatcher's attempt 1 is reported last.
    s.deliveries
        .report(&[s.report(&stalled, None, NextStep::Failed)])
        .await
        .unwrap();
    let done = s.deliveries.get(hook, stalled.delivery.id).await.unwrap();
    assert_eq!(done.status, DeliveryStatus::Delivered);
    assert_eq!((done.attempts, done.last_status_code), (2, Some(204)));
    assert_eq!(
        s.attempt_log(done.id).await,
        [(1, Some(500)), (2, Some(204))]
    );
}

async fn a_late_report_of_the_same_attempt_does_not_undo_a_delivery(s: Stores) {
    let p = s.project("p", 5).await;
    let hook = s.webhook(&["command.queued"], None, true).await;
    for text in ["a", "b", "c"] {
        s.submit(p, Priority::Normal, text).await;
    }
    // Each delivery is claimed twice (the first lease runs out at once), so two dispatchers
    // send the same attempt 1 of each.
    let stalled = s
        .deliveries
        .claim_due(&s.expiring_claim_request(3))
        .await
        .unwrap();
    let taken = s
        .deliveries
        .claim_due(&s.claim_request(3, 3, vec![]))
        .await
        .unwrap();
    assert_eq!((stalled.len(), taken.len()), (3, 3));
    let twin = |late: &DueDelivery| {
        taken
            .iter()
            .find(|t| t.delivery.id == late.delivery.id)
            .unwrap()
    };
    let retry_at = s.clock.now() - time::Duration::hours(1);
    // The first: delivered, and the stalled attempt's failure reported in a later batch.
    s.deliveries
        .report(&[s.report(twin(&stalled[0]), Some(204), NextStep::Delivered)])
        .await
        .unwrap();
    s.deliveries
        .report(&[s.report(&stalled[0], None, NextStep::Failed)])
        .await
        .unwrap();
    // The others: both reports in one batch, the failure first and last.
    s.deliveries
        .report(&[
            s.report(&stalled[1], Some(500), NextStep::RetryAt(retry_at)),
            s.report(twin(&stalled[1]), Some(204), NextStep::Delivered),
            s.report(twin(&stalled[2]), Some(204), NextStep::Delivered),
            s.report(&stalled[2], None, NextStep::Failed),
        ])
        .await
        .unwrap();
    for late in &stalled {
        let done = s.deliveries.get(hook, late.delivery.id).await.unwrap();
        assert_eq!(done.status, DeliveryStatus::Delivered, "{done:?}");
        assert_eq!((done.attempts, done.last_status_code), (1, Some(204)));
        assert_eq!(s.attempt_log(done.id).await, [(1, Some(204))]);
    }
}

async fn a_lost_lease_neither_reports_nor_frees_the_new_owners_claim(s: Stores) {
    let p = s.project("p", 5).await;
    let hook = s.webhook(&["command.queued"], None, true).await;
    s.submit(p, Priority::Normal, "c").await;
    // Dispatcher A claims and stalls past its lease; B takes the delivery over and sends it.
    let a = s
        .deliveries
        .claim_due(&s.expiring_claim_request(1))
        .await
        .unwrap()
        .remove(0);
    let b = s
        .deliveries
        .claim_due(&s.claim_request(1, 1, vec![]))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(a.delivery.id, b.delivery.id);
    let nobody_else_sends = || async {
        s.deliveries
            .claim_due(&s.claim_request(10, 10, vec![]))
            .await
            .unwrap()
            .is_empty()
    };
    assert!(nobody_else_sends().await);
    // A's endpoint circuit was open: it postpones, which must not free B's claim.
    let past = s.clock.now() - time::Duration::hours(1);
    let postponed = AttemptReport {
        attempt: None,
        ..s.report(&a, None, NextStep::RetryAt(past))
    };
    s.deliveries.report(&[postponed]).await.unwrap();
    assert!(
        nobody_else_sends().await,
        "a postponed report freed another's claim"
    );
    // Nor does a redelivery asked for while B sends.
    s.deliveries.redeliver(hook, a.delivery.id).await.unwrap();
    assert!(nobody_else_sends().await, "a redelivery freed a live claim");
    // A's attempt 1 has the number B's has: it changes nothing and is not logged.
    s.deliveries
        .report(&[s.report(&a, Some(500), NextStep::RetryAt(past))])
        .await
        .unwrap();
    let waiting = s.deliveries.get(hook, a.delivery.id).await.unwrap();
    assert_eq!(
        (waiting.status, waiting.attempts),
        (DeliveryStatus::Pending, 0)
    );
    assert!(s.attempt_log(a.delivery.id).await.is_empty());
    assert!(nobody_else_sends().await);
    // B's report is the one that counts.
    s.deliveries
        .report(&[s.report(&b, Some(204), NextStep::Delivered)])
        .await
        .unwrap();
    let done = s.deliveries.get(hook, a.delivery.id).await.unwrap();
    assert_eq!((done.status, done.attempts), (DeliveryStatus::Delivered, 1));
    assert_eq!(s.attempt_log(done.id).await, [(1, Some(204))]);
}

async fn claims_bound_each_endpoint_and_skip_the_ones_asked(s: Stores) {
    let p = s.project("p", 5).await;
    let first = s.webhook(&["command.queued"], None, true).await;
    let second = s.webhook(&["command.queued"], None, true).await;
    for n in 0..3 {
        s.submit(p, Priority::Normal, &format!("c{n}")).await;
    }
    let claimed = s
        .deliveries
        .claim_due(&s.claim_request(10, 2, vec![first]))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    assert!(claimed.iter().all(|d| d.delivery.webhook_id == second));
    let claimed = s
        .deliveries
        .claim_due(&s.claim_request(1, 2, vec![]))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1, "the overall limit holds");
    let claimed = s
        .deliveries
        .claim_due(&s.claim_request(10, 2, vec![]))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 3, "{claimed:?}");
}

async fn gone_disables_the_endpoint_and_its_deliveries_wait(s: Stores) {
    let p = s.project("p", 5).await;
    let hook = s.webhook(&["command.queued"], None, true).await;
    s.submit(p, Priority::Normal, "a").await;
    s.submit(p, Priority::Normal, "b").await;
    let claimed = s
        .deliveries
        .claim_due(&s.claim_request(1, 1, vec![]))
        .await
        .unwrap();
    let audit = Box::new(s.event(action::WEBHOOK_DISABLED, hook.to_string()));
    let next = NextStep::DisableEndpoint {
        reason: "410 Gone".into(),
        audit,
    };
    s.deliveries
        .report(&[s.report(&claimed[0], Some(410), next)])
        .await
        .unwrap();
    let webhook = s.webhooks.get(hook).await.unwrap();
    assert!(!webhook.enabled);
    assert_eq!(webhook.disabled_reason.as_deref(), Some("410 Gone"));
    let failed = s
        .deliveries
        .get(hook, claimed[0].delivery.id)
        .await
        .unwrap();
    assert_eq!(failed.status, DeliveryStatus::Failed);
    assert!(
        s.deliveries
            .claim_due(&s.claim_request(10, 10, vec![]))
            .await
            .unwrap()
            .is_empty(),
        "a disabled endpoint's deliveries wait"
    );
    s.submit(p, Priority::Normal, "c").await;
    assert_eq!(
        s.delivered_events(hook).await.len(),
        2,
        "and it gets no new ones"
    );
    let audit = s
        .audit
        .list(&AuditFilter {
            action: Some(action::WEBHOOK_DISABLED.into()),
            limit: 10,
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(audit.items.len(), 1);
}

async fn redelivery_makes_a_finished_delivery_due_again(s: Stores) {
    let p = s.project("p", 5).await;
    let hook = s.webhook(&["command.queued"], None, true).await;
    s.submit(p, Priority::Normal, "a").await;
    let claimed = s
        .deliveries
        .claim_due(&s.claim_request(1, 1, vec![]))
        .await
        .unwrap();
    s.deliveries
        .report(&[s.report(&claimed[0], None, NextStep::Failed)])
        .await
        .unwrap();
    assert!(
        s.deliveries
            .claim_due(&s.claim_request(1, 1, vec![]))
            .await
            .unwrap()
            .is_empty()
    );
    let again = s
        .deliveries
        .redeliver(hook, claimed[0].delivery.id)
        .await
        .unwrap();
    assert_eq!(again.status, DeliveryStatus::Pending);
    let claimed = s
        .deliveries
        .claim_due(&s.claim_request(1, 1, vec![]))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        claimed[0].delivery.attempts, 1,
        "attempts continue from the first run"
    );
    assert!(matches!(
        s.deliveries
            .redeliver(WebhookId::new(), claimed[0].delivery.id)
            .await,
        Err(PortError::NotFound)
    ));
}

async fn a_report_after_its_endpoint_was_deleted_writes_nothing(s: Stores) {
    let p = s.project("p", 5).await;
    let hook = s.webhook(&["command.queued"], None, true).await;
    let kept = s.webhook(&["command.queued"], None, true).await;
    s.submit(p, Priority::Normal, "a").await;
    let claimed = s
        .deliveries
        .claim_due(&s.claim_request(10, 10, vec![]))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    let event = s.event(action::WEBHOOK_DELETED, hook.to_string());
    s.webhooks.delete(hook, event).await.unwrap();
    let reports: Vec<AttemptReport> = claimed
        .iter()
        .map(|due| s.report(due, Some(204), NextStep::Delivered))
        .collect();
    s.deliveries.report(&reports).await.unwrap();
    let kept_delivery = claimed
        .iter()
        .find(|d| d.delivery.webhook_id == kept)
        .unwrap();
    assert_eq!(
        s.deliveries
            .get(kept, kept_delivery.delivery.id)
            .await
            .unwrap()
            .status,
        DeliveryStatus::Delivered,
        "the other endpoint's report still landed"
    );
    assert!(matches!(
        s.webhooks.get(hook).await,
        Err(PortError::NotFound)
    ));
}
