//! Redis Sentinel failover with real processes: a primary, a replica and a sentinel (see
//! `redis_servers`), herald nodes reaching them with `redis+sentinel://`. Acknowledged events
//! survive a failover (with `--redis-replicas 1`), or their loss is announced (`herald.gap`, with
//! 0) on every node, through the rewind marker; presence and closing a user work on the new
//! primary; bad configurations fail clearly.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{PATIENCE, Server, Sse, expect_error, free_port, http_client};
use crate::redis_servers::{FAILOVER_PATIENCE, Keeps, Redis, Sentinels, cli, node};

/// How many events a burst publishes.
const N: usize = 60;

/// Acknowledged `(data, id)` pairs, in order.
type Acked = Arc<Mutex<Vec<(String, String)>>>;

async fn sentinel_node(set: &Sentinels, extra: &[&str]) -> Server {
    node(&set.url(), extra).await
}

/// Publishes `m0…m{n-1}` one after another, each with its idempotency key, retrying a refusal
/// with the same key until it is acknowledged. Returns (data → acknowledged id, refusals).
fn publish_with_retries(
    url: String,
    n: usize,
    pause: Duration,
    acked: Acked,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let http = http_client();
        let mut refused = 0;
        for i in 0..n {
            let body = json!({"topic": "burst", "data": format!("m{i}"), "idempotencyKey": format!("k{i}")});
            let deadline = Instant::now() + FAILOVER_PATIENCE;
            loop {
                let answer = http
                    .post(format!("{url}/publish"))
                    .json(&body)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                match answer {
                    Ok(r) if r.status() == StatusCode::OK => {
                        let v: Value = r.json().await.unwrap();
                        acked
                            .lock()
                            .unwrap()
                            .push((format!("m{i}"), v["id"].as_str().unwrap().to_string()));
                        break;
                    }
                    Ok(r) => {
                        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
                        assert!(r.headers().contains_key("retry-after"));
                        refused += 1;
                    }
                    Err(_) => refused += 1,
                }
                assert!(Instant::now() < deadline, "m{i} was never acknowledged");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(pause).await;
        }
        refused
    })
}

