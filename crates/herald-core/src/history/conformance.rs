//! The conformance suite every history store must pass: ids, fidelity, windows, gaps, retention by
//! count, age and bytes, and retention rules per topic. A store's tests call [`run`] with a
//! factory for fresh stores.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::{Chunk, Gap, History, ReadFrom, Retention, RetentionRule, RetentionRules};
use crate::event::{Event, EventId, Message};
use crate::name::{EventType, Selector, Topic, UserId};

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
    run_rules(&make).await;
    byte_retention(
        &make(
            Retention {
                max_events: 100,
                max_age: None,
                max_bytes: Some(4_000),
                rules: RetentionRules::default(),
            },
            7000,
        )
        .await,
    )
    .await;
    rule_byte_bound(&make(with_rules(1000, None, &["ai/**:bytes=4000"]), 8000).await).await;
}

/// A store keeping `events` of the topics no rule names (and for `age`), with these rules.
fn with_rules(events: usize, age: Option<Duration>, rules: &[&str]) -> Retention {
    let global = Retention {
        max_events: events,
        max_age: age,
        max_bytes: None,
        rules: RetentionRules::default(),
    };
    let rules = rules
        .iter()
        .map(|r| RetentionRule::parse(r, &global).unwrap())
        .collect();
    Retention {
        rules: RetentionRules::new(rules).unwrap(),
        ..global
    }
}

fn to(topics: &[&str], data: impl Into<String>) -> Message {
    let mut m = Message::to_topic(Topic::new(topics[0]).unwrap()).data(data.into());
    m.targets.topics = topics.iter().map(|t| Topic::new(t).unwrap()).collect();
    m
}

/// Every event of a read from `from` to the end, following `read` chunk by chunk.
async fn read_all(h: &Arc<dyn History>, from: ReadFrom) -> (Option<Gap>, Vec<Arc<Event>>) {
    let mut chunk = h.read(from, 64).await.unwrap();
    let gap = chunk.gap;
    let mut all = Vec::new();
    loop {
        let last = chunk.events.last().map(|e| e.id);
        all.append(&mut chunk.events);
        match last {
            Some(last) => chunk = h.read(ReadFrom::After(last), 64).await.unwrap(),
            None => return (gap, all),
        }
    }
}

/// The retention-rule cases, for every store.
pub(crate) async fn run_rules<F, Fut>(make: &F)
where
    F: Fn(Retention, u64) -> Fut,
    Fut: Future<Output = Arc<dyn History>>,
{
    a_burst_on_other_topics_keeps_a_ruled_topic(
        &make(with_rules(10, None, &["ai/**:events=50"]), 20_000).await,
    )
    .await;
    a_rule_age_expires_its_events(&make(with_rules(100, None, &["ai/**:age=150ms"]), 30_000).await)
        .await;
    an_event_of_a_ruled_and_an_unruled_topic_is_read_once(
        &make(with_rules(3, None, &["ai/**"]), 40_000).await,
    )
    .await;
    after_complete_expires_a_finished_stream(
        &make(
            with_rules(100, None, &["ai/**:after-complete=150ms"]),
            50_000,
        )
        .await,
    )
    .await;
    a_dropped_event_of_two_topics_is_a_gap_for_a_reader_of_either(
        &make(with_rules(100, None, &["ai/**:events=2"]), 60_000).await,
    )
    .await;
}

/// An event to a ruled and an unruled topic lives in the rule's log; when that log drops it, a
/// reader of only the unruled topic (whose selectors do not reach the rule's log) is told.
async fn a_dropped_event_of_two_topics_is_a_gap_for_a_reader_of_either(h: &Arc<dyn History>) {
    let before = h.append(vec![to(&["news/x"], "before")]).await.unwrap();
    h.append(vec![to(&["ai/a", "news/x"], "both")])
        .await
        .unwrap();
    h.append(vec![to(&["ai/b"], "b1"), to(&["ai/b"], "b2")])
        .await
        .unwrap();
    h.maintain().await.unwrap();
    let news = h.interest(&[Selector::new("news/x").unwrap()]);
    let c = h
        .read_for(ReadFrom::After(before[0].id), 100, news)
        .await
        .unwrap();
    assert!(c.gap.is_some(), "the news reader missed `both`: {c:?}");
    let data: Vec<&str> = c.events.iter().map(|e| e.data.as_str()).collect();
    assert_eq!(data, ["b1", "b2"], "what is kept after its id");
}

