//! Following a command: its status and output as a stream of events that starts after any
//! sequence number (SSE `Last-Event-ID`), replays the rest from the store, then follows live.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::Stream;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use time::OffsetDateTime;

use crate::domain::command::{Command, CommandStatus, OutputChunk};
use crate::domain::ids::{ApiKeyId, CommandId};
use crate::ports::{
    BusEvent, Clock, CommandMetrics, CommandStore, OutputBus, OutputStore, Received, Subscription,
};

use super::commands::CommandService;
use super::{Caller, ServiceError};

/// Chunks read from the store per catch-up query; also the most a follower holds at once.
const REPLAY_PAGE: u32 = 128;
/// How often a live follower re-reads the store even without news.
const STORE_RECHECK: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a stream token lives.
pub const STREAM_TOKEN_SECS: i64 = 60;

/// What a follower sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FollowEvent {
    /// The command's state; `position` while queued.
    Status {
        command: Box<Command>,
        position: Option<u64>,
    },
    Output(Arc<OutputChunk>),
    Truncated,
    /// The last event: the command is final and all its stored output was sent.
    End {
        command: Box<Command>,
    },
}

/// Caps open streams per replica and per key. A permit releases its slot when dropped.
pub struct StreamLimiter {
    max_total: usize,
    max_per_key: usize,
    open: Mutex<(usize, HashMap<ApiKeyId, usize>)>,
    metrics: Arc<dyn CommandMetrics>,
}

pub struct StreamPermit {
    limiter: Arc<StreamLimiter>,
    key: ApiKeyId,
    command: CommandId,
}

impl StreamLimiter {
    pub fn new(
        max_total: usize,
        max_per_key: usize,
        metrics: Arc<dyn CommandMetrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_key,
            open: Mutex::new((0, HashMap::new())),
            metrics,
        })
    }

    pub fn acquire(
        self: &Arc<Self>,
        key: ApiKeyId,
        command: CommandId,
    ) -> Result<StreamPermit, ServiceError> {
        let mut open = self
            .open
            .lock()
            .expect("stream limiter lock is never poisoned");
        let (total, per_key) = &mut *open;
        let of_key = per_key.get(&key).copied().unwrap_or(0);
        if *total >= self.max_total || of_key >= self.max_per_key {
            return Err(ServiceError::TooManyStreams);
        }
        *total += 1;
        per_key.insert(key, of_key + 1);
        self.metrics.stream_opened();
        tracing::info!(%command, %key, open = *total, "SSE connection opened");
        Ok(StreamPermit {
            limiter: self.clone(),
            key,
            command,
        })
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self
            .limiter
            .open
            .lock()
            .expect("stream limiter lock is never poisoned");
        let (total, per_key) = &mut *open;
        *total -= 1;
        if let Some(count) = per_key.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                per_key.remove(&self.key);
            }
        }
        self.limiter.metrics.stream_closed();
        tracing::info!(command = %self.command, key = %self.key, open = *total, "SSE connection closed");
    }
}

/// Short-lived, command-bound tokens for clients that cannot send headers (`EventSource`):
/// `<command>.<key>.<expiry>.<HMAC-SHA256>`.
pub struct StreamTokens {
    secret: Vec<u8>,
}

impl StreamTokens {
    pub fn new(secret: Vec<u8>) -> Self {
        Self { secret }
    }

    pub fn issue(
        &self,
        command: CommandId,
        key: ApiKeyId,
        now: OffsetDateTime,
    ) -> (String, OffsetDateTime) {
        let expires = now + time::Duration::seconds(STREAM_TOKEN_SECS);
        let claims = format!("{command}.{key}.{}", expires.unix_timestamp());
        let token = format!("{claims}.{}", URL_SAFE_NO_PAD.encode(self.sign(&claims)));
        (token, expires)
    }

