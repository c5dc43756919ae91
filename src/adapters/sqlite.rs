//! The embedded SQLite backend: one writer connection (SQLite allows one writer at a time, so
//! queueing writes in the pool is cheaper than retrying `SQLITE_BUSY`) and a pool of readers on
//! the WAL, shared by a unit per port ([`SqliteApiKeyRepository`], [`SqliteProjectRepository`],
//! [`SqliteAuditLog`], [`SqliteCommandStore`], [`SqliteCommandQueue`], [`SqliteOutputStore`]).
//! Commands claim and wake up within this one process, so time comes from the [`Clock`] port.
//! Timestamps are stored as RFC 3339 text, which compares correctly only as `julianday(...)`.

pub mod api_keys;
pub mod audit;
pub mod commands;
pub mod deliveries;
pub mod output;
pub mod projects;
pub mod queue;
pub mod secrets;
pub mod webhooks;

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
pub use deliveries::SqliteDeliveryQueue;
pub use output::SqliteOutputStore;
pub use projects::SqliteProjectRepository;
pub use queue::SqliteCommandQueue;
pub use secrets::SqliteSharedSecrets;
pub use webhooks::SqliteWebhookEndpoints;

use super::sql::{Sealing, StoreError, db};
use crate::ports::{Clock, PortError};

/// The writer and reader pools, migrated.
#[derive(Clone)]
pub struct SqliteDatabase {
    writer: SqlitePool,
    reader: SqlitePool,
    sealing: Arc<Sealing>,
}

impl SqliteDatabase {
    /// Opens (creating if needed) the database at `url` and applies the migrations.
    pub async fn connect(url: &str, sealing: Arc<Sealing>) -> Result<Self, StoreError> {
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
        owner_only(options.get_filename())?;
        let mut tx = writer.begin().await?;
        audit::seal_with_key(&mut tx, &sealing.key).await?;
        tx.commit().await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.read_only(true))
            .await?;
        Ok(Self {
            writer,
            reader,
            sealing,
        })
    }

    /// The audit key kept in a file beside the database (`<database>.audit-key`, mode 0600),
    /// generated on first use: out of the database, so that a writer of the database file who
    /// cannot read this one cannot re-forge the chain.
    pub fn key_file_beside(url: &str) -> std::io::Result<Vec<u8>> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let options = SqliteConnectOptions::from_str(url).map_err(std::io::Error::other)?;
        let mut path = options.get_filename().as_os_str().to_owned();
        path.push(".audit-key");
        match std::fs::read(&path) {
            Ok(key) => return Ok(key),
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
            Err(_) => {}
        }
        let key = hex::encode(rand::random::<[u8; 32]>()).into_bytes();
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path);
        let mut file = match created {
            Ok(file) => file,
            // Another process sharing this database created it first.
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                return std::fs::read(&path);
            }
            Err(error) => return Err(error),
        };
        file.write_all(&key)?;
        file.sync_all()?;
        Ok(key)
    }

    /// A write transaction on the one writer connection.
    pub(crate) async fn begin(&self) -> Result<Transaction<'static, Sqlite>, PortError> {
        self.writer.begin().await.map_err(db)
    }

    pub fn api_keys(&self) -> SqliteApiKeyRepository {
        SqliteApiKeyRepository::new(self.clone(), self.sealing.clone())
    }

    pub fn projects(&self) -> SqliteProjectRepository {
        SqliteProjectRepository::new(self.clone(), self.sealing.clone())
    }

    pub fn audit_log(&self) -> SqliteAuditLog {
        SqliteAuditLog::new(self.clone(), self.sealing.clone())
    }

    pub fn command_store(&self, clock: Arc<dyn Clock>) -> SqliteCommandStore {
        SqliteCommandStore::new(self.clone(), clock, self.sealing.clone())
    }

    pub fn command_queue(&self, clock: Arc<dyn Clock>) -> SqliteCommandQueue {
        SqliteCommandQueue::new(self.clone(), clock, self.sealing.clone())
    }

    pub fn output_store(&self) -> SqliteOutputStore {
        SqliteOutputStore::new(self.clone())
    }

    pub fn webhook_endpoints(&self) -> SqliteWebhookEndpoints {
        SqliteWebhookEndpoints::new(self.clone(), self.sealing.clone())
    }

    pub fn delivery_queue(&self, clock: Arc<dyn Clock>) -> SqliteDeliveryQueue {
        SqliteDeliveryQueue::new(self.clone(), clock, self.sealing.clone())
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

/// Makes the database file and its WAL companions readable and writable by the server's user
/// only: commands run as another user (`RDEV_LOCAL_RUN_AS`) must not open it.
fn owner_only(database: &std::path::Path) -> Result<(), std::io::Error> {
    use std::os::unix::fs::PermissionsExt;
    for suffix in ["", "-wal", "-shm"] {
        let mut path = database.as_os_str().to_owned();
        path.push(suffix);
        match std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
    }
    Ok(())
}
