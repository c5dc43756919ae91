//! What the SQLite and Postgres adapters share: reading rows into domain values, translating
//! sqlx errors into [`PortError`]s, and building the statements whose text and parameters both
//! dialects accept (inserts with many columns). Each backend executes them in its own port
//! units (`adapters/sqlite/*.rs`, `adapters/postgres/*.rs`), with its own locking and clock.

use std::collections::BTreeMap;
use std::sync::Arc;

use sqlx::Row;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::domain::api_key::{AllowedIps, ApiKey, KeyName, Scopes, SecretHash};
use crate::domain::audit::{
    AuditContext, AuditEvent, AuditHead, AuditKey, ChainReport, ChainVerifier, GENESIS_HASH,
    NewAuditEvent, action,
};
use crate::domain::command::{
    Command, CommandLine, CommandStatus, OutputChunk, OutputStream, Priority, TerminationReason,
};
use crate::domain::ids::{ApiKeyId, AuditEventId, CommandId, ProjectId};
use crate::domain::project::{
    EnvVars, ExecutorKind, KubeLabelName, KubeTarget, LabelSelector, PodName, PodRef, Project,
    ProjectName, Workdir,
};
use crate::domain::rate_limit::RateLimit;
use crate::domain::webhook::{
    Attempt, Delivery, DeliveryId, DeliveryStatus, EventFilter, Webhook, WebhookId, WebhookSecret,
    WebhookUrl,
};
use crate::ports::{AuditHeads, Page, PortError, ProjectLoad, QueueSummary};

pub const KEY_COLUMNS: &str = "id, name, prefix, secret_hash, scopes, project_ids, rate_limit, \
    created_at, created_by, expires_at, revoked_at, last_used_at";
pub const PROJECT_COLUMNS: &str = "id, name, description, namespace, pod, selector, container, \
    workdir, env, max_concurrency, default_timeout_secs, executor, created_at, updated_at";
pub const COMMAND_COLUMNS: &str = "id, project_id, command, env, priority, timeout_secs, status, \
    submitted_by, created_at, started_at, finished_at, exit_code, termination_reason, error, \
    cancel_requested, stdout_bytes, stderr_bytes, dropped_bytes, truncated, last_seq";
pub const AUDIT_COLUMNS: &str = "seq, id, at, actor_key_id, client_ip, request_id, trace_id, \
    action, target_type, target_id, outcome, details, prev_hash, hash";

/// Typed reads from a row of either backend.
pub trait Cells {
    fn uuid(&self, column: &str) -> Result<Uuid, PortError>;
    fn opt_uuid(&self, column: &str) -> Result<Option<Uuid>, PortError>;
    fn text(&self, column: &str) -> Result<String, PortError>;
    fn opt_text(&self, column: &str) -> Result<Option<String>, PortError>;
    fn int(&self, column: &str) -> Result<i64, PortError>;
    fn opt_int(&self, column: &str) -> Result<Option<i64>, PortError>;
    fn time(&self, column: &str) -> Result<OffsetDateTime, PortError>;
    fn opt_time(&self, column: &str) -> Result<Option<OffsetDateTime>, PortError>;
    fn flag(&self, column: &str) -> Result<bool, PortError>;
}

macro_rules! impl_cells {
    ($row:ty) => {
        impl Cells for $row {
            fn uuid(&self, column: &str) -> Result<Uuid, PortError> {
                self.try_get(column).map_err(PortError::backend)
            }
            fn opt_uuid(&self, column: &str) -> Result<Option<Uuid>, PortError> {
                self.try_get(column).map_err(PortError::backend)
            }
            fn text(&self, column: &str) -> Result<String, PortError> {
                self.try_get(column).map_err(PortError::backend)
            }
            fn opt_text(&self, column: &str) -> Result<Option<String>, PortError> {
                self.try_get(column).map_err(PortError::backend)
            }
            fn int(&self, column: &str) -> Result<i64, PortError> {
                self.try_get(column).map_err(PortError::backend)
            }
            fn opt_int(&self, column: &str) -> Result<Option<i64>, PortError> {
                self.try_get(column).map_err(PortError::backend)
            }
            fn time(&self, column: &str) -> Result<OffsetDateTime, PortError> {
                self.try_get(column).map_err(PortError::backend)
            }
            fn opt_time(&self, column: &str) -> Result<Option<OffsetDateTime>, PortError> {
                self.try_get(column).map_err(PortError::backend)
            }
            fn flag(&self, column: &str) -> Result<bool, PortError> {
                self.try_get(column).map_err(PortError::backend)
            }
        }
    };
}

