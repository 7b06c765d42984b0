//! What a connection may receive: its `Grant` (all, anonymous, or a token's subscribe rights),
//! applied alike to live fan-out and to replay.

use std::sync::Arc;

use crate::event::Event;
use crate::name::{Selector, UserId};

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
