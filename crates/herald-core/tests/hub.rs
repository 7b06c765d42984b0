//! The engine driven directly through its public API, with Tokio's clock paused: heartbeats,
//! lagging and catch-up, token expiry, closing and blocking a user, shutdown, idempotency and the
//! gap verdicts of a resume. Every stream is read as bytes and parsed with the crate's own SSE
//! parser, as a browser would see it.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use herald_core::event::now_ms;
use herald_core::sse_parser::{Parser, SseEvent};
use herald_core::{
    EventStream, Hub, Message, Published, Selector, Start, SubscribeError, SubscribeRequest, Topic,
    UserId,
};
use serde_json::{Value, json};

/// Longer than any wait in these tests: a stream that stays silent this long has nothing to say.
const QUIET: Duration = Duration::from_secs(120);

/// One connection as a client sees it: the raw frames and the events parsed from them.
struct Client {
    stream: EventStream,
    parser: Parser,
    frames: Vec<Bytes>,
    events: Vec<SseEvent>,
}

impl Client {
    fn new(stream: EventStream) -> Self {
        Client {
            stream,
            parser: Parser::default(),
            frames: Vec::new(),
            events: Vec::new(),
        }
    }

    /// The next frame, or `None` when the stream ended; panics if nothing comes within `wait`.
    async fn frame_within(&mut self, wait: Duration) -> Option<Bytes> {
        let frame = tokio::time::timeout(wait, self.stream.next())
            .await
            .expect("the stream stayed silent")?;
        self.events.extend(self.parser.feed(&frame));
        self.frames.push(frame.clone());
        Some(frame)
    }

    /// Whether a frame arrives within `wait` (consuming it if so).
    async fn silent_for(&mut self, wait: Duration) -> bool {
        match tokio::time::timeout(wait, self.stream.next()).await {
            Err(_) => true,
            Ok(Some(frame)) => {
                self.events.extend(self.parser.feed(&frame));
                self.frames.push(frame);
                false
            }
            Ok(None) => false,
        }
    }

    /// Reads until `n` events have been parsed in all.
    async fn events(&mut self, n: usize) -> &[SseEvent] {
        while self.events.len() < n {
            self.frame_within(QUIET)
                .await
                .expect("the stream ended early");
        }
        &self.events
    }

    /// Reads to the end of the stream and returns every event parsed.
    async fn read_to_end(&mut self) -> &[SseEvent] {
        while self.frame_within(QUIET).await.is_some() {}
        &self.events
    }
}

fn topic(s: &str) -> Topic {
    Topic::new(s).unwrap()
}

fn user(s: &str) -> UserId {
    UserId::new(s).unwrap()
}

fn to(selector: &str, start: Start) -> SubscribeRequest {
    SubscribeRequest {
        selectors: vec![Selector::new(selector).unwrap()],
        start,
        ..SubscribeRequest::default()
    }
}

fn as_user(name: &str) -> SubscribeRequest {
    SubscribeRequest {
        user: Some(user(name)),
        ..SubscribeRequest::default()
    }
}

async fn publish(hub: &Hub, t: &str, data: &str) -> Published {
    hub.publish(Message::to_topic(topic(t)).data(data))
        .await
        .unwrap()
}

fn json(e: &SseEvent) -> Value {
    serde_json::from_str(&e.data).unwrap()
}

fn data(events: &[SseEvent]) -> Vec<&str> {
    events.iter().map(|e| e.data.as_str()).collect()
}

#[tokio::test(start_paused = true)]
async fn the_stream_opens_with_its_preamble_and_heartbeats_on_the_interval() {
    let hub = Hub::builder()
        .heartbeat(Duration::from_secs(15))
        .retry(Duration::from_millis(2500))
        .build()
        .unwrap();
    let mut c = Client::new(hub.subscribe(to("a", Start::Live)).unwrap());
    let preamble = c.frame_within(Duration::from_millis(1)).await.unwrap();
    assert_eq!(&preamble[..], b"retry: 2500\n: herald\n\n");
    assert_eq!((c.parser.retry_ms, c.parser.comments), (Some(2500), 1));

    // Nothing before the interval is up, one comment line when it is, and again a full interval later.
    assert!(c.silent_for(Duration::from_millis(14_990)).await);
    let beat = c.frame_within(Duration::from_millis(20)).await.unwrap();
    assert_eq!(&beat[..], b":\n\n");
    assert!(c.silent_for(Duration::from_millis(14_970)).await);
    let beat = c.frame_within(Duration::from_millis(40)).await.unwrap();
    assert_eq!(&beat[..], b":\n\n");
    assert_eq!(c.parser.comments, 3);
    assert!(c.events.is_empty(), "heartbeats are comments, not events");
}

