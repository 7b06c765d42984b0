//! The conformance suite every history store must pass: ids, fidelity, windows, gaps, retention by
//! count, age and bytes. A store's tests call [`run`] with a factory for fresh stores.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::{Chunk, Gap, History, ReadFrom, Retention};
use crate::event::{Event, EventId, Message};
use crate::name::{EventType, Topic, UserId};

fn msg(i: usize) -> Message {
    let mut m = Message::to_topic(Topic::new("conf/t").unwrap())
        .user(UserId::new("u").unwrap())
        .data(format!("line {i}\nsecond ✓"))
        .event(EventType::new("kind").unwrap())
        .retry_ms(i as u32);
    m.idempotency_key = Some(format!("key-{i}"));
    // Every other message is private, so stores must keep the flag both ways.
    m.private(i % 2 == 1)
}

fn ids(c: &Chunk) -> Vec<EventId> {
    c.events.iter().map(|e| e.id).collect()
}

fn same(a: &Event, b: &Event) {
    assert_eq!(a.id, b.id);
    assert_eq!(a.targets, b.targets);
    assert_eq!(a.event_type, b.event_type);
    assert_eq!(a.data, b.data);
    assert_eq!(a.retry_ms, b.retry_ms);
    assert_eq!(a.idempotency_key, b.idempotency_key);
    assert_eq!(a.private, b.private);
    assert_eq!(a.published_at_ms, b.published_at_ms);
    assert_eq!(a.frame, b.frame);
}

fn count(n: usize) -> Retention {
    Retention {
        max_events: n,
        ..Retention::default()
    }
}

/// Runs every case against stores made by `make(retention, first_id)`.
pub(crate) async fn run<F, Fut>(make: F)
where
    F: Fn(Retention, u64) -> Fut,
    Fut: Future<Output = Arc<dyn History>>,
{
    run_without_byte_limit(&make).await;
    byte_retention(
        &make(
            Retention {
                max_events: 100,
                max_age: None,
                max_bytes: Some(4_000),
            },
            7000,
        )
        .await,
    )
    .await;
}

/// Every case but `max_bytes` retention, for stores that cannot bound bytes (Redis streams).
pub(crate) async fn run_without_byte_limit<F, Fut>(make: &F)
where
    F: Fn(Retention, u64) -> Fut,
    Fut: Future<Output = Arc<dyn History>>,
{
    empty_store_knows_no_id(&make(count(10), 100).await).await;
    ids_increase_and_events_read_back_exactly(&make(count(10), 100).await).await;
    finite_stream_events_read_back(&make(count(10), 100).await).await;
    window_and_gap_rules(&make(count(3), 1000).await).await;
    age_retention_and_since(
        &make(
            Retention {
                max_events: 100,
                max_age: Some(Duration::from_millis(150)),
                max_bytes: None,
            },
            5000,
        )
        .await,
    )
    .await;
}

async fn empty_store_knows_no_id(h: &Arc<dyn History>) {
    let c = h.read(ReadFrom::After(EventId(99)), 10).await.unwrap();
    assert_eq!((c.gap, c.events.len()), (Some(Gap { oldest: None }), 0));
    let c = h.read(ReadFrom::Oldest, 10).await.unwrap();
    assert_eq!((c.gap, c.events.len()), (None, 0));
    let c = h.read(ReadFrom::Since(0), 10).await.unwrap();
    assert_eq!((c.gap, c.events.len()), (None, 0));
}

async fn ids_increase_and_events_read_back_exactly(h: &Arc<dyn History>) {
    let first = h.append((0..3).map(msg).collect()).await.unwrap();
    let second = h.append(vec![msg(3)]).await.unwrap();
    let all: Vec<_> = first.iter().chain(&second).cloned().collect();
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "ids increase");
    assert!(
        all.windows(2)
            .all(|w| w[0].published_at_ms <= w[1].published_at_ms)
    );
    assert_eq!(all[2].data, "line 2\nsecond ✓");
    let c = h.read(ReadFrom::Oldest, 10).await.unwrap();
    assert_eq!(c.events.len(), 4);
    for (a, b) in all.iter().zip(&c.events) {
        same(a, b);
    }
    let private: Vec<bool> = c.events.iter().map(|e| e.private).collect();
    assert_eq!(
        private,
        [false, true, false, true],
        "the private flag is kept"
    );
    let c = h.read(ReadFrom::After(all[1].id), 10).await.unwrap();
    assert_eq!((c.gap, ids(&c)), (None, vec![all[2].id, all[3].id]));
}

