//! Validated names: `Topic`, `Selector`, `UserId`, `EventType`.
//! Every value of these types passed its check at the boundary; past it, invalid names cannot exist.

use std::fmt;
use std::sync::Arc;

/// Why a topic, selector, user id or event type was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("is {len} bytes long, the limit is {max}")]
    TooLong { len: usize, max: usize },
    #[error("contains a control character")]
    ControlChar,
    #[error("has an empty segment (leading, trailing or doubled '/')")]
    EmptySegment,
    #[error("has a '*' or '**' segment, which only selectors may have")]
    Wildcard,
    #[error("has '**' before its last segment")]
    InnerDoubleStar,
    #[error("must not contain '/'")]
    Slash,
    #[error("must not contain CR, LF or NUL")]
    LineBreak,
    #[error("starts with 'herald.', which is reserved for the hub")]
    Reserved,
}

/// The type of the presence events the hub publishes (see `presence_events`).
pub const PRESENCE_EVENT: &str = "herald.presence";
/// The type of the event that ends a finite stream.
pub const COMPLETE: &str = "herald.complete";
/// The type of the event that asks a finite stream's producer to stop.
pub const CANCEL: &str = "herald.cancel";

const TOPIC_MAX: usize = 255;
const USER_MAX: usize = 128;
const EVENT_TYPE_MAX: usize = 256;

fn check_len(s: &str, max: usize) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    if s.len() > max {
        return Err(NameError::TooLong { len: s.len(), max });
    }
    if s.chars().any(char::is_control) {
        return Err(NameError::ControlChar);
    }
    Ok(())
}

