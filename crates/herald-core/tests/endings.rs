//! Engine-level regressions of how a stream ends (issue 12, defect 1): a token's expiry and an
//! operator's close stop delivery of everything published after them on every path: live,
//! replay and the catch-up of a connection whose queue overflowed.

use std::time::Duration;

use futures_util::StreamExt;
use herald_core::sse_parser::{Parser, SseEvent};
use herald_core::{EventStream, Hub, Message, Selector, Start, SubscribeRequest, Topic, UserId};

fn topic() -> Topic {
    Topic::new("t").unwrap()
}

async fn publish(hub: &Hub, n: usize, label: &str) -> Vec<u64> {
    let mut ids = Vec::new();
    for i in 0..n {
        let m = Message::to_topic(topic()).data(format!("{label}{i}"));
        ids.push(hub.publish(m).await.unwrap().id.0);
    }
    ids
}

/// Reads the stream to its end (it must end within a few seconds).
async fn read_to_end(mut stream: EventStream) -> Vec<SseEvent> {
    let mut parser = Parser::default();
    let mut events = Vec::new();
    let read = async {
        while let Some(frame) = stream.next().await {
            events.extend(parser.feed(&frame));
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the stream did not end");
    events
}

fn ids(events: &[SseEvent]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| e.id.as_deref()?.parse().ok())
        .collect()
}

/// Reproduces: a slow reader whose queue overflowed caught up from history after its token's
/// `exp` and was handed the events published after it (26,900 in the red-team run), and a
/// `since=all` replay went on past `exp`. Now a stream past its `exp` gets nothing but
/// `herald.close`.
#[tokio::test]
async fn nothing_is_delivered_after_the_token_expired() {
    let hub = Hub::builder().queue_capacity(4).build().unwrap();
    publish(&hub, 20, "old").await;
    let exp = herald_core::event::now_ms() + 300;
    for start in [Start::Live, Start::All] {
        let stream = hub
            .subscribe(SubscribeRequest {
                selectors: vec![Selector::new("t").unwrap()],
                start: start.clone(),
                expires_at_ms: Some(exp),
                ..SubscribeRequest::default()
            })
            .unwrap();
        // The reader stalls: its queue overflows, so it will catch up from history.
        let _before = publish(&hub, 10, "before").await;
        tokio::time::sleep(Duration::from_millis(
            exp.saturating_sub(herald_core::event::now_ms()) + 50,
        ))
        .await;
        let after = publish(&hub, 10, "after").await;
        let events = read_to_end(stream).await;
        let got = ids(&events);
        assert!(
            got.iter().all(|id| !after.contains(id)),
            "{start:?}: delivered events published after exp: {got:?}"
        );
        assert!(got.is_empty(), "{start:?}: a stream past exp got {got:?}");
        let last = events.last().expect("a closing event");
        assert_eq!(last.event_type, "herald.close");
        assert_eq!(last.data, r#"{"reason":"token_expired"}"#);
    }
}

/// Reproduces: after `DELETE /users/{id}/connections`, a connection that was catching up from
/// history read on up to the newest event, delivering what was published after the close (28,800
/// events in the red-team run). Now it delivers what was published before the close, then
/// `herald.close`.
#[tokio::test]
async fn nothing_published_after_a_close_is_delivered() {
    let hub = Hub::builder().queue_capacity(4).build().unwrap();
    let alice = UserId::new("alice").unwrap();
    for start in [Start::Live, Start::All] {
        let stream = hub
            .subscribe(SubscribeRequest {
                selectors: vec![Selector::new("t").unwrap()],
                user: Some(alice.clone()),
                start: start.clone(),
                ..SubscribeRequest::default()
            })
            .unwrap();
        let before = publish(&hub, 30, "before").await;
        assert_eq!(hub.close_user(&alice, "suspended", None), 1);
        let after = publish(&hub, 30, "after").await;
        let events = read_to_end(stream).await;
        let got = ids(&events);
        assert!(
            got.iter().all(|id| !after.contains(id)),
            "{start:?}: delivered events published after the close: {got:?}"
        );
        assert!(
            before.iter().all(|id| got.contains(id)),
            "{start:?}: events published before the close are still delivered: {got:?}"
        );
        let last = events.last().expect("a closing event");
        assert_eq!(last.event_type, "herald.close");
        assert_eq!(last.data, r#"{"reason":"suspended"}"#);
    }
}

/// Reproduces: `?block=` entries were unbounded (100,000 distinct blocks for 999 days were all
/// kept). Now at most `max_blocks` users are blocked; past it the block ending soonest goes.
#[tokio::test]
async fn blocks_are_bounded() {
    let hub = Hub::builder().max_blocks(2).build().unwrap();
    let user = |s: &str| UserId::new(s).unwrap();
    let hour = Duration::from_secs(3600);
    hub.close_user(&user("a"), "x", Some(hour));
    hub.close_user(&user("b"), "x", Some(hour * 3));
    hub.close_user(&user("c"), "x", Some(hour * 2));
    assert!(
        hub.blocked_for(&user("a")).is_none(),
        "the block ending soonest was dropped"
    );
    assert!(hub.blocked_for(&user("b")).is_some());
    assert!(hub.blocked_for(&user("c")).is_some());
    // Blocking an already blocked user again replaces its block, dropping nothing.
    hub.close_user(&user("c"), "x", Some(hour * 4));
    assert!(hub.blocked_for(&user("b")).is_some());
    assert!(hub.blocked_for(&user("c")).unwrap() > hour * 3);
    let refused = hub.subscribe(SubscribeRequest {
        user: Some(user("b")),
        ..SubscribeRequest::default()
    });
    assert!(matches!(
        refused,
        Err(herald_core::SubscribeError::Blocked(_))
    ));
}
