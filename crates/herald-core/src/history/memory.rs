//! In-memory history: the most recent events in a ring, trimmed by the retention limits. Lost on
//! restart; ids start from the clock in microseconds, so a restart issues ids above the earlier
//! run's unless the clock was stepped back further than that run's age (SECURITY.md says what
//! then), and within a run they only count up.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;

use super::rules::{Dropped, Ends, RetentionRule, counts_for_all};
use super::{
    Bounds, Chunk, Gap, History, HistoryError, Interest, ReadFrom, Retention, RetentionRules,
    fresh_base,
};
use crate::event::{Event, EventId, Message, now_ms};
use crate::name::Selector;

#[derive(Debug)]
pub struct MemoryHistory {
    /// Which log keeps an event and which logs a reader reaches: fixed at open, so read without
    /// the ring's lock ([`History::interest`] runs for every stream that starts).
    rules: RetentionRules,
    state: Mutex<Ring>,
}

#[derive(Debug)]
struct Ring {
    /// The default log, then one per retention rule; each in id order, trimmed from its front.
    logs: Vec<Log>,
    first_issued: u64,
    next: u64,
    last_published_ms: u64,
    /// Events dropped so far, by any log (see `Chunk::drops`).
    drops: u64,
}

/// The events one log keeps (the default log's, or a rule's), and what it dropped.
#[derive(Debug)]
struct Log {
    events: VecDeque<Arc<Event>>,
    keep: Bounds,
    /// The rule whose events this log keeps (`None`: the default log).
    rule: Option<RetentionRule>,
    bytes: u64,
    dropped: Dropped,
    /// The topics whose streams ended, for `after_complete`.
    ends: Ends,
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
        let logs = (0..retention.rules.logs())
            .map(|log| {
                let keep = retention.bounds_of(log);
                Log {
                    events: VecDeque::with_capacity(keep.max_events.min(4096)),
                    keep,
                    rule: retention.rules.rule(log).cloned(),
                    bytes: 0,
                    dropped: Dropped::default(),
                    ends: Ends::default(),
                }
            })
            .collect();
        MemoryHistory {
            rules: retention.rules,
            state: Mutex::new(Ring {
                logs,
                first_issued: first,
                next: first,
                last_published_ms: 0,
                drops: 0,
            }),
        }
    }
}

impl Log {
    /// Drops the oldest events while a bound is exceeded; `drops` counts the store's drops.
    /// Its rule's `after-complete`, if any.
    fn after_complete(&self) -> Option<Duration> {
        self.rule.as_ref().and_then(|r| r.after_complete)
    }

    fn trim(&mut self, now_ms: u64, drops: &mut u64) {
        let cutoff = self.keep.cutoff_ms(now_ms);
        while let Some(front) = self.events.front() {
            let over = self.events.len() > self.keep.max_events
                || self.keep.max_bytes.is_some_and(|m| self.bytes > m)
                || cutoff.is_some_and(|c| front.published_at_ms < c)
                || self
                    .after_complete()
                    .is_some_and(|after| self.ends.expired(front, after, now_ms));
            if !over {
                break;
            }
            let dropped = self.events.pop_front().expect("front exists");
            self.bytes -= size_of(&dropped);
            *drops += 1;
            self.dropped.record(
                dropped.id.0,
                dropped.published_at_ms,
                *drops,
                counts_for_all(&dropped.targets, self.rule.as_ref()),
            );
            self.ends.forget(&dropped);
        }
    }
}

impl Ring {
    fn trim(&mut self, now_ms: u64) {
        for log in &mut self.logs {
            log.trim(now_ms, &mut self.drops);
        }
    }

    /// Whether `after` is an id this ring issued (or the one just before its first).
    fn knows(&self, after: u64) -> bool {
        self.next != self.first_issued
            && after.saturating_add(1) >= self.first_issued
            && after < self.next
    }

    /// Up to `limit` events merged by id from each log's position `starts[log]`.
    fn merged(&self, starts: &[usize], limit: usize) -> Vec<Arc<Event>> {
        if let [only] = &self.logs[..] {
            return only
                .events
                .iter()
                .skip(starts[0])
                .take(limit)
                .cloned()
                .collect();
        }
        let mut at = starts.to_vec();
        let mut out = Vec::with_capacity(limit.min(256));
        while out.len() < limit {
            let next = (0..self.logs.len())
                .filter_map(|l| self.logs[l].events.get(at[l]).map(|e| (e.id, l)))
                .min();
            let Some((_, l)) = next else { break };
            out.push(self.logs[l].events[at[l]].clone());
            at[l] += 1;
        }
        out
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
            let log = self.rules.log_of(&message.targets);
            let event = Arc::new(Event::new(EventId(ring.next), message, now));
            ring.next += 1;
            let log = &mut ring.logs[log];
            log.bytes += size_of(&event);
            if log.after_complete().is_some() {
                log.ends.note(&event);
            }
            log.events.push_back(event.clone());
            out.push(event);
        }
        ring.trim(now);
        Ok(out)
    }

    async fn read_for(
        &self,
        from: ReadFrom,
        limit: usize,
        interest: Interest,
    ) -> Result<Chunk, HistoryError> {
        let ring = self.state.lock();
        // The newest drop of each log that counts against this reader.
        let mut drops = ring
            .logs
            .iter()
            .enumerate()
            .filter_map(|(l, log)| log.dropped.against(interest, l));
        let (gap, starts): (bool, Vec<usize>) = match from {
            ReadFrom::Oldest => (false, vec![0; ring.logs.len()]),
            ReadFrom::After(a) if ring.knows(a.0) => (
                drops.any(|d| d.id > a.0),
                ring.logs
                    .iter()
                    .map(|log| log.events.partition_point(|e| e.id <= a))
                    .collect(),
            ),
            ReadFrom::After(_) => (true, vec![0; ring.logs.len()]),
            ReadFrom::Since(at) => (
                drops.any(|d| d.at_ms >= at),
                ring.logs
                    .iter()
                    .map(|log| log.events.partition_point(|e| e.published_at_ms < at))
                    .collect(),
            ),
        };
        let events = ring.merged(&starts, limit);
        // What follows a gap starts at the oldest retained event the read asked for.
        let gap = gap.then(|| Gap {
            oldest: events.first().map(|e| e.id),
        });
        Ok(Chunk {
            gap,
            events,
            cut_short: false,
            skipped: Vec::new(),
            drops: ring.drops,
        })
    }

    fn interest(&self, selectors: &[Selector]) -> Interest {
        self.rules.interest(selectors)
    }

    async fn maintain(&self) -> Result<(), HistoryError> {
        self.state.lock().trim(now_ms());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `interest` needs no lock: a stream starting while an append or read holds the ring (or
    /// a slow trim) gets its interest at once.
    #[tokio::test]
    async fn interest_does_not_wait_for_the_ring() {
        let global = Retention::default();
        let rule = RetentionRule::parse("ai/**:events=5", &global).unwrap();
        let rules = RetentionRules::new(vec![rule]).unwrap();
        let h = Arc::new(MemoryHistory::with_retention(Retention {
            rules: rules.clone(),
            ..global
        }));
        let selectors = vec![Selector::new("ai/answer/1").unwrap()];
        let ring = h.state.lock();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn({
            let (h, selectors) = (h.clone(), selectors.clone());
            move || tx.send(h.interest(&selectors)).unwrap()
        });
        let interest = rx
            .recv_timeout(Duration::from_secs(2))
            .expect("interest answered while the ring is locked");
        drop(ring);
        assert_eq!(interest, rules.interest(&selectors));
        assert_ne!(interest, Interest::ALL);
    }

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
