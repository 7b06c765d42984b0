//! Retention per topic (issue 16): a `--retention` rule keeps its topics' events through a burst
//! on other topics, in the memory, durable and Redis stores, replayed whole and in order; a bad
//! rule stops startup naming it; a rule's age expires its events; an event naming a ruled and an
//! unruled topic is replayed once, in order, to a subscriber of both.

use std::time::Duration;

use serde_json::{Value, json};

use crate::cluster::{Redis, node};
use crate::common::{Server, Sse, refused};

/// Publishes `n` messages to `topic(i)` in batches, in order.
async fn publish_many(s: &Server, n: usize, topic: impl Fn(usize) -> String, data: &str) {
    let mut i = 0;
    while i < n {
        let end = (i + 500).min(n);
        let batch: Vec<Value> = (i..end)
            .map(|k| json!({"topic": topic(k), "data": format!("{data}{k}")}))
            .collect();
        let (status, answer) = s.post_json("/publish", &json!(batch)).await;
        assert_eq!(status, 200, "{answer}");
        i = end;
    }
}

/// The next `n` events of `sse`, failing on a `herald.gap`: (id, data).
async fn events(sse: &mut Sse, n: usize) -> Vec<(u64, String)> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let e = sse.next().await;
        assert_ne!(e.event_type, "herald.gap", "unexpected gap: {}", e.data);
        out.push((e.id.expect("an id").parse().unwrap(), e.data));
    }
    out
}

/// The case: `--history 1000`, a rule keeping 5000 events of `ai/**`; 500 events to
/// `ai/answer/1`, then 20000 to other topics; `since=all` on `ai/answer/1` still returns all 500,
/// in order, and a reader resuming in the middle gets the rest without a gap.
async fn a_burst_keeps_the_answer(s: &Server) {
    publish_many(s, 500, |_| "ai/answer/1".into(), "t").await;
    publish_many(s, 20_000, |k| format!("news/{}", k % 7), "n").await;
    let mut sse = s.subscribe("topic=ai/answer/1&since=all").await;
    let got = events(&mut sse, 500).await;
    let data: Vec<String> = got.iter().map(|(_, d)| d.clone()).collect();
    let sent: Vec<String> = (0..500).map(|k| format!("t{k}")).collect();
    assert_eq!(data, sent, "every token, in order");
    assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "ids increase");
    assert!(
        sse.next_within(Duration::from_millis(300)).await.is_none(),
        "nothing more"
    );
    let middle = got[249].0.to_string();
    let mut resumed = s
        .subscribe_with("topic=ai/answer/1", &[("Last-Event-ID", &middle)])
        .await;
    let rest = events(&mut resumed, 250).await;
    assert_eq!(rest.first().map(|(_, d)| d.as_str()), Some("t250"));
    assert_eq!(rest.last().map(|(_, d)| d.as_str()), Some("t499"));
    // The others kept the global bound: the oldest news are gone, so their readers get a gap.
    let mut news = s.subscribe("topic=news/*&since=all").await;
    let first = news.next().await;
    assert_eq!(first.data, "n19000", "the newest 1000 of the others");
    let mut late = s
        .subscribe_with("topic=news/*", &[("Last-Event-ID", &middle)])
        .await;
    assert_eq!(late.next().await.event_type, "herald.gap");
}

const RULE: [&str; 4] = ["--history", "1000", "--retention", "ai/**:events=5000"];

#[tokio::test]
async fn a_rule_keeps_a_topic_through_a_burst_in_memory() {
    let s = Server::start(&RULE).await;
    a_burst_keeps_the_answer(&s).await;
}