/// Checks the shape shared by topics and selectors; `wildcards` allows `*` and a last `**`.
fn check_path(s: &str, wildcards: bool) -> Result<(), NameError> {
    check_len(s, TOPIC_MAX)?;
    let mut segments = s.split('/').peekable();
    while let Some(seg) = segments.next() {
        match seg {
            "" => return Err(NameError::EmptySegment),
            "*" | "**" if !wildcards => return Err(NameError::Wildcard),
            "**" if segments.peek().is_some() => return Err(NameError::InnerDoubleStar),
            _ => {}
        }
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = NameError;
            fn try_from(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                Self::new(&s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// A topic a message is published to: `/`-separated, 1–255 bytes, no empty, `*` or `**` segment.
    Topic
);
name_type!(
    /// A topic pattern: a `*` segment matches one segment, a last `**` matches one or more.
    Selector
);
name_type!(
    /// A user id: 1–128 bytes, no `/`, no control characters.
    UserId
);
name_type!(
    /// An event type: 1–256 bytes, no CR/LF/NUL, not starting with `herald.`.
    EventType
);

impl Topic {
    pub fn new(s: &str) -> Result<Self, NameError> {
        check_path(s, false)?;
        Ok(Self(s.into()))
    }

    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// Whether the topic belongs to herald (its first segment starts with `$`, like
    /// `$presence/alice`): only the hub publishes to it, and only an explicit right subscribes.
    pub fn is_reserved(&self) -> bool {
        self.0.starts_with('$')
    }
}

impl Selector {
    pub fn new(s: &str) -> Result<Self, NameError> {
        check_path(s, true)?;
        Ok(Self(s.into()))
    }

    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// Whether the selector asks for herald's own topics: its first segment is a literal starting
    /// with `$`. Only such a selector matches a reserved topic (a first-level `*` or `**` never
    /// does, as in MQTT), so `**` does not quietly subscribe to `$presence/…`.
    pub fn is_reserved(&self) -> bool {
        self.0.starts_with('$')
    }

    /// True when the selector has no wildcard segment and so matches exactly one topic.
    pub fn is_exact(&self) -> bool {
        !self.segments().any(|s| s == "*" || s == "**")
    }

    /// Whether `topic` is matched by this selector.
    pub fn matches(&self, topic: &Topic) -> bool {
        // Most selectors are plain topics; a topic never holds `*`, so equal strings decide.
        if !self.0.contains('*') {
            return *self.0 == *topic.0;
        }
        // A reserved topic is matched only by a selector naming its first segment.
        if topic.is_reserved() && !self.is_reserved() {
            return false;
        }
        let mut topic_segs = topic.segments();
        for sel in self.segments() {
            match sel {
                // `**` is always last: it needs at least one more topic segment.
                "**" => return topic_segs.next().is_some(),
                "*" => {
                    if topic_segs.next().is_none() {
                        return false;
                    }
                }
                literal => {
                    if topic_segs.next() != Some(literal) {
                        return false;
                    }
                }
            }
        }
        topic_segs.next().is_none()
    }

    /// Whether this selector, taken as a right, covers `other`: every topic `other` can match is
    /// matched by `self`. `chat/*` covers `chat/a` and `chat/*`, but not `chat/**`; `chat/**`
    /// covers `chat/*` and `chat/a/**`; `**` covers everything.
    pub fn covers(&self, other: &Selector) -> bool {
        // Herald's own topics are covered only by a right that names them (`$presence/**`).
        if other.is_reserved() && !self.is_reserved() {
            return false;
        }
        let mut rights = self.segments();
        let mut wanted = other.segments();
        loop {
            match (rights.next(), wanted.next()) {
                (None, None) => return true,
                // `self` ends with `**`: whatever `other` still has (one segment or more) fits.
                (Some("**"), Some(_)) => return true,
                // The lengths of the matched topics differ.
                (Some(_), None) | (None, Some(_)) => return false,
                // `other` allows any length from here on, `self` does not.
                (Some(_), Some("**")) => return false,
                (Some("*"), Some(_)) => {}
                // A literal right covers only the same literal, never a `*`.
                (Some(r), Some(w)) if r == w && w != "*" => {}
                (Some(_), Some(_)) => return false,
            }
        }
    }
}

impl From<Topic> for Selector {
    fn from(t: Topic) -> Self {
        Selector(t.0)
    }
}

impl UserId {
    pub fn new(s: &str) -> Result<Self, NameError> {
        check_len(s, USER_MAX)?;
        if s.contains('/') {
            return Err(NameError::Slash);
        }
        Ok(Self(s.into()))
    }
}

impl EventType {
    pub fn new(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > EVENT_TYPE_MAX {
            return Err(NameError::TooLong {
                len: s.len(),
                max: EVENT_TYPE_MAX,
            });
        }
        if s.contains(['\r', '\n', '\0']) {
            return Err(NameError::LineBreak);
        }
        if s.starts_with("herald.") {
            return Err(NameError::Reserved);
        }
        Ok(Self(s.into()))
    }

    /// Hub-reserved types (`herald.gap`, `herald.close`) are built only inside the crate.
    pub(crate) fn reserved(s: &'static str) -> Self {
        debug_assert!(s.starts_with("herald."));
        Self(s.into())
    }

    /// A type read back from a store: what [`EventType::new`] accepts, and the reserved types
    /// the hub stores with an id (`herald.presence`, `herald.complete`, `herald.cancel`).
    #[cfg(any(feature = "durable", feature = "redis"))]
    pub(crate) fn stored(s: &str) -> Result<Self, NameError> {
        match s {
            PRESENCE_EVENT => Ok(Self::reserved(PRESENCE_EVENT)),
            COMPLETE => Ok(Self::complete()),
            CANCEL => Ok(Self::cancel()),
            _ => Self::new(s),
        }
    }

    /// `herald.complete`: the last event of a finite stream (an answer, a job), stored with an id.
    pub fn complete() -> Self {
        Self::reserved(COMPLETE)
    }

    /// `herald.cancel`: a request to stop a finite stream, stored with an id; it ends the
    /// streaming publish in progress on its topic.
    pub fn cancel() -> Self {
        Self::reserved(CANCEL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Topic {
        Topic::new(s).unwrap()
    }
    fn sel(s: &str) -> Selector {
        Selector::new(s).unwrap()
    }

    #[test]
    fn topics_are_checked() {
        assert!(Topic::new("chat/room1").is_ok());
        assert!(Topic::new("a").is_ok());
        assert!(Topic::new("über/ß").is_ok());
        assert!(Topic::new("a*b/c").is_ok());
        assert_eq!(Topic::new(""), Err(NameError::Empty));
        assert_eq!(Topic::new("/a"), Err(NameError::EmptySegment));
        assert_eq!(Topic::new("a/"), Err(NameError::EmptySegment));
        assert_eq!(Topic::new("a//b"), Err(NameError::EmptySegment));
        assert_eq!(Topic::new("a/*"), Err(NameError::Wildcard));
        assert_eq!(Topic::new("**"), Err(NameError::Wildcard));
        assert_eq!(Topic::new("a\nb"), Err(NameError::ControlChar));
        assert_eq!(Topic::new("a\u{7f}"), Err(NameError::ControlChar));
        assert!(Topic::new(&"x".repeat(255)).is_ok());
        assert_eq!(
            Topic::new(&"x".repeat(256)),
            Err(NameError::TooLong { len: 256, max: 255 })
        );
    }

    #[test]
    fn selectors_are_checked() {
        assert!(Selector::new("chat/*").is_ok());
        assert!(Selector::new("**").is_ok());
        assert!(Selector::new("*/b/**").is_ok());
        assert_eq!(Selector::new("a/**/b"), Err(NameError::InnerDoubleStar));
        assert_eq!(Selector::new("a//b"), Err(NameError::EmptySegment));
        assert!(sel("a/b").is_exact());
        assert!(!sel("a/*").is_exact());
    }

    #[test]
    fn reserved_topics_need_a_selector_that_names_them() {
        assert!(t("$presence/alice").is_reserved());
        assert!(!t("presence/$x").is_reserved());
        for wild in ["**", "*/alice", "*/*", "*/**"] {
            assert!(!sel(wild).matches(&t("$presence/alice")), "{wild}");
        }
        assert!(sel("**").matches(&t("presence/alice")));
        assert!(sel("$presence/*").matches(&t("$presence/alice")));
        assert!(sel("$presence/**").matches(&t("$presence/alice")));
        assert!(sel("$presence/alice").matches(&t("$presence/alice")));
        assert!(!sel("**").covers(&sel("$presence/*")));
        assert!(!sel("*/**").covers(&sel("$presence/alice")));
        assert!(sel("$presence/**").covers(&sel("$presence/*")));
        assert!(sel("$presence/*").covers(&sel("$presence/alice")));
    }

    #[test]
    fn selector_matching() {
        assert!(sel("chat/*").matches(&t("chat/room1")));
        assert!(!sel("chat/*").matches(&t("chat/a/b")));
        assert!(!sel("chat/*").matches(&t("chat")));
        assert!(sel("chat/**").matches(&t("chat/room1")));
        assert!(sel("chat/**").matches(&t("chat/a/b")));
        assert!(!sel("chat/**").matches(&t("chat")));
        assert!(!sel("chat/**").matches(&t("chatter/a")));
        assert!(sel("chat").matches(&t("chat")));
        assert!(!sel("chat").matches(&t("chat/a")));
        assert!(!sel("chat/a").matches(&t("chat")));
        assert!(!sel("chat/a").matches(&t("chat/b")));
        // A `*` inside a segment is a literal, in selectors and in topics alike.
        assert!(sel("a*b/c").matches(&t("a*b/c")));
        assert!(!sel("a*b/c").matches(&t("axb/c")));
        assert!(sel("a*b/*").matches(&t("a*b/c")));
        assert!(sel("*/b").matches(&t("a/b")));
        assert!(!sel("*/b").matches(&t("a/c")));
        assert!(sel("**").matches(&t("x")));
        assert!(sel("**").matches(&t("x/y/z")));
        assert!(sel("*/*/**").matches(&t("a/b/c")));
        assert!(!sel("*/*/**").matches(&t("a/b")));
    }

    #[test]
    fn coverage() {
        let covers = |r: &str, s: &str| sel(r).covers(&sel(s));
        assert!(covers("chat/*", "chat/a"));
        assert!(covers("chat/*", "chat/*"));
        assert!(!covers("chat/*", "chat/**"));
        assert!(!covers("chat/*", "chat"));
        assert!(!covers("chat/*", "chat/a/b"));
        assert!(covers("chat/**", "chat/a"));
        assert!(covers("chat/**", "chat/*"));
        assert!(covers("chat/**", "chat/**"));
        assert!(covers("chat/**", "chat/a/**"));
        assert!(covers("chat/**", "chat/*/b"));
        assert!(!covers("chat/**", "chat"));
        assert!(!covers("chat/**", "*/a"));
        assert!(!covers("chat/**", "**"));
        assert!(covers("**", "**"));
        assert!(covers("**", "a/b/c"));
        assert!(covers("**", "*"));
        assert!(covers("*/**", "a/**"));
        assert!(!covers("*/*/**", "a/**"));
        assert!(covers("*/*/**", "a/*/**"));
        assert!(covers("a/b", "a/b"));
        assert!(!covers("a/b", "a/*"));
        assert!(!covers("a/b", "a/c"));
        assert!(!covers("a", "a/b"));
        assert!(covers("*/b", "a/b"));
        assert!(!covers("*/b", "a/*"));
        assert!(!covers("a*", "a/b"));
        assert!(!covers("a*", "*"));
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn segment(wild: bool) -> BoxedStrategy<String> {
            if wild {
                prop_oneof![Just("a"), Just("b"), Just("*")]
                    .prop_map(String::from)
                    .boxed()
            } else {
                prop_oneof![Just("a"), Just("b")]
                    .prop_map(String::from)
                    .boxed()
            }
        }

        /// Selectors over the literals `a` and `b`, up to 4 segments, maybe ending in `**`.
        fn selector() -> impl Strategy<Value = Selector> {
            (
                proptest::collection::vec(segment(true), 1..=4),
                any::<bool>(),
            )
                .prop_map(|(mut segs, rest)| {
                    if rest {
                        *segs.last_mut().unwrap() = "**".into();
                    }
                    Selector::new(&segs.join("/")).unwrap()
                })
        }

        /// Every topic of up to `max` segments over `a`, `b` and a literal neither selector has.
        fn topics(max: usize) -> Vec<Topic> {
            let mut all: Vec<Vec<&str>> = vec![vec![]];
            let mut out = Vec::new();
            for _ in 0..max {
                let mut next = Vec::new();
                for prefix in &all {
                    for seg in ["a", "b", "z"] {
                        let mut t = prefix.clone();
                        t.push(seg);
                        out.push(Topic::new(&t.join("/")).unwrap());
                        next.push(t);
                    }
                }
                all = next;
            }
            out
        }

        proptest! {
            #[test]
            fn covers_agrees_with_brute_force(right in selector(), wanted in selector()) {
                // One more segment than either selector has is enough to tell `**` apart.
                let max = right.segments().count().max(wanted.segments().count()) + 1;
                let brute = topics(max)
                    .iter()
                    .all(|t| !wanted.matches(t) || right.matches(t));
                prop_assert_eq!(right.covers(&wanted), brute, "{} covers {}", right, wanted);
            }

            #[test]
            fn names_never_panic_and_accept_only_what_they_promise(s in "\\PC{0,40}|[a*/\\n\\r]{0,12}") {
                if let Ok(t) = Topic::new(&s) {
                    prop_assert!(!s.is_empty() && s.len() <= 255);
                    prop_assert!(t.segments().all(|g| !g.is_empty() && g != "*" && g != "**"));
                    prop_assert!(Selector::from(t.clone()).matches(&t));
                }
                if let Ok(sel) = Selector::new(&s) {
                    prop_assert!(sel.covers(&sel));
                    prop_assert!(!s.chars().any(char::is_control));
                }
                if UserId::new(&s).is_ok() {
                    prop_assert!(!s.contains('/') && !s.chars().any(char::is_control));
                }
                if EventType::new(&s).is_ok() {
                    prop_assert!(!s.contains(['\r', '\n', '\0']));
                }
            }
        }
    }

    #[test]
    fn users_and_event_types() {
        assert!(UserId::new("alice@example.com").is_ok());
        assert_eq!(UserId::new("a/b"), Err(NameError::Slash));
        assert_eq!(UserId::new(""), Err(NameError::Empty));
        assert_eq!(UserId::new("a\tb"), Err(NameError::ControlChar));
        assert!(UserId::new(&"u".repeat(128)).is_ok());
        assert!(UserId::new(&"u".repeat(129)).is_err());
        assert!(EventType::new("order.updated").is_ok());
        assert_eq!(EventType::new("herald.gap"), Err(NameError::Reserved));
        assert_eq!(EventType::new("a\rb"), Err(NameError::LineBreak));
        assert_eq!(EventType::new(""), Err(NameError::Empty));
        assert!(EventType::new(&"e".repeat(257)).is_err());
    }
}
