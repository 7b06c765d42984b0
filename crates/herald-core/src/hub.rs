//! The hub: the public face of the engine. It builds the parts (history, fan-out state, the
//! committer, the cluster follower, the timers), admits connections and hands them their stream,
//! sends publishes to the committer, and answers presence and closes users. It sits on top: no
//! other module of the engine's core imports it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::defaults;
use crate::event::{Event, EventId, Message};
use crate::fanout::{AgePolicy, CancelWatch, Fanout, QueueBound, Stats};
use crate::grant::Grant;
use crate::history::{
    Chunk, Gap, History, HistoryError, Interest, MemoryHistory, ReadFrom, Retention, SharedHistory,
};
use crate::name::{COMPLETE, Selector, Topic, UserId};
use crate::publish::{Feed, Job, KeyBounds, Keys, PublishError, Published};
use crate::stream::{EventStream, FirstRead, ReplayObserver, Start};

/// Most segments of one subscribed selector.
pub const SELECTOR_SEGMENTS_MAX: usize = 32;
/// Most segments of all of one connection's selectors together: what it may cost the index.
pub const CONNECTION_SEGMENTS_MAX: usize = 512;

/// Settings of a hub. Build with [`Hub::builder`].
#[derive(Clone)]
pub struct HubBuilder {
    history: Option<Arc<dyn History>>,
    shared: Option<Arc<dyn SharedHistory>>,
    retention: Retention,
    idempotency_window: Duration,
    idempotency_keys: usize,
    idempotency_bytes: usize,
    heartbeat: Duration,
    retry: Duration,
    queue_capacity: usize,
    queue_bytes: usize,
    max_connections: usize,
    max_selectors: usize,
    max_blocks: usize,
    ages: AgePolicy,
}

impl std::fmt::Debug for HubBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubBuilder")
            .field("retention", &self.retention)
            .field("idempotency_window", &self.idempotency_window)
            .field("heartbeat", &self.heartbeat)
            .field("retry", &self.retry)
            .field("queue_capacity", &self.queue_capacity)
            .field("queue_bytes", &self.queue_bytes)
            .field("max_blocks", &self.max_blocks)
            .field("idempotency_keys", &self.idempotency_keys)
            .field("idempotency_bytes", &self.idempotency_bytes)
            .field("max_connections", &self.max_connections)
            .field("max_selectors", &self.max_selectors)
            .field("ages", &self.ages)
            .finish_non_exhaustive()
    }
}

