//! Finite streams in the engine (issue 16): a `herald.cancel` fanned out fires the watches of
//! its topics (and only those), and `Hub::is_completion` recognises a topic's `herald.complete`.

use std::time::Duration;

use herald_core::{EventType, Hub, Message, Topic};

fn topic(s: &str) -> Topic {
    Topic::new(s).unwrap()
}

#[tokio::test]
async fn a_cancel_fires_the_watches_of_its_topic_only() {
    let hub = Hub::builder().build().unwrap();
    let mut mine = hub.watch_cancel(vec![topic("ai/1")]);
    let mut other = hub.watch_cancel(vec![topic("ai/2")]);
    hub.publish(Message::to_topic(topic("ai/1")).data("token"))
        .await
        .unwrap();
    let early = tokio::time::timeout(Duration::from_millis(50), mine.cancelled()).await;
    assert!(early.is_err(), "an ordinary event must not cancel");
    let cancel = hub
        .publish(
            Message::to_topic(topic("ai/1"))
                .event(EventType::cancel())
                .data("{}"),
        )
        .await
        .unwrap();
    let fired = tokio::time::timeout(Duration::from_secs(5), mine.cancelled())
        .await
        .expect("the watch fires");
    assert_eq!(fired, cancel.id);
    let untouched = tokio::time::timeout(Duration::from_millis(50), other.cancelled()).await;
    assert!(untouched.is_err(), "a cancel on ai/1 must not fire ai/2");
    drop(other);
    // A watch made after the cancel does not see it: only cancels that come later count.
    let mut late = hub.watch_cancel(vec![topic("ai/1")]);
    let none = tokio::time::timeout(Duration::from_millis(50), late.cancelled()).await;
    assert!(none.is_err());
}

#[tokio::test]
async fn a_completion_is_recognised_by_its_id_and_topic() {
    let hub = Hub::builder().build().unwrap();
    let token = hub
        .publish(Message::to_topic(topic("ai/1")).data("x"))
        .await
        .unwrap();
    let done = hub
        .publish(
            Message::to_topic(topic("ai/1"))
                .event(EventType::complete())
                .data("{}"),
        )
        .await
        .unwrap();
    assert!(hub.is_completion(&topic("ai/1"), done.id).await.unwrap());
    assert!(!hub.is_completion(&topic("ai/2"), done.id).await.unwrap());
    assert!(!hub.is_completion(&topic("ai/1"), token.id).await.unwrap());
    let never = herald_core::EventId(done.id.0 + 10);
    assert!(!hub.is_completion(&topic("ai/1"), never).await.unwrap());
}