    /// The key the token was issued to, if it is genuine, unexpired and for `command`.
    pub fn verify(&self, token: &str, command: CommandId, now: OffsetDateTime) -> Option<ApiKeyId> {
        let (claims, signature) = token.rsplit_once('.')?;
        let signature = URL_SAFE_NO_PAD.decode(signature).ok()?;
        let mut mac = self.mac();
        mac.update(claims.as_bytes());
        mac.verify_slice(&signature).ok()?;
        let mut parts = claims.split('.');
        let (for_command, key, expires) = (parts.next()?, parts.next()?, parts.next()?);
        let expires: i64 = expires.parse().ok()?;
        (for_command == command.to_string() && now.unix_timestamp() < expires)
            .then(|| key.parse().ok())
            .flatten()
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes keys of any length")
    }

    fn sign(&self, claims: &str) -> Vec<u8> {
        let mut mac = self.mac();
        mac.update(claims.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }
}

pub struct FollowService {
    commands: Arc<CommandService>,
    store: Arc<dyn CommandStore>,
    output: Arc<dyn OutputStore>,
    bus: Arc<dyn OutputBus>,
    clock: Arc<dyn Clock>,
    limiter: Arc<StreamLimiter>,
    tokens: StreamTokens,
}

pub struct FollowPorts {
    pub store: Arc<dyn CommandStore>,
    pub output: Arc<dyn OutputStore>,
    pub bus: Arc<dyn OutputBus>,
    pub clock: Arc<dyn Clock>,
}

impl FollowService {
    pub fn new(
        commands: Arc<CommandService>,
        ports: FollowPorts,
        limiter: Arc<StreamLimiter>,
        tokens: StreamTokens,
    ) -> Self {
        Self {
            commands,
            store: ports.store,
            output: ports.output,
            bus: ports.bus,
            clock: ports.clock,
            limiter,
            tokens,
        }
    }

    pub async fn issue_token(
        &self,
        caller: &Caller,
        id: CommandId,
    ) -> Result<(String, OffsetDateTime), ServiceError> {
        self.commands.visible(caller, id).await?;
        Ok(self.tokens.issue(id, caller.key_id, self.clock.now()))
    }

    /// The key a stream token stands for, or `None` when it is not valid for `id`.
    pub fn token_key(&self, token: &str, id: CommandId) -> Option<ApiKeyId> {
        self.tokens.verify(token, id, self.clock.now())
    }

