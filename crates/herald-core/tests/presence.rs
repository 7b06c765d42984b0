//! Engine-level tests of presence events on a paused clock: one `online` event for a user's first
//! stream, none for more streams or a reload inside the grace, one `offline` event a grace after
//! the last stream closed; generations grow; `$` topics are the hub's own (publishing to them is
//! refused, `**` does not match them).

use std::time::Duration;

use futures_util::StreamExt;
use herald_core::sse_parser::Parser;
use herald_core::{
    EventStream, Hub, Message, PublishError, Selector, Start, SubscribeRequest, Topic, UserId,
    presence_events,
};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

const GRACE: Duration = Duration::from_secs(5);

fn watch(hub: &Hub, selector: &str) -> mpsc::UnboundedReceiver<(Instant, String, Value)> {
    let stream = hub
        .subscribe(SubscribeRequest {
            selectors: vec![Selector::new(selector).unwrap()],
            ..Default::default()
        })
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(forward(stream, tx));
    rx
}

async fn forward(mut stream: EventStream, tx: mpsc::UnboundedSender<(Instant, String, Value)>) {
    let mut parser = Parser::default();
    while let Some(frame) = stream.next().await {
        for e in parser.feed(&frame) {
            let data = serde_json::from_str(&e.data).unwrap_or(Value::Null);
            if tx.send((Instant::now(), e.event_type, data)).is_err() {
                return;
            }
        }
    }
}

fn connect(hub: &Hub, user: &str) -> EventStream {
    hub.subscribe(SubscribeRequest {
        selectors: vec![Selector::new("app").unwrap()],
        user: Some(UserId::new(user).unwrap()),
        ..Default::default()
    })
    .unwrap()
}

/// Nothing arrives within `d` (of paused time).
async fn quiet(rx: &mut mpsc::UnboundedReceiver<(Instant, String, Value)>, d: Duration) {
    if let Ok(got) = tokio::time::timeout(d, rx.recv()).await {
        panic!("expected no presence event, got {got:?}");
    }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<(Instant, String, Value)>) -> (Instant, Value) {
    let (at, kind, data) = rx.recv().await.expect("the watcher runs");
    assert_eq!(kind, "herald.presence", "{data}");
    (at, data)
}

async fn hub() -> Hub {
    let hub = Hub::builder().build().unwrap();
    assert!(presence_events::start_local(&hub, GRACE).await);
    hub
}

#[tokio::test(start_paused = true)]
async fn online_once_offline_after_the_grace_and_generations_grow() {
    let hub = hub().await;
    let mut events = watch(&hub, "$presence/*");

    let first = connect(&hub, "alice");
    let (_, online) = next(&mut events).await;
    assert_eq!(online["user"], "alice");
    assert_eq!(online["online"], true);
    assert_eq!(online["connections"], 1);
    let g1 = online["generation"].as_u64().unwrap();

    // Two more streams: still one user online, no event.
    let more = [connect(&hub, "alice"), connect(&hub, "alice")];
    quiet(&mut events, GRACE * 3).await;

    // A reload: every stream closes, a new one opens 2 s later, inside the grace.
    drop(first);
    drop(more);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reloaded = connect(&hub, "alice");
    quiet(&mut events, GRACE * 3).await;

    // The last stream closes: one offline event, a grace later.
    let closed = Instant::now();
    drop(reloaded);
    let (at, offline) = next(&mut events).await;
    assert_eq!(at - closed, GRACE, "the offline event waits the grace");
    assert_eq!(offline["user"], "alice");
    assert_eq!(offline["online"], false);
    assert_eq!(offline["connections"], 0);
    let g2 = offline["generation"].as_u64().unwrap();
    assert!(g2 > g1, "{g2} > {g1}");
    quiet(&mut events, GRACE * 3).await;

    // Back again: online, with a newer generation.
    let _back = connect(&hub, "alice");
    let (_, again) = next(&mut events).await;
    assert_eq!(again["online"], true);
    assert!(again["generation"].as_u64().unwrap() > g2);
}

#[tokio::test(start_paused = true)]
async fn presence_events_are_ordinary_events_in_history() {
    let hub = hub().await;
    let mut events = watch(&hub, "$presence/bob");
    let bob = connect(&hub, "bob");
    next(&mut events).await;
    drop(bob);
    next(&mut events).await;
    // A subscriber that resumes from the start gets both, with ids, from history.
    let mut replay = hub
        .subscribe(SubscribeRequest {
            selectors: vec![Selector::new("$presence/*").unwrap()],
            start: Start::All,
            ..Default::default()
        })
        .unwrap();
    let mut parser = Parser::default();
    let mut got = Vec::new();
    while got.len() < 2 {
        got.extend(parser.feed(&replay.next().await.unwrap()));
    }
    assert!(got.iter().all(|e| e.id.is_some()), "{got:?}");
    let online: Vec<bool> = got
        .iter()
        .map(|e| serde_json::from_str::<Value>(&e.data).unwrap()["online"] == true)
        .collect();
    assert_eq!(online, [true, false]);
}

#[tokio::test(start_paused = true)]
async fn reserved_topics_are_the_hubs_own() {
    let hub = hub().await;
    let mut everything = watch(&hub, "**");
    let mut presence = watch(&hub, "$presence/**");
    let err = hub
        .publish(Message::to_topic(Topic::new("$presence/x").unwrap()).data("forged"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, PublishError::ReservedTopic { index: 0, .. }),
        "{err:?}"
    );
    let _carol = connect(&hub, "carol");
    let (_, data) = next(&mut presence).await;
    assert_eq!(data["user"], "carol");
    // `**` matches every ordinary topic, but not `$presence/carol`.
    hub.publish(Message::to_topic(Topic::new("news").unwrap()).data("n"))
        .await
        .unwrap();
    let (_, kind, data) = everything.recv().await.unwrap();
    assert_eq!((kind.as_str(), data), ("message", Value::Null), "news only");
    quiet(&mut everything, GRACE).await;
}

#[tokio::test(start_paused = true)]
async fn users_are_independent_and_anonymous_streams_do_not_count() {
    let hub = hub().await;
    let mut events = watch(&hub, "$presence/*");
    let _anon = hub
        .subscribe(SubscribeRequest {
            selectors: vec![Selector::new("app").unwrap()],
            ..Default::default()
        })
        .unwrap();
    let a = connect(&hub, "a");
    let _b = connect(&hub, "b");
    let (_, x) = next(&mut events).await;
    let (_, y) = next(&mut events).await;
    assert_eq!(
        (x["user"].as_str(), y["user"].as_str()),
        (Some("a"), Some("b"))
    );
    drop(a);
    let (_, z) = next(&mut events).await;
    assert_eq!(
        (z["user"].as_str(), z["online"].as_bool()),
        (Some("a"), Some(false))
    );
    quiet(&mut events, GRACE * 2).await;
}