impl_cells!(sqlx::sqlite::SqliteRow);
impl_cells!(sqlx::postgres::PgRow);

fn corrupt(what: &str, detail: impl std::fmt::Display) -> PortError {
    PortError::backend(format!("stored {what} is invalid: {detail}"))
}

/// Translates a sqlx error; `taken` names what a unique violation found already there.
pub fn translate(error: sqlx::Error, taken: &'static str) -> PortError {
    match &error {
        sqlx::Error::RowNotFound => PortError::NotFound,
        sqlx::Error::Database(db) if db.is_unique_violation() => PortError::AlreadyExists(taken),
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => PortError::MissingReference,
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_) => PortError::Unavailable(Box::new(error)),
        _ => PortError::Backend(Box::new(error)),
    }
}

/// For calls that cannot hit a uniqueness rule.
pub fn db(error: sqlx::Error) -> PortError {
    translate(error, "a conflicting row")
}

pub const KEY_TAKEN: &str = "an API key with this prefix";
pub const PROJECT_TAKEN: &str = "a project with this name";

pub fn key_from_row(row: &impl Cells, allowed_ips: &[String]) -> Result<ApiKey, PortError> {
    let project_ids: Vec<Uuid> = serde_json::from_str(&row.text("project_ids")?)
        .map_err(|e| corrupt("key project list", e))?;
    Ok(ApiKey {
        id: ApiKeyId::from_uuid(row.uuid("id")?),
        name: KeyName::parse(row.text("name")?).map_err(|e| corrupt("key name", e))?,
        prefix: row.text("prefix")?,
        secret_hash: SecretHash::from_stored(row.text("secret_hash")?),
        scopes: Scopes::from_csv(&row.text("scopes")?).map_err(|e| corrupt("scopes", e))?,
        allowed_ips: AllowedIps::parse(allowed_ips).map_err(|e| corrupt("allowed IPs", e))?,
        project_ids: project_ids.into_iter().map(ProjectId::from_uuid).collect(),
        rate_limit: row
            .opt_text("rate_limit")?
            .map(|raw| RateLimit::parse(&raw).map_err(|e| corrupt("key rate limit", e)))
            .transpose()?,
        created_at: row.time("created_at")?,
        created_by: row.opt_uuid("created_by")?.map(ApiKeyId::from_uuid),
        expires_at: row.opt_time("expires_at")?,
        revoked_at: row.opt_time("revoked_at")?,
        last_used_at: row.opt_time("last_used_at")?,
    })
}

pub fn project_ids_json(key: &ApiKey) -> String {
    let ids: Vec<Uuid> = key.project_ids.iter().map(ProjectId::as_uuid).collect();
    serde_json::to_string(&ids).expect("a list of UUIDs always serializes")
}

/// The target columns of a project: (namespace, pod, selector, container).
pub type TargetColumns = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

pub fn target_columns(target: Option<&KubeTarget>) -> TargetColumns {
    match target {
        None => (None, None, None, None),
        Some(target) => {
            let (pod, selector) = match &target.pod {
                PodRef::Name(name) => (Some(name.to_string()), None),
                PodRef::Selector(selector) => (None, Some(selector.to_string())),
            };
            (
                Some(target.namespace.to_string()),
                pod,
                selector,
                target.container.as_ref().map(ToString::to_string),
            )
        }
    }
}

