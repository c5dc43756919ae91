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
/// Signed tokens that stand for an API key on one command's event stream (for `EventSource`,
/// which cannot send headers). A token opens the stream until its expiry; after that it still
/// reopens it while the command has not ended, or ended less than the TTL ago, because
/// `EventSource` reconnects with the very same URL.
pub struct StreamTokens {
    secret: Vec<u8>,
    ttl: time::Duration,
}

/// What a genuine token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClaims {
    pub key: ApiKeyId,
    /// The key's public part when the token was issued: the token dies with a rotation.
    pub key_prefix: String,
    pub expires: OffsetDateTime,
}

impl StreamTokens {
    pub fn new(secret: Vec<u8>, ttl: std::time::Duration) -> Self {
        Self {
            secret,
            ttl: time::Duration::try_from(ttl).unwrap_or(time::Duration::MAX),
        }
    }

    pub fn issue(
        &self,
        command: CommandId,
        key: ApiKeyId,
        key_prefix: &str,
        now: OffsetDateTime,
    ) -> (String, OffsetDateTime) {
        let expires = now + self.ttl;
        let claims = format!("{command}.{key}.{key_prefix}.{}", expires.unix_timestamp());
        let token = format!("{claims}.{}", URL_SAFE_NO_PAD.encode(self.sign(&claims)));
        (token, expires)
    }

    /// What the token says, if it is genuine and for `command` (expired or not).
    pub fn verify(&self, token: &str, command: CommandId) -> Option<TokenClaims> {
        let (claims, signature) = token.rsplit_once('.')?;
        let signature = URL_SAFE_NO_PAD.decode(signature).ok()?;
        let mut mac = self.mac();
        mac.update(claims.as_bytes());
        mac.verify_slice(&signature).ok()?;
        let mut parts = claims.split('.');
        let (for_command, key, key_prefix, expires) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if for_command != command.to_string() {
            return None;
        }
        Some(TokenClaims {
            key: key.parse().ok()?,
            key_prefix: key_prefix.to_owned(),
            expires: OffsetDateTime::from_unix_timestamp(expires.parse().ok()?).ok()?,
        })
    }

    /// Whether a genuine token still opens the stream of a command in this state.
    pub fn admits(&self, claims: &TokenClaims, command: &Command, now: OffsetDateTime) -> bool {
        now < claims.expires
            || command
                .finished_at
                .is_none_or(|finished| now < finished + self.ttl)
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
    store_recheck: Option<std::time::Duration>,
}

pub struct FollowPorts {
    pub store: Arc<dyn CommandStore>,
    pub output: Arc<dyn OutputStore>,
    pub bus: Arc<dyn OutputBus>,
    pub clock: Arc<dyn Clock>,
    /// How often an idle follower re-reads the store without news: `Some` where the bus carries
    /// other replicas' events as best-effort hints (Postgres), `None` where it sees every event
    /// (one process).
    pub store_recheck: Option<std::time::Duration>,
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
            store_recheck: ports.store_recheck,
        }
    }

    pub async fn issue_token(
        &self,
        caller: &Caller,
        id: CommandId,
    ) -> Result<(String, OffsetDateTime), ServiceError> {
        self.commands.visible(caller, id).await?;
        Ok(self
            .tokens
            .issue(id, caller.key_id, &caller.key_prefix, self.clock.now()))
    }

    /// The key a stream token stands for, or `None` when it does not open `id`'s stream now.
    pub async fn token_key(
        &self,
        token: &str,
        id: CommandId,
    ) -> Result<Option<TokenClaims>, ServiceError> {
        let Some(claims) = self.tokens.verify(token, id) else {
            return Ok(None);
        };
        let now = self.clock.now();
        if now < claims.expires {
            return Ok(Some(claims));
        }
        let command = self
            .store
            .get(id)
            .await
            .map_err(|e| ServiceError::from_port(e, "command"))?;
        Ok(self.tokens.admits(&claims, &command, now).then_some(claims))
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
            store_recheck: self.store_recheck,
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
    store_recheck: Option<std::time::Duration>,
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
        let recheck = async {
            match self.store_recheck {
                Some(every) => tokio::time::sleep(every).await,
                None => std::future::pending().await,
            }
        };
        let received = tokio::select! {
            received = self.subscription.next() => received,
            _ = recheck => {
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

    const TTL: std::time::Duration = std::time::Duration::from_secs(60);

    fn command(finished_at: Option<OffsetDateTime>) -> Command {
        use crate::domain::command::{CommandLine, CommandStatus, Priority};
        Command {
            id: CommandId::new(),
            project_id: crate::domain::ids::ProjectId::new(),
            command: CommandLine::from_trusted("true".into()),
            env: Default::default(),
            priority: Priority::Normal,
            timeout_secs: 60,
            status: if finished_at.is_some() {
                CommandStatus::Succeeded
            } else {
                CommandStatus::Running
            },
            submitted_by: None,
            created_at: OffsetDateTime::now_utc(),
            started_at: None,
            finished_at,
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

    #[test]
    fn stream_tokens_are_bound_to_their_command_key_and_secret() {
        let tokens = StreamTokens::new(b"secret".to_vec(), TTL);
        let (command, key) = (CommandId::new(), ApiKeyId::new());
        let now = OffsetDateTime::now_utc();
        let (token, expires) = tokens.issue(command, key, "abcd1234", now);
        assert_eq!(tokens.verify(&token, command).map(|c| c.key), Some(key));
        assert_eq!(
            tokens.verify(&token, command).map(|c| c.key_prefix),
            Some("abcd1234".to_owned())
        );
        let other_prefix = token.replace("abcd1234", "zzzz9999");
        assert_eq!(tokens.verify(&other_prefix, command), None);
        assert_eq!(
            tokens
                .verify(&token, command)
                .map(|c| c.expires.unix_timestamp()),
            Some(expires.unix_timestamp())
        );
        assert_eq!(tokens.verify(&token, CommandId::new()), None);
        let forged = token.replace(&key.to_string(), &ApiKeyId::new().to_string());
        assert_eq!(tokens.verify(&forged, command), None);
        assert_eq!(
            StreamTokens::new(b"other".to_vec(), TTL).verify(&token, command),
            None
        );
    }

    #[test]
    fn an_expired_token_reopens_only_a_command_that_has_not_long_ended() {
        let tokens = StreamTokens::new(b"secret".to_vec(), TTL);
        let now = OffsetDateTime::now_utc();
        let claims = TokenClaims {
            key: ApiKeyId::new(),
            key_prefix: "abcd1234".into(),
            expires: now + TTL,
        };
        let hour_later = now + time::Duration::hours(1);
        let running = command(None);
        assert!(tokens.admits(&claims, &running, now));
        assert!(
            tokens.admits(&claims, &running, hour_later),
            "reconnects while it runs"
        );
        let just_ended = command(Some(hour_later - time::Duration::seconds(10)));
        assert!(tokens.admits(&claims, &just_ended, hour_later));
        let long_ended = command(Some(now + time::Duration::seconds(30)));
        assert!(!tokens.admits(&claims, &long_ended, hour_later));
        assert!(
            tokens.admits(&claims, &long_ended, now),
            "an unexpired token opens any state"
        );
    }
}