#[tokio::test]
async fn a_rule_keeps_a_topic_through_a_burst_on_disk_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let mut args = RULE.to_vec();
    args.extend(["--data-dir", data_dir]);
    let s = Server::start(&args).await;
    a_burst_keeps_the_answer(&s).await;
    s.kill().await;
    let s = Server::start(&args).await;
    let mut sse = s.subscribe("topic=ai/answer/1&since=all").await;
    assert_eq!(events(&mut sse, 500).await[499].1, "t499");
    s.kill().await;
    // Started without the rule, the answer is the default log's again: the global bound trims it.
    let s = Server::start(&["--history", "1000", "--data-dir", data_dir]).await;
    publish_many(&s, 1, |_| "news/x".into(), "after").await;
    let mut sse = s.subscribe("topic=ai/answer/1&since=all").await;
    assert!(
        sse.next_within(Duration::from_millis(500)).await.is_none(),
        "the answer was the oldest of 1501 events"
    );
}

#[tokio::test]
async fn a_rule_keeps_a_topic_through_a_burst_in_redis() {
    let redis = Redis::start();
    let s = node(&redis, &RULE).await;
    a_burst_keeps_the_answer(&s).await;
    // Another node on the same Redis replays the same.
    let other = node(&redis, &RULE).await;
    let mut sse = other.subscribe("topic=ai/answer/1&since=all").await;
    assert_eq!(events(&mut sse, 500).await[0].1, "t0");
}

#[tokio::test]
async fn a_bad_rule_stops_startup_naming_it() {
    for (rule, says) in [
        ("ai/**:events=0", "events must be a whole number"),
        ("ai/**:age=soon", "age"),
        ("ai/**:keep=5", "unknown key 'keep'"),
        ("a//b:events=5", "is not a topic selector"),
    ] {
        let err = refused(&["--retention", rule]).await;
        assert!(
            err.contains("retention") && err.contains(rule) && err.contains(says),
            "{rule}: {err}"
        );
    }
    let err = refused(&["--retention", "ai/**", "--retention", "ai/**:events=3"]).await;
    assert!(err.contains("given twice"), "{err}");
    let err = refused(&[
        "--redis",
        "redis://127.0.0.1:1/0",
        "--retention",
        "ai/**:bytes=1000",
    ])
    .await;
    assert!(
        err.contains("ai/**") && err.contains("bytes is not supported with Redis"),
        "{err}"
    );
    // The same rules in TOML.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("herald.toml");
    std::fs::write(&file, "[[retention]]\ntopics = \"ai/**\"\nkeep = 5\n").unwrap();
    let err = refused(&["--config", file.to_str().unwrap()]).await;
    assert!(
        err.contains("unknown key 'keep'") && err.contains("ai/**"),
        "{err}"
    );
    std::fs::write(&file, "[[retention]]\nevents = 5\n").unwrap();
    let err = refused(&["--config", file.to_str().unwrap()]).await;
    assert!(err.contains("topics"), "{err}");
}

#[tokio::test]
async fn rules_from_toml_and_env_apply() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("herald.toml");
    std::fs::write(
        &file,
        "history = 5\n\n[[retention]]\ntopics = \"ai/**\"\nevents = 100\nage = \"1h\"\nafter-complete = \"10m\"\n",
    )
    .unwrap();
    let s = Server::start(&["--config", file.to_str().unwrap()]).await;
    publish_many(&s, 20, |_| "ai/a".into(), "t").await;
    publish_many(&s, 50, |_| "news".into(), "n").await;
    let mut sse = s.subscribe("topic=ai/a&since=all").await;
    assert_eq!(events(&mut sse, 20).await[19].1, "t19");
    let s = Server::start_with_env(
        &["--history", "5"],
        &[("HERALD_RETENTION", "ai/**:events=100,age=1h")],
    )
    .await;
    publish_many(&s, 20, |_| "ai/a".into(), "t").await;
    publish_many(&s, 50, |_| "news".into(), "n").await;
    let mut sse = s.subscribe("topic=ai/a&since=all").await;
    assert_eq!(events(&mut sse, 20).await[0].1, "t0");
}

