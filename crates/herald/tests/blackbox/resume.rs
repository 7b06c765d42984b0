//! Resuming with `Last-Event-ID`: replay without loss or duplicates (also while publishing goes on),
//! `herald.gap` when history cannot cover the id, and slow connections catching up from history.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::Server;

async fn publish_n(s: &Server, topic: &str, range: std::ops::Range<usize>) -> Vec<String> {
    let mut ids = Vec::new();
    for i in range {
        ids.push(
            s.publish(json!({"topic": topic, "data": i.to_string()}))
                .await,
        );
    }
    ids
}

fn numbers(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| i.to_string()).collect()
}

#[tokio::test]
async fn resume_replays_what_this_connection_would_have_received() {
    let s = Server::start(&[]).await;
    let ids = publish_n(&s, "r", 0..30).await;
    // Interleave events for others: they must not be replayed.
    s.publish(json!({"topic": "other", "data": "not mine"}))
        .await;
    s.publish(json!({"users": ["someone"], "data": "not mine"}))
        .await;
    s.publish(json!({"users": ["me"], "data": "mine"})).await;
    let mut sse = s
        .subscribe_with("topic=r&user=me", &[("last-event-id", &ids[19])])
        .await;
    let mut want = numbers(20..30);
    want.push("mine".into());
    assert_eq!(sse.next_data(11).await, want);
    // Then live.
    s.publish(json!({"topic": "r", "data": "live"})).await;
    let e = sse.next().await;
    assert_eq!(e.data, "live");
    assert_eq!(s.get("/stats").await.1["gaps"], 0);
}

#[tokio::test]
async fn header_wins_over_query_and_empty_counts_as_none() {
    let s = Server::start(&[]).await;
    let ids = publish_n(&s, "q", 0..5).await;
    let mut by_query = s
        .subscribe(&format!("topic=q&lastEventId={}", ids[2]))
        .await;
    assert_eq!(by_query.next_data(2).await, ["3", "4"]);
    let mut both = s
        .subscribe_with(
            &format!("topic=q&lastEventId={}", ids[0]),
            &[("last-event-id", &ids[3])],
        )
        .await;
    assert_eq!(both.next().await.data, "4");
    let mut empty = s.subscribe_with("topic=q", &[("last-event-id", "")]).await;
    s.publish(json!({"topic": "q", "data": "live"})).await;
    assert_eq!(
        empty.next().await.data,
        "live",
        "empty Last-Event-ID replays nothing"
    );
    assert_eq!(both.next().await.data, "live");
}

#[tokio::test]
async fn resume_under_concurrent_publishing_loses_and_repeats_nothing() {
    const N: usize = 1500;
    let s = Server::start(&[]).await;
    let mut first = s.subscribe("topic=flow").await;
    first.opened().await;
    let url = s.url.clone();
    let publisher = tokio::spawn(async move {
        let http = crate::common::http_client();
        for i in 0..N {
            let r = http
                .post(format!("{url}/publish"))
                .json(&json!({"topic": "flow", "data": i.to_string()}))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
        }
    });
    let mut got: Vec<String> = Vec::new();
    let mut last_id = None;
    let mut sse = first;
    let mut reconnects = 0;
    while got.len() < N {
        // Read a varying number of events, then drop the connection and resume.
        let take = 17 + (reconnects * 13) % 61;
        for _ in 0..take {
            if got.len() == N {
                break;
            }
            let e = sse.next().await;
            assert_ne!(e.event_type, "herald.gap", "no gap expected: {e:?}");
            got.push(e.data);
            last_id = e.id;
        }
        drop(sse);
        reconnects += 1;
        let id = last_id.clone().expect("an id");
        sse = s
            .subscribe_with("topic=flow", &[("last-event-id", &id)])
            .await;
    }
    publisher.await.unwrap();
    assert!(reconnects > 10);
    assert_eq!(got, numbers(0..N), "every event exactly once, in order");
}

#[tokio::test]
async fn gap_when_the_id_is_older_than_history_or_unknown() {
    let s = Server::start(&["--history", "10"]).await;
    let ids = publish_n(&s, "g", 0..30).await;
    // Retained: 20..30. Resuming after event 5 misses 6..20.
    let mut sse = s
        .subscribe_with("topic=g", &[("last-event-id", &ids[5])])
        .await;
    let gap = sse.next().await;
    assert_eq!(gap.event_type, "herald.gap");
    assert_eq!(gap.id, None, "herald.gap carries no id");
    let info: Value = serde_json::from_str(&gap.data).unwrap();
    assert_eq!(info, json!({"lastEventId": ids[5], "oldest": ids[20]}));
    assert_eq!(sse.next_data(10).await, numbers(20..30));

    // Just before the oldest retained event: not a gap.
    let mut sse = s
        .subscribe_with("topic=g", &[("last-event-id", &ids[19])])
        .await;
    let e = sse.next().await;
    assert_eq!(e.data, "20");
    // The newest id: nothing to replay, no gap.
    let mut newest = s
        .subscribe_with("topic=g", &[("last-event-id", &ids[29])])
        .await;
    s.publish(json!({"topic": "g", "data": "live"})).await;
    assert_eq!(newest.next().await.data, "live");

    // An id this hub never wrote.
    for unknown in ["not-an-id", "99999999999999999"] {
        let mut sse = s
            .subscribe_with("topic=g", &[("last-event-id", unknown)])
            .await;
        let gap = sse.next().await;
        assert_eq!(gap.event_type, "herald.gap", "for {unknown}");
        let info: Value = serde_json::from_str(&gap.data).unwrap();
        assert_eq!(info["lastEventId"], unknown);
        assert_eq!(info["oldest"], ids[21]);
        let mut want = numbers(21..30);
        want.push("live".into());
        assert_eq!(sse.next_data(10).await, want);
    }
    assert_eq!(s.get("/stats").await.1["gaps"], 3);
}

