//! Token deadlines of open connections, ordered by time, so the hub's one timer ends each stream at
//! its token's expiry without a timer per connection.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use super::subscriber::{Ending, Subscriber};

/// The reason a stream ends with when its token expires.
pub(crate) const TOKEN_EXPIRED: &str = "token_expired";

/// Token deadlines of open connections, ordered by time, so the hub's one timer ends each stream
/// at its expiry without a timer per connection. Keyed by deadline and the subscriber's address
/// (unique while its `Weak` is held here).
#[derive(Debug, Default)]
pub(crate) struct Expiries {
    due: Mutex<BTreeMap<(u64, usize), Weak<Subscriber>>>,
}

impl Expiries {
    pub(crate) fn add(&self, sub: &Arc<Subscriber>) {
        if let Some(at) = sub.expires_at_ms() {
            self.due
                .lock()
                .insert((at, Arc::as_ptr(sub) as usize), Arc::downgrade(sub));
        }
    }

    pub(crate) fn remove(&self, sub: &Arc<Subscriber>) {
        if let Some(at) = sub.expires_at_ms() {
            self.due.lock().remove(&(at, Arc::as_ptr(sub) as usize));
        }
    }

    /// Ends every stream whose token expired at or before `now_ms` with `herald.close`.
    pub(crate) fn fire(&self, now_ms: u64) {
        let expired = {
            let mut due = self.due.lock();
            let later = due.split_off(&(now_ms.saturating_add(1), 0));
            std::mem::replace(&mut *due, later)
        };
        for sub in expired.into_values().filter_map(|w| w.upgrade()) {
            sub.end(Ending::Closed(TOKEN_EXPIRED.to_string()));
        }
    }
}
