//! One connection's outgoing SSE frames: preamble, gap notice, replay from history, then live events,
//! heartbeats and the closing event. Frames are the events' shared `Bytes`; nothing is re-encoded.

mod start;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;

use crate::event::{Event, EventId, control_frame, now_ms, user_line};
use crate::fanout::{Ending, Fanout, Signal, Subscriber, TOKEN_EXPIRED};
use crate::history::{Chunk, Gap, HistoryError, Interest, ReadFrom};
use crate::name::EventType;
pub(crate) use start::FirstRead;
pub use start::Start;

/// Events read from history per step of a replay.
const REPLAY_CHUNK: usize = 256;
static HEARTBEAT: &[u8] = b":\n\n";

type ReadFuture = Pin<Box<dyn Future<Output = Result<Chunk, HistoryError>> + Send>>;

/// Called with the number of events a connection's replay from history sent, once that replay is
/// over (for metrics; never for a live start or a catch-up after a queue overflow).
#[derive(Clone)]
pub struct ReplayObserver(pub Arc<dyn Fn(u64) + Send + Sync>);

impl std::fmt::Debug for ReplayObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplayObserver")
    }
}

/// The stream of SSE frames for one connection. Dropping it unregisters the connection.
pub struct EventStream {
    hub: Arc<Fanout>,
    sub: Arc<Subscriber>,
    /// Frames ready for the writer. Its storage is given back whenever the stream waits, so an
    /// idle stream holds none.
    out: VecDeque<Bytes>,
    /// Events taken from the inbox (swapped with its queue, so the two keep one buffer each
    /// while events flow; both are given back at a heartbeat that finds nothing to send).
    live: Vec<Arc<Event>>,
    /// The newest event id this stream has written or passed over (0: none; ids start at 1);
    /// live events at or below it are duplicates of what replay already covered.
    cursor: u64,
    /// Only while replaying or catching up. Boxed, so a live stream does not carry its size.
    replay: Option<Box<Replay>>,
    /// Set for `route=1`: each event is preceded by its routing lines (see [`Route`]). Boxed, so
    /// streams without it stay one pointer bigger, not a `Bytes` bigger.
    route: Option<Box<Route>>,
    done: bool,
}

/// What a routing stream writes before each event, so that a client sharing it between several
/// consumers (herald.js' `share`) knows which of them it is for. The event's frame stays shared.
#[derive(Debug)]
struct Route {
    /// `user: <id>\n` of this connection's user, written before events sent to that user.
    user_line: Option<Bytes>,
}

impl Route {
    fn push(route: Option<&Route>, sub: &Subscriber, event: &Event, out: &mut VecDeque<Bytes>) {
        if let Some(route) = route {
            let lines = event.route_lines();
            if !lines.is_empty() {
                out.push_back(lines.clone());
            }
            if let (Some(line), Some(user)) = (&route.user_line, &sub.user)
                && event.targets.users.contains(user)
            {
                out.push_back(line.clone());
            }
        }
        out.push_back(event.frame.clone());
    }
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("cursor", &self.cursor())
            .field("replaying", &self.replay.is_some())
            .finish_non_exhaustive()
    }
}

struct Replay {
    from: ReadFrom,
    /// First read only: the position a `herald.gap` names as `lastEventId` (the client's raw id,
    /// or `None` for a time). Later reads name the id they continue after.
    report: Option<Option<String>>,
    /// First read only: the client's id is not one this hub writes, so it is always a gap.
    forced: bool,
    /// Catching up after a queue overflow (the connection counts in the `lagging` gauge until done).
    lagging: bool,
    /// Events this replay has sent so far.
    sent: u64,
    /// The history logs this connection's selectors reach (see `History::read_for`).
    interest: Interest,
    /// Told how many events the start's replay sent, once it is over (a catch-up has none).
    on_replayed: Option<ReplayObserver>,
    read: Option<ReadFuture>,
}