impl Default for HubBuilder {
    fn default() -> Self {
        HubBuilder {
            history: None,
            shared: None,
            retention: Retention::default(),
            idempotency_window: defaults::IDEMPOTENCY_WINDOW,
            idempotency_keys: defaults::IDEMPOTENCY_KEYS,
            idempotency_bytes: defaults::IDEMPOTENCY_BYTES,
            heartbeat: defaults::HEARTBEAT,
            retry: defaults::RETRY,
            queue_capacity: defaults::QUEUE_EVENTS,
            queue_bytes: defaults::QUEUE_BYTES,
            max_connections: usize::MAX,
            max_selectors: defaults::MAX_SELECTORS,
            max_blocks: defaults::MAX_BLOCKS,
            ages: AgePolicy::default(),
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
    /// Most idempotency keys remembered (default 100000); past it the oldest are forgotten early.
    pub fn idempotency_keys(mut self, n: usize) -> Self {
        self.idempotency_keys = n;
        self
    }
    /// Most bytes of idempotency keys remembered (default 32 MiB); past it the oldest are forgotten.
    pub fn idempotency_bytes(mut self, n: usize) -> Self {
        self.idempotency_bytes = n;
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
    /// Bytes of event frames queued per connection before it counts as lagging and catches up
    /// from history (default 1 MiB); also bounds what one step of a replay holds. One event always
    /// fits an empty queue.
    pub fn queue_bytes(mut self, n: usize) -> Self {
        self.queue_bytes = n.max(1);
        self
    }
    /// Most users blocked at once by [`Hub::close_user`] (default 10000); past it the block that
    /// ends soonest is dropped.
    pub fn max_blocks(mut self, n: usize) -> Self {
        self.max_blocks = n.max(1);
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

    /// How long streams may live (default: until the client or the hub goes away). Each stream
    /// ends quietly, without `herald.close`, at a random point in `[max × (1 − jitter), max]`, so
    /// clients reconnect with their last id, to whichever node a load balancer picks then.
    pub fn max_stream_age(mut self, max: Option<Duration>, jitter: f64) -> Self {
        self.ages = AgePolicy { max, jitter };
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
        let inner = Arc::new(Fanout::new(
            history,
            format!("retry: {retry_ms}\n: herald\n\n").into(),
            QueueBound {
                events: self.queue_capacity,
                bytes: self.queue_bytes,
            },
            self.max_connections,
            self.max_selectors,
            self.max_blocks,
            self.ages,
        ));
        let feed = Arc::new(Feed::new());
        runtime.spawn(crate::publish::commit_loop(
            Arc::downgrade(&inner),
            self.shared.clone().map(|shared| (shared, feed.clone())),
            job_rx,
            Keys::new(KeyBounds {
                window: self.idempotency_window,
                max_keys: self.idempotency_keys,
                max_bytes: self.idempotency_bytes,
            }),
        ));
        runtime.spawn(crate::fanout::timers(
            Arc::downgrade(&inner),
            inner.ages.changed.clone(),
            self.heartbeat,
        ));
        if let Some(shared) = self.shared {
            runtime.spawn(crate::publish::follow(
                Arc::downgrade(&inner),
                feed.clone(),
                shared,
            ));
        }
        Ok(Hub { inner, jobs, feed })
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
    #[error("a topic selector has {given} segments, at most {max} are allowed")]
    SelectorTooDeep { given: usize, max: usize },
    #[error("the selectors have {given} segments in all, at most {max} are allowed per connection")]
    TooManySegments { given: usize, max: usize },
    #[error("this user's connections are blocked for another {0:?}")]
    Blocked(Duration),
    #[error("the hub is at its connection limit ({0})")]
    AtCapacity(usize),
    #[error("the hub is shutting down")]
    ShuttingDown,
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
    /// Write each event's routing lines before it (`topic:`, `broadcast:`, and `user:` for a
    /// message to this connection's user): see [`crate::Event::route_lines`].
    pub route: bool,
    /// The longest this stream may live (`?maxAge=`); the hub's own limit wins when shorter.
    pub max_age: Option<Duration>,
    /// Told how many events the start's replay sent, once it is over (not called for `Live`).
    pub on_replayed: Option<ReplayObserver>,
}

/// Messages sent to one user, read from history.
#[derive(Debug)]
pub struct UserMessages {
    /// Set when retention dropped events the request asked for.
    pub gap: Option<Gap>,
    pub events: Vec<Arc<Event>>,
}

/// A push hub. Cheap to clone; all clones share one hub.
#[derive(Clone, Debug)]
pub struct Hub {
    inner: Arc<Fanout>,
    /// Publishes wait here for the committer, which appends whole groups at once.
    jobs: mpsc::Sender<Job>,
    /// The cluster follower's progress and the shared history's reachability.
    feed: Arc<Feed>,
}

/// A hub that does not keep it alive (for the hub's own background tasks).
#[derive(Clone, Debug)]
pub(crate) struct WeakHub {
    inner: std::sync::Weak<Fanout>,
    jobs: mpsc::WeakSender<Job>,
    feed: std::sync::Weak<Feed>,
}

impl WeakHub {
    pub(crate) fn upgrade(&self) -> Option<Hub> {
        Some(Hub {
            inner: self.inner.upgrade()?,
            jobs: self.jobs.upgrade()?,
            feed: self.feed.upgrade()?,
        })
    }
}

impl Hub {
    pub fn builder() -> HubBuilder {
        HubBuilder::default()
    }

    pub(crate) fn downgrade(&self) -> WeakHub {
        WeakHub {
            inner: Arc::downgrade(&self.inner),
            jobs: self.jobs.downgrade(),
            feed: Arc::downgrade(&self.feed),
        }
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
        // What a connection costs the selector index is bounded: each segment is a trie node.
        let mut segments = 0;
        for selector in &req.selectors {
            let given = selector.segments().count();
            if given > SELECTOR_SEGMENTS_MAX {
                return Err(SubscribeError::SelectorTooDeep {
                    given,
                    max: SELECTOR_SEGMENTS_MAX,
                });
            }
            segments += given;
        }
        if segments > CONNECTION_SEGMENTS_MAX {
            return Err(SubscribeError::TooManySegments {
                given: segments,
                max: CONNECTION_SEGMENTS_MAX,
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

        let (sub, baseline) = inner
            .register(
                req.user,
                selectors,
                req.grant,
                req.expires_at_ms,
                req.max_age,
            )
            .ok_or(SubscribeError::AtCapacity(inner.max_connections))?;
        tracing::debug!(key = sub.key, user = ?sub.user, selectors = ?sub.selectors, start = ?start, "connection opened");
        Ok(EventStream::new(
            self.inner.clone(),
            sub,
            start,
            baseline,
            req.route,
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
        addressed(&messages)?;
        for (index, m) in messages.iter().enumerate() {
            if let Some(topic) = m.targets.topics.iter().find(|t| t.is_reserved()) {
                return Err(PublishError::ReservedTopic {
                    index,
                    topic: topic.to_string(),
                });
            }
        }
        self.commit(messages).await
    }

    /// Publishes messages as [`Hub::publish_batch`] does, to the reserved topics (`$…`) under
    /// `owned` that a layer above owns and publishes to itself (Mercure's subscription events on
    /// `$mercure/subscriptions`); every other reserved topic (`$presence/…`) stays refused.
    /// Never for a client's message.
    pub async fn publish_reserved(
        &self,
        owned: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<Published>, PublishError> {
        addressed(&messages)?;
        for (index, m) in messages.iter().enumerate() {
            if let Some(topic) = m
                .targets
                .topics
                .iter()
                .find(|t| t.is_reserved() && !t.as_str().starts_with(owned))
            {
                return Err(PublishError::ReservedTopic {
                    index,
                    topic: topic.to_string(),
                });
            }
        }
        self.commit(messages).await
    }

    /// Sends messages to the committer, reserved topics included (the hub's own publishes).
    pub(crate) async fn commit(
        &self,
        messages: Vec<Message>,
    ) -> Result<Vec<Published>, PublishError> {
        let stopped = || PublishError::Store(HistoryError::Unavailable("the hub stopped".into()));
        let (reply, answer) = oneshot::channel();
        self.jobs
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
        let Some(FirstRead {
            mut from,
            unknown_id,
        }) = start.first_read()
        else {
            return Ok(UserMessages {
                gap: None,
                events: Vec::new(),
            });
        };
        let mut out = UserMessages {
            gap: None,
            events: Vec::new(),
        };
        let mut first = true;
        let mut interest = Interest::ALL;
        loop {
            let chunk = self.inner.history.read_for(from, 512, interest).await?;
            // Going on, what was dropped before this read is no gap (retention rules).
            interest = interest.after_drops(chunk.drops);
            if first {
                out.gap = chunk.gap;
                if unknown_id {
                    out.gap = Some(Gap {
                        oldest: chunk.events.first().map(|e| e.id),
                    });
                }
                first = false;
            } else if chunk.gap.is_some() && out.gap.is_none() {
                // Unreadable events further on (a damaged row): some of the user's may be missing.
                out.gap = chunk.gap;
            }
            let Some(last) = chunk.events.last().map(|e| e.id) else {
                return Ok(out);
            };
            let full = chunk.events.len() == 512 || chunk.cut_short;
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

    /// Reads the history for a reader that may want any event: at most `limit` events from
    /// `from`; every drop counts for its gap verdict.
    pub async fn read_history(&self, from: ReadFrom, limit: usize) -> Result<Chunk, HistoryError> {
        self.inner.history.read(from, limit).await
    }

    /// Reads the history as a resuming stream does, for a reader of `interest` (from
    /// [`Hub::history_interest`], then [`Interest::after_drops`] of each chunk it goes on from):
    /// with retention rules, it gets a gap only when an event it could receive was dropped.
    pub async fn read_history_for(
        &self,
        from: ReadFrom,
        limit: usize,
        interest: Interest,
    ) -> Result<Chunk, HistoryError> {
        self.inner.history.read_for(from, limit, interest).await
    }

    /// The history logs a reader with these selectors reaches (see [`History::interest`]).
    pub fn history_interest(&self, selectors: &[Selector]) -> Interest {
        self.inner.history.interest(selectors)
    }

    /// Online users with their connection counts, sorted by id, after `after`, at most `limit`.
    pub fn users(&self, after: Option<&UserId>, limit: usize) -> Vec<(UserId, usize)> {
        self.inner.users(after, limit)
    }

    /// How much longer `user` is blocked by [`Hub::close_user`], if at all.
    pub fn blocked_for(&self, user: &UserId) -> Option<Duration> {
        let now = Instant::now();
        self.inner
            .blocked
            .lock()
            .get(user)
            .filter(|until| **until > now)
            .map(|until| *until - now)
    }

    /// Every selector this hub's open streams hold, with their stream counts, sorted.
    pub fn subscriptions(&self) -> Vec<(Selector, usize)> {
        self.inner.subscriptions().into_iter().collect()
    }

    /// Open connections of `user` on this hub.
    pub fn connections_of(&self, user: &UserId) -> usize {
        self.inner.connections_of(user)
    }

    /// Ends every stream of `user` with `herald.close` (after what is already queued), and with
    /// `block` refuses that user's new connections for that long. Returns how many were closed.
    pub fn close_user(&self, user: &UserId, reason: &str, block: Option<Duration>) -> usize {
        self.inner.close_user(user, reason, block)
    }

    pub fn stats(&self) -> Stats {
        self.inner.stats()
    }

    /// Refuses new connections and ends every stream without `herald.close`, so clients reconnect
    /// (to this hub's successor) with their last id.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }

    /// The users whose connections open or close on this hub, from now on (one receiver per hub:
    /// `None` when already taken).
    pub(crate) fn watch_users(&self) -> Option<mpsc::UnboundedReceiver<UserId>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner.user_changes.set(tx).ok()?;
        Some(rx)
    }

    /// The hub's history store.
    pub(crate) fn history(&self) -> &Arc<dyn History> {
        &self.inner.history
    }

    /// False while a shared history (cluster mode) cannot be reached.
    pub fn is_ready(&self) -> bool {
        self.feed.is_ready()
    }

    /// Watches `topics` for `herald.cancel`: a streaming publish uses it to stop when a
    /// subscriber cancels, on this node or (through the follower) on another.
    pub fn watch_cancel(&self, topics: Vec<Topic>) -> CancelWatch {
        CancelWatch::new(self.inner.clone(), topics)
    }

    /// Whether event `id` is a `herald.complete` on `topic`: a connection that resumes after it,
    /// asking for that topic alone, has nothing more to receive.
    pub async fn is_completion(&self, topic: &Topic, id: EventId) -> Result<bool, HistoryError> {
        Ok(self.inner.history.event(id).await?.is_some_and(|e| {
            e.event_type
                .as_ref()
                .is_some_and(|t| t.as_str() == COMPLETE)
                && e.targets.topics.contains(topic)
        }))
    }
}

/// Refuses an empty batch and a message with no target (all or none is published).
fn addressed(messages: &[Message]) -> Result<(), PublishError> {
    if messages.is_empty() {
        return Err(PublishError::EmptyBatch);
    }
    match messages.iter().position(|m| m.targets.is_empty()) {
        Some(index) => Err(PublishError::NoTarget { index }),
        None => Ok(()),
    }
}