#[tokio::test(start_paused = true)]
async fn a_connection_whose_queue_overflows_catches_up_from_history_in_order() {
    let hub = Hub::builder().queue_capacity(2).build().unwrap();
    let mut c = Client::new(hub.subscribe(to("t", Start::Live)).unwrap());
    let mut ids = Vec::new();
    for i in 0..6 {
        let p = publish(&hub, "t", &format!("m{i}")).await;
        assert_eq!(
            p.delivered, 1,
            "a lagging connection still counts as delivered"
        );
        ids.push(p.id.to_string());
    }
    assert_eq!(hub.stats().lagging, 1);
    let events = c.events(6).await;
    assert_eq!(data(events), ["m0", "m1", "m2", "m3", "m4", "m5"]);
    let got: Vec<_> = events.iter().map(|e| e.id.clone().unwrap()).collect();
    assert_eq!(got, ids);
    assert!(events.iter().all(|e| e.event_type == "message"), "no gap");
    assert_eq!(hub.stats().lagging, 0);
    // Live again: the next event arrives from the queue.
    publish(&hub, "t", "after").await;
    assert_eq!(c.events(7).await[6].data, "after");
    assert!(c.silent_for(Duration::from_secs(1)).await);
}

#[tokio::test(start_paused = true)]
async fn an_expired_token_ends_the_stream_with_herald_close() {
    let hub = Hub::builder().build().unwrap();
    let mut c = Client::new(
        hub.subscribe(SubscribeRequest {
            expires_at_ms: Some(now_ms() + 300),
            ..to("t", Start::Live)
        })
        .unwrap(),
    );
    publish(&hub, "t", "before").await;
    assert_eq!(data(c.events(1).await), ["before"]);
    // The deadline is wall-clock time; the hub's housekeeping looks once a (paused) second.
    std::thread::sleep(Duration::from_millis(400));
    let events = c.read_to_end().await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].event_type, "herald.close");
    assert_eq!(json(&events[1]), json!({ "reason": "token_expired" }));
    assert_eq!(hub.stats().connections, 1, "until the stream is dropped");
    drop(c);
    assert_eq!(hub.stats().connections, 0);
}

