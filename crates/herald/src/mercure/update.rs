//! A Mercure update as herald carries it: one herald event on the herald topic [`HERALD_TOPIC`]
//! (a subscription event: on [`SUBSCRIPTIONS_TOPIC`]) whose data is a JSON envelope (topics, publisher id, type, retry, private, data). herald's
//! history, cluster and limits thus work unchanged; this file turns an envelope back into the
//! SSE frame a Mercure subscriber expects, with the publisher's id as `id:`. An update published
//! without an id gets `#<herald id>`: a fragment, as the spec allows, that resolves without a
//! search.

use bytes::{BufMut, Bytes, BytesMut};
use herald_core::EventId;
use herald_core::event::encode_frame;
use serde::{Deserialize, Serialize};

/// The herald topic every Mercure update a publisher sends travels on (published private, so
/// herald's own anonymous subscribers never see it).
pub const HERALD_TOPIC: &str = ".well-known/mercure";

/// The herald topic of the subscription events (`--mercure-subscriptions`): reserved (`$`), so
/// only the hub publishes there, and apart from [`HERALD_TOPIC`], so only the Mercure subscribers
/// that may receive them hold it (see `subscriptions::may_receive`).
pub const SUBSCRIPTIONS_TOPIC: &str = "$mercure/subscriptions";

/// The JSON envelope stored as a herald event's data.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Envelope {
    /// The publisher's id; `None`: the hub's, `#<herald id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub topics: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r#type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub private: bool,
    pub data: String,
}

/// The id an update of this herald event has for Mercure clients.
pub fn mercure_id(envelope_id: Option<&str>, herald: EventId) -> String {
    match envelope_id {
        Some(id) => id.to_string(),
        None => format!("#{herald}"),
    }
}

/// A hub-generated id (`#<herald id>`) back to the herald id it names.
pub fn herald_id(mercure_id: &str) -> Option<EventId> {
    mercure_id.strip_prefix('#').and_then(EventId::parse)
}

/// An update ready for Mercure subscribers: what they are filtered on and the frame they get.
#[derive(Debug)]
pub struct Update {
    pub herald: EventId,
    pub id: String,
    pub topics: Vec<String>,
    pub private: bool,
    pub frame: Bytes,
}

impl Update {
    /// Reads a herald event's `id` and `data` back into an update; `None` if the data is not an
    /// envelope (something else published on the herald topic).
    pub fn decode(herald: EventId, data: &str) -> Option<Update> {
        let e: Envelope = serde_json::from_str(data).ok()?;
        let id = mercure_id(e.id.as_deref(), herald);
        let body = encode_frame(None, e.r#type.as_deref(), e.retry, &e.data);
        let mut frame = BytesMut::with_capacity(body.len() + id.len() + 5);
        frame.put_slice(b"id: ");
        frame.put_slice(id.as_bytes());
        frame.put_u8(b'\n');
        frame.put_slice(&body);
        Some(Update {
            herald,
            id,
            topics: e.topics,
            private: e.private,
            frame: frame.freeze(),
        })
    }
}

/// Splits one herald event frame (`id: N\n` … `data: …\n\n`, one data line: the envelope is one
/// line of JSON) into its id and data.
pub fn split_frame(frame: &[u8]) -> Option<(EventId, &str)> {
    let text = std::str::from_utf8(frame).ok()?;
    let rest = text.strip_prefix("id: ")?;
    let (id, rest) = rest.split_once('\n')?;
    let data_line = rest.lines().find_map(|l| l.strip_prefix("data: "))?;
    Some((EventId::parse(id)?, data_line))
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::sse_parser::Parser;

    #[test]
    fn an_envelope_becomes_the_publishers_frame() {
        let e = Envelope {
            id: Some("urn:x:1".into()),
            topics: vec!["https://e/a".into()],
            r#type: Some("t".into()),
            retry: Some(5),
            private: false,
            data: "a\n\n  b".into(),
        };
        let json = serde_json::to_string(&e).unwrap();
        let herald_frame = encode_frame(Some(EventId(9)), None, None, &json);
        let (id, data) = split_frame(&herald_frame).unwrap();
        assert_eq!(id, EventId(9));
        let u = Update::decode(id, data).unwrap();
        let events = Parser::default().feed(&u.frame);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].id.as_deref(), Some("urn:x:1"));
        assert_eq!(events[0].data, "a\n\n  b");
        assert_eq!(events[0].event_type, "t");
        let hub = Update::decode(EventId(3), r#"{"topics":["x"],"data":""}"#).unwrap();
        assert_eq!(hub.id, "#3");
        assert_eq!(herald_id("#3"), Some(EventId(3)));
        assert_eq!(herald_id("3"), None);
        assert!(Update::decode(EventId(1), "not json").is_none());
    }
}
