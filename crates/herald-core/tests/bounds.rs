//! Engine-level regressions of what one connection may cost (issue 12, defects 3 and 7): the
//! selector index it fills, and the bytes of events its queue pins while it does not read.

use std::time::Duration;

use futures_util::StreamExt;
use herald_core::sse_parser::Parser;
use herald_core::{
    CONNECTION_SEGMENTS_MAX, Hub, Message, SELECTOR_SEGMENTS_MAX, Selector, SubscribeError,
    SubscribeRequest, Topic,
};

fn selector(depth: usize, leaf: usize) -> Selector {
    let mut segs = vec!["s".to_string(); depth - 1];
    segs.push(format!("l{leaf}"));
    Selector::new(&segs.join("/")).unwrap()
}

/// Reproduces (defect 3): 31 selectors of 125 segments were accepted and cost ~2 MB of index per
/// idle stream. Now a selector has at most 32 segments and a connection 512 in all.
#[tokio::test]
async fn deep_selectors_are_refused() {
    let hub = Hub::builder().build().unwrap();
    let deep = SubscribeRequest {
        selectors: vec![selector(125, 0)],
        ..SubscribeRequest::default()
    };
    assert_eq!(
        hub.subscribe(deep).unwrap_err(),
        SubscribeError::SelectorTooDeep {
            given: 125,
            max: SELECTOR_SEGMENTS_MAX
        }
    );
    let many = SubscribeRequest {
        selectors: (0..31)
            .map(|i| selector(SELECTOR_SEGMENTS_MAX, i))
            .collect(),
        ..SubscribeRequest::default()
    };
    assert_eq!(
        hub.subscribe(many).unwrap_err(),
        SubscribeError::TooManySegments {
            given: 31 * SELECTOR_SEGMENTS_MAX,
            max: CONNECTION_SEGMENTS_MAX
        }
    );
    let fits = SubscribeRequest {
        selectors: (0..16)
            .map(|i| selector(SELECTOR_SEGMENTS_MAX, i))
            .collect(),
        ..SubscribeRequest::default()
    };
    let _open = hub
        .subscribe(fits)
        .expect("16 selectors of 32 segments fit");
    assert_eq!(hub.stats().topics, 16);
}

/// Reproduces (defect 7): a subscriber that never reads held every queued event up to its event
/// count (1024), whatever their size: 20 stalled subscribers and bursts of 512 KB events took
/// RSS from 15 MB to 1.5 GB. Now its queue is bounded in bytes too: past the bound it lags and
/// catches up from history, missing nothing.
#[tokio::test]
async fn a_stalled_queue_is_bounded_in_bytes() {
    let hub = Hub::builder().queue_bytes(1 << 20).build().unwrap();
    let mut stream = hub
        .subscribe(SubscribeRequest {
            selectors: vec![Selector::new("big").unwrap()],
            ..SubscribeRequest::default()
        })
        .unwrap();
    let body = "x".repeat(512 * 1024);
    let mut ids = Vec::new();
    for _ in 0..8 {
        let m = Message::to_topic(Topic::new("big").unwrap()).data(body.clone());
        ids.push(hub.publish(m).await.unwrap().id.to_string());
    }
    assert_eq!(
        hub.stats().lagging,
        1,
        "8 events of 512 KB overflow a 1 MiB queue"
    );
    let mut parser = Parser::default();
    let mut got = Vec::new();
    while got.len() < ids.len() {
        let frame = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("the stream catches up")
            .expect("the stream stays open");
        for e in parser.feed(&frame) {
            assert_eq!(e.data.len(), body.len());
            got.push(e.id.expect("an id"));
        }
    }
    assert_eq!(got, ids, "every event, in order, from history");
    assert_eq!(hub.stats().lagging, 0);
}
