//! The hub: registers connections, assigns ids through the history, fans events out to inboxes,
//! answers presence and closes users. Publishing never waits on a subscriber.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::Waker;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use slab::Slab;
use tokio::sync::{mpsc, oneshot};

use crate::commit::Job;
use crate::event::{Event, EventId, Message, now_ms};
use crate::feed::Feed;
use crate::grant::{Expiries, Grant};
use crate::history::{History, HistoryError, MemoryHistory, ReadFrom, Retention, SharedHistory};
use crate::idempotency::Keys;
use crate::index::SelectorIndex;
use crate::name::{Selector, UserId};
use crate::stream::EventStream;
use crate::subscriber::{Ending, Offer, Subscriber};

/// Settings of a hub. Build with [`Hub::builder`].
#[derive(Clone)]
pub struct HubBuilder {
    history: Option<Arc<dyn History>>,
    shared: Option<Arc<dyn SharedHistory>>,
    retention: Retention,
    idempotency_window: Duration,
    heartbeat: Duration,
    retry: Duration,
    queue_capacity: usize,
    max_connections: usize,
    max_selectors: usize,
}

impl std::fmt::Debug for HubBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubBuilder")
            .field("retention", &self.retention)
            .field("idempotency_window", &self.idempotency_window)
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
            shared: None,
            retention: Retention::default(),
            idempotency_window: Duration::from_secs(300),
            heartbeat: Duration::from_secs(15),
            retry: Duration::from_secs(3),
            queue_capacity: 1024,
            max_connections: usize::MAX,
            max_selectors: 64,
        }
    }
}

impl HubBuilder {
    /// Use this history store (default: in memory, with [`retention`](Self::retention)).
    pub fn history(mut self, history: Arc<dyn History>) -> Self {
        self.history = Some(history);
        self
    }
    /// Use a history shared with other hubs (a cluster): publishes go to it, and this hub fans
    /// out what it reads back from it, so every hub delivers every event in the same order.
    pub fn shared_history(mut self, shared: Arc<dyn SharedHistory>) -> Self {
        self.history = Some(shared.clone());
        self.shared = Some(shared);
        self
    }
    /// How many events the default in-memory history keeps for replay (default 10000).
    pub fn history_len(mut self, n: usize) -> Self {
        self.retention.max_events = n;
        self
    }
    /// What the default in-memory history keeps (a store given to [`history`](Self::history)
    /// has its own).
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }
    /// How long a publish's idempotency key is remembered (default 5 minutes).
    pub fn idempotency_window(mut self, d: Duration) -> Self {
        self.idempotency_window = d;
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
            .unwrap_or_else(|| Arc::new(MemoryHistory::with_retention(self.retention)));
        let retry_ms = u32::try_from(self.retry.as_millis()).unwrap_or(u32::MAX);
        let (jobs, job_rx) = mpsc::channel(1024);
        let inner = Arc::new(Inner {
            history,
            shared: self.shared.clone(),
            feed: Feed::new(),
            jobs,
            preamble: format!("retry: {retry_ms}\n: herald\n\n").into(),
            queue_capacity: self.queue_capacity,
            max_connections: self.max_connections,
            max_selectors: self.max_selectors,
            registry: RwLock::new(Registry::default()),
            last_fanned_out: AtomicU64::new(0),
            blocked: Mutex::new(HashMap::new()),
            shutting_down: AtomicBool::new(false),
            expiries: Expiries::default(),
            counters: Counters::default(),
            started: Instant::now(),
        });
        runtime.spawn(crate::commit::commit_loop(
            Arc::downgrade(&inner),
            job_rx,
            Keys::new(self.idempotency_window),
        ));
        runtime.spawn(timers(Arc::downgrade(&inner), self.heartbeat));
        if let Some(shared) = self.shared {
            runtime.spawn(crate::feed::follow(Arc::downgrade(&inner), shared));
        }
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

/// Where a new connection's stream starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Start {
    /// Only events published from now on.
    #[default]
    Live,
    /// After this event id, as the client sent it (`Last-Event-ID`); an id this hub never wrote
    /// is reported as a gap.
    After(String),
    /// The events published within this long before now.
    Since(Duration),
    /// Everything retained.
    All,
}

