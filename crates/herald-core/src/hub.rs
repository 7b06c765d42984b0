//! The hub: registers connections, assigns ids through the history, fans events out to inboxes,
//! answers presence and closes users. Publishing never waits on a subscriber.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use slab::Slab;

use crate::event::{EventId, Message};
use crate::history::{History, HistoryError, MemoryHistory};
use crate::index::SelectorIndex;
use crate::name::{Selector, UserId};
use crate::stream::EventStream;
use crate::subscriber::{Ending, Offer, Subscriber};

/// Settings of a hub. Build with [`Hub::builder`].
#[derive(Clone)]
pub struct HubBuilder {
    history: Option<Arc<dyn History>>,
    history_len: usize,
    heartbeat: Duration,
    retry: Duration,
    queue_capacity: usize,
    max_connections: usize,
    max_selectors: usize,
}

impl std::fmt::Debug for HubBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubBuilder")
            .field("history_len", &self.history_len)
            .field("heartbeat", &self.heartbeat)
            .field("retry", &self.retry)
            .field("queue_capacity", &self.queue_capacity)
            .field("max_connections", &self.max_connections)
            .field("max_selectors", &self.max_selectors)
            .finish_non_exhaustive()
    }
}

impl Default for HubBuilder {
    fn default() -> Self {
        HubBuilder {
            history: None,
            history_len: 10_000,
            heartbeat: Duration::from_secs(15),
            retry: Duration::from_secs(3),
            queue_capacity: 1024,
            max_connections: usize::MAX,
            max_selectors: 64,
        }
    }
}

impl HubBuilder {
    /// Use this history store (default: in memory, keeping `history_len` events).
    pub fn history(mut self, history: Arc<dyn History>) -> Self {
        self.history = Some(history);
        self
    }
    /// How many events the default in-memory history keeps for replay (default 10000).
    pub fn history_len(mut self, n: usize) -> Self {
        self.history_len = n;
        self
    }
    /// Interval of the comment line that keeps idle streams alive and finds dead ones (default 15s).
    pub fn heartbeat(mut self, d: Duration) -> Self {
        self.heartbeat = d;
        self
    }
    /// Reconnect delay told to clients in the stream's first line (default 3s).
    pub fn retry(mut self, d: Duration) -> Self {
        self.retry = d;
        self
    }
    /// Events queued per connection before it counts as lagging and catches up from history.
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.queue_capacity = n.max(1);
        self
    }
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }
    pub fn max_selectors(mut self, n: usize) -> Self {
        self.max_selectors = n;
        self
    }

    /// Builds the hub and starts its heartbeat timer. Must be called inside a Tokio runtime.
    pub fn build(self) -> Result<Hub, HubError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| HubError::NoRuntime)?;
        if self.heartbeat.is_zero() {
            return Err(HubError::ZeroHeartbeat);
        }
        let history = self
            .history
            .unwrap_or_else(|| Arc::new(MemoryHistory::new(self.history_len)));
        let retry_ms = u32::try_from(self.retry.as_millis()).unwrap_or(u32::MAX);
        let inner = Arc::new(Inner {
            history,
            preamble: format!("retry: {retry_ms}\n: herald\n\n").into(),
            queue_capacity: self.queue_capacity,
            max_connections: self.max_connections,
            max_selectors: self.max_selectors,
            publish_lock: tokio::sync::Mutex::new(()),
            registry: RwLock::new(Registry::default()),
            last_fanned_out: AtomicU64::new(0),
            blocked: Mutex::new(HashMap::new()),
            shutting_down: AtomicBool::new(false),
            counters: Counters::default(),
            started: Instant::now(),
        });
        let weak = Arc::downgrade(&inner);
        let period = self.heartbeat;
        runtime.spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                inner.heartbeat();
            }
        });
        Ok(Hub { inner })
    }
}

/// Why a hub could not be built.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("the hub must be built inside a Tokio runtime")]
    NoRuntime,
    #[error("the heartbeat interval must be greater than zero")]
    ZeroHeartbeat,
}

/// Why a subscription was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("{given} topic selectors given, at most {max} are allowed")]
    TooManySelectors { given: usize, max: usize },
    #[error("this user's connections are blocked for another {0:?}")]
    Blocked(Duration),
    #[error("the hub is at its connection limit ({0})")]
    AtCapacity(usize),
    #[error("the hub is shutting down")]
    ShuttingDown,
}

/// Why a publish was refused. Nothing of a refused publish is stored or delivered.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("message {index} has no target (give topics, users or broadcast)")]
    NoTarget { index: usize },
    #[error("an empty batch publishes nothing")]
    EmptyBatch,
    #[error(transparent)]
    Store(#[from] HistoryError),
}

