//! History: where events get their ids and are kept for replay. [`History`] is the trait every store
//! implements (in memory, durable on disk); each must pass the conformance suite in `conformance`.

#[cfg(feature = "durable")]
mod durable;
mod memory;
#[cfg(feature = "redis")]
mod redis;
#[cfg(all(test, feature = "redis"))]
pub(crate) use redis::tests::RedisServer;
#[cfg(any(feature = "durable", feature = "redis"))]
mod row;
mod rules;
#[cfg(feature = "durable")]
mod wal;

#[cfg(test)]
pub(crate) mod conformance;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::event::{Event, EventId, Message};
use crate::name::Selector;

#[cfg(feature = "durable")]
pub use durable::{CheckReport, DurableHistory, OpenError};
pub use memory::MemoryHistory;
#[cfg(feature = "redis")]
pub use redis::{RedisHistory, RedisOptions};
pub use rules::{Bounds, Interest, MAX_RULES, RetentionRule, RetentionRules, RuleError};

/// A store failure. Publishing answers 503 on it; nothing is half-applied.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HistoryError {
    #[error("history store unavailable: {0}")]
    Unavailable(String),
    #[error("history store holds an unreadable event {id}: {reason}")]
    Corrupt { id: u64, reason: String },
    /// A repaired store's marker where a damaged event was.
    #[error("event {id} was lost (its damaged row was repaired)")]
    Lost { id: u64 },
    /// The message does not fit the stored row layout; nothing was written.
    #[error("cannot store this message: {0}")]
    Unstorable(String),
    /// Fewer Redis replicas than required acknowledged an append in time (`--redis-replicas`);
    /// the events may be on the primary but are not acknowledged.
    #[error("only {acked} of {wanted} Redis replicas acknowledged in time")]
    NotReplicated { wanted: usize, acked: usize },
    /// A failover lost events of the shared history (a primary that took over did not have the
    /// old primary's last ones): those after `after` (`None`: from the start) up to `through`. A
    /// rewind marker at `marker` stands in their place, written once by a node that had fanned
    /// them out and met by every node's follower: following goes on after it, and every stream
    /// catches up from history, where crossing it is a gap.
    #[error("a failover lost the shared history's events up to {through}")]
    Rewound {
        marker: EventId,
        after: Option<EventId>,
        through: EventId,
    },
    /// A shared history is kept by other retention rules than this node's (see `redis.rs`):
    /// the node must not start. `stored` and `ours` name the rules as `--retention` takes them.
    #[error(
        "the history in Redis (prefix '{prefix}') is kept by other retention rules than this node's: recorded {stored}, this node {ours}. Give every node the same --retention rules in the same order; to change them, stop every node and start on an empty history (another --redis-prefix, or delete the prefix's keys)"
    )]
    RulesDiffer {
        prefix: String,
        stored: String,
        ours: String,
    },
}

/// Where a read starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFrom {
    /// The oldest retained event; never a gap.
    Oldest,
    /// The events after this id (a client's `Last-Event-ID`).
    After(EventId),
    /// The events published at or after this time (milliseconds since the Unix epoch).
    Since(u64),
}

/// A slice of history read for a resuming connection.
#[derive(Debug)]
pub struct Chunk {
    /// Set when events the read asked for may be missing: dropped by retention, or (for
    /// [`ReadFrom::After`]) the id was never issued. Then `events` starts at the oldest retained
    /// event.
    pub gap: Option<Gap>,
    /// Events in id order.
    pub events: Vec<Arc<Event>>,
    /// The read stopped before `limit` at an event it cannot read (damaged, or written in a
    /// format this herald does not know): more events follow, and the next read, after the last
    /// of `events`, skips the unreadable ones and reports them as a gap.
    pub cut_short: bool,
    /// Ids of unreadable events this read passed over, before `events` (their place is the gap).
    pub skipped: Vec<EventId>,
    /// With retention rules: how many events the store had dropped when it read. A reader that
    /// goes on after this read passes it back ([`Interest::after_drops`]): what was dropped
    /// before is no gap of its continuation (0 without rules).
    pub drops: u64,
}

/// Events a read asked for may be missing; what follows starts at the oldest retained event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// The oldest retained event's id (`None` when nothing is retained).
    pub oldest: Option<EventId>,
}

/// What a store keeps. Whichever limit is reached first drops the oldest events. The limits are
/// those of the events no rule names; each of `rules` keeps its topics' events apart, by its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    pub max_events: usize,
    pub max_age: Option<Duration>,
    pub max_bytes: Option<u64>,
    pub rules: RetentionRules,
}

/// The byte bound of a history when none is given: without it, 10,000 events of 1 MiB (the
/// largest body) would be ~20 GB. Stores that cannot bound bytes (Redis) ignore it.
pub const DEFAULT_HISTORY_BYTES: u64 = crate::defaults::HISTORY_BYTES;

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_events: crate::defaults::HISTORY_EVENTS,
            max_age: None,
            max_bytes: Some(DEFAULT_HISTORY_BYTES),
            rules: RetentionRules::default(),
        }
    }
}

