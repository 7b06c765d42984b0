//! What a connection may receive: its `Grant` (all, anonymous, or a token's subscribe rights),
//! applied alike to live fan-out and to replay, and the hub-wide deadlines at which tokens expire.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::event::Event;
use crate::name::{Selector, UserId};
use crate::subscriber::{Ending, Subscriber};

/// The rights a connection holds. Selectors choose what a connection asks for; the grant decides
/// which private events (see [`Event::is_private`]) it may see.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Grant {
    /// No authorization configured: every event its selectors, user or a broadcast match.
    #[default]
    All,
    /// A connection without a token on a hub with authorization: never a private event, never a
    /// message to users.
    Anonymous,
    /// A token's `subscribe` rights: private events whose topics one of them matches, and
    /// messages to the connection's own user.
    Rights(Arc<[Selector]>),
}

impl Grant {
    pub fn rights(subscribe: impl IntoIterator<Item = Selector>) -> Self {
        Grant::Rights(subscribe.into_iter().collect())
    }

    /// Whether this grant lets a connection subscribe to `selector` (anonymous connections may ask
    /// for any topic; they just never see private events).
    pub fn covers(&self, selector: &Selector) -> bool {
        match self {
            Grant::All | Grant::Anonymous => true,
            Grant::Rights(rights) => rights.iter().any(|r| r.covers(selector)),
        }
    }

    /// Whether a connection of `user` with this grant may see `event` (routing aside).
    pub fn sees(&self, event: &Event, user: Option<&UserId>) -> bool {
        if !event.is_private() {
            return true;
        }
        match self {
            Grant::All => true,
            Grant::Anonymous => false,
            Grant::Rights(rights) => {
                event.targets.broadcast
                    || user.is_some_and(|u| event.targets.users.contains(u))
                    || event
                        .targets
                        .topics
                        .iter()
                        .any(|t| rights.iter().any(|r| r.matches(t)))
            }
        }
    }
}

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
        if let Some(at) = sub.expires_at_ms {
            self.due
                .lock()
                .insert((at, Arc::as_ptr(sub) as usize), Arc::downgrade(sub));
        }
    }

    pub(crate) fn remove(&self, sub: &Arc<Subscriber>) {
        if let Some(at) = sub.expires_at_ms {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventId, Message};
    use crate::name::Topic;

    fn event(m: Message) -> Event {
        Event::new(EventId(1), m, 0)
    }
    fn sel(s: &str) -> Selector {
        Selector::new(s).unwrap()
    }

    #[test]
    fn private_events_need_matching_rights() {
        let topic = Topic::new("chat/a").unwrap();
        let public = event(Message::to_topic(topic.clone()));
        let private = event(Message::to_topic(topic).private(true));
        let alice = UserId::new("alice").unwrap();
        let bob = UserId::new("bob").unwrap();
        let to_alice = event(Message::to_user(alice.clone()));
        let chat = Grant::rights([sel("chat/*")]);
        let news = Grant::rights([sel("news/**")]);
        for g in [&Grant::All, &Grant::Anonymous, &chat, &news] {
            assert!(g.sees(&public, None));
        }
        assert!(Grant::All.sees(&private, None));
        assert!(!Grant::Anonymous.sees(&private, None));
        assert!(chat.sees(&private, None));
        assert!(!news.sees(&private, None));
        assert!(chat.sees(&to_alice, Some(&alice)));
        assert!(!chat.sees(&to_alice, Some(&bob)));
        assert!(!chat.sees(&to_alice, None));
        assert!(!Grant::Anonymous.sees(&to_alice, Some(&alice)));
    }

    #[test]
    fn grants_cover_selectors() {
        let chat = Grant::rights([sel("chat/*"), sel("news/**")]);
        assert!(chat.covers(&sel("chat/a")));
        assert!(chat.covers(&sel("news/eu/*")));
        assert!(!chat.covers(&sel("chat/**")));
        assert!(Grant::Anonymous.covers(&sel("**")));
        assert!(!Grant::rights([]).covers(&sel("a")));
    }
}
