//! What the SQLite and Postgres adapters share: reading rows into domain values, translating
//! sqlx errors into [`PortError`]s, and (in [`sql_repositories!`]) the repository code whose SQL
//! both dialects accept. Each adapter keeps its own connection handling, locking and wake-ups.

use std::collections::BTreeMap;

use sqlx::Row;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::domain::api_key::{AllowedIps, ApiKey, KeyName, Scopes, SecretHash};
use crate::domain::audit::AuditEvent;
use crate::domain::command::{
    Command, CommandLine, CommandStatus, OutputChunk, OutputStream, Priority, TerminationReason,
};
use crate::domain::ids::{ApiKeyId, AuditEventId, CommandId, ProjectId};
use crate::domain::project::{
    EnvVars, ExecutorKind, KubeLabelName, KubeTarget, LabelSelector, PodName, PodRef, Project,
    ProjectName, Workdir,
};
use crate::ports::PortError;

pub const KEY_COLUMNS: &str = "id, name, prefix, secret_hash, scopes, project_ids, created_at, \
    created_by, expires_at, revoked_at, last_used_at";
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

/// Translates a sqlx error; `conflict` explains a unique violation to the client.
pub fn translate(error: sqlx::Error, conflict: &str) -> PortError {
    match &error {
        sqlx::Error::RowNotFound => PortError::NotFound,
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            PortError::Conflict(conflict.to_owned())
        }
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
            PortError::Conflict("a referenced resource does not exist".to_owned())
        }
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_) => PortError::Unavailable(Box::new(error)),
        _ => PortError::Backend(Box::new(error)),
    }
}

/// For calls that cannot hit a uniqueness rule.
pub fn db(error: sqlx::Error) -> PortError {
    translate(error, "conflicting change")
}

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

/// Appends `INSERT INTO command_output ... ON CONFLICT DO NOTHING` for a batch (a retried batch
/// whose first commit did land is not an error).
pub fn push_output_insert<'a, DB>(
    query: &mut sqlx::QueryBuilder<'a, DB>,
    command: CommandId,
    chunks: &'a [OutputChunk],
) where
    DB: sqlx::Database,
    Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    query.push("INSERT INTO command_output (command_id, seq, stream, data) ");
    query.push_values(chunks, |mut row, chunk| {
        row.push_bind(command.as_uuid())
            .push_bind(chunk.seq)
            .push_bind(i64::from(chunk.stream.code()))
            .push_bind(chunk.data.as_str());
    });
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

