//! Cross-replica hints over `LISTEN/NOTIFY` on one channel: [`PgRelay`] sends them (one
//! notification per coalesced batch), [`listen`] hands other replicas' hints to the bus. NOTIFY
//! is only a hint; the tables stay the source of truth.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgListener, PgPool};
use tokio_util::sync::CancellationToken;

use crate::domain::command::CommandStatus;
use crate::domain::ids::{ApiKeyId, CommandId, ProjectId};
use crate::ports::{Changed, Relay, RemoteHint, RemoteInbox};

const CHANNEL: &str = "rdev_events";
const HINTS_PER_NOTIFY: usize = 60;

/// Listens for other replicas' hints and hands them to `inbox` until `shutdown`.
pub fn listen(
    pool: PgPool,
    origin: String,
    inbox: Arc<dyn RemoteInbox>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            match listen_once(&pool, &origin, inbox.as_ref(), &shutdown).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(%error, "LISTEN connection failed; retrying (the poll fallback covers the gap)");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    });
}

async fn listen_once(
    pool: &PgPool,
    origin: &str,
    inbox: &dyn RemoteInbox,
    shutdown: &CancellationToken,
) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    loop {
        let notification = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            received = listener.recv() => received?,
        };
        match serde_json::from_str::<Envelope>(notification.payload()) {
            Ok(envelope) if envelope.origin != origin => {
                for hint in envelope.hints {
                    inbox.deliver(hint.into_hint());
                }
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "ignoring a malformed notification"),
        }
    }
}

/// Sends hints with `pg_notify`, one notification per batch.
pub struct PgRelay {
    pool: PgPool,
    origin: String,
}

impl PgRelay {
    pub fn new(pool: PgPool, origin: String) -> Self {
        Self { pool, origin }
    }
}

#[async_trait]
impl Relay for PgRelay {
    async fn send(&self, hints: Vec<RemoteHint>) {
        // NOTIFY payloads are limited to 8000 bytes; a hint takes under 100.
        let payloads: Vec<String> = hints
            .chunks(HINTS_PER_NOTIFY)
            .map(|chunk| {
                let envelope = Envelope {
                    origin: self.origin.clone(),
                    hints: chunk.iter().map(WireHint::from).collect(),
                };
                serde_json::to_string(&envelope).expect("hints always serialize")
            })
            .collect();
        if let Err(error) =
            sqlx::query("SELECT pg_notify($1, payload) FROM UNNEST($2::text[]) AS payload")
                .bind(CHANNEL)
                .bind(payloads)
                .execute(&self.pool)
                .await
        {
            tracing::warn!(%error, "NOTIFY failed; other replicas fall back to polling");
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    #[serde(rename = "o")]
    origin: String,
    #[serde(rename = "h")]
    hints: Vec<WireHint>,
}

/// The NOTIFY payload form of a hint: short keys, since payloads are limited to 8000 bytes.
#[derive(Serialize, Deserialize)]
#[serde(tag = "k")]
enum WireHint {
    #[serde(rename = "o")]
    Stored { c: CommandId, s: i64 },
    #[serde(rename = "s")]
    Status { c: CommandId, s: CommandStatus },
    #[serde(rename = "x")]
    Cancel { c: CommandId },
    #[serde(rename = "w")]
    Work,
    #[serde(rename = "k")]
    KeyChanged { i: ApiKeyId },
    #[serde(rename = "p")]
    ProjectChanged { i: ProjectId },
}

impl From<&RemoteHint> for WireHint {
    fn from(hint: &RemoteHint) -> Self {
        match *hint {
            RemoteHint::Stored { command, last_seq } => WireHint::Stored {
                c: command,
                s: last_seq,
            },
            RemoteHint::Status { command, status } => WireHint::Status {
                c: command,
                s: status,
            },
            RemoteHint::Cancel { command } => WireHint::Cancel { c: command },
            RemoteHint::Work => WireHint::Work,
            RemoteHint::Changed(Changed::ApiKey(i)) => WireHint::KeyChanged { i },
            RemoteHint::Changed(Changed::Project(i)) => WireHint::ProjectChanged { i },
        }
    }
}

impl WireHint {
    fn into_hint(self) -> RemoteHint {
        match self {
            WireHint::Stored { c, s } => RemoteHint::Stored {
                command: c,
                last_seq: s,
            },
            WireHint::Status { c, s } => RemoteHint::Status {
                command: c,
                status: s,
            },
            WireHint::Cancel { c } => RemoteHint::Cancel { command: c },
            WireHint::Work => RemoteHint::Work,
            WireHint::KeyChanged { i } => RemoteHint::Changed(Changed::ApiKey(i)),
            WireHint::ProjectChanged { i } => RemoteHint::Changed(Changed::Project(i)),
        }
    }
}
