//! One connection's inbox: a bounded queue of shared events plus flags for heartbeat and close.
//! Publishers only push under a short lock and never wait; a full queue marks the connection lagging.

use std::num::NonZeroU64;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;

use crate::event::{Event, EventId};
use crate::grant::Grant;
use crate::name::{Selector, UserId};

/// Why a stream ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Closed by an operator: the stream's last event is `herald.close` with this reason.
    Closed(String),
    /// The hub is shutting down: the stream just ends, so clients reconnect with their last id.
    Shutdown,
    /// The stream reached its maximum age: it just ends, and clients reconnect with their last
    /// id (to whichever node the load balancer picks now).
    Aged,
}

impl Ending {
    /// Whether the stream ends without `herald.close` and without first catching up what an
    /// overflow dropped: the client resumes from its last id instead.
    pub(crate) fn is_quiet(&self) -> bool {
        matches!(self, Ending::Shutdown | Ending::Aged)
    }
}

/// Every open connection has one, so it is kept small (see "Memory per idle stream" in
/// docs/ARCHITECTURE.md): what only authorization adds is boxed, optional times are
/// `NonZeroU64`s (8 bytes, not 16), the selectors a boxed slice sized to fit, the inbox's queue
/// allocated only while events wait.
#[derive(Debug)]
pub(crate) struct Subscriber {
    pub(crate) key: usize,
    pub(crate) user: Option<UserId>,
    pub(crate) selectors: Box<[Selector]>,
    /// The grant and token expiry; `None` (the streams of an open hub): `Grant::All`, no expiry.
    auth: Option<Box<Auth>>,
    /// The newest event id this connection may still deliver, once an operator closed it: nothing
    /// published after the close reaches it on any path (live, replay, catch-up). `u64::MAX`: open.
    last_deliverable: AtomicU64,
    /// When the stream reaches its maximum age (ms after the hub's `Ages` origin, at least 1).
    ends_at_ms: Option<NonZeroU64>,
    inbox: Mutex<Inbox>,
}

/// What authorization adds to a connection.
#[derive(Debug)]
struct Auth {
    /// What this connection may see of private events.
    grant: Grant,
    /// When its token expires (ms since the epoch): the stream then ends with `herald.close`.
    expires_at_ms: Option<NonZeroU64>,
}

#[derive(Debug, Default)]
struct Inbox {
    /// A `Vec`, not a `VecDeque` (8 bytes smaller): it is only pushed to and taken whole.
    events: Vec<Arc<Event>>,
    /// Bytes of the frames in `events`.
    bytes: usize,
    /// The id of the newest event offered (0: none yet; ids start at 1); an event matching
    /// several targets is queued once.
    last_offered: u64,
    /// Events were dropped because the queue was full: the writer must catch up from history.
    lagging: bool,
    heartbeat: bool,
    /// Boxed: rare, and 8 bytes instead of 24 in every inbox.
    ending: Option<Box<Ending>>,
    waker: Option<Waker>,
}

/// How much one connection's queue may hold before it counts as lagging and catches up from
/// history: events and bytes of their frames, so stalled readers cannot pin large events.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueBound {
    pub(crate) events: usize,
    pub(crate) bytes: usize,
}

/// What the writer should do next, in priority order after draining events.
#[derive(Debug)]
pub(crate) enum Signal {
    /// Events were moved into the caller's buffer (possibly with a heartbeat due as well).
    Ready {
        heartbeat: bool,
        lagging: bool,
    },
    Ending(Ending),
}

/// Outcome of offering an event to a subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offer {
    Queued,
    /// Already offered (another target matched), or the subscriber is ending.
    Skipped,
    /// The queue just overflowed: the subscriber starts lagging and will catch up from history.
    Overflowed,
    /// Still lagging from an earlier overflow.
    Lagging,
}