impl EventStream {
    pub(crate) fn new(
        hub: Arc<Fanout>,
        sub: Arc<Subscriber>,
        start: Start,
        baseline: Option<EventId>,
        route: bool,
        on_replayed: Option<ReplayObserver>,
    ) -> Self {
        let route = route.then(|| {
            Box::new(Route {
                user_line: sub.user.as_ref().map(user_line),
            })
        });
        let mut out = VecDeque::with_capacity(2);
        out.push_back(hub.preamble.clone());
        let replay = |from, report, forced| Replay {
            from,
            report,
            forced,
            lagging: false,
            sent: 0,
            interest: hub.history.interest(&sub.selectors),
            on_replayed,
            read: None,
        };
        let (cursor, replay) = match start.first_read() {
            None => (baseline, None),
            Some(read) => {
                // A gap names the client's raw id, or no id for a time.
                let report = match start {
                    Start::After(raw) => Some(Some(raw)),
                    Start::Since(_) => Some(None),
                    Start::Live | Start::All => None,
                };
                let cursor = match read.from {
                    ReadFrom::After(id) => Some(id),
                    ReadFrom::Oldest | ReadFrom::Since(_) => None,
                };
                (
                    cursor,
                    Some(Box::new(replay(read.from, report, read.unknown_id))),
                )
            }
        };
        EventStream {
            hub,
            sub,
            out,
            live: Vec::new(),
            cursor: cursor.map_or(0, |c| c.0),
            replay,
            route,
            done: false,
        }
    }

    /// The newest event id written or passed over, if any.
    fn cursor(&self) -> Option<EventId> {
        (self.cursor > 0).then_some(EventId(self.cursor))
    }

    fn gap_frame(&self, last_event_id: Option<&str>, oldest: Option<EventId>) -> Bytes {
        self.hub.counters.gaps.fetch_add(1, Ordering::Relaxed);
        let json = serde_json::json!({
            "lastEventId": last_event_id,
            "oldest": oldest.map(|o| o.to_string()),
        });
        control_frame(&EventType::reserved("herald.gap"), &json)
    }

    /// Applies one chunk of history; returns whether the replay is complete.
    fn apply_chunk(&mut self, replay: &mut Replay, chunk: Chunk) -> bool {
        // The next step goes on from here: what was dropped before this read is no gap of it.
        replay.interest = replay.interest.after_drops(chunk.drops);
        let report = replay.report.take();
        let forced = std::mem::take(&mut replay.forced);
        if let Some(Gap { oldest }) = chunk.gap {
            let shown = report.unwrap_or_else(|| match replay.from {
                ReadFrom::After(a) => Some(a.to_string()),
                _ => None,
            });
            let frame = self.gap_frame(shown.as_deref(), oldest);
            self.out.push_back(frame);
            // A gap replays from the oldest retained event, whatever the position was.
            self.cursor = 0;
        } else if forced {
            let oldest = chunk.events.first().map(|e| e.id);
            let frame = self.gap_frame(report.flatten().as_deref(), oldest);
            self.out.push_back(frame);
        }
        let mut replayed = 0u64;
        // A step of a replay holds at most the queue's byte bound; the rest is read again next step.
        let mut budget = self.hub.queue.bytes;
        let mut cut_short = false;
        for event in &chunk.events {
            if budget == 0 {
                cut_short = true;
                break;
            }
            if event.id.0 <= self.cursor {
                continue;
            }
            if !self.sub.deliverable(event.id) {
                // Published after an operator closed this stream: the replay ends here.
                self.count_replayed(replayed);
                return true;
            }
            self.cursor = event.id.0;
            if self.sub.wants(event) {
                Route::push(self.route.as_deref(), &self.sub, event, &mut self.out);
                budget = budget.saturating_sub(event.frame.len());
                replayed += 1;
            }
        }
        self.count_replayed(replayed);
        replay.sent += replayed;
        if let Some(c) = self.cursor() {
            replay.from = ReadFrom::After(c);
        }
        !cut_short && !chunk.cut_short && chunk.events.len() < REPLAY_CHUNK
    }

    fn count_replayed(&self, n: u64) {
        self.hub.counters.replayed.fetch_add(n, Ordering::Relaxed);
    }