pub fn project_from_row(row: &impl Cells) -> Result<Project, PortError> {
    let target = match row.opt_text("namespace")? {
        None => None,
        Some(namespace) => {
            let pod = match (row.opt_text("pod")?, row.opt_text("selector")?) {
                (Some(pod), _) => PodRef::Name(PodName::parse(pod).map_err(|e| corrupt("pod", e))?),
                (None, Some(selector)) => PodRef::Selector(
                    LabelSelector::parse(selector).map_err(|e| corrupt("selector", e))?,
                ),
                (None, None) => return Err(corrupt("target", "neither pod nor selector")),
            };
            Some(KubeTarget {
                namespace: KubeLabelName::parse(namespace).map_err(|e| corrupt("namespace", e))?,
                pod,
                container: row
                    .opt_text("container")?
                    .map(KubeLabelName::parse)
                    .transpose()
                    .map_err(|e| corrupt("container", e))?,
            })
        }
    };
    Ok(Project {
        id: ProjectId::from_uuid(row.uuid("id")?),
        name: ProjectName::parse(row.text("name")?).map_err(|e| corrupt("project name", e))?,
        description: row.text("description")?,
        target,
        workdir: Workdir::parse(row.text("workdir")?).map_err(|e| corrupt("workdir", e))?,
        env: EnvVars::from_trusted_json(&row.text("env")?).map_err(|e| corrupt("env", e))?,
        max_concurrency: u32::try_from(row.int("max_concurrency")?)
            .map_err(|e| corrupt("max_concurrency", e))?,
        default_timeout_secs: u32::try_from(row.int("default_timeout_secs")?)
            .map_err(|e| corrupt("default_timeout_secs", e))?,
        executor: ExecutorKind::parse(&row.text("executor")?)
            .map_err(|e| corrupt("executor", e))?,
        created_at: row.time("created_at")?,
        updated_at: row.time("updated_at")?,
    })
}

pub fn command_from_row(row: &impl Cells) -> Result<Command, PortError> {
    let priority = row.int("priority")?;
    Ok(Command {
        id: CommandId::from_uuid(row.uuid("id")?),
        project_id: ProjectId::from_uuid(row.uuid("project_id")?),
        command: CommandLine::from_trusted(row.text("command")?),
        env: EnvVars::from_trusted_json(&row.text("env")?).map_err(|e| corrupt("env", e))?,
        priority: i16::try_from(priority)
            .ok()
            .and_then(Priority::from_rank)
            .ok_or_else(|| corrupt("priority", priority))?,
        timeout_secs: u32::try_from(row.int("timeout_secs")?).map_err(|e| corrupt("timeout", e))?,
        status: CommandStatus::parse(&row.text("status")?).map_err(|e| corrupt("status", e))?,
        submitted_by: row.opt_uuid("submitted_by")?.map(ApiKeyId::from_uuid),
        created_at: row.time("created_at")?,
        started_at: row.opt_time("started_at")?,
        finished_at: row.opt_time("finished_at")?,
        exit_code: row.opt_int("exit_code")?.map(|c| c as i32),
        termination_reason: row
            .opt_text("termination_reason")?
            .map(|r| TerminationReason::parse(&r).ok_or_else(|| corrupt("termination reason", r)))
            .transpose()?,
        error: row.opt_text("error")?,
        cancel_requested: row.flag("cancel_requested")?,
        stdout_bytes: row.int("stdout_bytes")?,
        stderr_bytes: row.int("stderr_bytes")?,
        dropped_bytes: row.int("dropped_bytes")?,
        truncated: row.flag("truncated")?,
        last_seq: row.int("last_seq")?,
    })
}

pub fn chunk_from_row(row: &impl Cells) -> Result<OutputChunk, PortError> {
    let code = row.int("stream")?;
    Ok(OutputChunk {
        seq: row.int("seq")?,
        stream: i16::try_from(code)
            .ok()
            .and_then(OutputStream::from_code)
            .ok_or_else(|| corrupt("stream", code))?,
        data: row.text("data")?,
    })
}