/// What a new connection asks for.
#[derive(Debug, Clone, Default)]
pub struct SubscribeRequest {
    pub selectors: Vec<Selector>,
    pub user: Option<UserId>,
    /// The client's last event id (`Last-Event-ID`), as it sent it; empty counts as none.
    pub last_event_id: Option<String>,
}

/// The result of publishing one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub id: EventId,
    /// Connections on this node the event was queued for (or will catch up with it from history).
    pub delivered: usize,
}

/// Counts since start, for `/stats` and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub connections: usize,
    pub users: usize,
    /// Distinct selectors currently subscribed.
    pub topics: usize,
    pub published: u64,
    pub delivered: u64,
    pub replayed: u64,
    pub gaps: u64,
    /// Connections whose queue overflowed and that have not yet caught up from history.
    pub lagging: usize,
    pub uptime: Duration,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) published: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) replayed: AtomicU64,
    pub(crate) gaps: AtomicU64,
    pub(crate) lagging: AtomicUsize,
}

/// A push hub. Cheap to clone; all clones share one hub.
#[derive(Clone, Debug)]
pub struct Hub {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) history: Arc<dyn History>,
    pub(crate) preamble: bytes::Bytes,
    queue_capacity: usize,
    max_connections: usize,
    max_selectors: usize,
    /// Serialises append + fan-out so every inbox sees events in id order.
    publish_lock: tokio::sync::Mutex<()>,
    registry: RwLock<Registry>,
    /// The newest id whose fan-out has started; read under the registry write lock it tells a new
    /// connection which events it will get live and which it must not.
    last_fanned_out: AtomicU64,
    blocked: Mutex<HashMap<UserId, Instant>>,
    shutting_down: AtomicBool,
    pub(crate) counters: Counters,
    started: Instant,
}

#[derive(Debug, Default)]
struct Registry {
    subs: Slab<Arc<Subscriber>>,
    users: BTreeMap<UserId, Vec<Arc<Subscriber>>>,
    index: SelectorIndex,
}

impl Hub {
    pub fn builder() -> HubBuilder {
        HubBuilder::default()
    }

    /// Registers a connection and returns its stream of SSE frames. The registration is in place
    /// when this returns, so every event published afterwards reaches the stream.
    pub fn subscribe(&self, req: SubscribeRequest) -> Result<EventStream, SubscribeError> {
        let inner = &self.inner;
        if inner.shutting_down.load(Ordering::Acquire) {
            return Err(SubscribeError::ShuttingDown);
        }
        if req.selectors.len() > inner.max_selectors {
            return Err(SubscribeError::TooManySelectors {
                given: req.selectors.len(),
                max: inner.max_selectors,
            });
        }
        if let Some(user) = &req.user {
            let mut blocked = inner.blocked.lock();
            if let Some(until) = blocked.get(user) {
                let now = Instant::now();
                if *until > now {
                    return Err(SubscribeError::Blocked(*until - now));
                }
                blocked.remove(user);
            }
        }
        let mut selectors = req.selectors;
        selectors.sort();
        selectors.dedup();
        let resume = req.last_event_id.filter(|s| !s.is_empty());

        let mut reg = inner.registry.write();
        if reg.subs.len() >= inner.max_connections {
            return Err(SubscribeError::AtCapacity(inner.max_connections));
        }
        let entry = reg.subs.vacant_entry();
        let sub = Arc::new(Subscriber::new(entry.key(), req.user, selectors));
        entry.insert(sub.clone());
        if let Some(user) = &sub.user {
            reg.users.entry(user.clone()).or_default().push(sub.clone());
        }
        for selector in &sub.selectors {
            reg.index.insert(selector, &sub);
        }
        let baseline = match inner.last_fanned_out.load(Ordering::Acquire) {
            0 => None,
            id => Some(EventId(id)),
        };
        drop(reg);
        Ok(EventStream::new(self.inner.clone(), sub, resume, baseline))
    }

    /// Publishes one message.
    pub async fn publish(&self, message: Message) -> Result<Published, PublishError> {
        let mut out = self.publish_batch(vec![message]).await?;
        Ok(out.remove(0))
    }

