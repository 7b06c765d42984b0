//! The history: where events get their ids and are kept for replay. `History` is the trait every
//! store implements (in memory here; durable and Redis stores later); `MemoryHistory` is a bounded ring.

use std::collections::VecDeque;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::event::{Event, EventId, Message, now_ms};

/// A store failure. Publishing answers 503 on it; nothing is half-applied.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("history store unavailable: {0}")]
    Unavailable(String),
}

/// A slice of history read for a resuming connection.
#[derive(Debug)]
pub struct Chunk {
    /// Set when events after the requested id may be missing (dropped by retention, or the id was
    /// never issued); then `events` starts at the oldest retained event. Holds that oldest id.
    pub gap: Option<Option<EventId>>,
    /// Events in id order, all after the requested id.
    pub events: Vec<Arc<Event>>,
}

/// A store of events. `append` assigns ids (strictly increasing) and keeps the events; the hub
/// serialises calls to `append`, so implementations need not order concurrent appends themselves.
#[async_trait]
pub trait History: Send + Sync + 'static {
    /// Stores `messages` as events, all or none, and returns them with their ids, in order.
    async fn append(&self, messages: Vec<Message>) -> Result<Vec<Arc<Event>>, HistoryError>;

    /// Up to `limit` events after `after`, with the gap verdict for `after` (see [`Chunk::gap`]).
    /// `after = None` means from the oldest retained event, never a gap.
    async fn read_after(&self, after: Option<EventId>, limit: usize)
    -> Result<Chunk, HistoryError>;

    /// The oldest retained id, if any.
    async fn oldest(&self) -> Result<Option<EventId>, HistoryError>;
}

impl std::fmt::Debug for dyn History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("History")
    }
}

/// In-memory history: the last `capacity` events in a ring. Ids are consecutive, starting from the
/// current time in microseconds so that ids from an earlier run of the process are never reissued.
#[derive(Debug)]
pub struct MemoryHistory {
    state: Mutex<Ring>,
}

#[derive(Debug)]
struct Ring {
    events: VecDeque<Arc<Event>>,
    capacity: usize,
    /// The id the first event got (or gets).
    first: u64,
    /// The id the next event gets.
    next: u64,
}

impl MemoryHistory {
    pub fn new(capacity: usize) -> Self {
        let base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1)
            .max(1);
        Self::starting_at(capacity, base)
    }

    /// A ring whose first event gets id `first`.
    pub fn starting_at(capacity: usize, first: u64) -> Self {
        MemoryHistory {
            state: Mutex::new(Ring {
                events: VecDeque::with_capacity(capacity.min(4096)),
                capacity,
                first,
                next: first,
            }),
        }
    }
}

impl Ring {
    fn oldest(&self) -> Option<EventId> {
        self.events.front().map(|e| e.id)
    }

    /// `after` continues the retained history when it is the newest issued id or is at least the
    /// id just before the oldest retained one.
    fn continues(&self, after: EventId) -> bool {
        if self.next == self.first {
            return false; // nothing issued yet: every id is unknown
        }
        let newest = self.next - 1;
        let floor = self.oldest().map_or(newest, |o| o.0.saturating_sub(1));
        after.0 >= floor && after.0 <= newest
    }
}

#[async_trait]
impl History for MemoryHistory {
    async fn append(&self, messages: Vec<Message>) -> Result<Vec<Arc<Event>>, HistoryError> {
        let now = now_ms();
        let mut ring = self.state.lock();
        let mut out = Vec::with_capacity(messages.len());
        for message in messages {
            let event = Arc::new(Event::new(EventId(ring.next), message, now));
            ring.next += 1;
            if ring.capacity > 0 {
                if ring.events.len() == ring.capacity {
                    ring.events.pop_front();
                }
                ring.events.push_back(event.clone());
            }
            out.push(event);
        }
        Ok(out)
    }

    async fn read_after(
        &self,
        after: Option<EventId>,
        limit: usize,
    ) -> Result<Chunk, HistoryError> {
        let ring = self.state.lock();
        let (gap, skip) = match (after, ring.oldest()) {
            (None, _) => (None, 0),
            (Some(a), oldest) if ring.continues(a) => {
                let skip = oldest.map_or(0, |o| (a.0 + 1).saturating_sub(o.0) as usize);
                (None, skip)
            }
            (Some(_), oldest) => (Some(oldest), 0),
        };
        let events = ring.events.iter().skip(skip).take(limit).cloned().collect();
        Ok(Chunk { gap, events })
    }

    async fn oldest(&self) -> Result<Option<EventId>, HistoryError> {
        Ok(self.state.lock().oldest())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::name::Topic;

    fn msg(i: usize) -> Message {
        Message::to_topic(Topic::new("t").unwrap()).data(i.to_string())
    }

    fn ids(c: &Chunk) -> Vec<u64> {
        c.events.iter().map(|e| e.id.0).collect()
    }

    #[tokio::test]
    async fn window_and_gaps() {
        let h = MemoryHistory::starting_at(3, 10);
        // Nothing issued yet: any id is unknown.
        let c = h.read_after(Some(EventId(9)), 10).await.unwrap();
        assert_eq!(c.gap, Some(None));
        let evs = h.append((0..5).map(msg).collect()).await.unwrap();
        assert_eq!(
            evs.iter().map(|e| e.id.0).collect::<Vec<_>>(),
            [10, 11, 12, 13, 14]
        );
        // Retained: 12, 13, 14.
        assert_eq!(h.oldest().await.unwrap(), Some(EventId(12)));
        let c = h.read_after(Some(EventId(11)), 10).await.unwrap();
        assert_eq!((c.gap, ids(&c)), (None, vec![12, 13, 14]));
        let c = h.read_after(Some(EventId(12)), 1).await.unwrap();
        assert_eq!((c.gap, ids(&c)), (None, vec![13]));
        let c = h.read_after(Some(EventId(14)), 10).await.unwrap();
        assert_eq!((c.gap, ids(&c)), (None, vec![]));
        // 11 is just before the oldest: no gap. 10 is older: gap, replay from oldest.
        let c = h.read_after(Some(EventId(10)), 10).await.unwrap();
        assert_eq!(
            (c.gap, ids(&c)),
            (Some(Some(EventId(12))), vec![12, 13, 14])
        );
        // Never issued.
        let c = h.read_after(Some(EventId(15)), 10).await.unwrap();
        assert_eq!(c.gap, Some(Some(EventId(12))));
        let c = h.read_after(None, 2).await.unwrap();
        assert_eq!((c.gap, ids(&c)), (None, vec![12, 13]));
    }

    #[tokio::test]
    async fn zero_capacity_keeps_nothing() {
        let h = MemoryHistory::starting_at(0, 1);
        h.append(vec![msg(0)]).await.unwrap();
        let c = h.read_after(Some(EventId(1)), 10).await.unwrap();
        assert_eq!((c.gap, c.events.len()), (None, 0));
        let c = h.read_after(Some(EventId(0)), 10).await.unwrap();
        assert!(c.gap.is_some());
    }
}
