//! The in-process output bus and work signal: one shared broadcast ring per followed command (no
//! per-subscriber queues), and a `Notify` for idle workers. With a [`Relay`], it also sends
//! coalesced hints to other replicas, and takes theirs through [`RemoteInbox`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, broadcast};

use crate::domain::command::CommandStatus;
use crate::domain::ids::CommandId;
use crate::ports::{
    BusEvent, ChangeListener, ChangeNotices, Changed, OutputBus, Received, Relay, RemoteHint,
    RemoteInbox, Subscription, WorkSignal,
};

/// Events one command's ring holds; a follower further behind than this reads the store.
const RING_CAPACITY: usize = 256;
/// Hints to other replicas are sent together at most this often: a NOTIFY takes a global lock
/// at commit, so one per event would serialise every replica on it.
const HINT_INTERVAL: Duration = Duration::from_millis(20);

/// How long a cancel request is remembered for a subscriber that comes later: a worker that
/// claimed the command a moment ago subscribes after the request may have been published.
const CANCEL_MEMORY: Duration = Duration::from_secs(60);

type Rings = Mutex<HashMap<CommandId, broadcast::Sender<BusEvent>>>;

pub struct InProcessBus {
    rings: Arc<Rings>,
    /// Recent cancel requests, so a subscription opened just after one still sees it.
    recent_cancels: Mutex<HashMap<CommandId, std::time::Instant>>,
    work: Notify,
    relay: Option<Arc<dyn Relay>>,
    unsent: Mutex<UnsentHints>,
    change_listeners: Mutex<Vec<Arc<dyn ChangeListener>>>,
}

/// Hints waiting for the next flush, coalesced: the highest stored sequence per command, the
/// latest status per command, cancels, and whether there is new work at all.
#[derive(Default)]
struct UnsentHints {
    stored: HashMap<CommandId, i64>,
    status: HashMap<CommandId, CommandStatus>,
    cancel: Vec<CommandId>,
    work: bool,
    changed: std::collections::HashSet<Changed>,
}

impl UnsentHints {
    fn take(&mut self) -> Vec<RemoteHint> {
        let mut hints: Vec<RemoteHint> = self
            .stored
            .drain()
            .map(|(command, last_seq)| RemoteHint::Stored { command, last_seq })
            .collect();
        hints.extend(
            self.status
                .drain()
                .map(|(command, status)| RemoteHint::Status { command, status }),
        );
        hints.extend(
            self.cancel
                .drain(..)
                .map(|command| RemoteHint::Cancel { command }),
        );
        if std::mem::take(&mut self.work) {
            hints.push(RemoteHint::Work);
        }
        hints.extend(self.changed.drain().map(RemoteHint::Changed));
        hints
    }
}

impl InProcessBus {
    /// A bus for one process.
    pub fn local() -> Arc<Self> {
        Arc::new(Self::with_relay(None))
    }

    /// A bus that also tells other replicas through `relay`, and a task that flushes its hints.
    pub fn relayed(relay: Arc<dyn Relay>) -> Arc<Self> {
        let bus = Arc::new(Self::with_relay(Some(relay)));
        tokio::spawn(flush_hints(Arc::downgrade(&bus)));
        bus
    }

    fn with_relay(relay: Option<Arc<dyn Relay>>) -> Self {
        Self {
            rings: Arc::new(Mutex::new(HashMap::new())),
            recent_cancels: Mutex::new(HashMap::new()),
            work: Notify::new(),
            relay,
            unsent: Mutex::new(UnsentHints::default()),
            change_listeners: Mutex::new(Vec::new()),
        }
    }

    fn deliver_locally(&self, command: CommandId, event: BusEvent) {
        if matches!(event, BusEvent::CancelRequested) {
            let mut recent = self
                .recent_cancels
                .lock()
                .expect("bus lock is never poisoned");
            recent.retain(|_, at| at.elapsed() < CANCEL_MEMORY);
            recent.insert(command, std::time::Instant::now());
        }
        let rings = self.rings.lock().expect("bus lock is never poisoned");
        if let Some(ring) = rings.get(&command) {
            // No receivers left is fine: nobody is following.
            let _ = ring.send(event);
        }
    }

    /// Queues a hint for the next flush (nothing to do without a relay).
    fn relay(&self, add: impl FnOnce(&mut UnsentHints)) {
        if self.relay.is_some() {
            add(&mut self.unsent.lock().expect("bus lock is never poisoned"));
        }
    }

    /// `listener` hears of keys and projects changed on other replicas.
    pub fn listen_for_changes(&self, listener: Arc<dyn ChangeListener>) {
        self.change_listeners
            .lock()
            .expect("bus lock is never poisoned")
            .push(listener);
    }

    /// Open rings (commands being followed on this replica).
    pub fn followed_commands(&self) -> usize {
        self.rings.lock().expect("bus lock is never poisoned").len()
    }
}

async fn flush_hints(bus: Weak<InProcessBus>) {
    let mut tick = tokio::time::interval(HINT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(bus) = bus.upgrade() else { return };
        let hints = bus
            .unsent
            .lock()
            .expect("bus lock is never poisoned")
            .take();
        if let (false, Some(relay)) = (hints.is_empty(), &bus.relay) {
            relay.send(hints).await;
        }
    }
}