pub fn audit_from_row(row: &impl Cells) -> Result<AuditEvent, PortError> {
    Ok(AuditEvent {
        seq: row.int("seq")?,
        id: AuditEventId::from_uuid(row.uuid("id")?),
        at: row.time("at")?,
        actor: row.opt_uuid("actor_key_id")?.map(ApiKeyId::from_uuid),
        client_ip: row.opt_text("client_ip")?,
        request_id: row.opt_text("request_id")?,
        trace_id: row.opt_text("trace_id")?,
        action: row.text("action")?,
        target_type: row.text("target_type")?,
        target_id: row.text("target_id")?,
        outcome: row.text("outcome")?,
        details: row.text("details")?,
        prev_hash: row.text("prev_hash")?,
        hash: row.text("hash")?,
    })
}

/// Appends `INSERT INTO command_output ... SELECT ... WHERE <guard> ON CONFLICT DO NOTHING` for
/// a batch: the rows land only when `guard` (the lease fence) holds, and a retried batch whose
/// first commit did land is not an error.
pub fn push_output_insert<'a, DB>(
    query: &mut sqlx::QueryBuilder<'a, DB>,
    command: CommandId,
    chunks: &'a [OutputChunk],
    guard: &str,
) where
    DB: sqlx::Database,
    Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    query.push("INSERT INTO command_output (command_id, seq, stream, data) SELECT * FROM (");
    query.push_values(chunks, |mut row, chunk| {
        row.push_bind(command.as_uuid())
            .push_bind(chunk.seq)
            .push_bind(i64::from(chunk.stream.code()))
            .push_bind(chunk.data.as_str());
    });
    query.push(") AS batch WHERE ");
    query.push(guard);
    query.push(" ON CONFLICT DO NOTHING");
}

/// Groups `(key id, cidr)` rows by key.
pub fn group_allowed_ips(rows: Vec<(Uuid, String)>) -> BTreeMap<Uuid, Vec<String>> {
    let mut grouped: BTreeMap<Uuid, Vec<String>> = BTreeMap::new();
    for (id, cidr) in rows {
        grouped.entry(id).or_default().push(cidr);
    }
    grouped
}

/// `INSERT INTO api_keys (...) VALUES (...)` for a new key.
pub fn key_insert<'a, DB>(key: &'a ApiKey) -> sqlx::QueryBuilder<'a, DB>
where
    DB: sqlx::Database,
    Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<Uuid>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<String>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    OffsetDateTime: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<OffsetDateTime>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut insert = sqlx::QueryBuilder::new(format!("INSERT INTO api_keys ({KEY_COLUMNS}) "));
    insert.push_values([key], |mut row, key| {
        row.push_bind(key.id.as_uuid())
            .push_bind(key.name.as_str())
            .push_bind(key.prefix.as_str())
            .push_bind(key.secret_hash.as_str())
            .push_bind(key.scopes.to_csv())
            .push_bind(project_ids_json(key))
            .push_bind(key.rate_limit.map(|rate| rate.to_string()))
            .push_bind(key.created_at)
            .push_bind(key.created_by.map(|k| k.as_uuid()))
            .push_bind(key.expires_at)
            .push_bind(key.revoked_at)
            .push_bind(key.last_used_at);
    });
    insert
}

/// `INSERT INTO projects (...) VALUES (...)` for a new project.
pub fn project_insert<'a, DB>(project: &'a Project) -> sqlx::QueryBuilder<'a, DB>
where
    DB: sqlx::Database,
    Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<String>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    OffsetDateTime: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let (namespace, pod, selector, container) = target_columns(project.target.as_ref());
    let mut insert = sqlx::QueryBuilder::new(format!("INSERT INTO projects ({PROJECT_COLUMNS}) "));
    insert.push_values([project], |mut row, project| {
        row.push_bind(project.id.as_uuid())
            .push_bind(project.name.as_str())
            .push_bind(project.description.as_str())
            .push_bind(namespace.clone())
            .push_bind(pod.clone())
            .push_bind(selector.clone())
            .push_bind(container.clone())
            .push_bind(project.workdir.as_str())
            .push_bind(project.env.to_json())
            .push_bind(i64::from(project.max_concurrency))
            .push_bind(i64::from(project.default_timeout_secs))
            .push_bind(project.executor.as_str())
            .push_bind(project.created_at)
            .push_bind(project.updated_at);
    });
    insert
}