#[tokio::test]
async fn gap_on_an_empty_history_names_no_oldest() {
    let s = Server::start(&[]).await;
    let mut sse = s
        .subscribe_with("topic=x", &[("last-event-id", "12345")])
        .await;
    let gap = sse.next().await;
    assert_eq!(gap.event_type, "herald.gap");
    let info: Value = serde_json::from_str(&gap.data).unwrap();
    assert_eq!(info, json!({"lastEventId": "12345", "oldest": null}));
}

/// A connection that stops reading fills its socket and then its bounded queue; the publisher
/// does not wait for it, and when it reads again it catches up from history, losing nothing.
#[tokio::test]
async fn a_stalled_subscriber_catches_up_from_history() {
    let s = Server::start(&["--queue", "4", "--history", "1000", "--max-body", "200000"]).await;
    let mut stalled = s.subscribe("topic=big").await;
    stalled.opened().await;
    let payload = "x".repeat(60_000);
    for i in 0..200 {
        s.publish(json!({"topic": "big", "data": format!("{i}:{payload}")}))
            .await;
    }
    let (_, stats) = s.get("/stats").await;
    assert!(
        stats["lagging"].as_u64().unwrap() >= 1,
        "the stalled connection lags: {stats}"
    );
    for i in 0..200 {
        let e = stalled.next().await;
        assert_ne!(e.event_type, "herald.gap");
        let (n, rest) = e.data.split_once(':').unwrap();
        assert_eq!(n, i.to_string());
        assert_eq!(rest.len(), payload.len());
    }
    let (_, stats) = s.get("/stats").await;
    assert!(
        stats["replayed"].as_u64().unwrap() > 0,
        "caught up from history: {stats}"
    );
    assert_eq!(stats["lagging"], 0);
    assert_eq!(stats["gaps"], 0);
}

/// When the stalled connection falls out of history too, it gets `herald.gap` naming the last id
/// it received, then what history still has, in order.
#[tokio::test]
async fn a_subscriber_that_falls_out_of_history_gets_a_gap() {
    let s = Server::start(&["--queue", "4", "--history", "20", "--max-body", "200000"]).await;
    let mut stalled = s.subscribe("topic=big").await;
    stalled.opened().await;
    let payload = "y".repeat(60_000);
    let mut ids = Vec::new();
    for i in 0..200 {
        ids.push(
            s.publish(json!({"topic": "big", "data": format!("{i}:{payload}")}))
                .await,
        );
    }
    let mut seen: Vec<usize> = Vec::new();
    let mut last_id = None;
    let gap = loop {
        let e = stalled.next().await;
        if e.event_type == "herald.gap" {
            break e;
        }
        seen.push(e.data.split_once(':').unwrap().0.parse().unwrap());
        last_id = e.id;
    };
    assert_eq!(
        seen,
        (0..seen.len()).collect::<Vec<_>>(),
        "in order before the gap"
    );
    let info: Value = serde_json::from_str(&gap.data).unwrap();
    assert_eq!(info["lastEventId"].as_str(), last_id.as_deref());
    let oldest = info["oldest"].as_str().unwrap().to_string();
    let mut after: Vec<usize> = Vec::new();
    while let Some(e) = stalled.next_within(Duration::from_millis(500)).await {
        after.push(e.data.split_once(':').unwrap().0.parse().unwrap());
    }
    let first = ids.iter().position(|id| *id == oldest).unwrap();
    assert_eq!(
        after,
        (first..200).collect::<Vec<_>>(),
        "history after the gap, in order"
    );
}

#[tokio::test]
async fn a_non_ascii_last_event_id_is_an_unknown_id() {
    let s = Server::start(&[]).await;
    s.publish(json!({"topic": "n", "data": "kept"})).await;
    let r = s
        .http()
        .get(format!("{}/events?topic=n", s.url))
        .header(
            "last-event-id",
            reqwest::header::HeaderValue::from_bytes("idé".as_bytes()).unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    let mut sse = crate::common::Sse::new(r);
    assert_eq!(sse.next().await.event_type, "herald.gap");
    assert_eq!(sse.next().await.data, "kept");
}

/// Closing a user whose connection overflowed still delivers everything before `herald.close`.
#[tokio::test]
async fn closing_a_lagging_connection_delivers_what_it_missed_first() {
    let s = Server::start(&["--queue", "4", "--history", "1000", "--max-body", "200000"]).await;
    let mut stalled = s.subscribe("user=slow").await;
    stalled.opened().await;
    let payload = "w".repeat(60_000);
    for i in 0..150 {
        s.publish(json!({"users": ["slow"], "data": format!("{i}:{payload}")}))
            .await;
    }
    let (_, v) = s.delete("/users/slow/connections?reason=bye").await;
    assert_eq!(v["closed"], 1);
    for i in 0..150 {
        let e = stalled.next().await;
        assert_eq!(
            e.data.split_once(':').map(|(n, _)| n),
            Some(i.to_string().as_str())
        );
    }
    assert_eq!(stalled.next().await.event_type, "herald.close");
}
