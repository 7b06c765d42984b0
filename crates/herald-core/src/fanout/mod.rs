//! The hub's shared state, below every other part of it: the open connections (registry, users,
//! selector index), their counters, token deadlines and admission, and fan-out, which queues an
//! event into every matching inbox and never waits on a subscriber. The committer, the cluster
//! follower, the streams and the hub sit above this module and depend on it; it knows none of them.

mod age;
mod cancel;
mod expiries;
mod index;
mod subscriber;

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::task::Waker;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use slab::Slab;

use crate::event::{Event, EventId, now_ms};
use crate::grant::Grant;
use crate::history::History;
use crate::name::{Selector, UserId};

pub(crate) use age::{AgePolicy, Ages};
pub use cancel::CancelWatch;
use cancel::Cancels;
pub(crate) use expiries::{Expiries, TOKEN_EXPIRED};
use index::SelectorIndex;
pub(crate) use subscriber::{Ending, Offer, QueueBound, Signal, Subscriber};

/// Counts since start, for `/stats` and `/metrics`. `published` counts the events this node
/// accepted (by the committer), `delivered` the queueings this node made (in `fan_out`), so in a
/// cluster a sum over nodes is the total.
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
    /// Entries of the shared history (cluster) skipped because they could not be read.
    pub unreadable: u64,
    /// Connections whose queue overflowed and that have not yet caught up from history.
    pub lagging: usize,
    /// Streams that ended because they reached their maximum age.
    pub aged: u64,
    /// Times the shared history (after a Redis failover) was found to end before events this
    /// node had fanned out; streams past that point got a `herald.gap`.
    pub rewinds: u64,
    pub uptime: Duration,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) published: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) replayed: AtomicU64,
    pub(crate) gaps: AtomicU64,
    /// Events of the shared history skipped because they could not be read.
    pub(crate) unreadable: AtomicU64,
    pub(crate) lagging: AtomicUsize,
    pub(crate) aged: AtomicU64,
    pub(crate) rewinds: AtomicU64,
}

/// The state the hub's parts share. Held by the hub and by every open stream.
pub(crate) struct Fanout {
    pub(crate) history: Arc<dyn History>,
    pub(crate) preamble: bytes::Bytes,
    pub(crate) queue: QueueBound,
    pub(crate) max_connections: usize,
    pub(crate) max_selectors: usize,
    max_blocks: usize,
    registry: RwLock<Registry>,
    /// The newest id whose fan-out has started; read under the registry write lock it tells a new
    /// connection which events it will get live and which it must not.
    last_fanned_out: AtomicU64,
    pub(crate) blocked: Mutex<HashMap<UserId, Instant>>,
    pub(crate) shutting_down: AtomicBool,
    pub(crate) expiries: Expiries,
    pub(crate) ages: Ages,
    pub(crate) counters: Counters,
    /// Told the user of every connection that opens or closes, once presence events are on.
    pub(crate) user_changes: OnceLock<tokio::sync::mpsc::UnboundedSender<UserId>>,
    /// Streaming publishes waiting for a `herald.cancel` on their topics.
    pub(crate) cancels: Cancels,
    started: Instant,
}

impl std::fmt::Debug for Fanout {
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

impl Fanout {
    pub(crate) fn new(
        history: Arc<dyn History>,
        preamble: bytes::Bytes,
        queue: QueueBound,
        max_connections: usize,
        max_selectors: usize,
        max_blocks: usize,
        ages: AgePolicy,
    ) -> Self {
        Fanout {
            history,
            preamble,
            queue,
            max_connections,
            max_selectors,
            max_blocks,
            registry: RwLock::new(Registry::default()),
            last_fanned_out: AtomicU64::new(0),
            blocked: Mutex::new(HashMap::new()),
            shutting_down: AtomicBool::new(false),
            expiries: Expiries::default(),
            ages: Ages::new(ages),
            counters: Counters::default(),
            user_changes: OnceLock::new(),
            cancels: Cancels::default(),
            started: Instant::now(),
        }
    }

    /// Registers a connection, unless the hub is at its connection limit. Returns it with the
    /// newest id whose fan-out has started (the events it will not get live).
    pub(crate) fn register(
        &self,
        user: Option<UserId>,
        selectors: Vec<Selector>,
        grant: Grant,
        expires_at_ms: Option<u64>,
        max_age: Option<Duration>,
    ) -> Option<(Arc<Subscriber>, Option<EventId>)> {
        let mut reg = self.registry.write();
        if reg.subs.len() >= self.max_connections {
            return None;
        }
        // The same text as open streams hold is shared, not copied: an idle stream's selectors
        // and user id are then one pointer each.
        let selectors = selectors
            .into_iter()
            .map(|s| reg.index.shared(&s).unwrap_or(s))
            .collect();
        let user = user.map(|u| reg.users.get_key_value(&u).map_or(u, |(k, _)| k.clone()));
        let entry = reg.subs.vacant_entry();
        let sub = Arc::new(Subscriber::new(
            entry.key(),
            user,
            selectors,
            grant,
            expires_at_ms,
            self.ages.plan(max_age),
        ));
        entry.insert(sub.clone());
        if let Some(user) = &sub.user {
            reg.users.entry(user.clone()).or_default().push(sub.clone());
        }
        for selector in &sub.selectors {
            reg.index.insert(selector, &sub);
        }
        let baseline = match self.last_fanned_out.load(Ordering::Acquire) {
            0 => None,
            id => Some(EventId(id)),
        };
        drop(reg);
        self.user_changed(sub.user.as_ref());
        self.expiries.add(&sub);
        self.ages.add(&sub);
        Some((sub, baseline))
    }

