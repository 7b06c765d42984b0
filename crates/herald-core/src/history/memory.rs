//! In-memory history: the most recent events in a ring, trimmed by the retention limits. Lost on
//! restart; ids start from the clock in microseconds, so a restart issues ids above the earlier
//! run's unless the clock was stepped back further than that run's age (SECURITY.md says what
//! then), and within a run they only count up.

use std::collections::VecDeque;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;

use super::{Chunk, Gap, History, HistoryError, ReadFrom, Retention, continues, fresh_base};
use crate::event::{Event, EventId, Message, now_ms};

#[derive(Debug)]
pub struct MemoryHistory {
    state: Mutex<Ring>,
}

#[derive(Debug)]
struct Ring {
    events: VecDeque<Arc<Event>>,
    retention: Retention,
    first_issued: u64,
    next: u64,
    bytes: u64,
    /// Publish time of the newest event dropped by retention.
    dropped_at_ms: Option<u64>,
    last_published_ms: u64,
}

/// Bytes an event is counted as, for `max_bytes`.
fn size_of(e: &Event) -> u64 {
    (e.stored_bytes() + 128) as u64
}

impl MemoryHistory {
    pub fn with_retention(retention: Retention) -> Self {
        Self::starting_at(retention, fresh_base())
    }

    /// A ring whose first event gets id `first`.
    pub fn starting_at(retention: Retention, first: u64) -> Self {
        MemoryHistory {
            state: Mutex::new(Ring {
                events: VecDeque::with_capacity(retention.max_events.min(4096)),
                retention,
                first_issued: first,
                next: first,
                bytes: 0,
                dropped_at_ms: None,
                last_published_ms: 0,
            }),
        }
    }
}

impl Ring {
    fn trim(&mut self, now_ms: u64) {
        let cutoff = self.retention.cutoff_ms(now_ms);
        while let Some(front) = self.events.front() {
            let over = self.events.len() > self.retention.max_events
                || self.retention.max_bytes.is_some_and(|m| self.bytes > m)
                || cutoff.is_some_and(|c| front.published_at_ms < c);
            if !over {
                break;
            }
            let dropped = self.events.pop_front().expect("front exists");
            self.bytes -= size_of(&dropped);
            self.dropped_at_ms = Some(dropped.published_at_ms);
        }
    }
}

#[async_trait]
impl History for MemoryHistory {
    async fn append(&self, messages: Vec<Message>) -> Result<Vec<Arc<Event>>, HistoryError> {
        let mut ring = self.state.lock();
        let now = now_ms().max(ring.last_published_ms);
        ring.last_published_ms = now;
        let mut out = Vec::with_capacity(messages.len());
        for message in messages {
            let event = Arc::new(Event::new(EventId(ring.next), message, now));
            ring.next += 1;
            ring.bytes += size_of(&event);
            ring.events.push_back(event.clone());
            out.push(event);
        }
        ring.trim(now);
        Ok(out)
    }

    async fn read(&self, from: ReadFrom, limit: usize) -> Result<Chunk, HistoryError> {
        let ring = self.state.lock();
        let oldest = ring.events.front().map(|e| e.id);
        let (gap, skip) = match from {
            ReadFrom::Oldest => (None, 0),
            ReadFrom::After(a) => {
                if continues(a.0, ring.first_issued, ring.next, oldest.map(|o| o.0)) {
                    let skip = oldest.map_or(0, |o| (a.0 + 1).saturating_sub(o.0) as usize);
                    (None, skip)
                } else {
                    (Some(Gap { oldest }), 0)
                }
            }
            ReadFrom::Since(at) => {
                if ring.dropped_at_ms.is_some_and(|d| d >= at) {
                    (Some(Gap { oldest }), 0)
                } else {
                    (
                        None,
                        ring.events.partition_point(|e| e.published_at_ms < at),
                    )
                }
            }
        };
        let events = ring.events.iter().skip(skip).take(limit).cloned().collect();
        Ok(Chunk {
            gap,
            events,
            cut_short: false,
            skipped: Vec::new(),
        })
    }

    async fn maintain(&self) -> Result<(), HistoryError> {
        self.state.lock().trim(now_ms());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 12: a wall clock stepped backwards within a run moves neither ids nor publish times
    /// backwards, and `since=` still finds the events published after the step.
    #[tokio::test]
    async fn a_clock_stepped_back_within_a_run_moves_nothing_backwards() {
        let h = MemoryHistory::with_retention(Retention::default());
        let a = h
            .append(vec![Message::broadcast().data("a")])
            .await
            .unwrap();
        let _back = crate::clock::step_this_thread(-3_600_000);
        let b = h
            .append(vec![Message::broadcast().data("b")])
            .await
            .unwrap();
        assert_eq!(b[0].id.0, a[0].id.0 + 1);
        assert!(b[0].published_at_ms >= a[0].published_at_ms);
        let c = h
            .read(ReadFrom::Since(a[0].published_at_ms), 10)
            .await
            .unwrap();
        let data: Vec<&str> = c.events.iter().map(|e| e.data.as_str()).collect();
        assert_eq!((c.gap, data), (None, vec!["a", "b"]));
    }

    /// Issue 12: in memory, a restart after the clock stepped back by more than the time since
    /// the earlier run started issues ids below the earlier run's (documented in SECURITY.md); a
    /// reader resuming with one of those is told of a gap, not silently given nothing.
    #[tokio::test]
    async fn a_restart_under_a_stepped_back_clock_answers_old_ids_with_a_gap() {
        let earlier = MemoryHistory::with_retention(Retention::default());
        let old = earlier.append(vec![Message::broadcast()]).await.unwrap();
        let _back = crate::clock::step_this_thread(-3_600_000);
        let h = MemoryHistory::with_retention(Retention::default());
        let new = h.append(vec![Message::broadcast()]).await.unwrap();
        assert!(new[0].id < old[0].id);
        let c = h.read(ReadFrom::After(old[0].id), 10).await.unwrap();
        assert_eq!(c.gap.map(|g| g.oldest), Some(Some(new[0].id)));
    }

    #[tokio::test]
    async fn conformance() {
        super::super::conformance::run(|retention, first| async move {
            Arc::new(MemoryHistory::starting_at(retention, first)) as Arc<dyn History>
        })
        .await;
    }
}
