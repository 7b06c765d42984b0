//! Several nodes sharing one real `redis-server` (see `redis_servers`): cross-node
//! delivery with agreeing ids, a node killed mid-stream, a Redis outage, cluster-wide presence,
//! close and idempotency.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{PATIENCE, Server, Sse, free_port};
use crate::redis_servers::cli;
// Other tests' clusters start their Redis from here too.
pub(crate) use crate::redis_servers::Redis;

/// A node of the cluster on `redis`.
pub(crate) async fn node(redis: &Redis, extra: &[&str]) -> Server {
    crate::redis_servers::node(&redis.url(), extra).await
}

#[tokio::test]
async fn a_publish_on_one_node_reaches_every_node_with_one_id_and_one_order() {
    let redis = Redis::start();
    let (a, b, c) = (
        node(&redis, &[]).await,
        node(&redis, &[]).await,
        node(&redis, &[]).await,
    );
    let mut on_b = b.subscribe("topic=room").await;
    let mut on_c = c.subscribe("topic=room").await;
    on_b.opened().await;
    on_c.opened().await;
    let mut ids = Vec::new();
    for i in 0..40 {
        let publisher = if i % 2 == 0 { &a } else { &b };
        ids.push(
            publisher
                .publish(json!({"topic": "room", "data": i.to_string()}))
                .await,
        );
    }
    for sse in [&mut on_b, &mut on_c] {
        for (i, id) in ids.iter().enumerate() {
            let e = sse.next().await;
            assert_eq!(
                (e.id.as_deref(), e.data.as_str()),
                (Some(id.as_str()), i.to_string().as_str())
            );
        }
    }
    let numeric: Vec<u128> = ids.iter().map(|i| i.parse().unwrap()).collect();
    assert!(
        numeric.windows(2).all(|w| w[0] < w[1]),
        "ids increase across nodes"
    );
    // `delivered` counts the publishing node's own connections.
    let (_, v) = b
        .post_json("/publish", &json!({"topic": "room", "data": "x"}))
        .await;
    assert_eq!(v["delivered"], 1);
}