impl Subscriber {
    pub(crate) fn new(
        key: usize,
        user: Option<UserId>,
        selectors: Vec<Selector>,
        grant: Grant,
        expires_at_ms: Option<u64>,
        ends_at_ms: Option<u64>,
    ) -> Self {
        // An expiry at 0 ms is one long past, as 1 ms is.
        let expires_at_ms = expires_at_ms.and_then(|at| NonZeroU64::new(at.max(1)));
        let auth = (grant != Grant::All || expires_at_ms.is_some()).then(|| {
            Box::new(Auth {
                grant,
                expires_at_ms,
            })
        });
        Subscriber {
            key,
            user,
            selectors: selectors.into_boxed_slice(),
            auth,
            last_deliverable: AtomicU64::new(u64::MAX),
            ends_at_ms: ends_at_ms.and_then(|at| NonZeroU64::new(at.max(1))),
            inbox: Mutex::new(Inbox::default()),
        }
    }

    /// When its token expires (ms since the epoch): the stream then ends with `herald.close`.
    pub(crate) fn expires_at_ms(&self) -> Option<u64> {
        self.auth.as_ref()?.expires_at_ms.map(NonZeroU64::get)
    }

    /// When the stream reaches its maximum age (ms after the hub's `Ages` origin).
    pub(crate) fn ends_at_ms(&self) -> Option<u64> {
        self.ends_at_ms.map(NonZeroU64::get)
    }

    /// Whether the token's expiry has passed at `now_ms`: the stream then gets nothing more.
    pub(crate) fn expired_at(&self, now_ms: u64) -> bool {
        self.expires_at_ms().is_some_and(|at| now_ms >= at)
    }

    /// Whether an event with this id may still be delivered (see `last_deliverable`).
    pub(crate) fn deliverable(&self, id: EventId) -> bool {
        id.0 <= self.last_deliverable.load(Ordering::Acquire)
    }

    /// Ends the stream as an operator's close: it delivers what was published up to `last` (the
    /// newest event fanned out when the close was asked for), then `herald.close`.
    pub(crate) fn close_after(&self, last: EventId, reason: String) {
        self.last_deliverable.fetch_min(last.0, Ordering::AcqRel);
        self.end(Ending::Closed(reason));
    }

    /// Whether its grant lets this connection see `event` (fan-out has already routed it here).
    pub(crate) fn may_see(&self, event: &Event) -> bool {
        match &self.auth {
            None => true,
            Some(auth) => auth.grant.sees(event, self.user.as_ref()),
        }
    }

    /// Whether this connection receives `event`: routed to it and allowed by its grant. Replay
    /// and catch-up use this; live fan-out routes through the index, then checks [`Self::may_see`].
    pub(crate) fn wants(&self, event: &Event) -> bool {
        event.is_for(&self.selectors, self.user.as_ref()) && self.may_see(event)
    }

    /// Queues `event` unless already offered. The writer's waker, if it was waiting, goes to
    /// `wakers`: the caller wakes everyone once a whole group is queued, so each writer finds
    /// the group together and writes it with one `writev`.
    pub(crate) fn offer(
        &self,
        event: &Arc<Event>,
        bound: QueueBound,
        wakers: &mut Vec<Waker>,
    ) -> Offer {
        let mut inbox = self.inbox.lock();
        if inbox.last_offered >= event.id.0 || inbox.ending.is_some() {
            return Offer::Skipped;
        }
        inbox.last_offered = event.id.0;
        let size = event.frame.len();
        // One event always fits an empty queue, however large: its bytes are bounded by the body.
        let full = inbox.events.len() >= bound.events
            || (!inbox.events.is_empty() && inbox.bytes + size > bound.bytes);
        let offer = if inbox.lagging {
            Offer::Lagging
        } else if full {
            inbox.lagging = true;
            inbox.events.clear();
            inbox.bytes = 0;
            Offer::Overflowed
        } else {
            inbox.events.push(event.clone());
            inbox.bytes += size;
            Offer::Queued
        };
        if let Some(w) = inbox.waker.take() {
            wakers.push(w);
        }
        offer
    }

    pub(crate) fn heartbeat(&self) {
        self.poke(|inbox| inbox.heartbeat = true);
    }

    pub(crate) fn end(&self, ending: Ending) {
        self.poke(|inbox| {
            if inbox.ending.is_none() {
                inbox.ending = Some(Box::new(ending));
            }
        });
    }

