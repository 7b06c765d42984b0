//! The engine's defaults, in one place: what a `HubBuilder` (and a default `Retention`) uses when
//! the embedding app sets nothing. The `herald` server's settings table states the same values
//! for its flags, and a test there keeps the two equal.

use std::time::Duration;

/// Interval of the heartbeat comment on idle streams.
pub const HEARTBEAT: Duration = Duration::from_secs(15);
/// Reconnect delay told to clients in each stream's `retry:` line.
pub const RETRY: Duration = Duration::from_secs(3);
/// Events kept for replay.
pub const HISTORY_EVENTS: usize = 10_000;
/// Bytes of events kept for replay (a store without a byte bound, e.g. Redis, ignores it).
pub const HISTORY_BYTES: u64 = 256 * 1024 * 1024;
/// How long an idempotency key is remembered.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(300);
/// Most idempotency keys remembered at once.
pub const IDEMPOTENCY_KEYS: usize = 100_000;
/// Most bytes of idempotency keys remembered at once.
pub const IDEMPOTENCY_BYTES: usize = 32 << 20;
/// Events queued per connection before it catches up from history instead.
pub const QUEUE_EVENTS: usize = 1024;
/// Bytes queued per connection before it catches up from history instead.
pub const QUEUE_BYTES: usize = 1 << 20;
/// Topic selectors per connection.
pub const MAX_SELECTORS: usize = 64;
/// `?block=` entries kept at once.
pub const MAX_BLOCKS: usize = 10_000;
/// Spread of planned stream ends, as a fraction of the maximum stream age.
pub const STREAM_AGE_JITTER: f64 = 0.2;