/// `UPDATE projects SET ... WHERE id = ...` with every mutable field of `project`.
pub fn project_update<'a, DB>(project: &'a Project) -> sqlx::QueryBuilder<'a, DB>
where
    DB: sqlx::Database,
    Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<String>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    OffsetDateTime: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let (namespace, pod, selector, container) = target_columns(project.target.as_ref());
    let mut update = sqlx::QueryBuilder::new("UPDATE projects SET name = ");
    update
        .push_bind(project.name.as_str())
        .push(", description = ")
        .push_bind(project.description.as_str())
        .push(", namespace = ")
        .push_bind(namespace)
        .push(", pod = ")
        .push_bind(pod)
        .push(", selector = ")
        .push_bind(selector)
        .push(", container = ")
        .push_bind(container)
        .push(", workdir = ")
        .push_bind(project.workdir.as_str())
        .push(", env = ")
        .push_bind(project.env.to_json())
        .push(", max_concurrency = ")
        .push_bind(i64::from(project.max_concurrency))
        .push(", default_timeout_secs = ")
        .push_bind(i64::from(project.default_timeout_secs))
        .push(", executor = ")
        .push_bind(project.executor.as_str())
        .push(", updated_at = ")
        .push_bind(project.updated_at)
        .push(" WHERE id = ")
        .push_bind(project.id.as_uuid());
    update
}

/// `INSERT INTO audit_log (...) VALUES (...), ...` for sealed events.
pub fn audit_insert<'a, DB>(events: &'a [AuditEvent]) -> sqlx::QueryBuilder<'a, DB>
where
    DB: sqlx::Database,
    Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<Uuid>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<&'a str>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    OffsetDateTime: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut insert = sqlx::QueryBuilder::new(format!("INSERT INTO audit_log ({AUDIT_COLUMNS}) "));
    insert.push_values(events, |mut row, event| {
        row.push_bind(event.seq)
            .push_bind(event.id.as_uuid())
            .push_bind(event.at)
            .push_bind(event.actor.map(|a| a.as_uuid()))
            .push_bind(event.client_ip.as_deref())
            .push_bind(event.request_id.as_deref())
            .push_bind(event.trace_id.as_deref())
            .push_bind(event.action.as_str())
            .push_bind(event.target_type.as_str())
            .push_bind(event.target_id.as_str())
            .push_bind(event.outcome.as_str())
            .push_bind(event.details.as_str())
            .push_bind(event.prev_hash.as_str())
            .push_bind(event.hash.as_str());
    });
    insert
}

/// How the audit chain is sealed, and where its head is published after each commit.
pub struct Sealing {
    pub key: AuditKey,
    pub heads: Arc<dyn AuditHeads>,
}

impl Sealing {
    /// Commits a transaction that appended to the chain, then publishes the new head.
    pub async fn commit<DB: sqlx::Database>(
        &self,
        tx: sqlx::Transaction<'_, DB>,
        head: Option<AuditHead>,
    ) -> Result<(), PortError> {
        tx.commit().await.map_err(db)?;
        if let Some(head) = head {
            self.heads.published(head);
        }
        Ok(())
    }
}