/// Starts publishing a burst of [`N`] events on `node` (see [`publish_with_retries`]), one every
/// `pause`, and returns once a third of them are acknowledged.
async fn a_third_published(
    node: &Server,
    pause: Duration,
) -> (Acked, tokio::task::JoinHandle<usize>) {
    let acked: Acked = Arc::default();
    let publisher = publish_with_retries(node.url.clone(), N, pause, acked.clone());
    let deadline = Instant::now() + PATIENCE * 3;
    while acked.lock().unwrap().len() < N / 3 {
        assert!(Instant::now() < deadline, "publishing did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (acked, publisher)
}

/// What a subscriber that resumes with `Last-Event-ID` saw: `(id, data)` in order, and gaps.
#[derive(Default)]
struct Seen {
    events: Vec<(String, String)>,
    gaps: usize,
}

/// Reads `topic=burst` on `node` until `done` holds for what was seen, reconnecting with the last
/// id whenever the stream ends.
async fn resume_until(node: &Server, first: Sse, done: impl Fn(&Seen) -> bool) -> Seen {
    let mut seen = Seen::default();
    let mut sse = first;
    let mut last: Option<String> = None;
    let deadline = Instant::now() + FAILOVER_PATIENCE * 2;
    while !done(&seen) {
        assert!(
            Instant::now() < deadline,
            "the subscriber did not get everything"
        );
        match sse.next_within(Duration::from_secs(2)).await {
            Some(e) if e.event_type == "herald.gap" => seen.gaps += 1,
            Some(e) if e.event_type == "message" => {
                if let Some(id) = e.id.clone() {
                    last = Some(id.clone());
                    seen.events.push((id, e.data));
                }
            }
            Some(_) => {}
            None => {
                // Ended or quiet: resume from the last id (a quiet stream is reopened harmlessly).
                let headers: Vec<(&str, &str)> = last
                    .as_deref()
                    .map(|l| vec![("last-event-id", l)])
                    .unwrap_or_default();
                let r = node.open_events("topic=burst", &headers).await;
                if r.status() == StatusCode::OK {
                    sse = Sse::new(r);
                } else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    seen
}

#[tokio::test]
async fn a_sentinel_failover_during_a_burst_loses_no_acknowledged_event_with_one_replica() {
    let set = Sentinels::start();
    let a = sentinel_node(&set, &["--redis-replicas", "1"]).await;
    let b = sentinel_node(&set, &["--redis-replicas", "1"]).await;
    let mut sub = b.subscribe("topic=burst").await;
    sub.opened().await;
    // A third in, the sentinel hands the primary to the replica.
    let (acked, publisher) = a_third_published(&a, Duration::from_millis(30)).await;
    set.fail_over().await;
    publisher.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), N);
    let want: BTreeMap<String, String> = acked.iter().cloned().collect();
    let seen = resume_until(&b, sub, |s| {
        let ids: HashSet<&String> = s.events.iter().map(|(id, _)| id).collect();
        want.values().all(|id| ids.contains(id))
    })
    .await;
    // In order, once each, and each payload under its acknowledged id only.
    let ids: Vec<u128> = seen
        .events
        .iter()
        .map(|(id, _)| id.parse().unwrap())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "in order, no duplicates: {:?}",
        seen.events
    );
    for (data, id) in &seen
        .events
        .iter()
        .map(|(i, d)| (d.clone(), i.clone()))
        .collect::<Vec<_>>()
    {
        assert_eq!(
            want.get(data),
            Some(id),
            "{data} arrived under an id never acknowledged"
        );
    }
    assert_eq!(seen.gaps, 0, "nothing acknowledged was lost");
    // The new primary took writes (its replica, the old primary, acknowledges them).
    let (status, _) = a
        .post_json("/publish", &json!({"topic": "burst", "data": "after"}))
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn killing_the_primary_without_replicas_loses_nothing_silently() {
    let mut set = Sentinels::start();
    let a = sentinel_node(&set, &[]).await;
    let mut sub = a.subscribe("topic=burst").await;
    sub.opened().await;
    let (acked, publisher) = a_third_published(&a, Duration::from_millis(20)).await;
    let old = set.primary;
    set.kill(old);
    set.await_primary(set.replica).await;
    publisher.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    let last_acked = acked.last().unwrap().1.clone();
    let seen = resume_until(&a, sub, |s| {
        s.events.iter().any(|(id, _)| *id == last_acked)
    })
    .await;
    let ids: HashSet<&String> = seen.events.iter().map(|(id, _)| id).collect();
    let missing: Vec<&(String, String)> =
        acked.iter().filter(|(_, id)| !ids.contains(id)).collect();
    assert!(
        missing.is_empty() || seen.gaps > 0,
        "acknowledged events missing without a herald.gap: {missing:?}"
    );
}

#[tokio::test]
async fn presence_and_closing_a_user_work_across_a_failover() {
    let set = Sentinels::start();
    let a = sentinel_node(&set, &[]).await;
    let b = sentinel_node(&set, &[]).await;
    let mut on_b = b.subscribe("user=ada").await;
    on_b.opened().await;
    a.eventually("/users/ada", |v| v["connections"] == 1).await;
    set.fail_over().await;
    // Presence comes from the new primary, where every node reports again.
    a.eventually("/stats", |v| v["connections"] == 1).await;
    a.eventually("/users/ada", |v| v["connections"] == 1).await;
    // Closing on one node reaches the other through the new primary's control channel; retried
    // while b's subscription moves over (a close sent before it listens is not replayed).
    let deadline = Instant::now() + FAILOVER_PATIENCE;
    loop {
        let (status, _) = a.delete("/users/ada/connections").await;
        if status == StatusCode::OK {
            let (ended, events) = on_b.ends_within(Duration::from_secs(2)).await;
            if ended {
                assert!(
                    events.iter().any(|e| e.event_type == "herald.close"),
                    "{events:?}"
                );
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "ada's stream on b was never closed"
        );
    }
    a.eventually("/users/ada", |v| v["online"] == false).await;
}

#[tokio::test]
async fn bad_sentinel_configurations_fail_clearly() {
    // No sentinel listening: startup fails naming the addresses.
    let port = free_port();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", "127.0.0.1:0", "--redis"])
        .arg(format!("redis+sentinel://127.0.0.1:{port}/mymaster"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no sentinel answered") && err.contains(&port.to_string()),
        "{err}"
    );
    // A URL without a master name is a configuration error.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--redis", "redis+sentinel://127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no master name"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let set = Sentinels::start();
    // A master the sentinels do not know.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", "127.0.0.1:0", "--redis"])
        .arg(format!(
            "redis+sentinel://127.0.0.1:{}/nosuchmaster",
            set.sentinel
        ))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("know no master named 'nosuchmaster'"), "{err}");
    // More replicas than there are: every publish is refused, not acknowledged.
    let a = sentinel_node(
        &set,
        &["--redis-replicas", "2", "--redis-wait-timeout", "200ms"],
    )
    .await;
    let answer = a
        .post_json(
            "/publish",
            &json!({"topic": "t", "data": "x", "idempotencyKey": "r1"}),
        )
        .await;
    expect_error(answer, StatusCode::SERVICE_UNAVAILABLE, "not_replicated");
    // With one replica it goes through, and the retried key is answered as the same event.
    let b = sentinel_node(&set, &["--redis-replicas", "1"]).await;
    let (status, first) = b
        .post_json(
            "/publish",
            &json!({"topic": "t", "data": "x", "idempotencyKey": "r1"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let (_, again) = b
        .post_json(
            "/publish",
            &json!({"topic": "t", "data": "x", "idempotencyKey": "r1"}),
        )
        .await;
    assert_eq!(
        (again["id"].clone(), again["duplicate"].clone()),
        (first["id"].clone(), json!(true))
    );
    // --redis-replicas needs --redis.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--redis-replicas", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("redis-replicas"));
}

#[tokio::test]
async fn a_stream_that_went_back_is_announced_with_a_gap_and_counted() {
    // A Redis that saves only when told (`SAVE`) and loads that snapshot when restarted: a
    // restart after writes since looks to a node like a replica promoted without the old
    // primary's last writes (a stream that ends before what it fanned out).
    let mut redis = Redis::keeping(Keeps::Snapshot);
    let port = redis.port;
    let a = node(&redis.url(), &[]).await;
    let mut sub = a.subscribe("topic=back").await;
    sub.opened().await;
    for i in 0..3 {
        a.publish(json!({"topic": "back", "data": format!("old{i}")}))
            .await;
        if i == 0 {
            // What the replica had: a snapshot holding old0 only.
            assert_eq!(cli(port, &["SAVE"]), "OK");
        }
    }
    for want in ["old0", "old1", "old2"] {
        assert_eq!(sub.next().await.data, want);
    }
    // The Redis the node finds next holds old0 but not old1 and old2, which it fanned out.
    redis.restart();
    let deadline = Instant::now() + PATIENCE * 3;
    let after = loop {
        let (status, v) = a
            .post_json("/publish", &json!({"topic": "back", "data": "new"}))
            .await;
        if status == StatusCode::OK {
            break v;
        }
        assert!(Instant::now() < deadline, "publishing did not come back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The stream hears of the gap, then goes on with what the new stream holds after the last
    // event that survived (old0, which it had): none of the lost ones, nothing twice.
    let gap = sub.next().await;
    assert_eq!(gap.event_type, "herald.gap", "{gap:?}");
    let next = sub.next().await;
    assert_eq!(
        (next.data.as_str(), next.id.as_deref()),
        ("new", after["id"].as_str())
    );
    assert_eq!(a.metric("herald_history_rewinds_total").await, Some(1.0));
    a.eventually("/stats", |v| v["rewinds"] == 1).await;
}

/// The number of entries of the shared stream on the Redis at `port`.
fn stream_len(port: u16) -> usize {
    cli(port, &["XLEN", "herald:events"]).parse().unwrap_or(0)
}

/// With `--redis-replicas 0` a failover can lose acknowledged events that only one node read.
/// The node that finds its stream went back writes a rewind marker on the new primary, so the
/// other node, which never read the lost events, tells its streams too (before, they went on
/// silently), and resuming from before or inside the lost range answers `herald.gap`.
#[tokio::test]
async fn events_lost_in_a_failover_are_announced_on_every_node() {
    let mut set = Sentinels::start();
    let a = sentinel_node(&set, &[]).await;
    let b = sentinel_node(&set, &[]).await;
    let mut on_a = a.subscribe("topic=lost").await;
    let mut on_b = b.subscribe("topic=lost").await;
    let mut elsewhere_on_b = b.subscribe("topic=elsewhere").await;
    for sse in [&mut on_a, &mut on_b, &mut elsewhere_on_b] {
        sse.opened().await;
    }
    let kept = a.publish(json!({"topic": "lost", "data": "kept"})).await;
    for sse in [&mut on_a, &mut on_b] {
        assert_eq!(sse.next().await.data, "kept");
    }
    let deadline = Instant::now() + PATIENCE;
    while stream_len(set.replica) != stream_len(set.primary) {
        assert!(Instant::now() < deadline, "the replica did not get `kept`");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The replica stops replicating: it cannot authenticate to the primary (which has no password)
    // once its link is cut, so what the primary takes from now on is on the primary only.
    assert_eq!(
        cli(
            set.replica,
            &["CONFIG", "SET", "masterauth", "not-the-password"]
        ),
        "OK"
    );
    cli(set.replica, &["CLIENT", "KILL", "TYPE", "master"]);
    let deadline = Instant::now() + PATIENCE;
    while !cli(set.replica, &["INFO", "replication"]).contains("master_link_status:down") {
        assert!(
            Instant::now() < deadline,
            "the replica's link did not go down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // b reads nothing more from this primary: paused, its connections closed.
    b.signal("STOP");
    cli(set.primary, &["CLIENT", "KILL", "TYPE", "normal"]);
    let mut lost = Vec::new();
    for data in ["lost1", "lost2"] {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (status, v) = a
                .post_json("/publish", &json!({"topic": "lost", "data": data}))
                .await;
            if status == StatusCode::OK {
                lost.push(v["id"].as_str().unwrap().to_string());
                break;
            }
            assert!(Instant::now() < deadline, "{data} was not acknowledged");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let e = on_a.next().await;
        assert_eq!((e.data.as_str(), e.id.as_ref()), (data, lost.last()));
    }
    assert_eq!(stream_len(set.replica) + 2, stream_len(set.primary));
    let old = set.primary;
    set.kill(old);
    set.await_primary(set.replica).await;
    b.signal("CONT");

    // Every stream on both nodes hears of the loss, whatever its topic; b never had the events.
    for sse in [&mut on_a, &mut on_b, &mut elsewhere_on_b] {
        let e = sse
            .next_within(FAILOVER_PATIENCE)
            .await
            .expect("a herald.gap after the failover");
        assert_eq!(e.event_type, "herald.gap", "{e:?}");
    }
    let after = b.publish(json!({"topic": "lost", "data": "after"})).await;
    loop {
        let e = on_b.next().await;
        assert!(
            !e.data.starts_with("lost"),
            "b never read the lost events: {e:?}"
        );
        if e.data == "after" {
            assert_eq!(e.id.as_deref(), Some(after.as_str()));
            break;
        }
    }
    // One marker in the stream, counted once on each node (`/stats` sums the nodes).
    let stream = cli(set.replica, &["XRANGE", "herald:events", "-", "+"]);
    assert_eq!(stream.matches("rewind").count(), 1, "{stream}");
    for n in [&a, &b] {
        assert_eq!(n.metric("herald_history_rewinds_total").await, Some(1.0));
        n.eventually("/stats", |v| v["rewinds"] == 2).await;
    }
    // Resuming from before the lost range, or inside it, on either node: a gap, then what the new
    // primary holds after the loss, never a lost event.
    for (n, from) in [(&b, &kept), (&b, &lost[0]), (&a, &lost[1]), (&a, &kept)] {
        let mut resumed = n
            .subscribe_with("topic=lost", &[("last-event-id", from.as_str())])
            .await;
        let gap = resumed.next().await;
        assert_eq!(gap.event_type, "herald.gap", "from {from}: {gap:?}");
        let next = resumed.next().await;
        assert_eq!(
            (next.data.as_str(), next.id.as_deref()),
            ("after", Some(after.as_str())),
            "from {from}"
        );
    }
}
