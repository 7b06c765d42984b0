//! The committer: the one task every publish passes through. It takes whatever publishes are
//! waiting, stores them as one group (one history write, so one fsync for many publishers), fans
//! them out in id order, answers the publishers and only then wakes the writers.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::Waker;

use tokio::sync::mpsc;

use super::follower::{Feed, commit_shared};
use super::idempotency::Keys;
use super::job::{Job, PublishError, Published};
use crate::event::{EventId, now_ms};
use crate::fanout::Fanout;
use crate::history::SharedHistory;

/// How a message of a commit group is answered.
enum Slot {
    /// Appended now, at this index of the group.
    New(usize),
    /// Repeats the key of the message appended at this index of the group.
    Repeat(usize),
    /// Repeats a key already published as this event.
    Existing(EventId),
}

/// Appends a group of publishes as one history write, then fans the events out in id order.
async fn commit(hub: &Fanout, jobs: Vec<Job>, keys: &mut Keys) {
    let now = now_ms();
    keys.expire(now);
    let mut fresh = Vec::new();
    let mut in_group: HashMap<String, usize> = HashMap::new();
    let mut plans = Vec::with_capacity(jobs.len());
    let mut replies = Vec::with_capacity(jobs.len());
    for job in jobs {
        let mut plan = Vec::with_capacity(job.messages.len());
        for message in job.messages {
            if let Some(key) = &message.idempotency_key {
                if let Some(id) = keys.get(key) {
                    plan.push(Slot::Existing(id));
                    continue;
                }
                if let Some(&i) = in_group.get(key) {
                    plan.push(Slot::Repeat(i));
                    continue;
                }
                in_group.insert(key.clone(), fresh.len());
            }
            plan.push(Slot::New(fresh.len()));
            fresh.push(message);
        }
        plans.push(plan);
        replies.push(job.reply);
    }
    let appended = if fresh.is_empty() {
        Ok(Vec::new())
    } else {
        hub.history.append(fresh).await
    };
    let mut wakers = Vec::new();
    let (events, delivered) = match appended {
        Ok(events) => {
            hub.counters
                .published
                .fetch_add(events.len() as u64, Ordering::Relaxed);
            let delivered = hub.fan_out(&events, &mut wakers);
            for event in &events {
                if let Some(key) = &event.idempotency_key {
                    keys.insert(key.clone(), event.id, event.published_at_ms);
                }
            }
            (Ok(events), delivered)
        }
        Err(e) => (Err(e), Vec::new()),
    };
    for (plan, reply) in plans.into_iter().zip(replies) {
        let answer = plan
            .iter()
            .map(|slot| match (slot, &events) {
                (Slot::Existing(id), _) => Ok(Published {
                    id: *id,
                    delivered: 0,
                    duplicate: true,
                }),
                (Slot::New(i), Ok(events)) => Ok(Published {
                    id: events[*i].id,
                    delivered: delivered[*i],
                    duplicate: false,
                }),
                (Slot::Repeat(i), Ok(events)) => Ok(Published {
                    id: events[*i].id,
                    delivered: 0,
                    duplicate: true,
                }),
                (_, Err(e)) => Err(PublishError::Store(e.clone())),
            })
            .collect::<Result<Vec<_>, _>>();
        // The publisher may have gone away; the events are published all the same.
        let _ = reply.send(answer);
    }
    // Publishers first: waking thousands of writers can wait until they have their answer.
    // Yielding lets the request tasks just woken by the replies write their answers before
    // this thread spends its time on the wakes.
    if !wakers.is_empty() {
        tokio::task::yield_now().await;
    }
    wakers.into_iter().for_each(Waker::wake);
}

/// The committer: takes whatever publishes are waiting and commits them as one group, in order.
/// It first reloads the idempotency keys still in their window from history (a shared history
/// keeps the keys itself).
pub(crate) async fn commit_loop(
    hub: Weak<Fanout>,
    shared: Option<(Arc<dyn SharedHistory>, Arc<Feed>)>,
    mut jobs: mpsc::Receiver<Job>,
    mut keys: Keys,
) {
    if let Some(inner) = hub.upgrade()
        && shared.is_none()
    {
        keys.load(&*inner.history).await;
    }
    let mut group = Vec::with_capacity(64);
    while jobs.recv_many(&mut group, 512).await > 0 {
        let Some(inner) = hub.upgrade() else { break };
        let group = std::mem::take(&mut group);
        match &shared {
            Some((shared, feed)) => commit_shared(&inner, feed, shared, group).await,
            None => commit(&inner, group, &mut keys).await,
        }
    }
}