/// Why a database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect or migrate")]
    Database(#[from] sqlx::Error),
    #[error("cannot migrate the database")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot restrict the database file to its owner")]
    Permissions(#[from] std::io::Error),
    #[error("cannot move the audit chain onto its key")]
    Audit(#[from] PortError),
}

/// The name of the marker, in `shared_secrets`, of a chain sealed with the key.
pub const KEYED_CHAIN_MARKER: &str = "audit_chain_keyed";

/// Seals `events` onto a chain whose last row is `last` (`None`: an empty log).
pub fn seal_audits(
    last: Option<(i64, String)>,
    events: &[NewAuditEvent],
    key: &AuditKey,
) -> Vec<AuditEvent> {
    let (mut seq, mut prev) =
        last.map_or((1, GENESIS_HASH.to_owned()), |(seq, hash)| (seq + 1, hash));
    events
        .iter()
        .map(|event| {
            let sealed = event.seal(seq, &prev, key);
            seq += 1;
            prev.clone_from(&sealed.hash);
            sealed
        })
        .collect()
}

/// Cuts a page of `limit + 1` rows to `limit`, with the cursor of the next page.
pub fn page<T>(mut items: Vec<T>, limit: u32, cursor: impl Fn(&T) -> String) -> Page<T> {
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(cursor)
    } else {
        None
    };
    Page { items, next_cursor }
}

/// Counts freed project slots per project, in a stable (id) order, so concurrent writers lock
/// project rows in the same order.
pub fn slots_per_project(commands: &[Command]) -> BTreeMap<Uuid, i64> {
    let mut per_project = BTreeMap::new();
    for command in commands {
        *per_project.entry(command.project_id.as_uuid()).or_default() += 1;
    }
    per_project
}

/// Folds `(project, rank, status, count)` rows of queued and running commands into a summary.
pub fn queue_summary(
    rows: Vec<(Uuid, i64, String, i64)>,
    projects: Option<&[ProjectId]>,
) -> QueueSummary {
    let mut summary = QueueSummary {
        queued_by_priority: Priority::ALL.iter().map(|p| (*p, 0)).collect(),
        ..QueueSummary::default()
    };
    let mut per_project: BTreeMap<Uuid, ProjectLoad> = BTreeMap::new();
    for (project, rank, status, count) in rows {
        let project_id = ProjectId::from_uuid(project);
        if projects.is_some_and(|only| !only.contains(&project_id)) {
            continue;
        }
        let load = per_project.entry(project).or_insert(ProjectLoad {
            project_id,
            queued: 0,
            running: 0,
        });
        let count = count as u64;
        if status == CommandStatus::Running.as_str() {
            load.running += count;
            summary.running += count;
        } else {
            load.queued += count;
            if let Some(slot) = summary
                .queued_by_priority
                .iter_mut()
                .find(|(p, _)| i64::from(p.rank()) == rank)
            {
                slot.1 += count;
            }
        }
    }
    summary.per_project = per_project.into_values().collect();
    summary
}

/// The audit events of commands the reaper marked lost.
pub fn lost_audits(
    context: &AuditContext,
    at: OffsetDateTime,
    lost: &[Command],
) -> Vec<NewAuditEvent> {
    lost.iter()
        .map(|command| {
            NewAuditEvent::new(
                context,
                at,
                action::COMMAND_FINISHED,
                ("command", command.id.to_string()),
                serde_json::json!({"status": "lost", "termination_reason": "lost"}),
            )
        })
        .collect()
}

/// The message stored on a command the reaper marked lost.
pub const LOST_MESSAGE: &str = "the server running it stopped renewing its lease";

/// Audit rows read per round trip while verifying the chain.
pub const VERIFY_PAGE: i64 = 1000;

/// Re-seals a chain written before the key existed, after checking its unkeyed hashes: every
/// row gets its keyed `prev_hash` and `hash`. `None` when the old chain does not verify.
pub fn reseal(events: &[AuditEvent], key: &AuditKey) -> Option<Vec<AuditEvent>> {
    let mut legacy = ChainVerifier::legacy();
    events.iter().for_each(|event| legacy.push(event));
    if legacy.finish().first_broken.is_some() {
        return None;
    }
    let mut prev = GENESIS_HASH.to_owned();
    Some(
        events
            .iter()
            .map(|event| {
                let mut resealed = event.clone();
                resealed.prev_hash = prev.clone();
                resealed.hash = resealed.compute_hash(key);
                prev.clone_from(&resealed.hash);
                resealed
            })
            .collect(),
    )
}

/// Walks the whole chain a page at a time with `verifier`; `fetch(after)` returns up to
/// [`VERIFY_PAGE`] events with `seq > after`, in order.
pub async fn verify_chain<F, Fut>(
    mut verifier: ChainVerifier,
    mut fetch: F,
) -> Result<ChainReport, PortError>
where
    F: FnMut(i64) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<AuditEvent>, PortError>>,
{
    let mut after = 0_i64;
    loop {
        let events = fetch(after).await?;
        for event in &events {
            after = event.seq;
            verifier.push(event);
        }
        if (events.len() as i64) < VERIFY_PAGE {
            return Ok(verifier.finish());
        }
    }
}

/// A column list (one of the `*_COLUMNS`) qualified with a table alias, for statements that join.
pub fn qualified(columns: &str, alias: &str) -> String {
    columns
        .split(", ")
        .map(|c| format!("{alias}.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub const WEBHOOK_COLUMNS: &str = "id, url, events, project_id, description, secret, enabled, disabled_reason, created_at, updated_at";
pub const DELIVERY_COLUMNS: &str = "id, webhook_id, event_type, payload, status, attempts, \
    next_attempt_at, last_status_code, last_latency_ms, last_error, created_at, delivered_at";

pub fn webhook_from_row(row: &impl Cells) -> Result<Webhook, PortError> {
    Ok(Webhook {
        id: WebhookId::from_uuid(row.uuid("id")?),
        url: WebhookUrl::from_trusted(row.text("url")?),
        events: EventFilter::from_stored(&row.text("events")?)
            .map_err(|e| corrupt("event filter", e))?,
        project_id: row.opt_uuid("project_id")?.map(ProjectId::from_uuid),
        description: row.text("description")?,
        secret: WebhookSecret::parse(row.text("secret")?).map_err(|e| corrupt("secret", e))?,
        enabled: row.flag("enabled")?,
        disabled_reason: row.opt_text("disabled_reason")?,
        created_at: row.time("created_at")?,
        updated_at: row.time("updated_at")?,
    })
}

pub fn delivery_from_row(row: &impl Cells) -> Result<Delivery, PortError> {
    Ok(Delivery {
        id: DeliveryId::from_uuid(row.uuid("id")?),
        webhook_id: WebhookId::from_uuid(row.uuid("webhook_id")?),
        event_type: row.text("event_type")?,
        payload: row.text("payload")?,
        status: DeliveryStatus::parse(&row.text("status")?)
            .map_err(|e| corrupt("delivery status", e))?,
        attempts: u32::try_from(row.int("attempts")?).map_err(|e| corrupt("attempts", e))?,
        next_attempt_at: row.opt_time("next_attempt_at")?,
        last_status_code: row.opt_int("last_status_code")?.map(|c| c as u16),
        last_latency_ms: row.opt_int("last_latency_ms")?.map(|l| l.max(0) as u64),
        last_error: row.opt_text("last_error")?,
        created_at: row.time("created_at")?,
        delivered_at: row.opt_time("delivered_at")?,
    })
}

pub fn attempt_from_row(row: &impl Cells) -> Result<Attempt, PortError> {
    Ok(Attempt {
        number: u32::try_from(row.int("attempt")?).map_err(|e| corrupt("attempt", e))?,
        at: row.time("at")?,
        status_code: row.opt_int("status_code")?.map(|c| c as u16),
        latency_ms: row.int("latency_ms")?.max(0) as u64,
        error: row.opt_text("error")?,
    })
}

pub const WEBHOOK_TAKEN: &str = "a webhook with this id";

/// `INSERT INTO webhooks (...) VALUES (...)` for a new endpoint.
pub fn webhook_insert<'a, DB>(webhook: &'a Webhook) -> sqlx::QueryBuilder<'a, DB>
where
    DB: sqlx::Database,
    Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<Uuid>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<&'a str>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    bool: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    OffsetDateTime: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut insert = sqlx::QueryBuilder::new(format!("INSERT INTO webhooks ({WEBHOOK_COLUMNS}) "));
    insert.push_values([webhook], |mut row, w| {
        row.push_bind(w.id.as_uuid())
            .push_bind(w.url.as_str())
            .push_bind(w.events.to_stored())
            .push_bind(w.project_id.map(|p| p.as_uuid()))
            .push_bind(w.description.as_str())
            .push_bind(w.secret.expose())
            .push_bind(w.enabled)
            .push_bind(w.disabled_reason.as_deref())
            .push_bind(w.created_at)
            .push_bind(w.updated_at);
    });
    insert
}

/// `UPDATE webhooks SET ... WHERE id = ...` with every mutable field of `webhook`.
pub fn webhook_update<'a, DB>(webhook: &'a Webhook) -> sqlx::QueryBuilder<'a, DB>
where
    DB: sqlx::Database,
    Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<Uuid>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<&'a str>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    bool: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    OffsetDateTime: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut update = sqlx::QueryBuilder::new("UPDATE webhooks SET url = ");
    update
        .push_bind(webhook.url.as_str())
        .push(", events = ")
        .push_bind(webhook.events.to_stored())
        .push(", project_id = ")
        .push_bind(webhook.project_id.map(|p| p.as_uuid()))
        .push(", description = ")
        .push_bind(webhook.description.as_str())
        .push(", secret = ")
        .push_bind(webhook.secret.expose())
        .push(", enabled = ")
        .push_bind(webhook.enabled)
        .push(", disabled_reason = ")
        .push_bind(webhook.disabled_reason.as_deref())
        .push(", updated_at = ")
        .push_bind(webhook.updated_at)
        .push(" WHERE id = ")
        .push_bind(webhook.id.as_uuid());
    update
}