    fn poll_replay(&mut self, cx: &mut Context<'_>, mut replay: Box<Replay>) -> Poll<()> {
        let read = replay.read.get_or_insert_with(|| {
            let history = self.hub.history.clone();
            let (from, interest) = (replay.from, replay.interest);
            Box::pin(async move { history.read_for(from, REPLAY_CHUNK, interest).await })
        });
        match read.as_mut().poll(cx) {
            Poll::Pending => {
                self.replay = Some(replay);
                Poll::Pending
            }
            Poll::Ready(Err(e)) => {
                tracing::warn!(error = %e, "history read failed; ending the stream so the client resumes");
                self.finish_replay(&replay);
                self.done = true;
                Poll::Ready(())
            }
            Poll::Ready(Ok(chunk)) => {
                replay.read = None;
                if self.apply_chunk(&mut replay, chunk) {
                    self.finish_replay(&replay);
                } else {
                    self.replay = Some(replay);
                }
                Poll::Ready(())
            }
        }
    }

    fn finish_replay(&mut self, replay: &Replay) {
        if replay.lagging {
            self.hub.counters.lagging.fetch_sub(1, Ordering::Relaxed);
        } else if let Some(observer) = &replay.on_replayed {
            (observer.0)(replay.sent);
        }
    }

    /// Once the token has expired the stream gets nothing more, whatever is queued, replaying
    /// or still to catch up: only `herald.close`. Checked before every frame, not only by the
    /// hub's once-a-second expiry timer, so a slow reader cannot drain events past its `exp`.
    fn end_if_expired(&mut self) {
        if self.done || !self.sub.expired_at(now_ms()) {
            return;
        }
        self.out.clear();
        self.live.clear();
        if let Some(replay) = self.replay.take() {
            self.finish_replay(&replay);
        }
        self.sub.end(Ending::Closed(TOKEN_EXPIRED.to_string()));
        if self.route.is_some() {
            // An event's routing lines may have gone out without its frame: a blank line ends
            // them, and a parser dispatches nothing for an event without data.
            self.out.push_back(Bytes::from_static(b"\n"));
        }
        let json = serde_json::json!({ "reason": TOKEN_EXPIRED });
        self.out
            .push_back(control_frame(&EventType::reserved("herald.close"), &json));
        self.done = true;
    }

    /// Gives back the storage of `out` (empty whenever the stream waits): one small allocation
    /// per wake-up, against a buffer held by every idle stream.
    fn release_out(&mut self) {
        if self.out.capacity() > 0 {
            self.out = VecDeque::new();
        }
    }

    fn take_live(&mut self) {
        for event in self.live.drain(..) {
            if event.id.0 <= self.cursor {
                continue;
            }
            if !self.sub.deliverable(event.id) {
                continue;
            }
            self.cursor = event.id.0;
            Route::push(self.route.as_deref(), &self.sub, &event, &mut self.out);
        }
        // After a burst, give the memory back: idle connections should stay small.
        if self.live.capacity() > 64 {
            self.live = Vec::new();
        }
    }
}

