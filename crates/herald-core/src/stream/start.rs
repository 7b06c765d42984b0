//! Where a new connection's stream starts: live, after a client's last event id, a time ago, or
//! from the oldest retained event.

use std::time::Duration;

use crate::event::{EventId, now_ms};
use crate::history::ReadFrom;

/// Where a new connection's stream starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Start {
    /// Only events published from now on.
    #[default]
    Live,
    /// After this event id, as the client sent it (`Last-Event-ID`); an id this hub never wrote
    /// is reported as a gap.
    After(String),
    /// The events published within this long before now.
    Since(Duration),
    /// Everything retained.
    All,
}

/// A start's first read of history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FirstRead {
    pub(crate) from: ReadFrom,
    /// The client's id is not one this hub writes: whatever the read finds, it is a gap.
    pub(crate) unknown_id: bool,
}

impl Start {
    /// Where reading history begins for this start (`None`: live, nothing to read). The one
    /// mapping from a start to a read, for streams and for `GET /users/{id}/messages` alike.
    pub(crate) fn first_read(&self) -> Option<FirstRead> {
        let read = |from| FirstRead {
            from,
            unknown_id: false,
        };
        match self {
            Start::Live => None,
            Start::After(raw) => Some(match EventId::parse(raw) {
                Some(id) => read(ReadFrom::After(id)),
                None => FirstRead {
                    from: ReadFrom::Oldest,
                    unknown_id: true,
                },
            }),
            Start::Since(d) => {
                let at = now_ms().saturating_sub(d.as_millis().min(u128::from(u64::MAX)) as u64);
                Some(read(ReadFrom::Since(at)))
            }
            Start::All => Some(read(ReadFrom::Oldest)),
        }
    }
}
