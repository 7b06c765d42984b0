//! Messages (what a publisher asks for) and events (a message with its id and its SSE frame).
//! An event's frame is encoded exactly once, into shared `Bytes` that every connection writes; its
//! data, when it has no line break, is a slice of that frame, so history keeps one copy.

use std::fmt;
use std::sync::OnceLock;

use bytes::{BufMut, Bytes, BytesMut};

use crate::name::{EventType, Selector, Topic, UserId};

/// The hub-assigned id of an event. Ids increase strictly in publish order; clients treat them as opaque.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId(pub u64);

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl EventId {
    /// Parses an id as a client echoes it back; `None` for anything this hub never writes.
    pub fn parse(s: &str) -> Option<Self> {
        if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok().map(EventId)
    }
}

/// Who a message goes to. At least one target is always present.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Targets {
    pub topics: Vec<Topic>,
    pub users: Vec<UserId>,
    pub broadcast: bool,
}

impl Targets {
    pub fn is_empty(&self) -> bool {
        self.topics.is_empty() && self.users.is_empty() && !self.broadcast
    }
}

/// A message to publish: targets, optional type, data and retry hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub targets: Targets,
    pub event_type: Option<EventType>,
    pub data: String,
    pub retry_ms: Option<u32>,
    /// A publisher's key: repeating a publish with the same key within the hub's window publishes once.
    pub idempotency_key: Option<String>,
    /// Delivered only to connections whose rights match one of its topics (see [`crate::Grant`]).
    pub private: bool,
}

impl Message {
    fn with(targets: Targets) -> Self {
        Message {
            targets,
            event_type: None,
            data: String::new(),
            retry_ms: None,
            idempotency_key: None,
            private: false,
        }
    }

    pub fn to_topic(topic: Topic) -> Self {
        Self::with(Targets {
            topics: vec![topic],
            ..Targets::default()
        })
    }

    pub fn to_user(user: UserId) -> Self {
        Self::with(Targets {
            users: vec![user],
            ..Targets::default()
        })
    }

    pub fn broadcast() -> Self {
        Self::with(Targets {
            broadcast: true,
            ..Targets::default()
        })
    }

    pub fn to_targets(targets: Targets) -> Self {
        Self::with(targets)
    }

    pub fn topic(mut self, topic: Topic) -> Self {
        self.targets.topics.push(topic);
        self
    }

    pub fn user(mut self, user: UserId) -> Self {
        self.targets.users.push(user);
        self
    }

    pub fn data(mut self, data: impl Into<String>) -> Self {
        self.data = data.into();
        self
    }

    pub fn event(mut self, event_type: EventType) -> Self {
        self.event_type = Some(event_type);
        self
    }

    pub fn retry_ms(mut self, ms: u32) -> Self {
        self.retry_ms = Some(ms);
        self
    }

    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Marks the message private: see [`Event::is_private`].
    pub fn private(mut self, private: bool) -> Self {
        self.private = private;
        self
    }
}

/// An event's data as published (valid UTF-8). Without a line break it is the slice of the
/// event's frame that already holds it, so an event keeps one copy of its data, not two.
#[derive(Clone, PartialEq, Eq)]
pub struct EventData(Bytes);

