//! Presence, closing and blocking users, heartbeats, dead connections, limits, stats, metrics,
//! CORS and shutdown with open streams.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{PATIENCE, Server, expect_error};

#[tokio::test]
async fn presence_follows_connections_as_they_come_and_go() {
    let s = Server::start(&[]).await;
    let (_, v) = s.get("/users").await;
    assert_eq!(v, json!({"count": 0, "users": []}));
    let a1 = s.subscribe("user=alice").await;
    let a2 = s.subscribe("user=alice&topic=t").await;
    let b = s.subscribe("user=bob").await;
    let _anon = s.subscribe("topic=t").await;
    let (_, v) = s.get("/users").await;
    assert_eq!(
        v,
        json!({"count": 2, "users": [{"id": "alice", "connections": 2}, {"id": "bob", "connections": 1}]})
    );
    let (_, v) = s.get("/users/alice").await;
    assert_eq!(v, json!({"id": "alice", "online": true, "connections": 2}));
    let (_, v) = s.get("/users/nobody").await;
    assert_eq!(
        v,
        json!({"id": "nobody", "online": false, "connections": 0})
    );
    let (_, v) = s.get("/stats").await;
    assert_eq!(
        (
            v["connections"].as_u64(),
            v["users"].as_u64(),
            v["topics"].as_u64()
        ),
        (Some(4), Some(2), Some(1))
    );

    drop(a1);
    s.eventually("/users/alice", |v| v["connections"] == 1)
        .await;
    drop(a2);
    drop(b);
    s.eventually("/users", |v| v["count"] == 0).await;
    s.eventually("/stats", |v| v["connections"] == 1).await;
}

