//! Idempotency keys: which keys were published within the window, and as which event. Owned by the
//! committer alone (no lock); rebuilt from history at start, so a durable hub keeps it across restarts.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use crate::event::{EventId, now_ms};
use crate::history::{History, ReadFrom};

#[derive(Debug)]
pub(crate) struct Keys {
    window_ms: u64,
    by_key: HashMap<String, (EventId, u64)>,
    /// Keys in publish order, for expiry.
    order: VecDeque<(u64, String)>,
}

impl Keys {
    pub(crate) fn new(window: Duration) -> Self {
        Keys {
            window_ms: window.as_millis().min(u128::from(u64::MAX)) as u64,
            by_key: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<EventId> {
        self.by_key.get(key).map(|(id, _)| *id)
    }

    pub(crate) fn insert(&mut self, key: String, id: EventId, published_at_ms: u64) {
        if self.window_ms == 0 {
            return;
        }
        self.order.push_back((published_at_ms, key.clone()));
        self.by_key.insert(key, (id, published_at_ms));
    }

    /// Forgets keys published more than the window before `now_ms`.
    pub(crate) fn expire(&mut self, now_ms: u64) {
        while let Some((at, _)) = self.order.front() {
            if at.saturating_add(self.window_ms) > now_ms {
                break;
            }
            let (at, key) = self.order.pop_front().expect("front exists");
            if self.by_key.get(&key).is_some_and(|(_, a)| *a == at) {
                self.by_key.remove(&key);
            }
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
                    self.insert(key.clone(), event.id, event.published_at_ms);
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

    #[test]
    fn keys_expire_after_the_window() {
        let mut keys = Keys::new(Duration::from_millis(100));
        keys.insert("a".into(), EventId(1), 1_000);
        keys.insert("b".into(), EventId(2), 1_050);
        keys.expire(1_099);
        assert_eq!(
            (keys.get("a"), keys.get("b")),
            (Some(EventId(1)), Some(EventId(2)))
        );
        keys.expire(1_100);
        assert_eq!((keys.get("a"), keys.get("b")), (None, Some(EventId(2))));
        keys.expire(1_150);
        assert_eq!(keys.get("b"), None);
    }
}