/// What a new connection asks for.
#[derive(Debug, Clone, Default)]
pub struct SubscribeRequest {
    pub selectors: Vec<Selector>,
    pub user: Option<UserId>,
    pub start: Start,
    /// What the connection may see of private events (default: everything, as with no auth).
    pub grant: Grant,
    /// When the connection's token expires, in ms since the epoch: its stream then ends with
    /// `herald.close` `{"reason":"token_expired"}`.
    pub expires_at_ms: Option<u64>,
    /// Told how many events the start's replay sent, once it is over (not called for `Live`).
    pub on_replayed: Option<ReplayObserver>,
}

/// Called with the number of events a connection's replay from history sent (for metrics).
#[derive(Clone)]
pub struct ReplayObserver(pub Arc<dyn Fn(u64) + Send + Sync>);

impl std::fmt::Debug for ReplayObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplayObserver")
    }
}

/// The result of publishing one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub id: EventId,
    /// Connections on this node the event was queued for (or will catch up with it from history).
    pub delivered: usize,
    /// The message repeated an idempotency key: `id` is the original event's; nothing was sent.
    pub duplicate: bool,
}

/// Messages sent to one user, read from history.
#[derive(Debug)]
pub struct UserMessages {
    /// Set when retention dropped events the request asked for; holds the oldest retained id.
    pub gap: Option<Option<EventId>>,
    pub events: Vec<Arc<Event>>,
}

/// Counts since start, for `/stats` and `/metrics`. `published` counts the events this node
/// accepted; `delivered` the queueings this node made (in a cluster, a sum over nodes is the total).
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

pub(crate) struct Inner {
    pub(crate) history: Arc<dyn History>,
    /// Set in cluster mode: publishes go here and are fanned out by the follower.
    pub(crate) shared: Option<Arc<dyn SharedHistory>>,
    pub(crate) feed: Feed,
    /// Publishes wait here for the committer, which appends whole groups at once.
    jobs: mpsc::Sender<Job>,
    pub(crate) preamble: bytes::Bytes,
    queue_capacity: usize,
    max_connections: usize,
    max_selectors: usize,
    registry: RwLock<Registry>,
    /// The newest id whose fan-out has started; read under the registry write lock it tells a new
    /// connection which events it will get live and which it must not.
    last_fanned_out: AtomicU64,
    blocked: Mutex<HashMap<UserId, Instant>>,
    shutting_down: AtomicBool,
    pub(crate) expiries: Expiries,
    pub(crate) counters: Counters,
    started: Instant,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
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
        let start = match req.start {
            Start::After(id) if id.is_empty() => Start::Live,
            other => other,
        };