impl EventData {
    pub fn as_str(&self) -> &str {
        // Built only from a `String` or a slice of one (see `Event::new`).
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// Bytes held besides `frame` (0 when the data is a slice of it).
    fn own_bytes(&self, frame: &Bytes) -> usize {
        let range = frame.as_ptr_range();
        if self.0.is_empty() || range.contains(&self.0.as_ptr()) {
            0
        } else {
            self.0.len()
        }
    }
}

impl std::ops::Deref for EventData {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for EventData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for EventData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for EventData {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<String> for EventData {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for EventData {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A published event: immutable, shared by history and every queue it is in.
#[derive(Debug)]
pub struct Event {
    pub id: EventId,
    pub targets: Targets,
    pub event_type: Option<EventType>,
    pub data: EventData,
    pub retry_ms: Option<u32>,
    pub idempotency_key: Option<String>,
    /// Published with `"private": true`.
    pub private: bool,
    /// Milliseconds since the Unix epoch when the hub accepted it.
    pub published_at_ms: u64,
    /// The SSE frame, encoded once.
    pub frame: Bytes,
    /// The routing lines a `route=1` stream writes just before the frame, encoded on first use.
    route: OnceLock<Bytes>,
}

impl Event {
    pub fn new(id: EventId, message: Message, published_at_ms: u64) -> Self {
        let frame = encode_frame(
            Some(id),
            message.event_type.as_ref().map(EventType::as_str),
            message.retry_ms,
            &message.data,
        );
        // Without a line break the frame ends with `data: <data>\n\n`: share those bytes.
        let data = if message.data.contains(['\n', '\r']) {
            EventData(Bytes::from(message.data))
        } else {
            let end = frame.len() - 2;
            EventData(frame.slice(end - message.data.len()..end))
        };
        debug_assert_eq!(data.as_str().len(), data.0.len());
        Event {
            id,
            targets: message.targets,
            event_type: message.event_type,
            data,
            retry_ms: message.retry_ms,
            idempotency_key: message.idempotency_key,
            private: message.private,
            published_at_ms,
            frame,
            route: OnceLock::new(),
        }
    }

    /// Bytes this event holds: its frame, plus its data when that is not a slice of the frame.
    pub fn stored_bytes(&self) -> usize {
        self.frame.len() + self.data.own_bytes(&self.frame)
    }

    /// The lines that tell a routing client (`GET /events?route=1`) where this event was sent:
    /// `topic: <t>` per target topic, then `broadcast: 1` for a broadcast. They are SSE fields a
    /// WHATWG parser ignores, written before `id:` so they belong to the same event. Encoded once
    /// per event, on first use, so streams that do not ask for them cost nothing. The users a
    /// message was sent to are not listed: a stream adds only its own user (see [`user_line`]).
    pub fn route_lines(&self) -> &Bytes {
        self.route.get_or_init(|| {
            let mut buf = BytesMut::new();
            for topic in &self.targets.topics {
                buf.put_slice(b"topic: ");
                buf.put_slice(topic.as_str().as_bytes());
                buf.put_u8(b'\n');
            }
            if self.targets.broadcast {
                buf.put_slice(b"broadcast: 1\n");
            }
            buf.freeze()
        })
    }

    /// Published by the hub itself (a `herald.presence` event), not by a publisher: not counted
    /// as published.
    pub fn is_from_hub(&self) -> bool {
        self.event_type
            .as_ref()
            .is_some_and(|t| t.as_str() == crate::name::PRESENCE_EVENT)
    }

    /// Private events reach only connections whose rights match one of their topics (or, for a
    /// message to users, that user). A message to users is always private.
    pub fn is_private(&self) -> bool {
        self.private || !self.targets.users.is_empty()
    }