#[async_trait]
impl OutputBus for InProcessBus {
    async fn publish(&self, command: CommandId, event: BusEvent) {
        match &event {
            BusEvent::Output(chunk) => self.relay(|unsent| {
                let last = unsent.stored.entry(command).or_default();
                *last = (*last).max(chunk.seq);
            }),
            BusEvent::Status(status) => self.relay(|unsent| {
                unsent.status.insert(command, *status);
            }),
            BusEvent::CancelRequested => self.relay(|unsent| unsent.cancel.push(command)),
            // Truncation is read from the command row by remote followers.
            BusEvent::Truncated | BusEvent::Stored { .. } => {}
        }
        self.deliver_locally(command, event);
    }

    fn subscribe(&self, command: CommandId) -> Box<dyn Subscription> {
        let mut rings = self.rings.lock().expect("bus lock is never poisoned");
        let receiver = rings
            .entry(command)
            .or_insert_with(|| broadcast::channel(RING_CAPACITY).0)
            .subscribe();
        drop(rings);
        let cancelled = self
            .recent_cancels
            .lock()
            .expect("bus lock is never poisoned")
            .get(&command)
            .is_some_and(|at| at.elapsed() < CANCEL_MEMORY);
        Box::new(RingSubscription {
            command,
            first: cancelled.then_some(BusEvent::CancelRequested),
            receiver: Some(receiver),
            rings: self.rings.clone(),
        })
    }
}

#[async_trait]
impl WorkSignal for InProcessBus {
    async fn announce(&self) {
        self.work.notify_one();
        self.relay(|unsent| unsent.work = true);
    }

    async fn wait(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.work.notified()).await;
    }
}

impl ChangeNotices for InProcessBus {
    fn announce_change(&self, change: Changed) {
        self.relay(|unsent| {
            unsent.changed.insert(change);
        });
    }
}

impl RemoteInbox for InProcessBus {
    fn deliver(&self, hint: RemoteHint) {
        match hint {
            RemoteHint::Stored { command, last_seq } => {
                self.deliver_locally(command, BusEvent::Stored { last_seq })
            }
            RemoteHint::Status { command, status } => {
                self.deliver_locally(command, BusEvent::Status(status))
            }
            RemoteHint::Cancel { command } => {
                self.deliver_locally(command, BusEvent::CancelRequested)
            }
            RemoteHint::Work => self.work.notify_one(),
            RemoteHint::Changed(change) => {
                let listeners = self
                    .change_listeners
                    .lock()
                    .expect("bus lock is never poisoned")
                    .clone();
                listeners.iter().for_each(|l| l.changed(change));
            }
        }
    }
}

struct RingSubscription {
    command: CommandId,
    /// Delivered before anything from the ring (a cancel requested before subscribing).
    first: Option<BusEvent>,
    receiver: Option<broadcast::Receiver<BusEvent>>,
    rings: Arc<Rings>,
}

#[async_trait]
impl Subscription for RingSubscription {
    async fn next(&mut self) -> Received {
        if let Some(event) = self.first.take() {
            return Received::Event(event);
        }
        let receiver = self.receiver.as_mut().expect("present until drop");
        match receiver.recv().await {
            Ok(event) => Received::Event(event),
            Err(broadcast::error::RecvError::Lagged(_)) => Received::Lagged,
            // The ring outlives its subscribers, so it never closes under one.
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }
}

impl Drop for RingSubscription {
    fn drop(&mut self) {
        drop(self.receiver.take());
        let mut rings = self.rings.lock().expect("bus lock is never poisoned");
        if rings
            .get(&self.command)
            .is_some_and(|ring| ring.receiver_count() == 0)
        {
            rings.remove(&self.command);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::command::{OutputChunk, OutputStream};

    fn chunk(seq: i64) -> BusEvent {
        BusEvent::Output(Arc::new(OutputChunk {
            seq,
            stream: OutputStream::Stdout,
            data: format!("{seq}\n"),
        }))
    }

    #[tokio::test]
    async fn subscribers_share_one_ring_that_goes_away_with_them() {
        let bus = InProcessBus::local();
        let id = CommandId::new();
        let mut a = bus.subscribe(id);
        let mut b = bus.subscribe(id);
        bus.publish(id, chunk(1)).await;
        for sub in [&mut a, &mut b] {
            assert!(matches!(sub.next().await, Received::Event(BusEvent::Output(c)) if c.seq == 1));
        }
        assert_eq!(bus.followed_commands(), 1);
        drop((a, b));
        assert_eq!(bus.followed_commands(), 0);
    }

    #[tokio::test]
    async fn a_cancel_published_before_subscribing_is_still_seen() {
        let bus = InProcessBus::local();
        let id = CommandId::new();
        bus.publish(id, BusEvent::CancelRequested).await;
        let mut late = bus.subscribe(id);
        assert!(matches!(
            late.next().await,
            Received::Event(BusEvent::CancelRequested)
        ));
        let mut other = bus.subscribe(CommandId::new());
        bus.publish(id, chunk(1)).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(50), other.next())
                .await
                .is_err(),
            "another command's subscriber sees nothing"
        );
    }

    #[tokio::test]
    async fn a_lagging_subscriber_is_told_to_read_the_store() {
        let bus = InProcessBus::local();
        let id = CommandId::new();
        let mut slow = bus.subscribe(id);
        for seq in 1..=(RING_CAPACITY as i64 + 10) {
            bus.publish(id, chunk(seq)).await;
        }
        assert!(matches!(slow.next().await, Received::Lagged));
    }
}
