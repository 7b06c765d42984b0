//! Idempotency keys: which keys were published within the window, as which event and with which
//! payload (its fingerprint). Owned by the committer alone (no lock); rebuilt from history at start,
//! so a durable hub keeps it across restarts. Bounded by count and by bytes: past either bound the
//! oldest keys are forgotten early (a repeat of a forgotten key publishes again).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use crate::event::{EventId, now_ms};
use crate::history::{History, ReadFrom};

/// What is remembered of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Claim {
    pub(crate) id: EventId,
    pub(crate) fingerprint: u64,
}

/// The limits of the key store.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyBounds {
    pub(crate) window: Duration,
    pub(crate) max_keys: usize,
    pub(crate) max_bytes: usize,
}

/// What one remembered key costs beyond its text (map and queue entries).
const KEY_OVERHEAD: usize = 64;

#[derive(Debug)]
pub(crate) struct Keys {
    window_ms: u64,
    max_keys: usize,
    max_bytes: usize,
    bytes: usize,
    by_key: HashMap<String, (Claim, u64)>,
    /// Keys in publish order, for expiry and eviction.
    order: VecDeque<(u64, String)>,
    /// Keys forgotten before their window ended because a bound was reached.
    evicted: u64,
}

impl Keys {
    pub(crate) fn new(bounds: KeyBounds) -> Self {
        Keys {
            window_ms: bounds.window.as_millis().min(u128::from(u64::MAX)) as u64,
            max_keys: bounds.max_keys,
            max_bytes: bounds.max_bytes,
            bytes: 0,
            by_key: HashMap::new(),
            order: VecDeque::new(),
            evicted: 0,
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<Claim> {
        self.by_key.get(key).map(|(claim, _)| *claim)
    }

    pub(crate) fn insert(&mut self, key: String, claim: Claim, published_at_ms: u64) {
        if self.window_ms == 0 || self.max_keys == 0 {
            return;
        }
        let cost = key.len() * 2 + KEY_OVERHEAD;
        while !self.order.is_empty()
            && (self.order.len() >= self.max_keys || self.bytes + cost > self.max_bytes)
        {
            self.forget_oldest();
            self.evicted += 1;
            if self.evicted.is_power_of_two() {
                tracing::warn!(
                    evicted = self.evicted,
                    keys = self.order.len(),
                    "idempotency keys reached their bound: the oldest are forgotten before their window ends"
                );
            }
        }
        self.bytes += cost;
        self.order.push_back((published_at_ms, key.clone()));
        self.by_key.insert(key, (claim, published_at_ms));
    }

    fn forget_oldest(&mut self) {
        let Some((at, key)) = self.order.pop_front() else {
            return;
        };
        self.bytes -= key.len() * 2 + KEY_OVERHEAD;
        if self.by_key.get(&key).is_some_and(|(_, a)| *a == at) {
            self.by_key.remove(&key);
        }
    }

    /// Forgets keys published more than the window before `now_ms`.
    pub(crate) fn expire(&mut self, now_ms: u64) {
        while let Some((at, _)) = self.order.front() {
            if at.saturating_add(self.window_ms) > now_ms {
                break;
            }
            self.forget_oldest();
        }
    }

    /// Reloads the keys of events published within the window.
    pub(crate) async fn load(&mut self, history: &dyn History) {
        if self.window_ms == 0 {
            return;
        }
        let mut from = ReadFrom::Since(now_ms().saturating_sub(self.window_ms));
        loop {
            let chunk = match history.read(from, 1024).await {
                Ok(chunk) => chunk,
                Err(e) => {
                    tracing::error!(error = %e, "could not reload idempotency keys; repeats of recent publishes may be published again");
                    return;
                }
            };
            let Some(last) = chunk.events.last().map(|e| e.id) else {
                break;
            };
            for event in &chunk.events {
                if let Some(key) = &event.idempotency_key {
                    let claim = Claim {
                        id: event.id,
                        fingerprint: event.fingerprint(),
                    };
                    self.insert(key.clone(), claim, event.published_at_ms);
                }
            }
            if chunk.events.len() < 1024 {
                break;
            }
            from = ReadFrom::After(last);
        }
        if !self.by_key.is_empty() {
            tracing::info!(
                keys = self.by_key.len(),
                "idempotency keys reloaded from history"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(window_ms: u64, max_keys: usize, max_bytes: usize) -> KeyBounds {
        KeyBounds {
            window: Duration::from_millis(window_ms),
            max_keys,
            max_bytes,
        }
    }

    fn claim(id: u64) -> Claim {
        Claim {
            id: EventId(id),
            fingerprint: 0,
        }
    }

    fn id(keys: &Keys, key: &str) -> Option<EventId> {
        keys.get(key).map(|c| c.id)
    }

    #[test]
    fn keys_expire_after_the_window() {
        let mut keys = Keys::new(bounds(100, usize::MAX, usize::MAX));
        keys.insert("a".into(), claim(1), 1_000);
        keys.insert("b".into(), claim(2), 1_050);
        keys.expire(1_099);
        assert_eq!(
            (id(&keys, "a"), id(&keys, "b")),
            (Some(EventId(1)), Some(EventId(2)))
        );
        keys.expire(1_100);
        assert_eq!((id(&keys, "a"), id(&keys, "b")), (None, Some(EventId(2))));
        keys.expire(1_150);
        assert_eq!(id(&keys, "b"), None);
        assert_eq!(keys.bytes, 0);
    }

    /// Reproduces (issue 12, defect 5): keys were kept for the whole window whatever their number
    /// (495,000 keys of 256 bytes took RSS from 15 to 351 MB). Now the oldest go first past the
    /// count or byte bound.
    #[test]
    fn keys_are_bounded_by_count_and_bytes() {
        let mut keys = Keys::new(bounds(60_000, 3, usize::MAX));
        for i in 0..5 {
            keys.insert(format!("k{i}"), claim(i), 1_000);
        }
        assert_eq!(keys.by_key.len(), 3);
        assert_eq!(id(&keys, "k1"), None);
        assert_eq!(id(&keys, "k4"), Some(EventId(4)));

        let cost = 256 * 2 + KEY_OVERHEAD;
        let mut keys = Keys::new(bounds(60_000, usize::MAX, cost * 10));
        for i in 0..100 {
            keys.insert(format!("{i:0>256}"), claim(i), 1_000);
        }
        assert_eq!(keys.by_key.len(), 10);
        assert!(keys.bytes <= cost * 10);
        assert_eq!(keys.evicted, 90);
    }
}