#[tokio::test]
async fn users_are_paged_in_id_order() {
    let s = Server::start(&[]).await;
    let mut conns = Vec::new();
    for u in ["d", "a", "c", "b", "e"] {
        conns.push(s.subscribe(&format!("user={u}")).await);
    }
    let (_, v) = s.get("/users?limit=2").await;
    assert_eq!(v["count"], 5);
    let ids: Vec<&str> = v["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "b"]);
    let (_, v) = s.get("/users?limit=2&after=b").await;
    let ids: Vec<&str> = v["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["c", "d"]);
    let (_, v) = s.get("/users?after=d").await;
    assert_eq!(v["users"], json!([{"id": "e", "connections": 1}]));
    expect_error(
        s.get("/users?limit=0").await,
        StatusCode::BAD_REQUEST,
        "invalid_limit",
    );
}

#[tokio::test]
async fn closing_a_user_ends_every_stream_after_what_is_queued() {
    let s = Server::start(&[]).await;
    let mut a = s.subscribe("user=u&topic=t").await;
    let mut b = s.subscribe("user=u").await;
    let mut other = s.subscribe("user=v").await;
    for i in 0..3 {
        s.publish(json!({"users": ["u"], "data": i})).await;
    }
    let (status, v) = s.delete("/users/u/connections?reason=logout").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v, json!({"closed": 2}));
    for sse in [&mut a, &mut b] {
        assert_eq!(sse.next_data(3).await, ["0", "1", "2"]);
        let close = sse.next().await;
        assert_eq!(close.event_type, "herald.close");
        assert_eq!(
            serde_json::from_str::<Value>(&close.data).unwrap(),
            json!({"reason": "logout"})
        );
        let (ended, rest) = sse.ends_within(PATIENCE).await;
        assert!(
            ended && rest.is_empty(),
            "the stream ends after herald.close"
        );
        assert!(!String::from_utf8_lossy(&sse.raw).contains("id: \nevent: herald.close"));
    }
    // The close frame carries no id line.
    let raw = String::from_utf8_lossy(&a.raw).to_string();
    let close_at = raw.find("event: herald.close").unwrap();
    assert!(
        raw[..close_at].ends_with("\n\n"),
        "herald.close starts its own frame without id"
    );
    s.publish(json!({"users": ["v"], "data": "still here"}))
        .await;
    assert_eq!(other.next().await.data, "still here");
    s.eventually("/users/u", |v| v["online"] == false).await;
    // Without block, the user may reconnect at once.
    let r = s.open_events("user=u", &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_blocked_user_gets_204_until_the_block_expires() {
    let s = Server::start(&[]).await;
    let mut sse = s.subscribe("user=u").await;
    let (_, v) = s.delete("/users/u/connections?block=1s").await;
    assert_eq!(v["closed"], 1);
    assert_eq!(sse.next().await.event_type, "herald.close");
    let r = s.open_events("user=u", &[]).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = s.open_events("user=someone-else", &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = s.open_events("user=u", &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    expect_error(
        s.delete("/users/u/connections?block=soon").await,
        StatusCode::BAD_REQUEST,
        "invalid_block",
    );
}

#[tokio::test]
async fn idle_streams_get_heartbeat_comments() {
    let s = Server::start(&["--heartbeat", "100ms"]).await;
    let mut sse = s.subscribe("topic=quiet").await;
    sse.opened().await;
    let before = sse.parser.comments;
    let (ended, events) = sse.ends_within(Duration::from_millis(650)).await;
    assert!(!ended && events.is_empty());
    assert!(
        sse.parser.comments >= before + 3,
        "heartbeats: {}",
        sse.parser.comments - before
    );
}

/// Opens a raw stream as `user` and waits until presence shows it.
async fn raw_stream(s: &Server, user: &str) -> tokio::net::TcpStream {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", s.port))
        .await
        .unwrap();
    let request =
        format!("GET /events?user={user} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut buf = [0u8; 1024];
    let n = tcp.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    s.eventually(&format!("/users/{user}"), |v| v["online"] == true)
        .await;
    tcp
}

/// A client that closes its socket leaves presence at once.
#[tokio::test]
async fn closed_connections_leave_presence_at_once() {
    let s = Server::start(&["--heartbeat", "200ms"]).await;
    let tcp = raw_stream(&s, "ghost").await;
    drop(tcp);
    let started = tokio::time::Instant::now();
    s.eventually("/users/ghost", |v| v["online"] == false).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
}

/// A client that vanishes without a FIN or a reset (its packets are dropped by the firewall, as
/// with a pulled cable) leaves presence once heartbeats stay unacknowledged for two intervals.
/// Without `TCP_USER_TIMEOUT` it would stay for TCP's full retransmission time (~15 minutes).
/// Needs root and iptables (scripts/test installs it).
#[tokio::test]
async fn vanished_connections_leave_presence_within_a_few_heartbeats() {
    let s = Server::start(&["--heartbeat", "300ms"]).await;
    let tcp = raw_stream(&s, "vanished").await;
    let client_port = tcp.local_addr().unwrap().port().to_string();
    let rule = [
        "INPUT",
        "-p",
        "tcp",
        "--sport",
        &client_port,
        "--dport",
        &s.port.to_string(),
        "-j",
        "DROP",
    ];
    let added = std::process::Command::new("iptables")
        .arg("-I")
        .args(rule)
        .status()
        .expect("iptables must be installed (scripts/test installs it)");
    assert!(
        added.success(),
        "adding the iptables rule failed: this test needs root"
    );
    struct Remove(Vec<String>);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::process::Command::new("iptables")
                .arg("-D")
                .args(&self.0)
                .status();
        }
    }
    let _remove = Remove(rule.iter().map(|s| s.to_string()).collect());
    let started = tokio::time::Instant::now();
    s.eventually("/users/vanished", |v| v["online"] == false)
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?}",
        started.elapsed()
    );
    drop(tcp);
}

#[tokio::test]
async fn connection_limit_answers_503_with_retry_after() {
    let s = Server::start(&["--max-connections", "2"]).await;
    let _a = s.subscribe("").await;
    let b = s.subscribe("").await;
    let r = s.open_events("", &[]).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().contains_key("retry-after"));
    let (_, v) = crate::common::json_of(r).await;
    assert_eq!(v["error"], "at_capacity");
    drop(b);
    s.eventually("/stats", |v| v["connections"] == 1).await;
    let r = s.open_events("", &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn stats_health_and_metrics() {
    let s = Server::start(&[]).await;
    let mut sse = s.subscribe("topic=m&user=u").await;
    s.publish(json!({"topic": "m", "data": "1"})).await;
    s.publish(json!({"topic": "nobody", "data": "2"})).await;
    sse.next().await;
    let (status, v) = s.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["status"], "ok");
    let (_, v) = s.get("/stats").await;
    for key in [
        "connections",
        "users",
        "topics",
        "published",
        "delivered",
        "uptimeSeconds",
    ] {
        assert!(v[key].is_u64(), "{key} in {v}");
    }
    assert_eq!(
        v["uptime_s"], v["uptimeSeconds"],
        "the old name, for one release"
    );
    assert_eq!(
        (v["published"].as_u64(), v["delivered"].as_u64()),
        (Some(2), Some(1))
    );
    let r = s
        .http()
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap();
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = r.text().await.unwrap();
    for line in [
        "herald_connections 1",
        "herald_users_online 1",
        "herald_published_total 2",
        "herald_delivered_total 1",
        "herald_replayed_total 0",
        "herald_gaps_total 0",
        "herald_lagging_connections 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(
        text.contains(
            r#"herald_http_requests_total{route="/publish",method="POST",status="200"} 2"#
        ),
        "{text}"
    );
}

#[tokio::test]
async fn cors_allows_listed_origins_only() {
    let s = Server::start(&["--cors-origin", "https://app.example"]).await;
    let preflight = s
        .http()
        .request(reqwest::Method::OPTIONS, format!("{}/publish", s.url))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success());
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(
        preflight.headers()["access-control-allow-credentials"],
        "true"
    );
    let r = s
        .http()
        .get(format!("{}/stats", s.url))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(!r.headers().contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn sigterm_ends_open_streams_and_exits() {
    let mut s = Server::start(&["--shutdown-timeout", "5s"]).await;
    let mut idle = s.subscribe("topic=idle").await;
    let mut user = s.subscribe("user=u").await;
    idle.opened().await;
    user.opened().await;
    s.publish(json!({"users": ["u"], "data": "before"})).await;
    assert_eq!(user.next().await.data, "before");
    let started = std::time::Instant::now();
    s.signal("TERM");
    for sse in [&mut idle, &mut user] {
        let (ended, events) = sse.ends_within(PATIENCE).await;
        assert!(ended, "stream ended on shutdown");
        assert!(
            events.iter().all(|e| e.event_type != "herald.close"),
            "shutdown must not tell clients to stop reconnecting"
        );
    }
    let status = s.wait_exit(PATIENCE).await;
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    // A request that never finishes its body keeps graceful shutdown waiting for the timeout.
    let mut s = Server::start(&["--shutdown-timeout", "60s"]).await;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", s.port))
        .await
        .unwrap();
    tcp.write_all(
        b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.signal("INT");
    let status = s.wait_exit(Duration::from_secs(5)).await;
    assert!(
        !status.success(),
        "the second signal exits with a failure code"
    );
}