    fn poke(&self, f: impl FnOnce(&mut Inbox)) {
        let mut inbox = self.inbox.lock();
        f(&mut inbox);
        let waker = inbox.waker.take();
        drop(inbox);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Whether this stream is ending quietly (shutdown or age), so a replay need not finish.
    pub(crate) fn is_ending_quietly(&self) -> bool {
        self.inbox
            .lock()
            .ending
            .as_ref()
            .is_some_and(|e| e.is_quiet())
    }

    /// Makes the writer catch up from history, as after an overflow. True if it was not lagging.
    pub(crate) fn mark_lagging(&self) -> bool {
        let mut was = false;
        self.poke(|inbox| {
            was = inbox.lagging;
            inbox.lagging = true;
            inbox.events.clear();
            inbox.bytes = 0;
        });
        !was
    }

    /// The inbox queue's allocated slots (tests check that an idle stream keeps none).
    #[cfg(test)]
    pub(crate) fn queue_capacity(&self) -> usize {
        self.inbox.lock().events.capacity()
    }

    /// Whether an overflow is still waiting for the writer to take it.
    pub(crate) fn is_lagging(&self) -> bool {
        self.inbox.lock().lagging
    }

    /// Moves queued events into `into` (swapping buffers, no copy). When nothing is queued, reports
    /// a due heartbeat, a lag or the ending, or registers the waker and stays pending.
    /// A lag is reported, and cleared, only once the queue is empty: the caller then reads history.
    pub(crate) fn poll_take(
        &self,
        cx: &mut Context<'_>,
        into: &mut Vec<Arc<Event>>,
    ) -> Poll<Signal> {
        let mut inbox = self.inbox.lock();
        let heartbeat = std::mem::take(&mut inbox.heartbeat);
        if !inbox.events.is_empty() {
            std::mem::swap(&mut inbox.events, into);
            inbox.bytes = 0;
            return Poll::Ready(Signal::Ready {
                heartbeat,
                lagging: false,
            });
        }
        if heartbeat && inbox.events.capacity() > 0 {
            // Nothing came since the last heartbeat: the queue keeps no buffer while idle.
            inbox.events = Vec::new();
        }
        // A closed stream first catches up what its overflow dropped; a quiet ending does not
        // wait (clients resume from their last id, on the next hub after a shutdown).
        if let Some(ending) = &inbox.ending
            && (!inbox.lagging || ending.is_quiet())
        {
            return Poll::Ready(Signal::Ending(Ending::clone(ending)));
        }
        let lagging = std::mem::take(&mut inbox.lagging);
        if heartbeat || lagging {
            return Poll::Ready(Signal::Ready { heartbeat, lagging });
        }
        if !inbox
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            inbox.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every open connection holds one `Subscriber` (in an `Arc`: 16 bytes more), so a field that
    /// makes it larger makes every idle stream larger: 144 bytes is mimalloc's 160-byte class
    /// with the `Arc`'s counts ("Memory per idle stream" in docs/ARCHITECTURE.md).
    #[test]
    fn a_subscriber_stays_small() {
        let size = std::mem::size_of::<Subscriber>();
        println!(
            "Subscriber: {size} bytes, Inbox: {}",
            std::mem::size_of::<Inbox>()
        );
        assert!(size <= 144, "Subscriber: {size} bytes");
    }

    /// An expiry or a planned end at 0 ms is kept as 1 ms: as long past, never lost.
    #[test]
    fn times_at_zero_are_kept() {
        let sub = Subscriber::new(0, None, Vec::new(), Grant::All, Some(0), Some(0));
        assert_eq!(sub.expires_at_ms(), Some(1));
        assert_eq!(sub.ends_at_ms(), Some(1));
        assert!(sub.expired_at(1));
        let sub = Subscriber::new(0, None, Vec::new(), Grant::All, None, Some(7));
        assert_eq!((sub.expires_at_ms(), sub.ends_at_ms()), (None, Some(7)));
        assert!(!sub.expired_at(u64::MAX));
    }
}