    fn user_changed(&self, user: Option<&UserId>) {
        if let (Some(user), Some(tx)) = (user, self.user_changes.get()) {
            let _ = tx.send(user.clone());
        }
    }

    /// Online users with their connection counts, sorted by id, after `after`, at most `limit`.
    pub(crate) fn users(&self, after: Option<&UserId>, limit: usize) -> Vec<(UserId, usize)> {
        let reg = self.registry.read();
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        reg.users
            .range::<UserId, _>((lower, Bound::Unbounded))
            .take(limit)
            .map(|(u, subs)| (u.clone(), subs.len()))
            .collect()
    }

    /// Every selector open streams hold, with how many streams hold it.
    pub(crate) fn subscriptions(&self) -> BTreeMap<Selector, usize> {
        let reg = self.registry.read();
        let mut out: BTreeMap<Selector, usize> = BTreeMap::new();
        for (_, sub) in reg.subs.iter() {
            for selector in &sub.selectors {
                *out.entry(selector.clone()).or_default() += 1;
            }
        }
        out
    }

    /// Open connections of `user` on this hub.
    pub(crate) fn connections_of(&self, user: &UserId) -> usize {
        self.registry.read().users.get(user).map_or(0, Vec::len)
    }

    /// Ends every stream of `user` with `herald.close` (after what is already queued), and with
    /// `block` refuses that user's new connections for that long. Returns how many were closed.
    pub(crate) fn close_user(&self, user: &UserId, reason: &str, block: Option<Duration>) -> usize {
        if let Some(d) = block.filter(|d| !d.is_zero()) {
            let now = Instant::now();
            let until = now
                .checked_add(d)
                .unwrap_or(now + Duration::from_secs(100 * 365 * 86_400));
            let mut blocked = self.blocked.lock();
            if !blocked.contains_key(user) && blocked.len() >= self.max_blocks {
                blocked.retain(|_, until| *until > now);
                if blocked.len() >= self.max_blocks
                    && let Some(soonest) = blocked
                        .iter()
                        .min_by_key(|(_, until)| **until)
                        .map(|(u, _)| u.clone())
                {
                    tracing::warn!(user = %soonest, "too many blocked users: dropping the block that ends soonest");
                    blocked.remove(&soonest);
                }
            }
            blocked.insert(user.clone(), until);
        }
        let reg = self.registry.read();
        // Everything fanned out from here on is published after the close: none of it is
        // delivered, live or from history.
        let last = EventId(self.last_fanned_out.load(Ordering::Acquire));
        let subs = reg.users.get(user).map_or(&[][..], Vec::as_slice);
        for sub in subs {
            sub.close_after(last, reason.to_string());
        }
        subs.len()
    }

    pub(crate) fn stats(&self) -> Stats {
        let reg = self.registry.read();
        let c = &self.counters;
        Stats {
            connections: reg.subs.len(),
            users: reg.users.len(),
            topics: reg.index.distinct(),
            published: c.published.load(Ordering::Relaxed),
            delivered: c.delivered.load(Ordering::Relaxed),
            replayed: c.replayed.load(Ordering::Relaxed),
            gaps: c.gaps.load(Ordering::Relaxed),
            unreadable: c.unreadable.load(Ordering::Relaxed),
            lagging: c.lagging.load(Ordering::Relaxed),
            aged: c.aged.load(Ordering::Relaxed),
            rewinds: c.rewinds.load(Ordering::Relaxed),
            uptime: self.started.elapsed(),
        }
    }

    /// Refuses new connections and ends every stream without `herald.close`.
    pub(crate) fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        for (_, sub) in self.registry.read().subs.iter() {
            sub.end(Ending::Shutdown);
        }
    }

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
                match sub.offer(event, self.queue, wakers) {
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
            self.cancels.offer(event);
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
        self.user_changed(sub.user.as_ref());
        tracing::debug!(key = sub.key, user = ?sub.user, "connection closed");
    }
}

/// One shared timer for every connection's heartbeat, the streams' planned ends, plus
/// once-a-second housekeeping.
pub(crate) async fn timers(
    hub: Weak<Fanout>,
    ages_changed: Arc<tokio::sync::Notify>,
    heartbeat: Duration,
) {
    use tokio::time::{Instant, MissedTickBehavior, interval_at};
    let mut beat = interval_at(Instant::now() + heartbeat, heartbeat);
    beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let second = Duration::from_secs(1);
    let mut chores = interval_at(Instant::now() + second, second);
    chores.set_missed_tick_behavior(MissedTickBehavior::Delay);
    while let Some(next_end) = hub.upgrade().map(|inner| inner.ages.next_due()) {
        let ends = async {
            match next_end {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ends => match hub.upgrade() {
                Some(inner) => inner.ages.fire(Instant::now()),
                None => break,
            },
            // An earlier end was planned: sleep until that one instead.
            _ = ages_changed.notified() => {}
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
