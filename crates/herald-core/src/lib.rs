//! herald-core: the engine of the herald push hub — names, events and their SSE frames, the
//! selector index, per-connection inboxes, history stores and the `Hub`. No HTTP here.

mod cluster;
pub mod duration;
pub mod event;
mod fanout;
mod grant;
pub mod history;
mod hub;
pub mod name;
mod publish;
pub mod sse_parser;
mod stream;

pub use cluster::Cluster;
pub use event::{Event, EventId, Message, Targets};
pub use fanout::Stats;
pub use grant::Grant;
pub use history::{
    Chunk, DurableHistory, Gap, History, HistoryError, MemoryHistory, OpenError, ReadFrom,
    RedisHistory, RedisOptions, Retention, SharedHistory, Stored,
};
pub use hub::{Hub, HubBuilder, HubError, SubscribeError, SubscribeRequest, UserMessages};
pub use name::{EventType, NameError, Selector, Topic, UserId};
pub use publish::{PublishError, Published};
pub use stream::{EventStream, Start};