/// The SQL dialect an outbox statement is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Sqlite,
}

impl Dialect {
    /// A JSON string of a timestamp column (RFC 3339).
    fn time_json(self, column: &str) -> String {
        match self {
            Dialect::Postgres => {
                format!("to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
            }
            // sqlx stores times on SQLite as RFC 3339 text already.
            Dialect::Sqlite => column.to_owned(),
        }
    }

    /// The canonical text of a UUID column.
    fn uuid_text(self, column: &str) -> String {
        match self {
            Dialect::Postgres => format!("{column}::text"),
            Dialect::Sqlite => format!(
                "lower(substr(hex({column}), 1, 8) || '-' || substr(hex({column}), 9, 4) || '-' || \
                 substr(hex({column}), 13, 4) || '-' || substr(hex({column}), 17, 4) || '-' || \
                 substr(hex({column}), 21))"
            ),
        }
    }
}

/// The outbox write: one `INSERT ... SELECT` that turns the command rows of `source` (a table
/// expression with the command columns, each row a command just moved to its new status) into a
/// pending delivery for every enabled endpoint whose project and event filters match. With no
/// endpoint it inserts nothing. `now` is an SQL expression for the creation time. The event of a
/// row is its status (`running` is `command.started`); the body, `{type, timestamp, data}`, is
/// built here, so it is fixed at the moment of the change.
pub fn outbox_insert(dialect: Dialect, source: &str, now: &str) -> String {
    let (json, new_id, payload_cast) = match dialect {
        Dialect::Postgres => ("json_build_object", "gen_random_uuid()", "::text"),
        Dialect::Sqlite => ("json_object", "randomblob(16)", ""),
    };
    let t = |column: &str| dialect.time_json(column);
    let data = format!(
        "{json}('id', {id}, 'project_id', {project}, 'status', e.status, 'exit_code', e.exit_code, \
         'termination_reason', e.termination_reason, 'error', e.error, 'created_at', {created}, \
         'started_at', {started}, 'finished_at', {finished})",
        id = dialect.uuid_text("e.id"),
        project = dialect.uuid_text("e.project_id"),
        created = t("e.created_at"),
        started = t("e.started_at"),
        finished = t("e.finished_at"),
    );
    let payload = format!(
        "{json}('type', e.event_type, 'timestamp', {at}, 'data', {data}){payload_cast}",
        at = t("COALESCE(e.finished_at, e.started_at, e.created_at)"),
    );
    format!(
        "INSERT INTO webhook_deliveries (id, webhook_id, event_type, payload, status, attempts, \
         next_attempt_at, created_at) \
         SELECT {new_id}, w.id, e.event_type, {payload}, 'pending', 0, {now}, {now} \
         FROM (SELECT c.*, 'command.' || CASE c.status WHEN 'running' THEN 'started' ELSE c.status END \
               AS event_type FROM {source} c) e \
         JOIN webhooks w ON w.enabled AND (w.project_id IS NULL OR w.project_id = e.project_id) \
          AND (w.events = '*' OR ',' || w.events || ',' LIKE '%,' || e.event_type || ',%')"
    )
}