#[tokio::test]
async fn a_rules_age_expires_its_events() {
    let s = Server::start(&["--history", "1000", "--retention", "ai/**:age=1s"]).await;
    publish_many(&s, 3, |_| "ai/x".into(), "old").await;
    publish_many(&s, 1, |_| "news".into(), "kept").await;
    // Older than the rule's age by then; the next publish trims every log.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    publish_many(&s, 1, |_| "news".into(), "marker").await;
    let mut sse = s.subscribe("topic=ai/x&topic=news&since=all").await;
    let got = events(&mut sse, 2).await;
    let data: Vec<&str> = got.iter().map(|(_, d)| d.as_str()).collect();
    assert_eq!(data, ["kept0", "marker0"]);
}

#[tokio::test]
async fn an_event_of_a_ruled_and_an_unruled_topic_is_replayed_once_in_order() {
    let s = Server::start(&["--history", "3", "--retention", "ai/**"]).await;
    let both = json!({"topics": ["ai/x", "news"], "data": "both"});
    publish_many(&s, 2, |_| "news".into(), "before").await;
    s.publish(both).await;
    publish_many(&s, 1, |_| "ai/x".into(), "ai").await;
    publish_many(&s, 10, |_| "news".into(), "after").await;
    let mut sse = s.subscribe("topic=ai/x&topic=news&since=all").await;
    let got = events(&mut sse, 5).await;
    let data: Vec<&str> = got.iter().map(|(_, d)| d.as_str()).collect();
    assert_eq!(data, ["both", "ai0", "after7", "after8", "after9"]);
    assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "ids increase");
    assert!(sse.next_within(Duration::from_millis(300)).await.is_none());
    // A subscriber of the ruled topic alone resumes after "both" without a gap.
    let after_both = got[0].0.to_string();
    let mut ai = s
        .subscribe_with("topic=ai/x", &[("Last-Event-ID", &after_both)])
        .await;
    let e = ai.next().await;
    assert_eq!((e.event_type.as_str(), e.data.as_str()), ("message", "ai0"));
}

/// Redis records the rules its history is kept by: a node with other rules (another node, or a
/// restart with changed rules) is refused, naming both, while the history holds events; on an
/// empty history the node's rules are recorded in their place.
#[tokio::test]
async fn a_node_with_other_rules_than_redis_records_is_refused_naming_both() {
    let redis = Redis::start();
    let url = redis.url();
    let first = node(&redis, &RULE).await;
    publish_many(&first, 3, |_| "ai/a".into(), "t").await;
    for (args, ours) in [
        (
            vec!["--history", "1000", "--retention", "ai/**:events=10"],
            "'ai/**:events=10'",
        ),
        (
            vec![
                "--history",
                "1000",
                "--retention",
                "jobs/*",
                "--retention",
                "ai/**:events=5000",
            ],
            "'jobs/*:events=1000' 'ai/**:events=5000'",
        ),
        (vec!["--history", "1000"], "this node none"),
    ] {
        let mut all = vec!["--redis", url.as_str()];
        all.extend(args);
        let err = refused(&all).await;
        assert!(
            err.contains("other retention rules")
                && err.contains("recorded 'ai/**:events=5000'")
                && err.contains(ours)
                && err.contains("--redis-prefix"),
            "{all:?}: {err}"
        );
    }
    // A restart with the same rules starts and replays what the first node kept.
    first.kill().await;
    let again = node(&redis, &RULE).await;
    let mut sse = again.subscribe("topic=ai/a&since=all").await;
    assert_eq!(events(&mut sse, 3).await[2].1, "t2");
    again.kill().await;

    // On an empty history (another prefix) a node's rules replace the recorded ones.
    let empty = ["--redis-prefix", "empty", "--history", "1000"];
    let one = node(&redis, &[&empty[..], &["--retention", "ai/**"]].concat()).await;
    one.kill().await;
    let changed = [&empty[..], &["--retention", "jobs/*:events=5"]].concat();
    let two = node(&redis, &changed).await;
    publish_many(&two, 1, |_| "jobs/1".into(), "j").await;
    let mut all = vec!["--redis", url.as_str()];
    all.extend([&empty[..], &["--retention", "ai/**"]].concat());
    let err = refused(&all).await;
    assert!(
        err.contains("recorded 'jobs/*:events=5'") && err.contains("this node 'ai/**:events=1000'"),
        "{err}"
    );
}
