//! Planned stream ends: the hub's maximum stream age, spread by jitter, and a subscriber's own
//! shorter `maxAge`. One deadline-ordered map serves every connection and the hub's one timer
//! task sleeps until its earliest entry, so there is still no timer per connection. A stream that
//! reaches its age ends quietly (no `herald.close`): clients reconnect with their last id.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::subscriber::{Ending, Subscriber};

/// The hub's rule for how long a stream may live.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct AgePolicy {
    /// The longest a stream lives; `None`: streams live until the client or the hub goes away,
    /// unless the client asks for less.
    pub(crate) max: Option<Duration>,
    /// Each stream ends at a random point in `[age × (1 − jitter), age]`, so the streams of a node
    /// do not all reconnect at once. Between 0 and 1.
    pub(crate) jitter: f64,
}

impl Default for AgePolicy {
    fn default() -> Self {
        AgePolicy {
            max: None,
            jitter: crate::defaults::STREAM_AGE_JITTER,
        }
    }
}

impl AgePolicy {
    /// The age a stream gets: the shorter of the hub's limit and the client's ask, jittered.
    fn age(&self, asked: Option<Duration>) -> Option<Duration> {
        let age = match (self.max, asked) {
            (Some(max), Some(asked)) => max.min(asked),
            (max, asked) => max.or(asked)?,
        };
        let jitter = self.jitter.clamp(0.0, 1.0);
        Some(age.mul_f64(1.0 - jitter * unit_random()))
    }
}

/// A uniform number in `[0, 1)`. std's `RandomState` is seeded from the OS once per thread and
/// stepped on every call, which is all the randomness a jitter needs; no RNG crate for one number.
fn unit_random() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// The planned ends of open streams. Deadlines are milliseconds after `origin` (Tokio's clock,
/// so paused-clock tests drive them), keyed with the subscriber's address to stay unique.
#[derive(Debug)]
pub(crate) struct Ages {
    policy: AgePolicy,
    origin: Instant,
    due: Mutex<BTreeMap<(u64, usize), Weak<Subscriber>>>,
    /// Woken when a deadline earlier than every other one is added, so the timer re-arms.
    pub(crate) changed: Arc<Notify>,
}

impl Ages {
    pub(crate) fn new(policy: AgePolicy) -> Self {
        Ages {
            policy,
            origin: Instant::now(),
            due: Mutex::new(BTreeMap::new()),
            changed: Arc::new(Notify::new()),
        }
    }

    /// When a stream opened now ends (ms after `origin`, at least 1), if it has an age at all.
    pub(crate) fn plan(&self, asked: Option<Duration>) -> Option<u64> {
        let age = self.policy.age(asked)?;
        let at = (Instant::now() + age).duration_since(self.origin);
        Some(u64::try_from(at.as_millis()).unwrap_or(u64::MAX).max(1))
    }

    pub(crate) fn add(&self, sub: &Arc<Subscriber>) {
        let Some(at) = sub.ends_at_ms() else { return };
        let key = (at, Arc::as_ptr(sub) as usize);
        let mut due = self.due.lock();
        let earliest = due.first_key_value().is_none_or(|(first, _)| key < *first);
        due.insert(key, Arc::downgrade(sub));
        drop(due);
        if earliest {
            self.changed.notify_one();
        }
    }

    pub(crate) fn remove(&self, sub: &Arc<Subscriber>) {
        if let Some(at) = sub.ends_at_ms() {
            self.due.lock().remove(&(at, Arc::as_ptr(sub) as usize));
        }
    }

    /// The earliest planned end, for the timer to sleep until.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        let due = self.due.lock();
        let ((at, _), _) = due.first_key_value()?;
        Some(self.origin + Duration::from_millis(*at))
    }

    /// Ends every stream whose age is reached by `now`.
    pub(crate) fn fire(&self, now: Instant) {
        let now_ms = u64::try_from(now.duration_since(self.origin).as_millis()).unwrap_or(u64::MAX);
        let reached = {
            let mut due = self.due.lock();
            let later = due.split_off(&(now_ms.saturating_add(1), 0));
            std::mem::replace(&mut *due, later)
        };
        for sub in reached.into_values().filter_map(|w| w.upgrade()) {
            sub.end(Ending::Aged);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max: Option<u64>, jitter: f64) -> AgePolicy {
        AgePolicy {
            max: max.map(Duration::from_secs),
            jitter,
        }
    }

    #[test]
    fn the_age_is_the_shorter_of_the_hub_limit_and_the_ask() {
        let s = Duration::from_secs;
        assert_eq!(policy(None, 0.0).age(None), None);
        assert_eq!(policy(Some(60), 0.0).age(None), Some(s(60)));
        assert_eq!(policy(Some(60), 0.0).age(Some(s(600))), Some(s(60)));
        assert_eq!(policy(Some(60), 0.0).age(Some(s(10))), Some(s(10)));
        assert_eq!(policy(None, 0.0).age(Some(s(10))), Some(s(10)));
    }

    #[test]
    fn jitter_spreads_ages_within_the_window() {
        let p = policy(Some(100), 0.5);
        let ages: Vec<Duration> = (0..200).map(|_| p.age(None).unwrap()).collect();
        assert!(
            ages.iter()
                .all(|a| *a >= Duration::from_secs(50) && *a <= Duration::from_secs(100))
        );
        let (min, max) = (ages.iter().min().unwrap(), ages.iter().max().unwrap());
        // 200 uniform draws over a 50 s window land far apart.
        assert!(*max - *min > Duration::from_secs(25), "{min:?}..{max:?}");
    }
}
