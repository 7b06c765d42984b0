//! Cluster mode: publishes go to a shared history, and every hub fans out what it reads back from
//! that log, in log order and its own events included. A publisher is answered once its events
//! have been fanned out here, so `delivered` still counts this node's connections. `published`
//! counts on the node that accepted the publish, `delivered` on the node that queued the event, so
//! a sum over nodes counts each once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

use super::job::{Job, PublishError, Published};
use crate::event::{EventId, Message};
use crate::fanout::Fanout;
use crate::history::{HistoryError, SharedHistory, Stored};

/// Per-event local delivery counts kept for publishers still waiting for their answer.
const RECENT: usize = 65_536;
/// How long a publisher waits for the follower before it is answered with `delivered: 0`.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub(crate) struct Feed {
    /// The newest id fanned out on this hub.
    watermark: watch::Sender<u64>,
    delivered: Mutex<VecDeque<(EventId, usize)>>,
    /// The shared history answered the last time it was asked.
    ready: AtomicBool,
}

impl Feed {
    pub(crate) fn new() -> Self {
        Feed {
            watermark: watch::Sender::new(0),
            delivered: Mutex::new(VecDeque::new()),
            ready: AtomicBool::new(true),
        }
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    fn set_ready(&self, ready: bool) {
        if self.ready.swap(ready, Ordering::Relaxed) != ready {
            if ready {
                tracing::info!("shared history reachable again");
            } else {
                tracing::warn!(
                    "shared history unreachable: publishing answers 503 until it returns"
                );
            }
        }
    }

    fn record(&self, ids: impl Iterator<Item = EventId>, counts: &[usize]) {
        let mut recent = self.delivered.lock();
        for (id, n) in ids.zip(counts) {
            recent.push_back((id, *n));
        }
        while recent.len() > RECENT {
            recent.pop_front();
        }
    }

    fn delivered(&self, id: EventId) -> usize {
        let recent = self.delivered.lock();
        match recent.binary_search_by_key(&id, |(i, _)| *i) {
            Ok(i) => recent[i].1,
            Err(_) => 0,
        }
    }
}

/// Appends a group of publishes to the shared history, then answers each publisher once the
/// follower has fanned its events out (without holding up the next group).
pub(crate) async fn commit_shared(
    hub: &Fanout,
    feed: &Arc<Feed>,
    shared: &Arc<dyn SharedHistory>,
    jobs: Vec<Job>,
) {
    let mut sizes = Vec::with_capacity(jobs.len());
    let mut replies = Vec::with_capacity(jobs.len());
    let mut messages: Vec<Message> = Vec::new();
    for job in jobs {
        sizes.push(job.messages.len());
        messages.extend(job.messages);
        replies.push(job.reply);
    }
    let stored = match shared.append_claiming(messages, &sizes).await {
        Ok(stored) => stored,
        Err(e) => {
            feed.set_ready(false);
            for reply in replies {
                let _ = reply.send(Err(PublishError::Store(e.clone())));
            }
            return;
        }
    };
    feed.set_ready(true);
    // Counted here, on the node that accepted them; every node fans them out (and counts that).
    let accepted = stored
        .iter()
        .filter(|s| s.event.as_ref().is_some_and(|e| !e.is_from_hub()))
        .count();
    hub.counters
        .published
        .fetch_add(accepted as u64, std::sync::atomic::Ordering::Relaxed);
    let newest = stored
        .iter()
        .filter(|s| s.event.is_some())
        .map(|s| s.id)
        .max();
    let feed = feed.clone();
    tokio::spawn(async move {
        if let Some(newest) = newest {
            let mut seen = feed.watermark.subscribe();
            let _ = tokio::time::timeout(ANSWER_WAIT, seen.wait_for(|w| *w >= newest.0)).await;
        }
        let mut stored = stored.into_iter();
        for (size, reply) in sizes.into_iter().zip(replies) {
            let job: Vec<Stored> = stored.by_ref().take(size).collect();
            // A job that repeated a claimed key with another payload appended nothing.
            let conflict = job
                .iter()
                .position(|s| s.refused && s.id.0 != 0)
                .or_else(|| job.iter().position(|s| s.refused));
            let answer = match conflict {
                Some(index) => Err(PublishError::IdempotencyConflict {
                    index,
                    id: job[index].id,
                }),
                None => Ok(job
                    .into_iter()
                    .map(|s| Published {
                        id: s.id,
                        delivered: if s.event.is_some() {
                            feed.delivered(s.id)
                        } else {
                            0
                        },
                        duplicate: s.event.is_none(),
                    })
                    .collect()),
            };
            let _ = reply.send(answer);
        }
    });
}

/// Follows the shared history from its newest event and fans out everything that arrives, in
/// order. When the history is unreachable it retries from where it stopped, so nothing is
/// skipped; if events were trimmed before this hub read them, every connection catches up from
/// history itself (and learns of the gap).
pub(crate) async fn follow(hub: Weak<Fanout>, feed: Arc<Feed>, shared: Arc<dyn SharedHistory>) {
    let mut cursor = loop {
        match shared.newest().await {
            Ok(newest) => break newest,
            Err(e) => {
                if hub.strong_count() == 0 {
                    return;
                }
                tracing::debug!(error = %e, "waiting for the shared history");
                feed.set_ready(false);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    if let (Some(c), Some(inner)) = (cursor, hub.upgrade()) {
        inner.start_at(c);
        feed.watermark.send_replace(c.0);
    }
    loop {
        let result = shared.follow(cursor, 512).await;
        let Some(inner) = hub.upgrade() else { return };
        match result {
            Ok(chunk) => {
                feed.set_ready(true);
                if chunk.gap.is_some() {
                    tracing::warn!(after = ?cursor, "events were trimmed before this node read them");
                    inner.lag_everyone();
                }
                if let Some(&skipped) = chunk.skipped.last() {
                    // Unreadable entries (logged by the store): anyone's events may be in them, so
                    // every connection catches up from history, which reports them as a gap; the
                    // follower goes on after them.
                    inner
                        .counters
                        .unreadable
                        .fetch_add(chunk.skipped.len() as u64, Ordering::Relaxed);
                    inner.lag_everyone();
                    cursor = Some(skipped);
                    feed.watermark.send_replace(skipped.0);
                }
                let Some(last) = chunk.events.last().map(|e| e.id) else {
                    continue;
                };
                let mut wakers = Vec::new();
                let counts = inner.fan_out(&chunk.events, &mut wakers);
                wakers.into_iter().for_each(std::task::Waker::wake);
                feed.record(chunk.events.iter().map(|e| e.id), &counts);
                cursor = Some(last);
                feed.watermark.send_replace(last.0);
            }
            Err(HistoryError::Rewound {
                marker,
                after,
                through,
            }) => {
                // A failover lost events: this node or another one found it and wrote a rewind
                // marker in their place. Any stream here may have wanted them, and nobody can tell
                // their topics any more: every stream catches up from history, which reports the
                // marker (or a position past the new end) as a gap. Following goes on after it.
                tracing::warn!(
                    fanned_out = ?cursor,
                    lost_after = ?after,
                    lost_through = %through,
                    "events were lost in a Redis failover (unreplicated): every stream gets herald.gap"
                );
                feed.set_ready(true);
                inner.counters.rewinds.fetch_add(1, Ordering::Relaxed);
                inner.lag_everyone();
                cursor = Some(marker);
                inner.start_at(marker);
                feed.watermark.send_replace(marker.0);
            }
            Err(e) => {
                tracing::debug!(error = %e, "following the shared history failed");
                feed.set_ready(false);
                drop(inner);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}
