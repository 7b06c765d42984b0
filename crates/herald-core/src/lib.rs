//! herald-core: the engine of the herald push hub — names, events and their SSE frames, history
//! stores, fan-out to per-connection inboxes, the streams and the [`Hub`]. No HTTP here.
//!
//! # Map
//!
//! A message travels down this list and out through a stream; each module depends only on the
//! ones listed before it (the hub, last, on all of them).
//!
//! | module | owns |
//! |---|---|
//! | `name`, `duration` | validated names (topics, selectors, users, event types); durations |
//! | `event` | [`Message`] (what is published) and [`Event`] (stored, with its SSE frame encoded once) |
//! | `grant` | [`Grant`]: which private events a connection may see |
//! | `history/` | the [`History`] trait and its stores: memory (always), durable (redb, feature `durable`), Redis (shared, feature `redis`); the row codec |
//! | `fanout/` | the shared state: open connections (registry, users, selector index), their inboxes, token expiries, counters; fan-out |
//! | `publish/` | the committer (one history write per group), idempotency keys, the cluster follower |
//! | `stream/` | [`Start`] and [`EventStream`]: preamble, replay, live events, heartbeats, close |
//! | `hub` | [`Hub`] and [`HubBuilder`]: builds the parts, admits connections, takes publishes |
//! | `presence` | [`Presence`]: who is online and closing users, answered by the [`Hub`] for this node or by `Cluster` for all |
//! | `presence_events` | `herald.presence` events on `$presence/{user}`: this node's grace timers, and a [`presence_events::Ledger`] that decides transitions and generations |
//! | `cluster` | `Cluster` (feature `redis`): presence and closing users across nodes, through Redis |
//! | `sse_parser` | a `text/event-stream` parser (for clients and tests; the engine encodes, never parses) |
//!
//! # Example
//!
//! ```
//! use futures_util::StreamExt;
//! use herald_core::sse_parser::Parser;
//! use herald_core::{Hub, Message, Selector, SubscribeRequest, Topic};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let hub = Hub::builder().history_len(1000).build()?; // inside a Tokio runtime
//! let mut stream = hub.subscribe(SubscribeRequest {
//!     selectors: vec![Selector::new("chat/*")?],
//!     ..SubscribeRequest::default()
//! })?;
//! let published = hub
//!     .publish(Message::to_topic(Topic::new("chat/room1")?).data("hello"))
//!     .await?;
//! assert_eq!(published.delivered, 1);
//!
//! // The stream yields SSE frames: the preamble (`retry:` and a comment), then the event.
//! let mut parser = Parser::default();
//! let mut events = Vec::new();
//! while events.is_empty() {
//!     let frame = stream.next().await.expect("the stream is open");
//!     events.extend(parser.feed(&frame));
//! }
//! assert_eq!(events[0].data, "hello");
//! assert_eq!(events[0].id, Some(published.id.to_string()));
//! # Ok(())
//! # }
//! ```

pub mod clock;
#[cfg(feature = "redis")]
mod cluster;
pub mod defaults;
pub mod duration;
pub mod event;
mod fanout;
mod grant;
pub mod history;
mod hub;
pub mod name;
mod presence;
pub mod presence_events;
mod publish;
#[cfg(feature = "redis")]
pub mod redis_link;
pub mod sse_parser;
mod stream;

#[cfg(feature = "redis")]
pub use cluster::Cluster;
pub use event::{Event, EventData, EventId, Message, Targets};
pub use fanout::{CancelWatch, Stats};
pub use grant::Grant;
#[cfg(feature = "durable")]
pub use history::{CheckReport, DurableHistory, OpenError};
pub use history::{
    Chunk, DEFAULT_HISTORY_BYTES, Gap, History, HistoryError, Interest, MemoryHistory, ReadFrom,
    Retention, RetentionRule, RetentionRules, RuleError, SharedHistory, Stored,
};
#[cfg(feature = "redis")]
pub use history::{RedisHistory, RedisOptions};
pub use hub::{
    CONNECTION_SEGMENTS_MAX, Hub, HubBuilder, HubError, SELECTOR_SEGMENTS_MAX, SubscribeError,
    SubscribeRequest, UserMessages,
};
pub use name::{CANCEL, COMPLETE, EventType, NameError, Selector, Topic, UserId};
pub use presence::{ClusterError, Online, PeerGone, Presence};
pub use publish::{PublishError, Published};
#[cfg(feature = "redis")]
pub use redis_link::{LinkError, RedisLink};
pub use stream::{EventStream, ReplayObserver, Start};
