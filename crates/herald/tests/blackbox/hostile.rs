//! Regressions of the red-team pass of issue 12 against the real binary: request bodies that never
//! arrive, descriptor exhaustion, `/metrics` label growth, idempotency keys across publishers,
//! publish fields that would steer every subscriber's EventSource, duplicate JSON keys, blocked
//! users polling, misleading body errors and batches past the publish rate.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::{KEY, SECRET, token};
use crate::common::{PATIENCE, Server, expect_error, json_of};

/// Sends a raw request and returns what the server answered before closing (or within `within`).
async fn raw(port: u16, request: &[u8], within: Duration) -> String {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Reproduces: a publish that sends its head and never its body stayed open forever (also with
/// `--header-timeout`), and with auth on even a subscribe-only token could hold one, because the
/// body was read before publish rights were checked.
#[tokio::test]
async fn hostile_bodies_that_never_arrive_are_timed_out_and_rights_come_first() {
    let s = Server::start(&["--body-timeout", "1s", "--header-timeout", "1s"]).await;
    let head = b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"topic\":";
    let answer = raw(s.port, head, PATIENCE).await;
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "a body that never arrives must be answered 408 and closed: {answer:?}"
    );
    assert!(answer.contains("body_timeout"), "{answer}");

    let s = Server::start(&["--jwt-secret", SECRET, "--body-timeout", "30s"]).await;
    let reader = token(json!({"sub": "u", "herald": {"subscribe": ["**"]}}));
    let head = format!(
        "POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {reader}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    );
    // Answered at once, without waiting for the body (the body timeout is 30 s).
    let answer = raw(s.port, head.as_bytes(), Duration::from_secs(5)).await;
    assert!(
        answer.starts_with("HTTP/1.1 403"),
        "a token without publish rights is refused before its body: {answer:?}"
    );
    let head = "POST /broadcast HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n";
    let answer = raw(s.port, head.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer:?}");
}

/// Issue 12 (a body's minimum rate): a body dripped a byte at a time must not hold its connection
/// longer than one that never arrives. `--body-timeout` is one deadline for the whole body, not an
/// idle timer that each byte resets, so the drip is answered 408 and closed while still dripping.
#[tokio::test]
async fn hostile_dripped_bodies_end_at_the_body_timeout() {
    let s = Server::start(&["--body-timeout", "1s"]).await;
    let tcp = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let body = format!("{{\"topic\":\"t\",\"data\":\"{}\"}}", "x".repeat(380));
    let head = format!(
        "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    wr.write_all(head.as_bytes()).await.unwrap();
    // 400 bytes at 10 per second: 40 s to arrive in full.
    let drip = tokio::spawn(async move {
        for byte in body.into_bytes() {
            if wr.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut out = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, rd.read_to_end(&mut out)).await;
    let answer = String::from_utf8_lossy(&out);
    assert!(
        closed.is_ok(),
        "the dripping connection was not closed: {answer:?}"
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert!(
        !drip.is_finished(),
        "answered while the body was still dripping, not after it arrived"
    );
    drip.abort();
    assert_eq!(
        s.metric("herald_limited_total{limit=\"body_timeout\"}")
            .await,
        Some(1.0)
    );
}

/// Reproduces: 300 stalled publishes exhausted a 256-descriptor limit, after which `/healthz`
/// and `/events` hung unanswered. Now connections past the reserve are answered 503 and closed,
/// and the hub answers again as soon as the stalled bodies time out.
#[tokio::test]
async fn hostile_descriptor_exhaustion_is_answered() {
    // The default --body-timeout (10s) ends the stalled publishes.
    let s = Server::start_with_nofile(64, &[]).await;
    let head = b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n";
    let mut stalled = Vec::new();
    for _ in 0..80 {
        let mut tcp = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
        tcp.write_all(head).await.unwrap();
        stalled.push(tcp);
    }
    // Answered, not left hanging in the backlog: while the stalled bodies hold the descriptors,
    // that answer is 503 at_capacity.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(8))
        .build()
        .unwrap();
    let r = client
        .get(format!("{}/healthz", s.url))
        .send()
        .await
        .expect("/healthz must answer while descriptors run short");
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json_of(r).await.1["error"], "at_capacity");
    // Once the stalled bodies time out (408), the hub serves normally again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let ok = client
            .get(format!("{}/healthz", s.url))
            .send()
            .await
            .is_ok_and(|r| r.status() == StatusCode::OK);
        if ok {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(stalled);
}

/// Reproduces: every made-up HTTP method became a `method` label of
/// `herald_http_requests_total`, so `/metrics` grew without bound (100,001 series).
#[tokio::test]
async fn hostile_methods_do_not_grow_metrics() {
    let s = Server::start(&[]).await;
    for i in 0..20 {
        let method = reqwest::Method::from_bytes(format!("MADEUP{i}").as_bytes()).unwrap();
        let r = s
            .http()
            .request(method, format!("{}/stats", s.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    }
    let metrics = s.metrics_text().await;
    assert!(!metrics.contains("MADEUP"), "{metrics}");
    assert!(metrics.contains(r#"method="other""#), "{metrics}");
}

async fn post_as(s: &Server, path: &str, bearer: &str, body: &Value) -> (StatusCode, Value) {
    let r = s
        .http()
        .post(format!("{}{path}", s.url))
        .bearer_auth(bearer)
        .json(body)
        .send()
        .await
        .unwrap();
    json_of(r).await
}

/// Reproduces (defect 6): tenant B publishing with an idempotency key tenant A had used got A's
/// event id and `"duplicate":true`, and B's message was never published. Keys are now scoped by
/// publisher (publish key, token subject); the same publisher repeating a key with another
/// payload is answered 409 and nothing is published.
#[tokio::test]
async fn hostile_idempotency_keys_are_per_publisher() {
    let other_key = "second-publish-key-0123456789abc";
    let s = Server::start(&[
        "--jwt-secret",
        SECRET,
        "--publish-key",
        &format!("{KEY},{other_key}"),
    ])
    .await;
    let tenant_a = token(json!({"sub": "a", "herald": {"publish": ["t/**"]}}));
    let tenant_b = token(json!({"sub": "b", "herald": {"publish": ["t/**"]}}));
    let body = |data: &str| json!({"topic": "t/x", "data": data, "idempotencyKey": "order-1"});
    let a = post_as(&s, "/publish", &tenant_a, &body("from a")).await;
    assert_eq!(a.0, StatusCode::OK, "{}", a.1);
    let b = post_as(&s, "/publish", &tenant_b, &body("from b")).await;
    assert_eq!(b.0, StatusCode::OK, "{}", b.1);
    assert_ne!(a.1["id"], b.1["id"], "B's message is published as its own");
    assert_eq!(b.1.get("duplicate"), None);
    // A true repeat by the same publisher is still a duplicate.
    let again = post_as(&s, "/publish", &tenant_a, &body("from a")).await;
    assert_eq!(
        (again.1["id"].clone(), again.1["duplicate"].clone()),
        (a.1["id"].clone(), json!(true))
    );
    // The same key with another payload is refused, not silently dropped.
    expect_error(
        post_as(&s, "/publish", &tenant_a, &body("changed")).await,
        StatusCode::CONFLICT,
        "idempotency_conflict",
    );
    // Two publish keys are two publishers.
    let k1 = post_as(&s, "/publish", KEY, &body("k")).await;
    let k2 = post_as(&s, "/publish", other_key, &body("k")).await;
    assert_eq!((k1.0, k2.0), (StatusCode::OK, StatusCode::OK));
    assert_ne!(k1.1["id"], k2.1["id"]);
    // In a batch, the conflict names its message and nothing of the batch is published.
    let r = s
        .http()
        .post(format!("{}/publish", s.url))
        .bearer_auth(KEY)
        .json(&json!([{"topic": "t/y", "data": "new"}, body("other")]))
        .send()
        .await
        .unwrap();
    let (status, answer) = json_of(r).await;
    assert_eq!(
        (status, answer["index"].clone()),
        (StatusCode::CONFLICT, json!(1)),
        "{answer}"
    );
    let r = s
        .http()
        .get(format!("{}/stats", s.url))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    let after = json_of(r).await.1;
    assert_eq!(after["published"], json!(4), "{after}");
}

/// Reproduces: a publisher allowed one topic could send `retry: 4294967295`, `retry: 0`,
/// `event: error` or `event: open` to every subscriber of it, and a repeated JSON key
/// (`"private":true,"private":false`) published a public message.
#[tokio::test]
async fn hostile_fields_that_steer_every_eventsource_are_refused() {
    let s = Server::start(&[]).await;
    for (body, code) in [
        (
            json!({"topic": "a", "data": "x", "retry": 4_294_967_295u64}),
            "invalid_field",
        ),
        (
            json!({"topic": "a", "data": "x", "retry": 0}),
            "invalid_field",
        ),
        (
            json!({"topic": "a", "data": "x", "event": "error"}),
            "invalid_event",
        ),
        (
            json!({"topic": "a", "data": "x", "event": "open"}),
            "invalid_event",
        ),
        (
            json!({"topic": "a", "data": "x", "event": "herald.close"}),
            "invalid_event",
        ),
    ] {
        expect_error(
            s.post_json("/publish", &body).await,
            StatusCode::BAD_REQUEST,
            code,
        );
    }
    let r = s
        .http()
        .post(format!("{}/publish", s.url))
        .header("content-type", "application/json")
        .body(r#"{"topic":"a","data":"secret","private":true,"private":false}"#)
        .send()
        .await
        .unwrap();
    expect_error(json_of(r).await, StatusCode::BAD_REQUEST, "invalid_json");
    let (status, _) = s
        .post_form(
            "/publish",
            &[
                ("topic", "a"),
                ("data", "x"),
                ("private", "1"),
                ("private", "0"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let ok = json!({"topic": "a", "data": "x", "event": "message", "retry": 100});
    assert_eq!(s.post_json("/publish", &ok).await.0, StatusCode::OK);
}

/// Reproduces: after `DELETE /users/alice/connections?block=1h`, alice could still poll
/// `GET /users/alice/messages` with her own token.
#[tokio::test]
async fn hostile_blocked_users_cannot_poll_their_messages() {
    let s = Server::start(&["--jwt-secret", SECRET, "--publish-key", KEY]).await;
    let alice = token(json!({"sub": "alice"}));
    let get = |bearer: String| {
        let r = s
            .http()
            .get(format!("{}/users/alice/messages", s.url))
            .bearer_auth(bearer)
            .send();
        async move { json_of(r.await.unwrap()).await }
    };
    assert_eq!(get(alice.clone()).await.0, StatusCode::OK);
    let r = s
        .http()
        .delete(format!("{}/users/alice/connections?block=1h", s.url))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    expect_error(get(alice).await, StatusCode::FORBIDDEN, "user_blocked");
    // The operator still can.
    assert_eq!(get(KEY.to_string()).await.0, StatusCode::OK);
}

/// Reproduces: a malformed chunk size or a body cut short answered 413 "larger than 1048576
/// bytes"; a batch of 40,000 events passed a publish rate that counted requests.
#[tokio::test]
async fn hostile_body_errors_say_what_is_wrong_and_batches_count_as_events() {
    let s = Server::start(&[]).await;
    let chunked = b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n";
    let answer = raw(s.port, chunked, PATIENCE).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("incomplete_body"), "{answer}");
    let mut tcp = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
    tcp.write_all(b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{\"topic\":").await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut out)).await;
    let answer = String::from_utf8_lossy(&out);
    assert!(
        !answer.contains("413"),
        "a body cut short is not too large: {answer}"
    );

    let s = Server::start(&[
        "--publish-rate",
        "0.001",
        "--publish-burst",
        "10",
        "--max-batch",
        "20",
    ])
    .await;
    let batch = |n: usize| {
        Value::Array(
            (0..n)
                .map(|i| json!({"topic": "a", "data": i.to_string()}))
                .collect(),
        )
    };
    // Burst 10, refilled so slowly that it does not matter here. The oversized batch costs the
    // one token taken before its body was read.
    expect_error(
        s.post_json("/publish", &batch(21)).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "batch_too_large",
    );
    expect_error(
        s.post_json("/publish", &batch(11)).await,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
    );
    // 9 - 1 (the refused batch's first token) = 8 left: a batch of 7 takes 7, leaving 1.
    assert_eq!(s.post_json("/publish", &batch(7)).await.0, StatusCode::OK);
    expect_error(
        s.post_json("/publish", &batch(2)).await,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
    );
}

/// Reproduces: `--metrics-listen` was served without `--header-timeout`, so a client that never
/// finished its request head held a connection there forever.
#[tokio::test]
async fn hostile_slow_heads_on_the_metrics_listener_are_cut() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let _s = Server::start(&["--metrics-listen", &metrics, "--header-timeout", "1s"]).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut tcp = loop {
        match TcpStream::connect(("127.0.0.1", port)).await {
            Ok(tcp) => break tcp,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "metrics listener: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut out)).await;
    assert!(
        closed.is_ok(),
        "an unfinished head must be dropped after --header-timeout"
    );
    // A whole request is still served there.
    let text = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("herald_connections"), "{text}");
}

/// Reproduces (defect 1) against the binary: with `--queue 4`, a fast publisher and a client
/// that does not read, events published after the token's `exp` reached the client when it
/// caught up from history. Now nothing published after `exp` is delivered, and the stream ends
/// with `herald.close` `token_expired`.
#[tokio::test]
async fn hostile_a_slow_reader_gets_nothing_published_after_its_token_expired() {
    use std::time::{SystemTime, UNIX_EPOCH};
    let now_ms = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let s = Server::start(&["--jwt-secret", SECRET, "--publish-key", KEY, "--queue", "4"]).await;
    let exp_s = now_ms() / 1000 + 3;
    let reader = token(json!({"sub": "r", "exp": exp_s, "herald": {"subscribe": ["t"]}}));
    let r = s
        .http()
        .get(format!("{}/events?topic=t", s.url))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Not read until the publisher is done: the socket fills, the queue overflows.
    let mut sse = crate::common::Sse::new(r);
    let data = "x".repeat(2048);
    let mut late = std::collections::HashSet::new();
    let mut published = 0;
    while now_ms() < exp_s * 1000 + 2000 {
        let sent_at = now_ms();
        let batch: Vec<Value> = (0..50)
            .map(|_| json!({"topic": "t", "data": data, "private": true}))
            .collect();
        let (status, answer) = post_as(&s, "/publish", KEY, &Value::Array(batch)).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        published += 50;
        if sent_at > exp_s * 1000 + 500 {
            for a in answer.as_array().unwrap() {
                late.insert(a["id"].as_str().unwrap().to_string());
            }
        }
    }
    assert!(!late.is_empty() && published > late.len());
    let (ended, events) = sse.ends_within(PATIENCE).await;
    assert!(ended, "the stream of an expired token ends");
    let delivered_late: Vec<_> = events
        .iter()
        .filter_map(|e| e.id.clone())
        .filter(|id| late.contains(id))
        .collect();
    assert!(
        delivered_late.is_empty(),
        "{} events published after exp were delivered",
        delivered_late.len()
    );
    let last = events.last().expect("herald.close");
    assert_eq!(
        (last.event_type.as_str(), last.data.as_str()),
        ("herald.close", r#"{"reason":"token_expired"}"#)
    );
}

/// Reproduces (defect 1) against the binary: after `DELETE /users/{id}/connections`, a slow
/// reader catching up from history was handed what was published after the DELETE (28,800
/// events in the red-team run). Now it gets what came before, then `herald.close`.
#[tokio::test]
async fn hostile_a_slow_reader_gets_nothing_published_after_its_close() {
    // A long heartbeat: the kernel drops a peer that reads nothing for two heartbeats
    // (TCP_USER_TIMEOUT), and on a loaded machine the publishing below can take longer than 30 s.
    let s = Server::start(&[
        "--jwt-secret",
        SECRET,
        "--publish-key",
        KEY,
        "--queue",
        "4",
        "--heartbeat",
        "2m",
    ])
    .await;
    let alice = token(json!({"sub": "alice", "herald": {"subscribe": ["t"]}}));
    let r = s
        .http()
        .get(format!("{}/events?topic=t", s.url))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut sse = crate::common::Sse::new(r);
    // 16 MB before the close: more than the loopback socket buffers hold, so the reader lags.
    let data = "x".repeat(8192);
    let batch = || {
        Value::Array(
            (0..50)
                .map(|_| json!({"topic": "t", "data": data, "private": true}))
                .collect(),
        )
    };
    let mut before = Vec::new();
    for _ in 0..40 {
        let (status, answer) = post_as(&s, "/publish", KEY, &batch()).await;
        assert_eq!(status, StatusCode::OK);
        before.extend(answer.as_array().unwrap().iter().map(|a| a["id"].clone()));
    }
    let closed = s
        .http()
        .delete(format!(
            "{}/users/alice/connections?reason=suspended&block=1h",
            s.url
        ))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(closed).await.1["closed"], 1);
    let mut after = std::collections::HashSet::new();
    for _ in 0..40 {
        let (status, answer) = post_as(&s, "/publish", KEY, &batch()).await;
        assert_eq!(status, StatusCode::OK);
        after.extend(
            answer
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["id"].as_str().unwrap().to_string()),
        );
    }
    let (ended, events) = sse.ends_within(PATIENCE).await;
    assert!(ended, "a closed stream ends");
    // Only the events themselves: a WHATWG parser gives `herald.close` (which has no `id:`
    // line) the last id seen.
    let ids: Vec<String> = events
        .iter()
        .filter(|e| e.event_type == "message")
        .filter_map(|e| e.id.clone())
        .collect();
    let mut seen = std::collections::HashSet::new();
    assert!(ids.iter().all(|id| seen.insert(id)), "each event once");
    let late = ids.iter().filter(|id| after.contains(*id)).count();
    assert_eq!(late, 0, "events published after the DELETE were delivered");
    assert_eq!(ids.len(), before.len(), "everything published before it is");
    let last = events.last().expect("herald.close");
    assert_eq!(
        (last.event_type.as_str(), last.data.as_str()),
        ("herald.close", r#"{"reason":"suspended"}"#)
    );
}
