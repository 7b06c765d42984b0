//! The committer: the one task every publish passes through. It takes whatever publishes are
//! waiting, stores them as one group (one history write, so one fsync for many publishers), fans
//! them out in id order, answers the publishers and only then wakes the writers.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::Waker;

use tokio::sync::mpsc;

use super::follower::{Feed, commit_shared};
use super::idempotency::{Claim, Keys};
use super::job::{Job, PublishError, Published};
use crate::event::{EventId, Message, now_ms};
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

/// Why a job is refused before anything of it is appended.
fn conflict(index: usize, id: EventId) -> PublishError {
    PublishError::IdempotencyConflict { index, id }
}

/// Appends a group of publishes as one history write, then fans the events out in id order.
/// A job that repeats an idempotency key with another payload is refused whole (409).
async fn commit(hub: &Fanout, jobs: Vec<Job>, keys: &mut Keys) {
    let now = now_ms();
    keys.expire(now);
    let mut fresh: Vec<Message> = Vec::new();
    let mut in_group: HashMap<String, (usize, u64)> = HashMap::new();
    let mut plans = Vec::with_capacity(jobs.len());
    let mut replies = Vec::with_capacity(jobs.len());
    'jobs: for job in jobs {
        let base = fresh.len();
        let mut plan = Vec::with_capacity(job.messages.len());
        let mut added: Vec<Message> = Vec::new();
        let mut claims: Vec<(String, usize, u64)> = Vec::new();
        for (index, message) in job.messages.into_iter().enumerate() {
            if let Some(key) = &message.idempotency_key {
                let print = message.fingerprint();
                if let Some(claim) = keys.get(key) {
                    if claim.fingerprint != print {
                        let _ = job.reply.send(Err(conflict(index, claim.id)));
                        continue 'jobs;
                    }
                    plan.push(Slot::Existing(claim.id));
                    continue;
                }
                let earlier = in_group.get(key).copied().or_else(|| {
                    claims
                        .iter()
                        .find(|(k, _, _)| k == key)
                        .map(|(_, i, p)| (*i, *p))
                });
                if let Some((i, p)) = earlier {
                    if p != print {
                        // The other message is not appended yet: no id to name.
                        let _ = job.reply.send(Err(conflict(index, EventId(0))));
                        continue 'jobs;
                    }
                    plan.push(Slot::Repeat(i));
                    continue;
                }
                claims.push((key.clone(), base + added.len(), print));
            }
            plan.push(Slot::New(base + added.len()));
            added.push(message);
        }
        for (key, i, print) in claims {
            in_group.insert(key, (i, print));
        }
        fresh.extend(added);
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
            hub.counters.published.fetch_add(
                events.iter().filter(|e| !e.is_from_hub()).count() as u64,
                Ordering::Relaxed,
            );
            let delivered = hub.fan_out(&events, &mut wakers);
            for event in &events {
                if let Some(key) = &event.idempotency_key {
                    let claim = Claim {
                        id: event.id,
                        fingerprint: event.fingerprint(),
                    };
                    keys.insert(key.clone(), claim, event.published_at_ms);
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
