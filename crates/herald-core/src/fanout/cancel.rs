//! `Cancels`: the streaming publishes waiting for a `herald.cancel` on one of their topics.
//! Fan-out fires them for every `herald.cancel` it queues, whether this node's committer or the
//! cluster follower handed it the event, so a cancel reaches the producer on whichever node it
//! runs. Fan-out looks at the registry only while some watch exists (one atomic load otherwise).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::event::{Event, EventId};
use crate::name::{CANCEL, Topic};

/// One watch's signal: 0 until a cancel arrives, then that cancel's id.
type Signal = Arc<watch::Sender<u64>>;

#[derive(Default)]
pub(crate) struct Cancels {
    /// Watches registered: fan-out skips the lock while there are none.
    watching: AtomicUsize,
    by_topic: Mutex<HashMap<Topic, Vec<Signal>>>,
}

impl Cancels {
    fn watch(&self, topics: &[Topic]) -> (Signal, watch::Receiver<u64>) {
        let (tx, rx) = watch::channel(0);
        let tx = Arc::new(tx);
        let mut map = self.by_topic.lock();
        for topic in topics {
            map.entry(topic.clone()).or_default().push(tx.clone());
        }
        self.watching.fetch_add(1, Ordering::Release);
        (tx, rx)
    }

    fn unwatch(&self, topics: &[Topic], signal: &Signal) {
        let mut map = self.by_topic.lock();
        for topic in topics {
            if let Some(list) = map.get_mut(topic) {
                list.retain(|s| !Arc::ptr_eq(s, signal));
                if list.is_empty() {
                    map.remove(topic);
                }
            }
        }
        self.watching.fetch_sub(1, Ordering::Release);
    }

    /// Fires the watches of `event`'s topics when it is a `herald.cancel`.
    pub(crate) fn offer(&self, event: &Event) {
        if self.watching.load(Ordering::Acquire) == 0
            || event
                .event_type
                .as_ref()
                .is_none_or(|t| t.as_str() != CANCEL)
        {
            return;
        }
        let map = self.by_topic.lock();
        for topic in &event.targets.topics {
            for signal in map.get(topic).into_iter().flatten() {
                signal.send_if_modified(|v| {
                    let first = *v == 0;
                    if first {
                        *v = event.id.0;
                    }
                    first
                });
            }
        }
    }
}

/// A streaming publish's watch for `herald.cancel` on its topics, from [`crate::Hub::watch_cancel`].
/// Dropping it stops watching.
pub struct CancelWatch {
    fanout: Arc<super::Fanout>,
    topics: Vec<Topic>,
    signal: Signal,
    rx: watch::Receiver<u64>,
}

impl CancelWatch {
    pub(crate) fn new(fanout: Arc<super::Fanout>, topics: Vec<Topic>) -> Self {
        let (signal, rx) = fanout.cancels.watch(&topics);
        CancelWatch {
            fanout,
            topics,
            signal,
            rx,
        }
    }

    /// Resolves with the id of the first `herald.cancel` fanned out on a watched topic after the
    /// watch began; never resolves if none comes.
    pub async fn cancelled(&mut self) -> EventId {
        let fired = self.rx.wait_for(|v| *v != 0).await.map(|id| *id);
        match fired {
            Ok(id) => EventId(id),
            // The sender lives in `self`, so it cannot be dropped while this waits.
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for CancelWatch {
    fn drop(&mut self) {
        self.fanout.cancels.unwatch(&self.topics, &self.signal);
    }
}

impl std::fmt::Debug for CancelWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelWatch")
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}
