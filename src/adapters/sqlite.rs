//! The embedded SQLite backend: one writer connection (SQLite allows one writer at a time, so
//! queueing writes in the pool is cheaper than retrying `SQLITE_BUSY`) and a pool of readers on
//! the WAL, shared by a unit per port ([`SqliteApiKeyRepository`], [`SqliteProjectRepository`],
//! [`SqliteAuditLog`], [`SqliteCommandStore`], [`SqliteCommandQueue`], [`SqliteOutputStore`]).
//! Commands claim and wake up within this one process, so time comes from the [`Clock`] port.
//! Timestamps are stored as RFC 3339 text, which compares correctly only as `julianday(...)`.

pub mod api_keys;
pub mod audit;
pub mod commands;
pub mod output;
pub mod projects;
pub mod queue;
pub mod secrets;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};

pub use api_keys::SqliteApiKeyRepository;
pub use audit::SqliteAuditLog;
pub use commands::SqliteCommandStore;
pub use output::SqliteOutputStore;
pub use projects::SqliteProjectRepository;
pub use queue::SqliteCommandQueue;
pub use secrets::SqliteSharedSecrets;

use super::sql::db;
use crate::ports::{Clock, PortError};

/// The writer and reader pools, migrated.
#[derive(Clone)]
pub struct SqliteDatabase {
    writer: SqlitePool,
    reader: SqlitePool,
}

impl SqliteDatabase {
    /// Opens (creating if needed) the database at `url` and applies the migrations.
    pub async fn connect(url: &str) -> Result<Self, sqlx::Error> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.read_only(true))
            .await?;
        Ok(Self { writer, reader })
    }

    /// A write transaction on the one writer connection.
    pub(crate) async fn begin(&self) -> Result<Transaction<'static, Sqlite>, PortError> {
        self.writer.begin().await.map_err(db)
    }

    pub fn api_keys(&self) -> SqliteApiKeyRepository {
        SqliteApiKeyRepository::new(self.clone())
    }

    pub fn projects(&self) -> SqliteProjectRepository {
        SqliteProjectRepository::new(self.clone())
    }

    pub fn audit_log(&self) -> SqliteAuditLog {
        SqliteAuditLog::new(self.clone())
    }

    pub fn command_store(&self, clock: Arc<dyn Clock>) -> SqliteCommandStore {
        SqliteCommandStore::new(self.clone(), clock)
    }

    pub fn command_queue(&self, clock: Arc<dyn Clock>) -> SqliteCommandQueue {
        SqliteCommandQueue::new(self.clone(), clock)
    }

    pub fn output_store(&self) -> SqliteOutputStore {
        SqliteOutputStore::new(self.clone())
    }

    pub fn shared_secrets(&self) -> SqliteSharedSecrets {
        SqliteSharedSecrets::new(self.clone())
    }

    /// True when the database answers.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.reader).await.is_ok()
    }

    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }
}