impl Retention {
    /// Events published before this time (ms) are past `max_age`.
    #[cfg(any(feature = "durable", feature = "redis"))]
    pub(crate) fn cutoff_ms(&self, now_ms: u64) -> Option<u64> {
        self.bounds().cutoff_ms(now_ms)
    }

    /// The bounds of the default log (the events no rule names).
    pub fn bounds(&self) -> Bounds {
        Bounds {
            max_events: self.max_events,
            max_age: self.max_age,
            max_bytes: self.max_bytes,
        }
    }

    /// The bounds of log `log` (0: the default log; `i + 1`: rule `i`).
    pub(crate) fn bounds_of(&self, log: usize) -> Bounds {
        self.rules
            .rule(log)
            .map_or_else(|| self.bounds(), |r| r.keep)
    }
}

/// A store of events. `append` assigns ids, strictly increasing and consecutive within a store,
/// and keeps the events. The hub serialises calls to `append`.
#[async_trait]
pub trait History: Send + Sync + 'static {
    /// Stores `messages` as events, all or none, and returns them with their ids, in order. When
    /// this returns `Ok`, the events are as durable as the store promises.
    async fn append(&self, messages: Vec<Message>) -> Result<Vec<Arc<Event>>, HistoryError>;

    /// Up to `limit` events from `from`, with the gap verdict (see [`Chunk::gap`]), for a reader
    /// whose topics reach only the logs of `interest`: with retention rules, events another log
    /// dropped are no gap of this reader's (but dropped broadcasts and events to users are).
    async fn read_for(
        &self,
        from: ReadFrom,
        limit: usize,
        interest: Interest,
    ) -> Result<Chunk, HistoryError>;

    /// [`read_for`](Self::read_for) a reader that may want any event: every log's drops count.
    async fn read(&self, from: ReadFrom, limit: usize) -> Result<Chunk, HistoryError> {
        self.read_for(from, limit, Interest::ALL).await
    }

    /// The logs a reader with these selectors reaches (see [`read_for`](Self::read_for)).
    fn interest(&self, selectors: &[Selector]) -> Interest {
        let _ = selectors;
        Interest::ALL
    }

    /// The retained event with this id, if any (unreadable counts as none). Stores whose ids
    /// are not consecutive (Redis) find it directly.
    async fn event(&self, id: EventId) -> Result<Option<Arc<Event>>, HistoryError> {
        let Some(before) = id.0.checked_sub(1) else {
            return Ok(None);
        };
        let chunk = self.read(ReadFrom::After(EventId(before)), 1).await?;
        Ok(chunk.events.into_iter().next().filter(|e| e.id == id))
    }

    /// Applies age-based retention when nothing is being published. Called periodically.
    async fn maintain(&self) -> Result<(), HistoryError> {
        Ok(())
    }
}

/// One message of a shared append: its event, or only the id of the event that already claimed
/// its idempotency key.
#[derive(Debug)]
pub struct Stored {
    pub id: EventId,
    /// `None` for a duplicate or a refused message.
    pub event: Option<Arc<Event>>,
    /// Its job repeated an idempotency key with another payload, so nothing of it was appended;
    /// `id` is the claiming event's (0 for the job's other messages).
    pub refused: bool,
}

/// A history shared by several hubs (a cluster). Appends claim idempotency keys atomically across
/// hubs, and every hub learns of new events, its own included, by following the log in order.
#[async_trait]
pub trait SharedHistory: History {
    /// Appends the messages whose keys are unclaimed; the others get the claiming event's id.
    /// `jobs` splits `messages` into publishes, each all or none: a job that repeats a claimed
    /// key with another payload appends nothing (its messages come back `refused`).
    async fn append_claiming(
        &self,
        messages: Vec<Message>,
        jobs: &[usize],
    ) -> Result<Vec<Stored>, HistoryError>;

    /// The events after `after` (`None`: from the oldest), waiting a little when there are none
    /// yet. A gap means events after `after` were dropped before this hub saw them.
    async fn follow(&self, after: Option<EventId>, limit: usize) -> Result<Chunk, HistoryError>;

    /// The newest id issued so far by any hub.
    async fn newest(&self) -> Result<Option<EventId>, HistoryError>;
}

impl std::fmt::Debug for dyn SharedHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedHistory")
    }
}

impl std::fmt::Debug for dyn History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("History")
    }
}

/// The gap rule shared by stores whose ids are consecutive: reading after `after` continues the
/// history when `after` is the newest issued id or at least the id just before the oldest retained.
#[cfg(feature = "durable")]
pub(crate) fn continues(after: u64, first_issued: u64, next: u64, oldest: Option<u64>) -> bool {
    if next == first_issued {
        return false; // nothing issued yet: every id is unknown
    }
    let newest = next - 1;
    let floor = oldest.map_or(newest, |o| o.saturating_sub(1));
    after >= floor && after <= newest
}

/// Microseconds since the Unix epoch: the first id of a fresh store.
pub(crate) fn fresh_base() -> u64 {
    crate::clock::now_micros().max(1)
}