/// The reserved types stored with an id (`herald.complete`, `herald.cancel`) read back as
/// themselves: a store that refused them would turn every finished stream into a damaged row.
async fn finite_stream_events_read_back(h: &Arc<dyn History>) {
    let topic = Topic::new("ai/answer").unwrap();
    let stored = h
        .append(vec![
            Message::to_topic(topic.clone()).data("token"),
            Message::to_topic(topic.clone())
                .event(EventType::cancel())
                .data("{}"),
            Message::to_topic(topic)
                .event(EventType::complete())
                .data(r#"{"reason":"cancelled"}"#),
        ])
        .await
        .unwrap();
    let c = h.read(ReadFrom::Oldest, 10).await.unwrap();
    assert_eq!((c.gap, c.skipped.len(), c.events.len()), (None, 0, 3));
    for (a, b) in stored.iter().zip(&c.events) {
        same(a, b);
    }
    assert_eq!(
        c.events[2].event_type.as_ref().map(EventType::as_str),
        Some(crate::name::COMPLETE)
    );
    // One event found by its id (how a reconnect after a `herald.complete` is recognised).
    for e in &stored {
        same(e, &h.event(e.id).await.unwrap().expect("found by id"));
    }
    let after = EventId(stored[2].id.0 + 1);
    assert!(h.event(after).await.unwrap().is_none());
}

async fn window_and_gap_rules(h: &Arc<dyn History>) {
    let evs = h.append((0..5).map(msg).collect()).await.unwrap();
    let id = |i: usize| evs[i].id;
    // Retained: 2, 3, 4.
    let c = h.read(ReadFrom::Oldest, 10).await.unwrap();
    assert_eq!((c.gap, ids(&c)), (None, vec![id(2), id(3), id(4)]));
    // Just before the oldest retained: no gap.
    let c = h.read(ReadFrom::After(id(1)), 10).await.unwrap();
    assert_eq!((c.gap, ids(&c)), (None, vec![id(2), id(3), id(4)]));
    let c = h.read(ReadFrom::After(id(2)), 1).await.unwrap();
    assert_eq!((c.gap, ids(&c)), (None, vec![id(3)]));
    // The newest: no gap, nothing.
    let c = h.read(ReadFrom::After(id(4)), 10).await.unwrap();
    assert_eq!((c.gap, ids(&c)), (None, vec![]));
    // Older than history: gap naming the oldest, then from the oldest.
    let c = h.read(ReadFrom::After(id(0)), 10).await.unwrap();
    assert_eq!(
        (c.gap, ids(&c)),
        (
            Some(Gap {
                oldest: Some(id(2))
            }),
            vec![id(2), id(3), id(4)]
        )
    );
    // Never issued (newer than the newest).
    let c = h
        .read(ReadFrom::After(EventId(id(4).0 + 1)), 10)
        .await
        .unwrap();
    assert_eq!(
        c.gap,
        Some(Gap {
            oldest: Some(id(2))
        })
    );
    // Since the epoch: events were dropped, so that is a gap.
    let c = h.read(ReadFrom::Since(0), 10).await.unwrap();
    assert_eq!(
        c.gap,
        Some(Gap {
            oldest: Some(id(2))
        })
    );
}

async fn age_retention_and_since(h: &Arc<dyn History>) {
    let a = h.append(vec![msg(0)]).await.unwrap().remove(0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = h.append(vec![msg(1)]).await.unwrap().remove(0);
    assert!(b.published_at_ms >= a.published_at_ms + 300);
    // Appending trimmed the aged event.
    let c = h.read(ReadFrom::Oldest, 10).await.unwrap();
    assert_eq!(ids(&c), vec![b.id]);
    let c = h
        .read(ReadFrom::Since(b.published_at_ms), 10)
        .await
        .unwrap();
    assert_eq!((c.gap, ids(&c)), (None, vec![b.id]));
    let c = h
        .read(ReadFrom::Since(b.published_at_ms + 1), 10)
        .await
        .unwrap();
    assert_eq!((c.gap, ids(&c)), (None, vec![]));
    let c = h
        .read(ReadFrom::Since(a.published_at_ms), 10)
        .await
        .unwrap();
    assert_eq!(
        c.gap,
        Some(Gap { oldest: Some(b.id) }),
        "an event in the window was dropped"
    );
    // With nothing published, maintenance applies the age limit.
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.maintain().await.unwrap();
    let c = h.read(ReadFrom::Oldest, 10).await.unwrap();
    assert!(c.events.is_empty());
    let c = h.read(ReadFrom::After(b.id), 10).await.unwrap();
    assert_eq!(
        (c.gap, c.events.len()),
        (None, 0),
        "the newest id still continues"
    );
    let c = h.read(ReadFrom::After(a.id), 10).await.unwrap();
    assert_eq!(c.gap, Some(Gap { oldest: None }));
}

async fn byte_retention(h: &Arc<dyn History>) {
    let big = |i: usize| Message::broadcast().data(format!("{i}:{}", "x".repeat(900)));
    let mut last = None;
    for i in 0..20 {
        last = Some(h.append(vec![big(i)]).await.unwrap().remove(0).id);
    }
    let c = h.read(ReadFrom::Oldest, 100).await.unwrap();
    assert!(
        !c.events.is_empty() && c.events.len() < 5,
        "kept {}",
        c.events.len()
    );
    assert_eq!(c.events.last().map(|e| e.id), last, "the newest is kept");
    assert!(
        c.events
            .first()
            .unwrap()
            .data
            .starts_with(&format!("{}:", 20 - c.events.len()))
    );
}
