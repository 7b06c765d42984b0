//! The row codec of stored events, shared by the durable store (a redb value) and the Redis store
//! (a stream entry's field): one event as bytes and back. Encoding refuses what the layout cannot
//! hold (so a store never accepts what it cannot read back); decoding validates every name again,
//! so a damaged row is a `Corrupt` error, never a panic. A durable row adds a CRC-32.

use super::HistoryError;
use crate::event::{Event, EventId, Message, Targets};
use crate::name::{EventType, Topic, UserId};

#[cfg(feature = "durable")]
/// Flags bit of a row `herald check --repair` put in place of a damaged one: "an event was lost
/// here". Readers skip it with a `herald.gap`, as they skip a damaged row.
pub(crate) const LOST: u8 = 4;

// Row layout (format 2, also the Redis entry's `m`): published_at u64 | retry u32 (u32::MAX:
// none) | flags u8 (1: broadcast, 2: private, 4: lost) | event type str16 | idempotency key str16
// | topics u16 count of str16 | users u16 count of str16 | data (the rest). str16 is a u16 length
// and UTF-8 bytes; integers are little-endian. A stored row (format 3) is a CRC-32 (u32) of the
// format-2 row, then that row.

/// A message the row layout cannot hold; refused before anything is written, so the store never
/// accepts what it cannot read back.
fn too_large(what: &str, n: usize) -> HistoryError {
    HistoryError::Unstorable(format!(
        "{n} {what} in one message; a stored event holds at most {}",
        u16::MAX
    ))
}

fn put_str(row: &mut Vec<u8>, what: &str, s: &str) -> Result<(), HistoryError> {
    let n = u16::try_from(s.len()).map_err(|_| too_large(what, s.len()))?;
    row.extend_from_slice(&n.to_le_bytes());
    row.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_count(row: &mut Vec<u8>, what: &str, n: usize) -> Result<(), HistoryError> {
    let n16 = u16::try_from(n).map_err(|_| too_large(what, n))?;
    row.extend_from_slice(&n16.to_le_bytes());
    Ok(())
}

/// Encodes `m` in the format-2 layout, or refuses it (nothing appended to `row` is used then).
pub(crate) fn encode_row(
    row: &mut Vec<u8>,
    published_at: u64,
    m: &Message,
) -> Result<(), HistoryError> {
    row.extend_from_slice(&published_at.to_le_bytes());
    row.extend_from_slice(&m.retry_ms.unwrap_or(u32::MAX).to_le_bytes());
    row.push(u8::from(m.targets.broadcast) | (u8::from(m.private) << 1));
    put_str(
        row,
        "bytes of event type",
        m.event_type.as_ref().map_or("", EventType::as_str),
    )?;
    put_str(
        row,
        "bytes of idempotency key",
        m.idempotency_key.as_deref().unwrap_or(""),
    )?;
    put_count(row, "topics", m.targets.topics.len())?;
    for t in &m.targets.topics {
        put_str(row, "bytes of topic", t.as_str())?;
    }
    put_count(row, "users", m.targets.users.len())?;
    for u in &m.targets.users {
        put_str(row, "bytes of user id", u.as_str())?;
    }
    row.extend_from_slice(m.data.as_bytes());
    Ok(())
}

#[cfg(feature = "durable")]
/// Encodes `m` as a stored row: its checksum, then the format-2 row.
pub(crate) fn encode_checked_row(
    row: &mut Vec<u8>,
    published_at: u64,
    m: &Message,
) -> Result<(), HistoryError> {
    row.extend_from_slice(&[0; 4]);
    encode_row(row, published_at, m)?;
    let sum = crc32fast::hash(&row[4..]);
    row[..4].copy_from_slice(&sum.to_le_bytes());
    Ok(())
}

#[cfg(feature = "durable")]
/// The format-2 row inside a stored row, if its checksum holds.
pub(crate) fn checked(row: &[u8]) -> Option<&[u8]> {
    let (sum, body) = row.split_at_checked(4)?;
    (u32::from_le_bytes(sum.try_into().ok()?) == crc32fast::hash(body)).then_some(body)
}

#[cfg(feature = "durable")]
/// A stored row marking an event lost: readers skip it with a gap. Keeps the damaged row's
/// publish time when it is plausible, so age-based retention still trims it in turn.
pub(crate) fn lost_row(published_at: u64) -> Vec<u8> {
    let mut body = Vec::with_capacity(32);
    body.extend_from_slice(&published_at.to_le_bytes());
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    body.push(LOST);
    body.extend_from_slice(&[0; 8]); // empty type, key; no topics, no users
    let mut row = crc32fast::hash(&body).to_le_bytes().to_vec();
    row.extend_from_slice(&body);
    row
}

#[cfg(feature = "durable")]
/// Decodes a stored row: checks its checksum, then its layout.
pub(crate) fn decode_row(id: u64, row: &[u8]) -> Result<Event, HistoryError> {
    let body = checked(row).ok_or_else(|| HistoryError::Corrupt {
        id,
        reason: "checksum mismatch".into(),
    })?;
    if body.get(12).is_some_and(|flags| flags & LOST != 0) {
        return Err(HistoryError::Lost { id });
    }
    decode_body(id, body)
}

/// Decodes a format-2 row (a stored row's body, or a Redis entry's `m`).
pub(crate) fn decode_body(id: u64, row: &[u8]) -> Result<Event, HistoryError> {
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
        message.event_type = Some(EventType::stored(event_type).map_err(|_| bad("event type"))?);
    }
    message.retry_ms = (retry != u32::MAX).then_some(retry);
    message.idempotency_key = (!key.is_empty()).then(|| key.to_string());
    message.private = flags & 2 == 2;
    Ok(Event::new(EventId(id), message, published))
}

#[cfg(feature = "durable")]
/// The publish time of a stored (checksummed) row.
pub(crate) fn published_at(row: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(row.get(4..12)?.try_into().ok()?))
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
