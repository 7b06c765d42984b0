//! A publish on its way to the committer, and what its publisher is answered.

use tokio::sync::oneshot;

use crate::event::{EventId, Message};
use crate::history::HistoryError;

/// Why a publish was refused. Nothing of a refused publish is stored or delivered.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("message {index} has no target (give topics, users or broadcast)")]
    NoTarget { index: usize },
    #[error("an empty batch publishes nothing")]
    EmptyBatch,
    /// Message `index` names a topic starting with `$`: those belong to the hub.
    #[error("message {index} is for topic '{topic}': topics starting with '$' belong to the hub")]
    ReservedTopic { index: usize, topic: String },
    /// Message `index` repeats an idempotency key already used (as event `id`; 0 when it was
    /// claimed in the same group and has no id yet) with a different payload.
    #[error("message {index} repeats an idempotency key with a different payload")]
    IdempotencyConflict { index: usize, id: EventId },
    #[error(transparent)]
    Store(#[from] HistoryError),
}

/// The result of publishing one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub id: EventId,
    /// Connections on this node the event was queued for (or will catch up with it from history).
    pub delivered: usize,
    /// The message repeated an idempotency key: `id` is the original event's; nothing was sent.
    pub duplicate: bool,
}

pub(crate) struct Job {
    pub(crate) messages: Vec<Message>,
    pub(crate) reply: oneshot::Sender<Result<Vec<Published>, PublishError>>,
}