        let mut reg = inner.registry.write();
        if reg.subs.len() >= inner.max_connections {
            return Err(SubscribeError::AtCapacity(inner.max_connections));
        }
        let entry = reg.subs.vacant_entry();
        let sub = Arc::new(Subscriber::new(
            entry.key(),
            req.user,
            selectors,
            req.grant,
            req.expires_at_ms,
        ));
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
        inner.expiries.add(&sub);
        tracing::debug!(key = sub.key, user = ?sub.user, selectors = ?sub.selectors, start = ?start, "connection opened");
        Ok(EventStream::new(
            self.inner.clone(),
            sub,
            start,
            baseline,
            req.on_replayed,
        ))
    }

    /// Publishes one message.
    pub async fn publish(&self, message: Message) -> Result<Published, PublishError> {
        let mut out = self.publish_batch(vec![message]).await?;
        Ok(out.remove(0))
    }

    /// Publishes messages in order, all or none. Returns once they are stored and queued for
    /// every matching connection; concurrent publishes are committed together.
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
        let stopped = || PublishError::Store(HistoryError::Unavailable("the hub stopped".into()));
        let (reply, answer) = oneshot::channel();
        self.inner
            .jobs
            .send(Job { messages, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Messages sent to `user` (as a target, not by topic or broadcast) from `start`, at most `limit`.
    pub async fn user_messages(
        &self,
        user: &UserId,
        start: &Start,
        limit: usize,
    ) -> Result<UserMessages, HistoryError> {
        let mut from = match start {
            Start::Live => {
                return Ok(UserMessages {
                    gap: None,
                    events: Vec::new(),
                });
            }
            Start::After(raw) => match EventId::parse(raw) {
                Some(id) => ReadFrom::After(id),
                None => ReadFrom::Oldest,
            },
            Start::Since(d) => ReadFrom::Since(now_ms().saturating_sub(d.as_millis() as u64)),
            Start::All => ReadFrom::Oldest,
        };
        let unknown_id = matches!(start, Start::After(raw) if EventId::parse(raw).is_none());
        let mut out = UserMessages {
            gap: None,
            events: Vec::new(),
        };
        let mut first = true;
        loop {
            let chunk = self.inner.history.read(from, 512).await?;
            if first {
                out.gap = chunk.gap;
                if unknown_id {
                    out.gap = Some(chunk.events.first().map(|e| e.id));
                }
                first = false;
            }
            let Some(last) = chunk.events.last().map(|e| e.id) else {
                return Ok(out);
            };
            let full = chunk.events.len() == 512;
            for event in chunk.events {
                if event.targets.users.contains(user) {
                    out.events.push(event);
                    if out.events.len() == limit {
                        return Ok(out);
                    }
                }
            }
            if !full {
                return Ok(out);
            }
            from = ReadFrom::After(last);
        }
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

    /// False while a shared history (cluster mode) cannot be reached.
    pub fn is_ready(&self) -> bool {
        self.inner.feed.is_ready()
    }

    pub fn history(&self) -> &Arc<dyn History> {
        &self.inner.history
    }
}

impl Inner {
    /// Queues each event for every matching connection; returns how many connections per event.
    /// The writers to wake go to `wakers`: the caller wakes them once the group is queued.
    pub(crate) fn fan_out(&self, events: &[Arc<Event>], wakers: &mut Vec<Waker>) -> Vec<usize> {
        let reg = self.registry.read();
        let mut counts = Vec::with_capacity(events.len());
        for event in events {
            self.last_fanned_out.store(event.id.0, Ordering::Release);
            let mut delivered = 0;
            let mut offer = |sub: &Arc<Subscriber>| {
                if !sub.may_see(event) {
                    return;
                }
                match sub.offer(event, self.queue_capacity, wakers) {
                    Offer::Skipped => {}
                    Offer::Queued | Offer::Lagging => delivered += 1,
                    Offer::Overflowed => {
                        self.counters.lagging.fetch_add(1, Ordering::Relaxed);
                        delivered += 1;
                    }
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
            counts.push(delivered);
        }
        drop(reg);
        self.counters
            .delivered
            .fetch_add(counts.iter().sum::<usize>() as u64, Ordering::Relaxed);
        counts
    }

    /// The follower starts after `id`: new connections get what comes after it live.
    pub(crate) fn start_at(&self, id: EventId) {
        let _reg = self.registry.write();
        self.last_fanned_out.store(id.0, Ordering::Release);
    }

    /// Every connection catches up from history on its own (used when the follower skipped events).
    pub(crate) fn lag_everyone(&self) {
        for (_, sub) in self.registry.read().subs.iter() {
            if sub.mark_lagging() {
                self.counters.lagging.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn heartbeat(&self) {
        for (_, sub) in self.registry.read().subs.iter() {
            sub.heartbeat();
        }
    }

    async fn housekeeping(&self) {
        let now = Instant::now();
        self.blocked.lock().retain(|_, until| *until > now);
        self.expiries.fire(now_ms());
        if let Err(e) = self.history.maintain().await {
            tracing::warn!(error = %e, "history maintenance failed");
        }
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
        drop(reg);
        tracing::debug!(key = sub.key, user = ?sub.user, "connection closed");
    }
}

/// One shared timer for every connection's heartbeat, plus once-a-second housekeeping.
async fn timers(hub: Weak<Inner>, heartbeat: Duration) {
    use tokio::time::{Instant, MissedTickBehavior, interval_at};
    let mut beat = interval_at(Instant::now() + heartbeat, heartbeat);
    beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let second = Duration::from_secs(1);
    let mut chores = interval_at(Instant::now() + second, second);
    chores.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = beat.tick() => match hub.upgrade() {
                Some(inner) => inner.heartbeat(),
                None => break,
            },
            _ = chores.tick() => match hub.upgrade() {
                Some(inner) => inner.housekeeping().await,
                None => break,
            },
        }
    }
}