async fn a_burst_on_other_topics_keeps_a_ruled_topic(h: &Arc<dyn History>) {
    let mut answer = Vec::new();
    for i in 0..30 {
        answer.extend(
            h.append(vec![to(&["ai/answer/1"], format!("t{i}"))])
                .await
                .unwrap(),
        );
    }
    let mut burst = Vec::new();
    for b in 0..4 {
        let batch = (0..50)
            .map(|i| to(&["news/x"], format!("n{b}.{i}")))
            .collect();
        burst.extend(h.append(batch).await.unwrap());
    }
    let (gap, all) = read_all(h, ReadFrom::Oldest).await;
    assert_eq!(gap, None);
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "in id order");
    let kept: Vec<EventId> = all
        .iter()
        .filter(|e| e.targets.topics[0].as_str() == "ai/answer/1")
        .map(|e| e.id)
        .collect();
    let sent: Vec<EventId> = answer.iter().map(|e| e.id).collect();
    assert_eq!(kept, sent, "every event of the ruled topic is kept");
    let news: Vec<EventId> = all.iter().skip(30).map(|e| e.id).collect();
    let newest: Vec<EventId> = burst[190..].iter().map(|e| e.id).collect();
    assert_eq!(news, newest, "the others keep the global bound");
    // A reader of the ruled topic resuming in the middle misses nothing: no gap for it.
    let ai = h.interest(&[Selector::new("ai/answer/1").unwrap()]);
    let c = h.read_for(ReadFrom::After(sent[9]), 100, ai).await.unwrap();
    assert_eq!(c.gap, None);
    assert_eq!(c.events.first().map(|e| e.id), Some(sent[10]));
    assert_eq!(c.events.len(), 20 + 10);
    // A reader of everything missed the dropped news: a gap, then what is kept after its id.
    let c = h.read(ReadFrom::After(sent[9]), 100).await.unwrap();
    assert_eq!(
        c.gap,
        Some(Gap {
            oldest: Some(sent[10])
        })
    );
    assert_eq!(c.events.len(), 30);
    let news = h.interest(&[Selector::new("news/*").unwrap()]);
    let c = h
        .read_for(ReadFrom::After(sent[29]), 100, news)
        .await
        .unwrap();
    assert!(c.gap.is_some(), "a reader of the trimmed topics is told");
    // A replay from the oldest goes on, chunk by chunk, past what was dropped before it began.
    let first = h.read_for(ReadFrom::Oldest, 20, news).await.unwrap();
    assert_eq!(ids_of(&first), sent[..20].to_vec());
    let on = news.after_drops(first.drops);
    let c = h
        .read_for(ReadFrom::After(sent[19]), 100, on)
        .await
        .unwrap();
    assert_eq!((c.gap, c.events.len()), (None, 20));
    // Drops after that first read count again.
    let late = (0..10)
        .map(|i| to(&["news/x"], format!("late{i}")))
        .collect();
    h.append(late).await.unwrap();
    let c = h
        .read_for(ReadFrom::After(sent[19]), 100, on)
        .await
        .unwrap();
    assert!(c.gap.is_some(), "news dropped during the replay");
    // A broadcast dropped is a gap for every reader.
    let mut bursts = Vec::new();
    for i in 0..12 {
        let b = Message::broadcast().data(format!("b{i}"));
        bursts.extend(h.append(vec![b]).await.unwrap());
    }
    let c = h
        .read_for(ReadFrom::After(sent[29]), 100, ai)
        .await
        .unwrap();
    assert!(
        c.gap.is_some(),
        "dropped broadcasts count against every reader"
    );
}

