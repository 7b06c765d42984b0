//! Messages (what a publisher asks for) and events (a message with its id and its SSE frame).
//! An event's frame is encoded exactly once, into shared `Bytes` that every connection writes.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

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

/// A published event: immutable, shared by history and every queue it is in.
#[derive(Debug)]
pub struct Event {
    pub id: EventId,
    pub targets: Targets,
    pub event_type: Option<EventType>,
    pub data: String,
    pub retry_ms: Option<u32>,
    pub idempotency_key: Option<String>,
    /// Published with `"private": true`.
    pub private: bool,
    /// Milliseconds since the Unix epoch when the hub accepted it.
    pub published_at_ms: u64,
    /// The SSE frame, encoded once.
    pub frame: Bytes,
}

impl Event {
    pub fn new(id: EventId, message: Message, published_at_ms: u64) -> Self {
        let frame = encode_frame(
            Some(id),
            message.event_type.as_ref().map(EventType::as_str),
            message.retry_ms,
            &message.data,
        );
        Event {
            id,
            targets: message.targets,
            event_type: message.event_type,
            data: message.data,
            retry_ms: message.retry_ms,
            idempotency_key: message.idempotency_key,
            private: message.private,
            published_at_ms,
            frame,
        }
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

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

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

/// A hub control event (`herald.gap`, `herald.close`): no `id:` line, so it never moves a client's last id.
pub(crate) fn control_frame(event_type: &EventType, json: &serde_json::Value) -> Bytes {
    encode_frame(None, Some(event_type.as_str()), None, &json.to_string())
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
