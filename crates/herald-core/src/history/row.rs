//! The row codec of stored events, shared by the durable store (a redb value) and the Redis store
//! (a stream entry's field): one event as bytes and back. Decoding validates every name again, so
//! a damaged row is a `Corrupt` error, never a panic.

use super::HistoryError;
use crate::event::{Event, EventId, Message, Targets};
use crate::name::{EventType, Topic, UserId};

// Row layout: published_at u64 | retry u32 (u32::MAX: none) | flags u8 (1: broadcast, 2: private) | event type str16 |
// idempotency key str16 | topics u16 count of str16 | users u16 count of str16 | data (the rest).
// str16 is a u16 length and UTF-8 bytes; integers are little-endian.

fn put_str(row: &mut Vec<u8>, s: &str) {
    row.extend_from_slice(&(s.len() as u16).to_le_bytes());
    row.extend_from_slice(s.as_bytes());
}

pub(crate) fn encode_row(row: &mut Vec<u8>, published_at: u64, m: &Message) {
    row.extend_from_slice(&published_at.to_le_bytes());
    row.extend_from_slice(&m.retry_ms.unwrap_or(u32::MAX).to_le_bytes());
    row.push(u8::from(m.targets.broadcast) | (u8::from(m.private) << 1));
    put_str(row, m.event_type.as_ref().map_or("", EventType::as_str));
    put_str(row, m.idempotency_key.as_deref().unwrap_or(""));
    row.extend_from_slice(&(m.targets.topics.len() as u16).to_le_bytes());
    for t in &m.targets.topics {
        put_str(row, t.as_str());
    }
    row.extend_from_slice(&(m.targets.users.len() as u16).to_le_bytes());
    for u in &m.targets.users {
        put_str(row, u.as_str());
    }
    row.extend_from_slice(m.data.as_bytes());
}

pub(crate) fn published_at(row: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(row.get(..8)?.try_into().ok()?))
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.rest.len() < n {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn str(&mut self) -> Option<&'a str> {
        let n = self.u16()? as usize;
        std::str::from_utf8(self.take(n)?).ok()
    }
}

pub(crate) fn decode_row(id: u64, row: &[u8]) -> Result<Event, HistoryError> {
    let bad = |reason: &str| HistoryError::Corrupt {
        id,
        reason: reason.to_string(),
    };
    let mut r = Reader { rest: row };
    let published = u64::from_le_bytes(
        r.take(8)
            .ok_or_else(|| bad("short"))?
            .try_into()
            .unwrap_or_default(),
    );
    let retry = u32::from_le_bytes(
        r.take(4)
            .ok_or_else(|| bad("short"))?
            .try_into()
            .unwrap_or_default(),
    );
    let flags = r.take(1).ok_or_else(|| bad("short"))?[0];
    if flags > 3 {
        return Err(bad("flags"));
    }
    let broadcast = flags & 1 == 1;
    let event_type = r.str().ok_or_else(|| bad("event type"))?;
    let key = r.str().ok_or_else(|| bad("key"))?;
    let mut targets = Targets {
        broadcast,
        ..Targets::default()
    };
    for _ in 0..r.u16().ok_or_else(|| bad("topics"))? {
        let t = r
            .str()
            .and_then(|s| Topic::new(s).ok())
            .ok_or_else(|| bad("topic"))?;
        targets.topics.push(t);
    }
    for _ in 0..r.u16().ok_or_else(|| bad("users"))? {
        let u = r
            .str()
            .and_then(|s| UserId::new(s).ok())
            .ok_or_else(|| bad("user"))?;
        targets.users.push(u);
    }
    let data = std::str::from_utf8(r.rest).map_err(|_| bad("data is not UTF-8"))?;
    let mut message = Message::to_targets(targets).data(data);
    if !event_type.is_empty() {
        message.event_type = Some(EventType::new(event_type).map_err(|_| bad("event type"))?);
    }
    message.retry_ms = (retry != u32::MAX).then_some(retry);
    message.idempotency_key = (!key.is_empty()).then(|| key.to_string());
    message.private = flags & 2 == 2;
    Ok(Event::new(EventId(id), message, published))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip() {
        let mut m = Message::to_topic(Topic::new("a/b").unwrap())
            .user(UserId::new("ü").unwrap())
            .data("x\ny")
            .event(EventType::new("t").unwrap())
            .idempotency_key("k");
        m.targets.broadcast = true;
        let mut row = Vec::new();
        encode_row(&mut row, 1234, &m);
        let e = decode_row(9, &row).unwrap();
        assert_eq!(e.targets, m.targets);
        assert_eq!(
            (e.data.as_str(), e.published_at_ms, e.retry_ms),
            ("x\ny", 1234, None)
        );
        assert_eq!(e.idempotency_key.as_deref(), Some("k"));
        for cut in 0..row.len() - 3 {
            // Cutting into the fixed part or the names never panics; it errors or reads less data.
            let _ = decode_row(9, &row[..cut]);
        }
        assert!(decode_row(9, &row[..5]).is_err());
    }
}