async fn a_rule_age_expires_its_events(h: &Arc<dyn History>) {
    let old = h.append(vec![to(&["ai/a"], "old")]).await.unwrap();
    let news = h.append(vec![to(&["news"], "kept")]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.maintain().await.unwrap();
    let (gap, all) = read_all(h, ReadFrom::Oldest).await;
    let ids: Vec<EventId> = all.iter().map(|e| e.id).collect();
    assert_eq!(
        (gap, ids),
        (None, vec![news[0].id]),
        "the ruled event aged out"
    );
    let fresh = h.append(vec![to(&["ai/a"], "fresh")]).await.unwrap();
    let ai = h.interest(&[Selector::new("ai/a").unwrap()]);
    let c = h
        .read_for(ReadFrom::After(EventId(old[0].id.0 - 1)), 10, ai)
        .await
        .unwrap();
    assert_eq!(c.gap.map(|g| g.oldest), Some(Some(news[0].id)));
    let c = h
        .read_for(ReadFrom::After(news[0].id), 10, ai)
        .await
        .unwrap();
    assert_eq!((c.gap, ids_of(&c)), (None, vec![fresh[0].id]));
}

fn ids_of(c: &Chunk) -> Vec<EventId> {
    c.events.iter().map(|e| e.id).collect()
}

async fn an_event_of_a_ruled_and_an_unruled_topic_is_read_once(h: &Arc<dyn History>) {
    let mut sent = Vec::new();
    sent.extend(h.append(vec![to(&["news"], "n0")]).await.unwrap());
    sent.extend(h.append(vec![to(&["ai/x", "news"], "both")]).await.unwrap());
    sent.extend(
        h.append(vec![to(&["ai/x"], "a1"), to(&["news"], "n1")])
            .await
            .unwrap(),
    );
    sent.extend(
        h.append(vec![to(&["news", "ai/x"], "both again")])
            .await
            .unwrap(),
    );
    let (gap, all) = read_all(h, ReadFrom::Oldest).await;
    let data: Vec<&str> = all.iter().map(|e| e.data.as_str()).collect();
    assert_eq!(gap, None);
    assert_eq!(data, ["n0", "both", "a1", "n1", "both again"]);
    // A burst on news trims the default log, not the events that also name ai/x.
    for i in 0..5 {
        h.append(vec![to(&["news"], format!("m{i}"))])
            .await
            .unwrap();
    }
    let (_, all) = read_all(h, ReadFrom::Oldest).await;
    let data: Vec<&str> = all.iter().map(|e| e.data.as_str()).collect();
    assert_eq!(data, ["both", "a1", "both again", "m2", "m3", "m4"]);
    let both = h.interest(&[
        Selector::new("ai/x").unwrap(),
        Selector::new("news").unwrap(),
    ]);
    let c = h
        .read_for(ReadFrom::After(sent[0].id), 100, both)
        .await
        .unwrap();
    assert!(c.gap.is_some(), "news events were dropped after n0");
    assert_eq!(c.events.len(), 6);
}

async fn after_complete_expires_a_finished_stream(h: &Arc<dyn History>) {
    let a = Topic::new("ai/a").unwrap();
    h.append(vec![to(&["ai/a"], "a token")]).await.unwrap();
    let running = h.append(vec![to(&["ai/b"], "b token")]).await.unwrap();
    h.append(vec![
        Message::to_topic(a.clone()).data("a2"),
        Message::to_topic(a).event(EventType::complete()).data("{}"),
    ])
    .await
    .unwrap();
    let (_, all) = read_all(h, ReadFrom::Oldest).await;
    assert_eq!(all.len(), 4, "a finished stream stays for after-complete");
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.maintain().await.unwrap();
    let (_, all) = read_all(h, ReadFrom::Oldest).await;
    let data: Vec<&str> = all.iter().map(|e| e.data.as_str()).collect();
    // ai/a's first token goes; the running ai/b holds the rest of the log behind it.
    assert_eq!(data, ["b token", "a2", "{}"]);
    h.append(vec![
        Message::to_topic(Topic::new("ai/b").unwrap())
            .event(EventType::cancel())
            .data("{}"),
    ])
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.maintain().await.unwrap();
    let (gap, all) = read_all(h, ReadFrom::Oldest).await;
    assert_eq!(
        (gap, all.len()),
        (None, 0),
        "both finished streams are gone"
    );
    let c = h.read(ReadFrom::After(running[0].id), 10).await.unwrap();
    assert!(c.gap.is_some());
}

async fn rule_byte_bound(h: &Arc<dyn History>) {
    let big = |i: usize| to(&["ai/big"], format!("{i}:{}", "x".repeat(900)));
    for i in 0..20 {
        h.append(vec![big(i)]).await.unwrap();
    }
    h.append(vec![to(&["news"], "small")]).await.unwrap();
    let (_, all) = read_all(h, ReadFrom::Oldest).await;
    let ruled = all.iter().filter(|e| e.data.len() > 900).count();
    assert!((1..5).contains(&ruled), "kept {ruled}");
    assert_eq!(all.last().map(|e| e.data.as_str()), Some("small"));
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
                rules: RetentionRules::default(),
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
