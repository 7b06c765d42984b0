//! Engine-level tests of planned stream ends on a paused clock: a stream ends quietly at its age,
//! a subscriber's shorter `max_age` wins, the hub's limit caps a longer one, and jitter spreads
//! the ends over `[age × (1 − jitter), age]`.

use std::time::Duration;

use futures_util::StreamExt;
use herald_core::sse_parser::Parser;
use herald_core::{EventStream, Hub, Message, Selector, SubscribeRequest, Topic};
use tokio::time::Instant;

fn request(max_age: Option<Duration>) -> SubscribeRequest {
    SubscribeRequest {
        selectors: vec![Selector::new("t").unwrap()],
        max_age,
        ..Default::default()
    }
}

/// Whether a stream lived `secs` (deadlines are kept in whole milliseconds, rounded down).
fn about(lived: Duration, secs: u64) -> bool {
    lived <= Duration::from_secs(secs)
        && lived > Duration::from_secs(secs) - Duration::from_millis(2)
}

/// Reads the stream to its end; returns when it ended and what it carried.
async fn read_to_end(mut stream: EventStream) -> (Instant, Parser, Vec<String>) {
    let mut parser = Parser::default();
    let mut types = Vec::new();
    while let Some(frame) = stream.next().await {
        types.extend(parser.feed(&frame).into_iter().map(|e| e.event_type));
    }
    (Instant::now(), parser, types)
}

#[tokio::test(start_paused = true)]
async fn a_stream_ends_quietly_at_the_hubs_max_age() {
    let hub = Hub::builder()
        .heartbeat(Duration::from_secs(4))
        .max_stream_age(Some(Duration::from_secs(10)), 0.0)
        .build()
        .unwrap();
    let opened = Instant::now();
    let stream = hub.subscribe(request(None)).unwrap();
    let reader = tokio::spawn(read_to_end(stream));
    hub.publish(Message::to_topic(Topic::new("t").unwrap()))
        .await
        .unwrap();
    let (ended, parser, types) = reader.await.unwrap();
    assert!(about(ended - opened, 10), "{:?}", ended - opened);
    // The event, then two heartbeats (at 4 s and 8 s), then the end: no herald.close.
    assert_eq!(types, ["message"]);
    assert_eq!(parser.comments, 3, "the opening comment and two heartbeats");
    assert_eq!(hub.stats().aged, 1);
    assert_eq!(hub.stats().connections, 0);
}

#[tokio::test(start_paused = true)]
async fn the_shorter_of_the_hub_limit_and_the_ask_wins() {
    let hub = Hub::builder()
        .max_stream_age(Some(Duration::from_secs(60)), 0.0)
        .build()
        .unwrap();
    let opened = Instant::now();
    let short = tokio::spawn(read_to_end(
        hub.subscribe(request(Some(Duration::from_secs(5))))
            .unwrap(),
    ));
    let long = tokio::spawn(read_to_end(
        hub.subscribe(request(Some(Duration::from_secs(3600))))
            .unwrap(),
    ));
    let (short_end, ..) = short.await.unwrap();
    let (long_end, ..) = long.await.unwrap();
    assert!(about(short_end - opened, 5), "{:?}", short_end - opened);
    assert!(
        about(long_end - opened, 60),
        "capped: {:?}",
        long_end - opened
    );
    assert_eq!(hub.stats().aged, 2);
}

#[tokio::test(start_paused = true)]
async fn without_any_limit_a_stream_lives_on() {
    let hub = Hub::builder().build().unwrap();
    let mut stream = hub.subscribe(request(None)).unwrap();
    let _preamble = stream.next().await;
    let waited = tokio::time::timeout(Duration::from_secs(3600), async {
        while stream.next().await.is_some() {}
    })
    .await;
    assert!(waited.is_err(), "a stream without an age ended");
    assert_eq!(hub.stats().connections, 1);
}

#[tokio::test(start_paused = true)]
async fn jitter_spreads_the_ends_over_the_window() {
    let hub = Hub::builder()
        .max_stream_age(Some(Duration::from_secs(100)), 0.5)
        .build()
        .unwrap();
    let opened = Instant::now();
    let readers: Vec<_> = (0..40)
        .map(|_| tokio::spawn(read_to_end(hub.subscribe(request(None)).unwrap())))
        .collect();
    let mut lives = Vec::new();
    for r in readers {
        let (ended, ..) = r.await.unwrap();
        lives.push(ended - opened);
    }
    assert!(
        lives
            .iter()
            .all(|l| *l >= Duration::from_millis(49_999) && *l <= Duration::from_secs(100)),
        "{lives:?}"
    );
    let spread = *lives.iter().max().unwrap() - *lives.iter().min().unwrap();
    assert!(spread > Duration::from_secs(20), "{lives:?}");
}