    /// Whether a connection with these selectors and user receives this event (rights aside:
    /// see [`crate::Grant::sees`]).
    pub fn is_for(&self, selectors: &[Selector], user: Option<&UserId>) -> bool {
        self.targets.broadcast
            || user.is_some_and(|u| self.targets.users.contains(u))
            || self
                .targets
                .topics
                .iter()
                .any(|t| selectors.iter().any(|s| s.matches(t)))
    }
}

/// A fingerprint of what a message publishes (targets, type, data, retry, private), the same
/// for a message and the event it became, in every process: an idempotency key repeated with
/// another payload is told apart from a true repeat. FNV-1a over the fields, each length-prefixed.
fn fingerprint(
    targets: &Targets,
    event_type: Option<&EventType>,
    data: &str,
    retry_ms: Option<u32>,
    private: bool,
) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for t in &targets.topics {
        eat(t.as_str().as_bytes());
    }
    eat(b"|");
    for u in &targets.users {
        eat(u.as_str().as_bytes());
    }
    eat(&[
        u8::from(targets.broadcast),
        u8::from(private),
        u8::from(retry_ms.is_some()),
    ]);
    eat(&retry_ms.unwrap_or(0).to_le_bytes());
    eat(event_type.map_or(&b""[..], |t| t.as_str().as_bytes()));
    eat(data.as_bytes());
    h
}

impl Message {
    /// See [`Event::fingerprint`].
    pub fn fingerprint(&self) -> u64 {
        fingerprint(
            &self.targets,
            self.event_type.as_ref(),
            &self.data,
            self.retry_ms,
            self.private,
        )
    }
}

impl Event {
    /// The fingerprint of the message this event published: equal for equal payloads.
    pub fn fingerprint(&self) -> u64 {
        fingerprint(
            &self.targets,
            self.event_type.as_ref(),
            &self.data,
            self.retry_ms,
            self.private,
        )
    }
}

pub use crate::clock::now_ms;

/// Encodes one SSE event. Each CR, LF or CRLF in `data` ends a `data:` line, so a WHATWG parser
/// reads back exactly `data` with line breaks normalised to LF. `event_type` holds no CR/LF/NUL.
pub fn encode_frame(
    id: Option<EventId>,
    event_type: Option<&str>,
    retry_ms: Option<u32>,
    data: &str,
) -> Bytes {
    let mut buf = BytesMut::with_capacity(data.len() + 48);
    if let Some(id) = id {
        buf.put_slice(b"id: ");
        buf.put_slice(id.to_string().as_bytes());
        buf.put_u8(b'\n');
    }
    if let Some(t) = event_type {
        buf.put_slice(b"event: ");
        buf.put_slice(t.as_bytes());
        buf.put_u8(b'\n');
    }
    if let Some(ms) = retry_ms {
        buf.put_slice(b"retry: ");
        buf.put_slice(ms.to_string().as_bytes());
        buf.put_u8(b'\n');
    }
    let bytes = data.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\n' | b'\r' => {
                buf.put_slice(b"data: ");
                buf.put_slice(&bytes[start..i]);
                buf.put_u8(b'\n');
                if bytes[i] == b'\r' && bytes.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    buf.put_slice(b"data: ");
    buf.put_slice(&bytes[start..]);
    buf.put_slice(b"\n\n");
    buf.freeze()
}

/// The `user: <id>` line a routing stream of `user` writes before an event sent to that user.
pub fn user_line(user: &UserId) -> Bytes {
    Bytes::from(format!("user: {}\n", user.as_str()))
}

/// A hub control event (`herald.gap`, `herald.close`): no `id:` line, so it never moves a client's last id.
pub(crate) fn control_frame(event_type: &EventType, json: &serde_json::Value) -> Bytes {
    encode_frame(None, Some(event_type.as_str()), None, &json.to_string())
}

#[cfg(test)]
mod one_copy {
    use super::*;