    /// Events of command `id` after output sequence `after`. The stream holds a slot of the
    /// stream limits until it is dropped.
    pub async fn follow(
        &self,
        caller: &Caller,
        id: CommandId,
        after: i64,
    ) -> Result<impl Stream<Item = FollowEvent> + Send + use<>, ServiceError> {
        self.commands.visible(caller, id).await?;
        let permit = self.limiter.acquire(caller.key_id, id)?;
        // Subscribe before the first read: whatever is published afterwards is not missed.
        let subscription = self.bus.subscribe(id);
        let follower = Follower {
            id,
            store: self.store.clone(),
            output: self.output.clone(),
            subscription,
            // Sequence numbers are dense from 1; anything past that range resumes at its end.
            last_seq: after.clamp(0, i64::MAX / 2),
            pending: VecDeque::new(),
            phase: Phase::Start,
            last_status: None,
            truncated_sent: false,
            _permit: permit,
        };
        Ok(futures::stream::unfold(
            follower,
            |mut follower| async move { follower.next_event().await.map(|event| (event, follower)) },
        ))
    }
}

enum Phase {
    Start,
    CatchUp,
    Live,
    Done,
}

struct Follower {
    id: CommandId,
    store: Arc<dyn CommandStore>,
    output: Arc<dyn OutputStore>,
    subscription: Box<dyn Subscription>,
    last_seq: i64,
    pending: VecDeque<FollowEvent>,
    phase: Phase,
    last_status: Option<CommandStatus>,
    truncated_sent: bool,
    _permit: StreamPermit,
}

impl Follower {
    async fn next_event(&mut self) -> Option<FollowEvent> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            match self.phase {
                Phase::Done => return None,
                Phase::Start | Phase::CatchUp => {
                    if let Err(error) = self.catch_up().await {
                        tracing::warn!(command = %self.id, %error, "event stream ended by a store error");
                        self.phase = Phase::Done;
                    }
                }
                Phase::Live => self.follow_live().await,
            }
        }
    }

    /// Reads the command, then one page of output after `last_seq`. The command is read first:
    /// if it was already final, the output read after it is complete.
    async fn catch_up(&mut self) -> Result<(), crate::ports::PortError> {
        let command = self.store.get(self.id).await?;
        let chunks = self
            .output
            .read_after(self.id, self.last_seq, REPLAY_PAGE)
            .await?;
        if self.last_status != Some(command.status) && !command.status.is_final() {
            let position = if command.status == CommandStatus::Queued {
                self.store.position(self.id).await?
            } else {
                None
            };
            self.last_status = Some(command.status);
            self.pending.push_back(FollowEvent::Status {
                command: Box::new(command.clone()),
                position,
            });
        }
        let full_page = chunks.len() == REPLAY_PAGE as usize;
        for chunk in chunks {
            self.last_seq = chunk.seq;
            self.pending.push_back(FollowEvent::Output(Arc::new(chunk)));
        }
        if full_page {
            self.phase = Phase::CatchUp;
            return Ok(());
        }
        if command.truncated && !self.truncated_sent {
            self.truncated_sent = true;
            self.pending.push_back(FollowEvent::Truncated);
        }
        if command.status.is_final() {
            self.pending.push_back(FollowEvent::Status {
                command: Box::new(command.clone()),
                position: None,
            });
            self.pending.push_back(FollowEvent::End {
                command: Box::new(command),
            });
            self.phase = Phase::Done;
        } else {
            self.phase = Phase::Live;
        }
        Ok(())
    }

    async fn follow_live(&mut self) {
        // Hints from other replicas are best effort: look at the store now and then anyway.
        let received = tokio::select! {
            received = self.subscription.next() => received,
            _ = tokio::time::sleep(STORE_RECHECK) => {
                self.phase = Phase::CatchUp;
                return;
            }
        };
        match received {
            Received::Event(BusEvent::Output(chunk)) => {
                if chunk.seq == self.last_seq + 1 {
                    self.last_seq = chunk.seq;
                    self.pending.push_back(FollowEvent::Output(chunk));
                } else if chunk.seq > self.last_seq + 1 {
                    // Missed some: the store has them (output is stored before it is published).
                    self.phase = Phase::CatchUp;
                }
            }
            Received::Event(BusEvent::Truncated) => {
                if !self.truncated_sent {
                    self.truncated_sent = true;
                    self.pending.push_back(FollowEvent::Truncated);
                }
            }
            Received::Event(BusEvent::Stored { last_seq }) => {
                if last_seq > self.last_seq {
                    self.phase = Phase::CatchUp;
                }
            }
            Received::Event(BusEvent::Status(_)) | Received::Lagged => self.phase = Phase::CatchUp,
            Received::Event(BusEvent::CancelRequested) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_tokens_are_bound_to_command_and_time() {
        let tokens = StreamTokens::new(b"secret".to_vec());
        let (command, key) = (CommandId::new(), ApiKeyId::new());
        let now = OffsetDateTime::now_utc();
        let (token, _) = tokens.issue(command, key, now);
        assert_eq!(tokens.verify(&token, command, now), Some(key));
        assert_eq!(tokens.verify(&token, CommandId::new(), now), None);
        let later = now + time::Duration::seconds(STREAM_TOKEN_SECS + 1);
        assert_eq!(tokens.verify(&token, command, later), None);
        let forged = token.replace(&key.to_string(), &ApiKeyId::new().to_string());
        assert_eq!(tokens.verify(&forged, command, now), None);
        assert_eq!(
            StreamTokens::new(b"other".to_vec()).verify(&token, command, now),
            None
        );
    }
}