/// Implements every repository port whose SQL both dialects accept for a store type that has
/// `fn reader(&self) -> &Pool<DB>`, `fn writer(&self) -> &Pool<DB>`, `async fn begin(&self) ->
/// Result<Transaction<'static, DB>, PortError>`, and `claim_batch`, `mark_finished` and
/// `append_output`, the hot paths where the dialects differ most. `audit_lock` serialises audit
/// appends (Postgres: an advisory lock); `row_lock` locks a row read in a transaction (Postgres:
/// `FOR UPDATE`; SQLite has one writer); `time` wraps both sides of a timestamp comparison
/// (SQLite stores RFC 3339 text, which only compares right as `julianday(...)`).
macro_rules! sql_repositories {
    ($store:ident, $db:ident, audit_lock = $audit_lock:literal, row_lock = $row_lock:literal, time = $time:literal) => {
        mod repositories {
        use super::{$store, $db};
        use $crate::adapters::sql::{
            AUDIT_COLUMNS, COMMAND_COLUMNS, KEY_COLUMNS, PROJECT_COLUMNS, audit_from_row, chunk_from_row,
            command_from_row, db, group_allowed_ips, key_from_row, project_from_row,
            project_ids_json, target_columns, translate,
        };
        use $crate::domain::api_key::ApiKey;
        use $crate::domain::audit::{AuditContext, AuditEvent, ChainReport, ChainVerifier, GENESIS_HASH, NewAuditEvent, action};
        use $crate::domain::command::{Command, CommandStatus, OutputChunk, Priority};
        use $crate::domain::ids::{ApiKeyId, CommandId, ProjectId};
        use $crate::domain::project::Project;
        use $crate::ports::{
            ApiKeyRepository, AuditFilter, AuditLog, Claim, CommandFilter, CommandQueue, CommandStore,
            Finished, OutputProgress, OutputStore, Page, PortError, ProjectLoad, ProjectRepository, QueueSummary,
            RenewedLeases,
            Submission, SubmitOutcome,
        };

        const KEY_TAKEN: &str = "an API key with this prefix already exists";
        const PROJECT_TAKEN: &str = "a project with this name already exists";

        impl $store {
            /// Appends events to the chain in order; the lock makes the read of the last hash and
            /// the insert atomic with respect to every other appender.
            async fn append_audits(
                tx: &mut sqlx::Transaction<'static, $db>,
                events: Vec<NewAuditEvent>,
            ) -> Result<(), PortError> {
                if events.is_empty() {
                    return Ok(());
                }
                sqlx::query($audit_lock).execute(&mut **tx).await.map_err(db)?;
                let last: Option<(i64, String)> =
                    sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
                        .fetch_optional(&mut **tx)
                        .await
                        .map_err(db)?;
                let (mut seq, mut prev) = last.map_or((1, GENESIS_HASH.to_owned()), |(seq, hash)| (seq + 1, hash));
                let mut sealed = Vec::with_capacity(events.len());
                for event in &events {
                    let row = event.seal(seq, &prev);
                    seq += 1;
                    prev = row.hash.clone();
                    sealed.push(row);
                }
                let mut insert = sqlx::QueryBuilder::<$db>::new(format!("INSERT INTO audit_log ({AUDIT_COLUMNS}) "));
                insert.push_values(sealed, |mut row, event| {
                    row.push_bind(event.seq)
                        .push_bind(event.id.as_uuid())
                        .push_bind(event.at)
                        .push_bind(event.actor.map(|a| a.as_uuid()))
                        .push_bind(event.client_ip)
                        .push_bind(event.request_id)
                        .push_bind(event.trace_id)
                        .push_bind(event.action)
                        .push_bind(event.target_type)
                        .push_bind(event.target_id)
                        .push_bind(event.outcome)
                        .push_bind(event.details)
                        .push_bind(event.prev_hash)
                        .push_bind(event.hash);
                });
                insert.build().execute(&mut **tx).await.map_err(db)?;
                Ok(())
            }

            async fn append_audit(
                tx: &mut sqlx::Transaction<'static, $db>,
                event: NewAuditEvent,
            ) -> Result<(), PortError> {
                Self::append_audits(tx, vec![event]).await
            }

            async fn write_allowed_ips(
                tx: &mut sqlx::Transaction<'static, $db>,
                key: &ApiKey,
            ) -> Result<(), PortError> {
                sqlx::query("DELETE FROM api_key_allowed_ips WHERE api_key_id = $1")
                    .bind(key.id.as_uuid())
                    .execute(&mut **tx)
                    .await
                    .map_err(db)?;
                for net in key.allowed_ips.as_slice() {
                    sqlx::query("INSERT INTO api_key_allowed_ips (api_key_id, cidr) VALUES ($1, $2)")
                        .bind(key.id.as_uuid())
                        .bind(net.to_string())
                        .execute(&mut **tx)
                        .await
                        .map_err(db)?;
                }
                Ok(())
            }

            async fn load_key(&self, row: Option<<$db as sqlx::Database>::Row>) -> Result<Option<ApiKey>, PortError> {
                let Some(row) = row else { return Ok(None) };
                let id: uuid::Uuid = sqlx::Row::try_get(&row, "id").map_err(db)?;
                let ips: Vec<String> =
                    sqlx::query_scalar("SELECT cidr FROM api_key_allowed_ips WHERE api_key_id = $1")
                        .bind(id)
                        .fetch_all(self.reader())
                        .await
                        .map_err(db)?;
                key_from_row(&row, &ips).map(Some)
            }

            /// Gives back project slots of commands that left `running`.
            async fn free_slots(
                tx: &mut sqlx::Transaction<'static, $db>,
                commands: &[Command],
            ) -> Result<(), PortError> {
                let mut per_project: std::collections::BTreeMap<uuid::Uuid, i64> = Default::default();
                for command in commands {
                    *per_project.entry(command.project_id.as_uuid()).or_default() += 1;
                }
                for (project, freed) in per_project {
                    sqlx::query("UPDATE projects SET running_commands = running_commands - $2 WHERE id = $1")
                        .bind(project)
                        .bind(freed)
                        .execute(&mut **tx)
                        .await
                        .map_err(db)?;
                }
                Ok(())
            }
        }

        #[async_trait::async_trait]
        impl ApiKeyRepository for $store {
            async fn insert(&self, key: &ApiKey, audit: NewAuditEvent) -> Result<(), PortError> {
                let mut tx = self.begin().await?;
                sqlx::query(&format!(
                    "INSERT INTO api_keys ({KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
                ))
                .bind(key.id.as_uuid())
                .bind(key.name.as_str())
                .bind(&key.prefix)
                .bind(key.secret_hash.as_str())
                .bind(key.scopes.to_csv())
                .bind(project_ids_json(key))
                .bind(key.created_at)
                .bind(key.created_by.map(|k| k.as_uuid()))
                .bind(key.expires_at)
                .bind(key.revoked_at)
                .bind(key.last_used_at)
                .execute(&mut *tx)
                .await
                .map_err(|e| translate(e, KEY_TAKEN))?;
                Self::write_allowed_ips(&mut tx, key).await?;
                Self::append_audit(&mut tx, audit).await?;
                tx.commit().await.map_err(db)
            }

            async fn save(&self, key: &ApiKey, audit: NewAuditEvent) -> Result<(), PortError> {
                let mut tx = self.begin().await?;
                let updated = sqlx::query(
                    "UPDATE api_keys SET name = $2, prefix = $3, secret_hash = $4, scopes = $5, \
                     project_ids = $6, expires_at = $7, revoked_at = COALESCE(revoked_at, $8) WHERE id = $1",
                )
                .bind(key.id.as_uuid())
                .bind(key.name.as_str())
                .bind(&key.prefix)
                .bind(key.secret_hash.as_str())
                .bind(key.scopes.to_csv())
                .bind(project_ids_json(key))
                .bind(key.expires_at)
                .bind(key.revoked_at)
                .execute(&mut *tx)
                .await
                .map_err(|e| translate(e, KEY_TAKEN))?;
                if updated.rows_affected() == 0 {
                    return Err(PortError::NotFound);
                }
                Self::write_allowed_ips(&mut tx, key).await?;
                Self::append_audit(&mut tx, audit).await?;
                tx.commit().await.map_err(db)
            }

            async fn find_by_prefix(&self, prefix: &str) -> Result<Option<ApiKey>, PortError> {
                let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE prefix = $1"))
                    .bind(prefix)
                    .fetch_optional(self.reader())
                    .await
                    .map_err(db)?;
                self.load_key(row).await
            }

            async fn get(&self, id: ApiKeyId) -> Result<ApiKey, PortError> {
                let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"))
                    .bind(id.as_uuid())
                    .fetch_optional(self.reader())
                    .await
                    .map_err(db)?;
                self.load_key(row).await?.ok_or(PortError::NotFound)
            }

            async fn list(&self) -> Result<Vec<ApiKey>, PortError> {
                let rows = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id"))
                    .fetch_all(self.reader())
                    .await
                    .map_err(db)?;
                let ips = group_allowed_ips(
                    sqlx::query_as("SELECT api_key_id, cidr FROM api_key_allowed_ips")
                        .fetch_all(self.reader())
                        .await
                        .map_err(db)?,
                );
                rows.iter()
                    .map(|row| {
                        let id: uuid::Uuid = sqlx::Row::try_get(row, "id").map_err(db)?;
                        key_from_row(row, ips.get(&id).map_or(&[][..], Vec::as_slice))
                    })
                    .collect()
            }

            async fn is_empty(&self) -> Result<bool, PortError> {
                let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys")
                    .fetch_one(self.reader())
                    .await
                    .map_err(db)?;
                Ok(count == 0)
            }

            async fn record_usage(&self, used: &[(ApiKeyId, time::OffsetDateTime)]) -> Result<(), PortError> {
                let mut tx = self.begin().await?;
                for (id, at) in used {
                    sqlx::query(
                        "UPDATE api_keys SET last_used_at = $2 \
                         WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < $2)",
                    )
                    .bind(id.as_uuid())
                    .bind(*at)
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                }
                tx.commit().await.map_err(db)
            }
        }

        #[async_trait::async_trait]
        impl ProjectRepository for $store {
            async fn insert(&self, project: &Project, audit: NewAuditEvent) -> Result<(), PortError> {
                let (namespace, pod, selector, container) = target_columns(project.target.as_ref());
                let mut tx = self.begin().await?;
                sqlx::query(&format!(
                    "INSERT INTO projects ({PROJECT_COLUMNS}) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
                ))
                .bind(project.id.as_uuid())
                .bind(project.name.as_str())
                .bind(&project.description)
                .bind(namespace)
                .bind(pod)
                .bind(selector)
                .bind(container)
                .bind(project.workdir.as_str())
                .bind(project.env.to_json())
                .bind(i64::from(project.max_concurrency))
                .bind(i64::from(project.default_timeout_secs))
                .bind(project.executor.as_str())
                .bind(project.created_at)
                .bind(project.updated_at)
                .execute(&mut *tx)
                .await
                .map_err(|e| translate(e, PROJECT_TAKEN))?;
                Self::append_audit(&mut tx, audit).await?;
                tx.commit().await.map_err(db)
            }

            async fn update(&self, project: &Project, audit: NewAuditEvent) -> Result<(), PortError> {
                let (namespace, pod, selector, container) = target_columns(project.target.as_ref());
                let mut tx = self.begin().await?;
                let updated = sqlx::query(
                    "UPDATE projects SET name = $2, description = $3, namespace = $4, pod = $5, \
                     selector = $6, container = $7, workdir = $8, env = $9, max_concurrency = $10, \
                     default_timeout_secs = $11, executor = $12, updated_at = $13 WHERE id = $1",
                )
                .bind(project.id.as_uuid())
                .bind(project.name.as_str())
                .bind(&project.description)
                .bind(namespace)
                .bind(pod)
                .bind(selector)
                .bind(container)
                .bind(project.workdir.as_str())
                .bind(project.env.to_json())
                .bind(i64::from(project.max_concurrency))
                .bind(i64::from(project.default_timeout_secs))
                .bind(project.executor.as_str())
                .bind(project.updated_at)
                .execute(&mut *tx)
                .await
                .map_err(|e| translate(e, PROJECT_TAKEN))?;
                if updated.rows_affected() == 0 {
                    return Err(PortError::NotFound);
                }
                Self::append_audit(&mut tx, audit).await?;
                tx.commit().await.map_err(db)
            }

            async fn delete(&self, id: ProjectId, audit: NewAuditEvent) -> Result<(), PortError> {
                let mut tx = self.begin().await?;
                // Locked first, so no submit or claim lands between the check and the delete.
                let exists: Option<uuid::Uuid> =
                    sqlx::query_scalar(concat!("SELECT id FROM projects WHERE id = $1 ", $row_lock))
                        .bind(id.as_uuid())
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(db)?;
                if exists.is_none() {
                    return Err(PortError::NotFound);
                }
                let active: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM commands WHERE project_id = $1 AND status IN ('queued', 'running')",
                )
                .bind(id.as_uuid())
                .fetch_one(&mut *tx)
                .await
                .map_err(db)?;
                if active > 0 {
                    return Err(PortError::Conflict(format!(
                        "the project has {active} queued or running commands; cancel them first"
                    )));
                }
                let deleted = sqlx::query("DELETE FROM projects WHERE id = $1")
                    .bind(id.as_uuid())
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                if deleted.rows_affected() == 0 {
                    return Err(PortError::NotFound);
                }
                Self::append_audit(&mut tx, audit).await?;
                tx.commit().await.map_err(db)
            }

            async fn get(&self, id: ProjectId) -> Result<Project, PortError> {
                let row = sqlx::query(&format!("SELECT {PROJECT_COLUMNS} FROM projects WHERE id = $1"))
                    .bind(id.as_uuid())
                    .fetch_one(self.reader())
                    .await
                    .map_err(db)?;
                project_from_row(&row)
            }

            async fn list(&self, only: Option<&[ProjectId]>) -> Result<Vec<Project>, PortError> {
                let mut query = sqlx::QueryBuilder::<$db>::new(format!("SELECT {PROJECT_COLUMNS} FROM projects"));
                if let Some(only) = only {
                    if only.is_empty() {
                        return Ok(vec![]);
                    }
                    query.push(" WHERE id IN (");
                    let mut ids = query.separated(", ");
                    for id in only {
                        ids.push_bind(id.as_uuid());
                    }
                    query.push(")");
                }
                query.push(" ORDER BY name");
                let rows = query.build().fetch_all(self.reader()).await.map_err(db)?;
                rows.iter().map(project_from_row).collect()
            }
        }

        #[async_trait::async_trait]
        impl AuditLog for $store {
            async fn append(&self, event: NewAuditEvent) -> Result<(), PortError> {
                let mut tx = self.begin().await?;
                Self::append_audit(&mut tx, event).await?;
                tx.commit().await.map_err(db)
            }

            async fn list(&self, filter: &AuditFilter) -> Result<Page<AuditEvent>, PortError> {
                let mut query =
                    sqlx::QueryBuilder::<$db>::new(format!("SELECT {AUDIT_COLUMNS} FROM audit_log WHERE 1 = 1"));
                if let Some(actor) = filter.actor {
                    query.push(" AND actor_key_id = ").push_bind(actor.as_uuid());
                }
                if let Some(action) = &filter.action {
                    query.push(" AND action = ").push_bind(action.clone());
                }
                if let Some(target) = &filter.target_id {
                    query.push(" AND target_id = ").push_bind(target.clone());
                }
                if let Some(since) = filter.since {
                    query.push(concat!(" AND ", $time, "(at) >= ", $time, "(")).push_bind(since).push(")");
                }
                if let Some(until) = filter.until {
                    query.push(concat!(" AND ", $time, "(at) < ", $time, "(")).push_bind(until).push(")");
                }
                if let Some(before) = filter.before_seq {
                    query.push(" AND seq < ").push_bind(before);
                }
                query.push(" ORDER BY seq DESC LIMIT ").push_bind(i64::from(filter.limit) + 1);
                let rows = query.build().fetch_all(self.reader()).await.map_err(db)?;
                let mut items = rows.iter().map(audit_from_row).collect::<Result<Vec<_>, _>>()?;
                let next_cursor = if items.len() > filter.limit as usize {
                    items.truncate(filter.limit as usize);
                    items.last().map(|e| e.seq.to_string())
                } else {
                    None
                };
                Ok(Page { items, next_cursor })
            }

            async fn verify(&self) -> Result<ChainReport, PortError> {
                let mut verifier = ChainVerifier::default();
                let mut after = 0_i64;
                loop {
                    let rows = sqlx::query(&format!(
                        "SELECT {AUDIT_COLUMNS} FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT 1000"
                    ))
                    .bind(after)
                    .fetch_all(self.reader())
                    .await
                    .map_err(db)?;
                    for row in &rows {
                        let event = audit_from_row(row)?;
                        after = event.seq;
                        verifier.push(&event);
                    }
                    if rows.len() < 1000 {
                        return Ok(verifier.finish());
                    }
                }
            }
        }

        #[async_trait::async_trait]
        impl CommandStore for $store {
            async fn submit(&self, submission: Submission) -> Result<SubmitOutcome, PortError> {
                let Submission { command, audit, idempotency, max_queued } = submission;
                let mut tx = self.begin().await?;
                if let Some(idem) = &idempotency {
                    let seen: Option<(uuid::Uuid, String)> = sqlx::query_as(
                        "SELECT command_id, request_hash FROM idempotency_keys WHERE api_key_id = $1 AND key = $2",
                    )
                    .bind(idem.api_key.as_uuid())
                    .bind(&idem.key)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db)?;
                    if let Some((earlier, hash)) = seen {
                        if hash != idem.request_hash {
                            return Err(PortError::Conflict(
                                "this Idempotency-Key was used with a different request".into(),
                            ));
                        }
                        drop(tx);
                        return CommandStore::get(self, CommandId::from_uuid(earlier))
                            .await
                            .map(SubmitOutcome::Existing);
                    }
                }
                // The queue limit is checked by the insert itself: one round trip on the submit path.
                let inserted = sqlx::query(
                    "INSERT INTO commands (id, project_id, command, env, priority, timeout_secs, status, \
                     submitted_by, created_at) SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 \
                     WHERE (SELECT COUNT(*) FROM commands WHERE status = 'queued') < $10",
                )
                .bind(command.id.as_uuid())
                .bind(command.project_id.as_uuid())
                .bind(command.command.as_str())
                .bind(command.env.to_json())
                .bind(i64::from(command.priority.rank()))
                .bind(i64::from(command.timeout_secs))
                .bind(command.status.as_str())
                .bind(command.submitted_by.map(|k| k.as_uuid()))
                .bind(command.created_at)
                .bind(i64::try_from(max_queued).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await
                .map_err(|e| translate(e, "a command with this id already exists"))?;
                if inserted.rows_affected() == 0 {
                    let queued: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM commands WHERE status = 'queued'")
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(db)?;
                    return Ok(SubmitOutcome::QueueFull { queued: queued as u64 });
                }
                if let Some(idem) = &idempotency {
                    sqlx::query(
                        "INSERT INTO idempotency_keys (api_key_id, key, request_hash, command_id, created_at) \
                         VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(idem.api_key.as_uuid())
                    .bind(&idem.key)
                    .bind(&idem.request_hash)
                    .bind(command.id.as_uuid())
                    .bind(command.created_at)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| translate(e, "a request with this Idempotency-Key is in progress"))?;
                }
                Self::append_audit(&mut tx, audit).await?;
                tx.commit().await.map_err(db)?;
                Ok(SubmitOutcome::Created(command))
            }

            async fn get(&self, id: CommandId) -> Result<Command, PortError> {
                let row = sqlx::query(&format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE id = $1"))
                    .bind(id.as_uuid())
                    .fetch_one(self.reader())
                    .await
                    .map_err(db)?;
                command_from_row(&row)
            }

            async fn list(&self, filter: &CommandFilter) -> Result<Page<Command>, PortError> {
                let mut query =
                    sqlx::QueryBuilder::<$db>::new(format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE 1 = 1"));
                if let Some(project) = filter.project_id {
                    query.push(" AND project_id = ").push_bind(project.as_uuid());
                }
                if let Some(projects) = &filter.projects {
                    if projects.is_empty() {
                        return Ok(Page { items: vec![], next_cursor: None });
                    }
                    query.push(" AND project_id IN (");
                    let mut ids = query.separated(", ");
                    for id in projects {
                        ids.push_bind(id.as_uuid());
                    }
                    query.push(")");
                }
                if let Some(status) = filter.status {
                    query.push(" AND status = ").push_bind(status.as_str());
                }
                if let Some(before) = filter.before {
                    query
                        .push(" AND seq < (SELECT seq FROM commands WHERE id = ")
                        .push_bind(before.as_uuid())
                        .push(")");
                }
                query.push(" ORDER BY seq DESC LIMIT ").push_bind(i64::from(filter.limit) + 1);
                let rows = query.build().fetch_all(self.reader()).await.map_err(db)?;
                let mut items = rows.iter().map(command_from_row).collect::<Result<Vec<_>, _>>()?;
                let next_cursor = if items.len() > filter.limit as usize {
                    items.truncate(filter.limit as usize);
                    items.last().map(|c| c.id.to_string())
                } else {
                    None
                };
                Ok(Page { items, next_cursor })
            }

            async fn position(&self, id: CommandId) -> Result<Option<u64>, PortError> {
                let ahead: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM commands c, \
                       (SELECT priority, seq FROM commands WHERE id = $1 AND status = 'queued') me \
                     WHERE c.status = 'queued' \
                       AND (c.priority > me.priority OR (c.priority = me.priority AND c.seq <= me.seq))",
                )
                .bind(id.as_uuid())
                .fetch_one(self.reader())
                .await
                .map_err(db)?;
                Ok((ahead > 0).then_some(ahead as u64))
            }

            async fn summary(&self, projects: Option<&[ProjectId]>) -> Result<QueueSummary, PortError> {
                let rows: Vec<(uuid::Uuid, i64, String, i64)> = sqlx::query_as(
                    "SELECT project_id, priority, status, COUNT(*) FROM commands \
                     WHERE status IN ('queued', 'running') GROUP BY project_id, priority, status",
                )
                .fetch_all(self.reader())
                .await
                .map_err(db)?;
                let mut summary = QueueSummary {
                    queued_by_priority: Priority::ALL.iter().map(|p| (*p, 0)).collect(),
                    ..QueueSummary::default()
                };
                let mut per_project: std::collections::BTreeMap<uuid::Uuid, ProjectLoad> = Default::default();
                for (project, rank, status, count) in rows {
                    let project_id = ProjectId::from_uuid(project);
                    if projects.is_some_and(|only| !only.contains(&project_id)) {
                        continue;
                    }
                    let load = per_project.entry(project).or_insert(ProjectLoad { project_id, queued: 0, running: 0 });
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
                Ok(summary)
            }

            async fn request_cancel(&self, id: CommandId, audit: NewAuditEvent) -> Result<Command, PortError> {
                let now = $crate::domain::audit::truncate_to_micros(time::OffsetDateTime::now_utc());
                let mut tx = self.begin().await?;
                let cancelled = sqlx::query(&format!(
                    "UPDATE commands SET status = 'cancelled', termination_reason = 'cancel', finished_at = $2 \
                     WHERE id = $1 AND status = 'queued' RETURNING {COMMAND_COLUMNS}"
                ))
                .bind(id.as_uuid())
                .bind(now)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
                let row = match cancelled {
                    Some(row) => Some(row),
                    None => sqlx::query(&format!(
                        "UPDATE commands SET cancel_requested = TRUE \
                         WHERE id = $1 AND status = 'running' RETURNING {COMMAND_COLUMNS}"
                    ))
                    .bind(id.as_uuid())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db)?,
                };
                let Some(row) = row else {
                    drop(tx);
                    let command = CommandStore::get(self, id).await?;
                    return Err(PortError::Conflict(format!(
                        "the command already ended ({})",
                        command.status
                    )));
                };
                let command = command_from_row(&row)?;
                Self::append_audit(&mut tx, audit).await?;
                tx.commit().await.map_err(db)?;
                Ok(command)
            }
        }

        #[async_trait::async_trait]
        impl CommandQueue for $store {
            async fn claim(
                &self,
                owner: &str,
                lease: std::time::Duration,
                limit: usize,
            ) -> Result<Vec<Claim>, PortError> {
                // Each dialect claims its own way (see `claim_batch` in the adapter).
                self.claim_batch(owner, lease, limit).await
            }

            async fn renew_leases(
                &self,
                owner: &str,
                ids: &[CommandId],
                lease: std::time::Duration,
            ) -> Result<RenewedLeases, PortError> {
                let until = $crate::domain::audit::truncate_to_micros(time::OffsetDateTime::now_utc()) + lease;
                let mut renewed = RenewedLeases::default();
                for id in ids {
                    let flag: Option<bool> = sqlx::query_scalar(
                        "UPDATE commands SET lease_expires_at = $3 \
                         WHERE id = $1 AND lease_owner = $2 AND status = 'running' RETURNING cancel_requested",
                    )
                    .bind(id.as_uuid())
                    .bind(owner)
                    .bind(until)
                    .fetch_optional(self.writer())
                    .await
                    .map_err(db)?;
                    match flag {
                        Some(true) => renewed.cancel_requested.push(*id),
                        Some(false) => {}
                        None => renewed.lost.push(*id),
                    }
                }
                Ok(renewed)
            }

            async fn finish(&self, batch: &[Finished]) -> Result<Vec<Result<Command, PortError>>, PortError> {
                let allowed: Vec<&Finished> = batch
                    .iter()
                    .filter(|item| CommandStatus::Running.transition(item.outcome.status).is_ok())
                    .collect();
                let mut tx = self.begin().await?;
                // Each dialect marks a batch its own way (see `mark_finished` in the adapter).
                let ended = Self::mark_finished(&mut tx, &allowed).await?;
                let mut results = Vec::with_capacity(batch.len());
                let mut audits = Vec::with_capacity(ended.len());
                for item in batch {
                    let result = match CommandStatus::Running.transition(item.outcome.status) {
                        Err(error) => Err(PortError::Conflict(error.to_string())),
                        Ok(_) => match ended.get(&item.id) {
                            Some(command) => {
                                audits.push(item.audit.clone());
                                Ok(command.clone())
                            }
                            None => Err(PortError::Conflict("the command is no longer running".into())),
                        },
                    };
                    results.push(result);
                }
                let ended: Vec<Command> = ended.into_values().collect();
                Self::free_slots(&mut tx, &ended).await?;
                Self::append_audits(&mut tx, audits).await?;
                tx.commit().await.map_err(db)?;
                Ok(results)
            }

            async fn expire_leases(&self, context: &AuditContext) -> Result<Vec<Command>, PortError> {
                let now = $crate::domain::audit::truncate_to_micros(time::OffsetDateTime::now_utc());
                let mut tx = self.begin().await?;
                let rows = sqlx::query(&format!(
                    concat!(
                        "UPDATE commands SET status = 'lost', termination_reason = 'lost', finished_at = $1, \
                         error = 'the server running it stopped renewing its lease', \
                         lease_owner = NULL, lease_expires_at = NULL \
                         WHERE status = 'running' AND ", $time, "(lease_expires_at) < ", $time, "($1) \
                         RETURNING {}"
                    ),
                    COMMAND_COLUMNS
                ))
                .bind(now)
                .fetch_all(&mut *tx)
                .await
                .map_err(db)?;
                let lost = rows.iter().map(command_from_row).collect::<Result<Vec<_>, _>>()?;
                let audits = lost
                    .iter()
                    .map(|command| {
                        NewAuditEvent::new(
                            context,
                            now,
                            action::COMMAND_FINISHED,
                            ("command", command.id.to_string()),
                            serde_json::json!({"status": "lost", "termination_reason": "lost"}),
                        )
                    })
                    .collect();
                Self::free_slots(&mut tx, &lost).await?;
                Self::append_audits(&mut tx, audits).await?;
                tx.commit().await.map_err(db)?;
                Ok(lost)
            }
        }

        #[async_trait::async_trait]
        impl OutputStore for $store {
            async fn append(
                &self,
                command: CommandId,
                chunks: &[OutputChunk],
                progress: OutputProgress,
            ) -> Result<(), PortError> {
                // Each dialect writes a batch its own way (see `append_output` in the adapter).
                self.append_output(command, chunks, progress).await
            }

            async fn read_after(&self, command: CommandId, after: i64, limit: u32) -> Result<Vec<OutputChunk>, PortError> {
                let rows = sqlx::query(
                    "SELECT seq, stream, data FROM command_output \
                     WHERE command_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                )
                .bind(command.as_uuid())
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(self.reader())
                .await
                .map_err(db)?;
                rows.iter().map(chunk_from_row).collect()
            }
        }
        }
    };
}

pub(crate) use sql_repositories;