impl Stream for EventStream {
    type Item = Bytes;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let this = &mut *self;
        loop {
            if this.sub.expires_at_ms().is_some() {
                this.end_if_expired();
            }
            if let Some(frame) = this.out.pop_front() {
                return Poll::Ready(Some(frame));
            }
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(replay) = this.replay.take() {
                // A shutdown or an aged stream does not wait for a long replay to finish.
                if this.sub.is_ending_quietly() {
                    this.finish_replay(&replay);
                    this.done = true;
                    continue;
                }
                match this.poll_replay(cx, replay) {
                    Poll::Pending => {
                        this.release_out();
                        return Poll::Pending;
                    }
                    Poll::Ready(()) => continue,
                }
            }
            let mut live = std::mem::take(&mut this.live);
            let signal = this.sub.poll_take(cx, &mut live);
            this.live = live;
            match signal {
                Poll::Pending => {
                    this.release_out();
                    return Poll::Pending;
                }
                Poll::Ready(Signal::Ready { heartbeat, lagging }) => {
                    this.take_live();
                    if heartbeat && this.out.is_empty() {
                        // Nothing came since the last heartbeat: keep no buffer while idle.
                        this.live = Vec::new();
                        this.out.push_back(Bytes::from_static(HEARTBEAT));
                    }
                    if lagging {
                        this.replay = Some(Box::new(Replay {
                            from: this.cursor().map_or(ReadFrom::Oldest, ReadFrom::After),
                            report: None,
                            forced: false,
                            lagging: true,
                            sent: 0,
                            interest: this.hub.history.interest(&this.sub.selectors),
                            on_replayed: None,
                            read: None,
                        }));
                    }
                }
                Poll::Ready(Signal::Ending(Ending::Closed(reason))) => {
                    let json = serde_json::json!({ "reason": reason });
                    this.out
                        .push_back(control_frame(&EventType::reserved("herald.close"), &json));
                    this.done = true;
                }
                Poll::Ready(Signal::Ending(Ending::Shutdown)) => this.done = true,
                Poll::Ready(Signal::Ending(Ending::Aged)) => {
                    this.hub.counters.aged.fetch_add(1, Ordering::Relaxed);
                    this.done = true;
                }
            }
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.hub.expiries.remove(&self.sub);
        self.hub.ages.remove(&self.sub);
        // Unregister first: no new overflow can be counted after this.
        self.hub.unregister(&self.sub);
        // An unfinished catch-up and an overflow not yet taken each counted once.
        let catching_up = self.replay.as_ref().is_some_and(|r| r.lagging);
        let counted = usize::from(catching_up) + usize::from(self.sub.is_lagging());
        self.hub
            .counters
            .lagging
            .fetch_sub(counted, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::task::Poll;

    use futures_util::StreamExt as _;
    use futures_util::task::noop_waker_ref;

    use super::*;
    use crate::name::{Selector, Topic};
    use crate::{Hub, Message, SubscribeRequest};

    fn poll(stream: &mut EventStream) -> Poll<Option<Bytes>> {
        stream.poll_next_unpin(&mut Context::from_waker(noop_waker_ref()))
    }

    /// Takes every frame that is ready; true if the stream then waits.
    fn drain(stream: &mut EventStream) -> Vec<Bytes> {
        let mut frames = Vec::new();
        while let Poll::Ready(Some(frame)) = poll(stream) {
            frames.push(frame);
        }
        frames
    }

    /// What an idle stream holds is what "Memory per idle stream" (docs/ARCHITECTURE.md) counts:
    /// a waiting stream keeps no frame buffer, a heartbeat that finds nothing to send gives back
    /// the event buffers a burst left, and a live start keeps no replay state or observer.
    #[tokio::test]
    async fn an_idle_stream_keeps_no_buffers() {
        assert!(std::mem::size_of::<EventStream>() <= 104);
        let hub = Hub::builder().build().unwrap();
        let mut stream = hub
            .subscribe(SubscribeRequest {
                selectors: vec![Selector::new("t").unwrap()],
                on_replayed: Some(ReplayObserver(Arc::new(|_| {}))),
                ..Default::default()
            })
            .unwrap();
        assert!(stream.replay.is_none());
        assert_eq!(drain(&mut stream).len(), 1, "the preamble");
        assert_eq!(stream.out.capacity(), 0);
        for _ in 0..3 {
            hub.publish(Message::to_topic(Topic::new("t").unwrap()))
                .await
                .unwrap();
        }
        let frames = drain(&mut stream);
        assert_eq!(frames.len(), 3);
        assert_eq!(stream.out.capacity(), 0);
        assert!(stream.live.capacity() > 0, "kept while events flow");
        // The inbox and `live` swap buffers; both are kept while events flow.
        hub.publish(Message::to_topic(Topic::new("t").unwrap()))
            .await
            .unwrap();
        assert_eq!(drain(&mut stream).len(), 1);
        stream.sub.heartbeat();
        assert_eq!(drain(&mut stream), vec![Bytes::from_static(HEARTBEAT)]);
        assert_eq!(stream.live.capacity(), 0);
        assert_eq!(stream.sub.queue_capacity(), 0);
        // And events still arrive after.
        hub.publish(Message::to_topic(Topic::new("t").unwrap()))
            .await
            .unwrap();
        assert_eq!(drain(&mut stream).len(), 1);
    }
}