    /// Reproduces issue 12 (weak spot): history kept an event's data and its frame both (2 MiB for
    /// a 1 MiB body). Data without line breaks is now a slice of the frame.
    #[test]
    fn data_without_line_breaks_is_a_slice_of_the_frame() {
        let big = "x".repeat(1 << 20);
        let e = Event::new(EventId(7), Message::broadcast().data(big.clone()), 1);
        assert_eq!(e.data, big);
        assert!(e.stored_bytes() < big.len() + 64, "{}", e.stored_bytes());
        let lines = Event::new(EventId(8), Message::broadcast().data("a\r\nb"), 1);
        assert_eq!(lines.data, "a\r\nb", "published data is kept as sent");
        assert_eq!(lines.stored_bytes(), lines.frame.len() + 4);
        let empty = Event::new(EventId(9), Message::broadcast().data(""), 1);
        assert_eq!(
            (empty.data.as_str(), empty.stored_bytes()),
            ("", empty.frame.len())
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse_parser::{Parser, SseEvent};

    fn roundtrip(data: &str) -> Vec<SseEvent> {
        let frame = encode_frame(Some(EventId(7)), Some("t"), None, data);
        let mut p = Parser::default();
        p.feed(&frame)
    }

    #[test]
    fn frames_round_trip_through_a_whatwg_parser() {
        let cases = [
            ("", ""),
            ("hello", "hello"),
            ("a\n", "a\n"),
            ("a\nb", "a\nb"),
            ("a\r\nb", "a\nb"),
            ("a\rb", "a\nb"),
            ("a\r\rb", "a\n\nb"),
            ("\n\n", "\n\n"),
            ("\r\n", "\n"),
            ("x\n\r\ny", "x\n\ny"),
            ("ünïcødé ✓ 🚀", "ünïcødé ✓ 🚀"),
            ("data: fake\n\nid: 99", "data: fake\n\nid: 99"),
            (": not a comment", ": not a comment"),
            (" leading space", " leading space"),
        ];
        for (input, expected) in cases {
            let events = roundtrip(input);
            assert_eq!(events.len(), 1, "one event for {input:?}");
            assert_eq!(events[0].data, expected, "data of {input:?}");
            assert_eq!(events[0].id.as_deref(), Some("7"));
            assert_eq!(events[0].event_type, "t");
        }
    }

    #[test]
    fn route_lines_name_topics_and_broadcast_and_are_encoded_once() {
        let topics = Message::to_topic(Topic::new("chat/a").unwrap())
            .topic(Topic::new("news/x").unwrap())
            .user(UserId::new("bob").unwrap());
        let e = Event::new(EventId(1), topics, 0);
        assert_eq!(&e.route_lines()[..], b"topic: chat/a\ntopic: news/x\n");
        assert_eq!(
            e.route_lines().as_ptr(),
            e.route_lines().as_ptr(),
            "one encoding"
        );
        let b = Event::new(EventId(2), Message::broadcast(), 0);
        assert_eq!(&b.route_lines()[..], b"broadcast: 1\n");
        let u = Event::new(EventId(3), Message::to_user(UserId::new("ann").unwrap()), 0);
        assert!(u.route_lines().is_empty(), "users are never listed");
        assert_eq!(&user_line(&UserId::new("ann").unwrap())[..], b"user: ann\n");
    }

    #[test]
    fn frame_layout() {
        let f = encode_frame(Some(EventId(3)), None, Some(1500), "a\nb");
        assert_eq!(&f[..], b"id: 3\nretry: 1500\ndata: a\ndata: b\n\n");
        let f = encode_frame(None, Some("herald.gap"), None, "");
        assert_eq!(&f[..], b"event: herald.gap\ndata: \n\n");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever the data, type and retry, a WHATWG parser reads back exactly one event with
            /// exactly that data (line breaks as LF), id and type: nothing injected, ever. The frame
            /// is fed in two pieces split anywhere.
            #[test]
            fn any_frame_reads_back_as_exactly_one_event(
                id in any::<u64>(),
                event in proptest::option::of("\\PC{0,12}|[a\\r\\n:]{0,6}|herald\\.[a-z]{1,4}"),
                retry in proptest::option::of(any::<u32>()),
                data in "\\PC{0,40}|[a\\r\\n: ]{0,24}|(data|id|event|retry): [a-z\\r\\n]{0,8}",
                split in any::<usize>(),
            ) {
                let event = event.and_then(|e| EventType::new(&e).ok());
                let frame = encode_frame(Some(EventId(id)), event.as_ref().map(EventType::as_str), retry, &data);
                let mut parser = Parser::default();
                let at = split % (frame.len() + 1);
                let mut events = parser.feed(&frame[..at]);
                events.extend(parser.feed(&frame[at..]));
                prop_assert_eq!(events.len(), 1);
                prop_assert_eq!(&events[0].data, &data.replace("\r\n", "\n").replace('\r', "\n"));
                prop_assert_eq!(events[0].id.clone(), Some(id.to_string()));
                prop_assert_eq!(events[0].event_type.as_str(), event.as_ref().map_or("message", EventType::as_str));
            }

            /// `Last-Event-ID` parsing: never panics; what parses prints back as its digits.
            #[test]
            fn event_ids_parse_back(s in "\\PC{0,24}|[0-9]{1,22}") {
                if let Some(id) = EventId::parse(&s) {
                    let digits = s.trim_start_matches('0');
                    prop_assert_eq!(id.to_string(), if digits.is_empty() { "0" } else { digits });
                }
            }
        }
    }

    #[test]
    fn event_ids_parse_strictly() {
        assert_eq!(EventId::parse("42"), Some(EventId(42)));
        assert_eq!(EventId::parse(""), None);
        assert_eq!(EventId::parse("-1"), None);
        assert_eq!(EventId::parse("1.5"), None);
        assert_eq!(EventId::parse("+3"), None);
        assert_eq!(EventId::parse("99999999999999999999"), None);
    }
}
