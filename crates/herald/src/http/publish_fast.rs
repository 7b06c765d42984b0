//! The quick read of a well-formed JSON publish body: straight into borrowed fields, with no
//! `serde_json::Value` tree, for the shape nearly every publisher sends (string targets, string
//! data, known fields once each). It never answers an error: a body it cannot take whole, for any
//! reason, goes to the full parser in `publish.rs`, which names the problem. So what a body means
//! and how a bad one is refused is decided in one place; this only skips the tree when the body
//! is one the full parser would accept as it is.

use herald_core::Message;
use serde::Deserialize;

/// One message as the quick read takes it. Duplicate or unknown fields, a non-string `data` (kept
/// as JSON text by the full parser), a string with escapes (not borrowable), a `null` where the
/// full parser refuses one, or any other type fail it, and the full parser runs instead.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fields<'a> {
    #[serde(default, borrow)]
    topic: Given<&'a str>,
    #[serde(default, borrow)]
    topics: Given<Vec<&'a str>>,
    #[serde(default, borrow)]
    user: Given<Names<'a>>,
    #[serde(default, borrow)]
    users: Given<Names<'a>>,
    #[serde(default)]
    broadcast: Given<bool>,
    #[serde(default, borrow)]
    data: Given<&'a str>,
    /// `null` is taken as absent, as the full parser does.
    #[serde(borrow)]
    event: Option<&'a str>,
    #[serde(default)]
    retry: Given<u32>,
    #[serde(default, borrow, rename = "idempotencyKey")]
    idempotency_key: Given<&'a str>,
    #[serde(default)]
    private: Given<bool>,
}

/// A field that, when present, holds a `T` (never `null`, unlike `Option<T>`).
struct Given<T>(Option<T>);

impl<T> Default for Given<T> {
    fn default() -> Self {
        Given(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Given<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(|v| Given(Some(v)))
    }
}

/// `user` and `users` take a string or an array of strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum Names<'a> {
    One(&'a str),
    Many(Vec<&'a str>),
}

impl<'a> Names<'a> {
    fn iter(&self) -> impl Iterator<Item = &'a str> + '_ {
        let (one, many) = match self {
            Names::One(s) => (Some(*s), &[][..]),
            Names::Many(v) => (None, v.as_slice()),
        };
        one.into_iter().chain(many.iter().copied())
    }
}

/// A body of one object or a non-empty array of objects, when every message of it reads quickly
/// and passes every check; `None` sends the body to the full parser. `targets_allowed`: the
/// route takes its targets from the body (`/publish`); `finish` adds the route's own target and
/// runs the same final checks as the full parser.
pub(super) fn parse(
    bytes: &[u8],
    targets_allowed: bool,
    finish: impl Fn(super::publish::Draft) -> Option<Message>,
) -> Option<(Vec<Message>, bool)> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first == b'[' {
        let all: Vec<Fields> = serde_json::from_slice(bytes).ok()?;
        if all.is_empty() {
            return None;
        }
        let messages = all
            .into_iter()
            .map(|f| message(f, targets_allowed, &finish))
            .collect::<Option<Vec<_>>>()?;
        Some((messages, true))
    } else {
        let one: Fields = serde_json::from_slice(bytes).ok()?;
        Some((vec![message(one, targets_allowed, &finish)?], false))
    }
}

fn message(
    f: Fields<'_>,
    targets_allowed: bool,
    finish: &impl Fn(super::publish::Draft) -> Option<Message>,
) -> Option<Message> {
    use super::publish as p;
    let (topic, topics, user, users) = (f.topic.0, f.topics.0, f.user.0, f.users.0);
    let has_targets = topic.is_some()
        || topics.is_some()
        || user.is_some()
        || users.is_some()
        || f.broadcast.0.is_some();
    if (has_targets && !targets_allowed)
        || (topic.is_some() && topics.is_some())
        || (user.is_some() && users.is_some())
    {
        return None;
    }
    let mut d = p::Draft::default();
    for s in topic.into_iter().chain(topics.into_iter().flatten()) {
        d.targets.topics.push(p::topic("topic", s).ok()?);
    }
    for names in user.iter().chain(users.iter()) {
        for s in names.iter() {
            d.targets.users.push(p::user("user", s).ok()?);
        }
    }
    d.targets.broadcast = f.broadcast.0.unwrap_or(false);
    d.data = Some(f.data.0?.to_owned());
    d.event = match f.event {
        Some(s) => Some(p::event_type(s).ok()?),
        None => None,
    };
    d.retry_ms = match f.retry.0 {
        Some(ms) => Some(p::retry_in_bounds(ms).ok()?),
        None => None,
    };
    d.idempotency_key = match f.idempotency_key.0 {
        Some(s) => Some(p::idempotency_key(s).ok()?),
        None => None,
    };
    d.private = f.private.0.unwrap_or(false);
    finish(d)
}
