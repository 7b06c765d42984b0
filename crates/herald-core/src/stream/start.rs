//! Where a new connection's stream starts: live, after a client's last event id, a time ago, or
//! from the oldest retained event.

use std::time::Duration;

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