    /// Publishes messages in order, all or none.
    pub async fn publish_batch(
        &self,
        messages: Vec<Message>,
    ) -> Result<Vec<Published>, PublishError> {
        if messages.is_empty() {
            return Err(PublishError::EmptyBatch);
        }
        if let Some(index) = messages.iter().position(|m| m.targets.is_empty()) {
            return Err(PublishError::NoTarget { index });
        }
        let inner = &self.inner;
        let _order = inner.publish_lock.lock().await;
        let events = inner.history.append(messages).await?;
        let reg = inner.registry.read();
        let mut results = Vec::with_capacity(events.len());
        for event in &events {
            inner.last_fanned_out.store(event.id.0, Ordering::Release);
            let mut delivered = 0;
            let mut offer = |sub: &Arc<Subscriber>| match sub.offer(event, inner.queue_capacity) {
                Offer::Skipped => {}
                Offer::Queued | Offer::Lagging => delivered += 1,
                Offer::Overflowed => {
                    inner.counters.lagging.fetch_add(1, Ordering::Relaxed);
                    delivered += 1;
                }
            };
            if event.targets.broadcast {
                reg.subs.iter().for_each(|(_, s)| offer(s));
            } else {
                for topic in &event.targets.topics {
                    reg.index.for_each_match(topic, &mut offer);
                }
                for user in &event.targets.users {
                    if let Some(subs) = reg.users.get(user) {
                        subs.iter().for_each(&mut offer);
                    }
                }
            }
            results.push(Published {
                id: event.id,
                delivered,
            });
        }
        drop(reg);
        let delivered: usize = results.iter().map(|r| r.delivered).sum();
        let counters = &inner.counters;
        counters
            .published
            .fetch_add(results.len() as u64, Ordering::Relaxed);
        counters
            .delivered
            .fetch_add(delivered as u64, Ordering::Relaxed);
        Ok(results)
    }

    /// Online users with their connection counts, sorted by id, after `after`, at most `limit`.
    pub fn users(&self, after: Option<&UserId>, limit: usize) -> Vec<(UserId, usize)> {
        let reg = self.inner.registry.read();
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        reg.users
            .range::<UserId, _>((lower, Bound::Unbounded))
            .take(limit)
            .map(|(u, subs)| (u.clone(), subs.len()))
            .collect()
    }

    /// Open connections of `user` on this hub.
    pub fn connections_of(&self, user: &UserId) -> usize {
        self.inner
            .registry
            .read()
            .users
            .get(user)
            .map_or(0, Vec::len)
    }

    /// Ends every stream of `user` with `herald.close` (after what is already queued), and with
    /// `block` refuses that user's new connections for that long. Returns how many were closed.
    pub fn close_user(&self, user: &UserId, reason: &str, block: Option<Duration>) -> usize {
        if let Some(d) = block.filter(|d| !d.is_zero()) {
            self.inner
                .blocked
                .lock()
                .insert(user.clone(), Instant::now() + d);
        }
        let reg = self.inner.registry.read();
        let subs = reg.users.get(user).map_or(&[][..], Vec::as_slice);
        for sub in subs {
            sub.end(Ending::Closed(reason.to_string()));
        }
        subs.len()
    }

    pub fn stats(&self) -> Stats {
        let inner = &self.inner;
        let reg = inner.registry.read();
        let c = &inner.counters;
        Stats {
            connections: reg.subs.len(),
            users: reg.users.len(),
            topics: reg.index.distinct(),
            published: c.published.load(Ordering::Relaxed),
            delivered: c.delivered.load(Ordering::Relaxed),
            replayed: c.replayed.load(Ordering::Relaxed),
            gaps: c.gaps.load(Ordering::Relaxed),
            lagging: c.lagging.load(Ordering::Relaxed),
            uptime: inner.started.elapsed(),
        }
    }

    /// Refuses new connections and ends every stream without `herald.close`, so clients reconnect
    /// (to this hub's successor) with their last id.
    pub fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::Release);
        for (_, sub) in self.inner.registry.read().subs.iter() {
            sub.end(Ending::Shutdown);
        }
    }

    pub fn history(&self) -> &Arc<dyn History> {
        &self.inner.history
    }
}

impl Inner {
    fn heartbeat(&self) {
        for (_, sub) in self.registry.read().subs.iter() {
            sub.heartbeat();
        }
        let now = Instant::now();
        self.blocked.lock().retain(|_, until| *until > now);
    }

    /// Removes a connection from every index; called when its stream is dropped.
    pub(crate) fn unregister(&self, sub: &Arc<Subscriber>) {
        let mut reg = self.registry.write();
        reg.subs.try_remove(sub.key);
        if let Some(user) = &sub.user
            && let Some(list) = reg.users.get_mut(user)
        {
            list.retain(|s| !Arc::ptr_eq(s, sub));
            if list.is_empty() {
                reg.users.remove(user);
            }
        }
        for selector in &sub.selectors {
            reg.index.remove(selector, sub);
        }
    }
}
