//! herald-core: the engine of the herald push hub — names, events and their SSE frames, the
//! selector index, per-connection inboxes, history stores and the `Hub`. No HTTP here.

mod cluster;
mod commit;
pub mod duration;
pub mod event;
mod feed;
mod grant;
pub mod history;
mod hub;
mod idempotency;
mod index;
pub mod name;
pub mod sse;
mod stream;
mod subscriber;

pub use cluster::Cluster;
pub use event::{Event, EventId, Message, Targets};
pub use grant::Grant;
pub use history::{
    Chunk, DurableHistory, History, HistoryError, MemoryHistory, OpenError, ReadFrom, RedisHistory,
    RedisOptions, Retention, SharedHistory, Stored,
};
pub use hub::{
    Hub, HubBuilder, HubError, PublishError, Published, ReplayObserver, Start, Stats,
    SubscribeError, SubscribeRequest, UserMessages,
};
pub use name::{EventType, NameError, Selector, Topic, UserId};
pub use stream::EventStream;