#[tokio::test(start_paused = true)]
async fn closing_a_user_ends_its_streams_and_blocks_it_for_a_while() {
    let hub = Hub::builder().build().unwrap();
    let mut alice1 = Client::new(hub.subscribe(as_user("alice")).unwrap());
    let mut alice2 = Client::new(hub.subscribe(as_user("alice")).unwrap());
    let mut bob = Client::new(hub.subscribe(as_user("bob")).unwrap());
    assert_eq!(hub.connections_of(&user("alice")), 2);
    hub.publish(Message::to_user(user("alice")).data("queued first"))
        .await
        .unwrap();

    let closed = hub.close_user(&user("alice"), "kicked", Some(Duration::from_secs(30)));
    assert_eq!(closed, 2);
    for c in [&mut alice1, &mut alice2] {
        let events = c.read_to_end().await;
        assert_eq!(data(&events[..1]), ["queued first"]);
        assert_eq!(events[1].event_type, "herald.close");
        assert_eq!(json(&events[1]), json!({ "reason": "kicked" }));
        assert_eq!(events.len(), 2);
    }
    match hub.subscribe(as_user("alice")) {
        Err(SubscribeError::Blocked(left)) => {
            assert!(left <= Duration::from_secs(30) && left > Duration::from_secs(20))
        }
        other => panic!("alice is not blocked: {other:?}"),
    }
    let preamble = bob.frame_within(Duration::from_millis(1)).await.unwrap();
    assert!(preamble.starts_with(b"retry: "));
    assert!(
        bob.silent_for(Duration::from_secs(1)).await,
        "bob is untouched"
    );
    let _bob2 = hub.subscribe(as_user("bob")).unwrap();
    // Without a block, a closed user may come straight back.
    assert_eq!(hub.close_user(&user("bob"), "bye", None), 2);
    assert!(hub.subscribe(as_user("bob")).is_ok());
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_streams_without_close_and_refuses_new_ones() {
    let hub = Hub::builder().build().unwrap();
    let mut a = Client::new(hub.subscribe(to("t", Start::Live)).unwrap());
    let mut b = Client::new(hub.subscribe(to("**", Start::Live)).unwrap());
    publish(&hub, "t", "last").await;
    hub.shutdown();
    for c in [&mut a, &mut b] {
        let events = c.read_to_end().await;
        assert_eq!(
            data(events),
            ["last"],
            "no herald.close: clients reconnect elsewhere"
        );
    }
    assert!(matches!(
        hub.subscribe(to("t", Start::Live)),
        Err(SubscribeError::ShuttingDown)
    ));
}

#[tokio::test(start_paused = true)]
async fn a_repeated_idempotency_key_publishes_once() {
    let hub = Hub::builder().build().unwrap();
    let mut c = Client::new(hub.subscribe(to("t", Start::Live)).unwrap());
    let keyed = |d: &str, k: &str| Message::to_topic(topic("t")).data(d).idempotency_key(k);
    let first = hub.publish(keyed("one", "k1")).await.unwrap();
    let again = hub.publish(keyed("one", "k1")).await.unwrap();
    assert!(!first.duplicate);
    assert_eq!(
        (again.id, again.delivered, again.duplicate),
        (first.id, 0, true)
    );
    // The same key with another payload is refused, naming the event that holds the key.
    assert!(matches!(
        hub.publish(keyed("one again", "k1")).await,
        Err(herald_core::PublishError::IdempotencyConflict { index: 0, id }) if id == first.id
    ));
    let batch = hub
        .publish_batch(vec![keyed("two", "k2"), keyed("two", "k2")])
        .await
        .unwrap();
    assert_eq!((batch[0].duplicate, batch[1].duplicate), (false, true));
    assert_eq!(batch[1].id, batch[0].id);
    // Within one batch too, and then nothing of the batch is published.
    assert!(matches!(
        hub.publish_batch(vec![keyed("three", "k3"), keyed("three again", "k3")])
            .await,
        Err(herald_core::PublishError::IdempotencyConflict { index: 1, .. })
    ));
    assert_eq!(data(c.events(2).await), ["one", "two"]);
    assert!(c.silent_for(Duration::from_secs(1)).await);
    assert_eq!(hub.stats().published, 2);
}

/// Everything a new connection starting at `start` is sent before it goes quiet.
async fn replay(hub: &Hub, start: Start) -> Vec<SseEvent> {
    let mut c = Client::new(hub.subscribe(to("t", start)).unwrap());
    while !c.silent_for(Duration::from_secs(1)).await {}
    c.events
}

#[tokio::test(start_paused = true)]
async fn resuming_reports_a_gap_exactly_when_events_are_missing() {
    let hub = Hub::builder().history_len(3).build().unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(publish(&hub, "t", &format!("m{i}")).await.id.to_string());
    }
    let is_gap = |e: &SseEvent, last: &str| {
        e.event_type == "herald.gap" && json(e) == json!({ "lastEventId": last, "oldest": ids[2] })
    };

    // m0 and m1 were dropped: resuming after m0 misses m1.
    let events = replay(&hub, Start::After(ids[0].clone())).await;
    assert!(is_gap(&events[0], &ids[0]), "{events:?}");
    assert_eq!(data(&events[1..]), ["m2", "m3", "m4"]);
    // After m1 nothing is missing: the oldest retained event follows it.
    let events = replay(&hub, Start::After(ids[1].clone())).await;
    assert_eq!(data(&events), ["m2", "m3", "m4"]);
    // After the newest: nothing to replay, no gap.
    assert!(replay(&hub, Start::After(ids[4].clone())).await.is_empty());
    // An id this hub never wrote is always a gap, then everything retained.
    let events = replay(&hub, Start::After("not-an-id".into())).await;
    assert!(is_gap(&events[0], "not-an-id"), "{events:?}");
    assert_eq!(data(&events[1..]), ["m2", "m3", "m4"]);
    // Everything retained, as asked: no gap.
    assert_eq!(data(&replay(&hub, Start::All).await), ["m2", "m3", "m4"]);
    assert_eq!(hub.stats().gaps, 2);

    // The same verdicts for a user's messages read back without a stream.
    let u = user("u");
    for i in 0..2 {
        hub.publish(Message::to_user(u.clone()).data(format!("u{i}")))
            .await
            .unwrap();
    }
    let found = hub
        .user_messages(&u, &Start::After(ids[0].clone()), 10)
        .await
        .unwrap();
    let oldest = found.gap.map(|g| g.oldest.map(|o| o.to_string()));
    assert_eq!(oldest, Some(Some(ids[4].clone())));
    assert_eq!(found.events.len(), 2);
    let found = hub.user_messages(&u, &Start::All, 10).await.unwrap();
    assert!(found.gap.is_none());
    assert_eq!(found.events.len(), 2);
}

/// A layer above publishes to the reserved topics it owns, and to no other: Mercure's
/// subscription events may not pass for herald's own `$presence/…` events.
#[tokio::test(start_paused = true)]
async fn a_reserved_publish_reaches_only_the_owned_topics() {
    let hub = Hub::builder().build().unwrap();
    let owned = Message::to_topic(topic("$mercure/subscriptions")).data("ok");
    assert!(hub.publish_reserved("$mercure/", vec![owned]).await.is_ok());
    let forged = Message::to_topic(topic("$presence/alice")).data("{\"online\":true}");
    let refused = hub.publish_reserved("$mercure/", vec![forged]).await;
    assert!(
        matches!(refused, Err(herald_core::PublishError::ReservedTopic { ref topic, .. }) if topic == "$presence/alice"),
        "{refused:?}"
    );
    let client = Message::to_topic(topic("$mercure/subscriptions")).data("no");
    assert!(hub.publish(client).await.is_err(), "clients reach none");
}