#[tokio::test]
async fn clients_of_a_killed_node_resume_on_another_without_loss() {
    const N: usize = 400;
    let redis = Redis::start();
    let a = node(&redis, &[]).await;
    let mut b = node(&redis, &[]).await;
    let c = node(&redis, &[]).await;
    let mut sse = b.subscribe("topic=jobs").await;
    sse.opened().await;
    let url = a.url.clone();
    let publisher = tokio::spawn(async move {
        let http = crate::common::http_client();
        for i in 0..N {
            let r = http
                .post(format!("{url}/publish"))
                .json(&json!({"topic": "jobs", "data": i.to_string()}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
        }
    });
    let mut got = Vec::new();
    let mut last = None;
    while got.len() < 100 {
        let e = sse.next().await;
        got.push(e.data);
        last = e.id;
    }
    b.signal("KILL");
    b.wait_exit(PATIENCE).await;
    drop(sse);
    let last = last.unwrap();
    let mut resumed = c
        .subscribe_with("topic=jobs", &[("last-event-id", &last)])
        .await;
    while got.len() < N {
        let e = resumed.next().await;
        assert_ne!(e.event_type, "herald.gap");
        got.push(e.data);
    }
    publisher.await.unwrap();
    let want: Vec<String> = (0..N).map(|i| i.to_string()).collect();
    assert_eq!(got, want, "every event exactly once, in order");
}

#[tokio::test]
async fn a_redis_outage_gives_503s_then_everything_accepted_arrives_once() {
    let mut redis = Redis::start();
    let a = node(&redis, &[]).await;
    let b = node(&redis, &[]).await;
    let mut subs: Vec<Sse> = vec![a.subscribe("topic=o").await, b.subscribe("topic=o").await];
    for s in &mut subs {
        s.opened().await;
    }
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let refused = Arc::new(Mutex::new(0usize));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let (url, acked, refused, stop) =
            (a.url.clone(), acked.clone(), refused.clone(), stop.clone());
        tokio::spawn(async move {
            let http = crate::common::http_client();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = http
                    .post(format!("{url}/publish"))
                    .json(&json!({"topic": "o", "data": i.to_string()}))
                    .send()
                    .await
                    .unwrap();
                match r.status() {
                    StatusCode::OK => {
                        let v: Value = r.json().await.unwrap();
                        acked
                            .lock()
                            .unwrap()
                            .push(v["id"].as_str().unwrap().to_string());
                    }
                    StatusCode::SERVICE_UNAVAILABLE => *refused.lock().unwrap() += 1,
                    other => panic!("unexpected status {other}"),
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.kill();
    let (status, _) = {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let (status, v) = a.get("/readyz").await;
            if status == StatusCode::SERVICE_UNAVAILABLE || tokio::time::Instant::now() > deadline {
                break (status, v);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "/readyz reports the outage"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.restart();
    a.eventually("/readyz", |v| v["ready"] == true).await;
    b.eventually("/readyz", |v| v["ready"] == true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    publisher.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(
        *refused.lock().unwrap() > 0,
        "publishes during the outage were refused"
    );
    assert!(acked.len() > 20);
    let last = acked.last().unwrap().clone();
    for sse in &mut subs {
        let mut seen = Vec::new();
        loop {
            let e = sse.next().await;
            assert_ne!(e.event_type, "herald.gap");
            let id = e.id.unwrap();
            let done = id == last;
            seen.push(id);
            if done {
                break;
            }
        }
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "nothing twice");
        for id in &acked {
            assert!(
                unique.contains(id),
                "accepted event {id} reached the subscriber"
            );
        }
    }
}

#[tokio::test]
async fn presence_and_close_are_cluster_wide() {
    let redis = Redis::start();
    let (a, b, c) = (
        node(&redis, &[]).await,
        node(&redis, &[]).await,
        node(&redis, &[]).await,
    );
    let mut streams = [
        a.subscribe("user=u").await,
        a.subscribe("user=u").await,
        b.subscribe("user=u").await,
        b.subscribe("user=w").await,
    ];
    c.eventually("/users/u", |v| v["connections"] == 3).await;
    let v = c.eventually("/users", |v| v["count"] == 2).await;
    assert_eq!(v["users"][0], json!({"id": "u", "connections": 3}));
    let v = c.eventually("/stats", |v| v["connections"] == 4).await;
    // Each node with its connections, the asking node first.
    let mut counts: Vec<u64> = v["nodes"]
        .as_array()
        .expect("nodes in cluster mode")
        .iter()
        .map(|n| {
            assert!(n["id"].as_str().is_some_and(|id| !id.is_empty()), "{n}");
            n["connections"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(counts[0], 0, "c holds no stream: {v}");
    counts.sort_unstable();
    assert_eq!(counts, [0, 2, 2]);
    let (status, v) = c.delete("/users/u/connections?reason=logout").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["closed"], 3);
    for sse in streams.iter_mut().take(3) {
        let e = sse.next().await;
        assert_eq!(e.event_type, "herald.close");
    }
    a.eventually("/users/u", |v| v["online"] == false).await;
    c.eventually("/users/u", |v| v["online"] == false).await;
    c.eventually("/users", |v| v["count"] == 1).await;
}

#[tokio::test]
async fn idempotency_keys_hold_across_nodes() {
    let redis = Redis::start();
    let (a, b) = (node(&redis, &[]).await, node(&redis, &[]).await);
    let body = json!({"topic": "pay", "data": "charge", "idempotencyKey": "order-7"});
    let (_, first) = a.post_json("/publish", &body).await;
    let (_, again) = b.post_json("/publish", &body).await;
    assert_eq!(first["id"], again["id"]);
    assert_eq!(again["duplicate"], true);
    assert!(first.get("duplicate").is_none());
    // The same key with another payload is refused on any node, and nothing is published.
    let changed = json!({"topic": "pay", "data": "charge twice", "idempotencyKey": "order-7"});
    let (status, answer) = b.post_json("/publish", &changed).await;
    assert_eq!(
        (status, answer["error"].clone()),
        (reqwest::StatusCode::CONFLICT, json!("idempotency_conflict")),
        "{answer}"
    );
    let batch = json!([{"topic": "pay", "data": "other"}, changed]);
    let (status, answer) = a.post_json("/publish", &batch).await;
    assert_eq!(
        (status.as_u16(), answer["index"].clone()),
        (409, json!(1)),
        "{answer}"
    );
}

/// Issue 12 (defect 5 in a cluster): Redis kept every idempotency key for its whole window.
/// `--idempotency-keys` now bounds them cluster-wide: past it the oldest is forgotten, and a
/// repeat of it publishes again, on any node.
#[tokio::test]
async fn idempotency_keys_are_bounded_across_nodes() {
    let redis = Redis::start();
    let bound = ["--idempotency-keys", "2"];
    let (a, b) = (node(&redis, &bound).await, node(&redis, &bound).await);
    let body = |k: &str| json!({"topic": "pay", "data": "charge", "idempotencyKey": k});
    let mut ids = Vec::new();
    for k in ["order-0", "order-1", "order-2"] {
        let (_, v) = a.post_json("/publish", &body(k)).await;
        assert!(v.get("duplicate").is_none(), "{v}");
        ids.push(v["id"].clone());
    }
    let (_, kept) = b.post_json("/publish", &body("order-2")).await;
    assert_eq!((&kept["id"], &kept["duplicate"]), (&ids[2], &json!(true)));
    let (_, forgotten) = b.post_json("/publish", &body("order-0")).await;
    assert!(
        forgotten.get("duplicate").is_none() && forgotten["id"] != ids[0],
        "the oldest key was forgotten at the bound: {forgotten}"
    );
}

#[tokio::test]
async fn an_unreachable_redis_stops_startup() {
    let port = free_port();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--redis",
            &format!("redis://127.0.0.1:{port}/0"),
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Redis"));
}

/// Adds an entry to the shared stream by hand, as `redis-cli` would.
fn xadd(redis: &Redis, fields: &[&str]) {
    let mut args = vec!["XADD", "herald:events", "*"];
    args.extend_from_slice(fields);
    let id = cli(redis.port, &args);
    assert!(id.contains('-'), "XADD answered {id:?}");
}

/// Reproduces issue 12 (defect 9): one undecodable entry in the Redis stream (`XADD herald:events
/// '*' m garbage`) halted fan-out on every node: publishes answered `delivered:0` after 5 s and
/// were never delivered, and `/readyz` blamed Redis. Now each node skips (and counts) it, every
/// reader gets a `herald.gap` where it was, and later events flow; an entry in a row format this
/// herald does not know (a newer node in a rolling upgrade) is skipped the same way.
#[tokio::test]
async fn an_undecodable_stream_entry_is_skipped_with_a_gap_and_fan_out_goes_on() {
    let redis = Redis::start();
    let (a, b) = (node(&redis, &[]).await, node(&redis, &[]).await);
    let mut on_a = a.subscribe("topic=room").await;
    let mut on_b = b.subscribe("topic=room").await;
    on_a.opened().await;
    on_b.opened().await;
    a.publish(json!({"topic": "room", "data": "before"})).await;
    xadd(&redis, &["m", "garbage"]);
    b.publish(json!({"topic": "room", "data": "middle"})).await;
    xadd(&redis, &["v", "9", "m", "from a newer herald"]);
    a.publish(json!({"topic": "room", "data": "after"})).await;
    for sse in [&mut on_a, &mut on_b] {
        let mut seen = Vec::new();
        while seen.last().map(String::as_str) != Some("after") {
            let e = sse.next().await;
            seen.push(if e.event_type == "herald.gap" {
                "gap".to_string()
            } else {
                e.data
            });
        }
        // A reader may learn of one gap twice (each node's follower and its own catch-up race).
        seen.dedup();
        assert_eq!(seen, ["before", "gap", "middle", "gap", "after"]);
    }
    for node in [&a, &b] {
        let (status, v) = node.get("/readyz").await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let (_, stats) = node.get("/stats").await;
        assert_eq!(stats["unreadable"], 2, "{stats}");
    }
}
