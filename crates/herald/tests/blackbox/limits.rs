//! Limits and hostile input against the real binary: streams per IP, publish rate, slow and
//! oversized request heads, long URLs, floods of selectors, and injection through every field.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{Server, json_of};

#[tokio::test]
async fn limits_connections_per_ip_and_publish_rate() {
    let s = Server::start(&[
        "--max-connections-per-ip",
        "2",
        "--publish-rate",
        "1",
        "--publish-burst",
        "2",
    ])
    .await;
    let _a = s.subscribe("topic=a").await;
    let _b = s.subscribe("topic=b").await;
    let r = s.open_events("topic=c", &[]).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key("retry-after"));
    let (_, v) = json_of(r).await;
    assert_eq!(v["error"], "too_many_connections");
    drop(_a);
    // The slot comes back once the stream is gone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = s.open_events("topic=c", &[]).await;
        if r.status() == StatusCode::OK {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = json!({"topic": "a", "data": "x"});
    assert_eq!(s.post_json("/publish", &body).await.0, StatusCode::OK);
    assert_eq!(s.post_json("/publish", &body).await.0, StatusCode::OK);
    let r = s
        .http()
        .post(format!("{}/publish", s.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(json_of(r).await.1["error"], "rate_limited");
    let metrics = s.metrics_text().await;
    assert!(
        metrics.contains(r#"herald_limited_total{limit="connections_per_ip"}"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"herald_limited_total{limit="publish_rate"}"#));
}

#[tokio::test]
async fn limits_request_heads_urls_and_selectors() {
    let s = Server::start(&[
        "--header-timeout",
        "1s",
        "--max-url",
        "2000",
        "--max-selectors",
        "8",
    ])
    .await;
    // Slowloris: half a request head, then nothing. The server hangs up.
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", s.port))
        .await
        .unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(_)) | Ok(Err(_))),
        "the connection was closed in time"
    );

    let long = format!("{}/healthz?pad={}", s.url, "x".repeat(3000));
    let r = s.http().get(long).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::URI_TOO_LONG);
    assert_eq!(json_of(r).await.1["error"], "uri_too_long");

    let r = s
        .http()
        .get(format!("{}/healthz", s.url))
        .header("x-big", "y".repeat(20_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(json_of(r).await.1["error"], "header_too_large");

    let nine: Vec<String> = (0..9).map(|i| format!("topic=t{i}")).collect();
    let r = s.open_events(&nine.join("&"), &[]).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json_of(r).await.1["error"], "too_many_selectors");

    // Ten thousand selectors never reach the hub.
    let flood: Vec<String> = (0..10_000).map(|i| format!("topic=t{i}")).collect();
    let request = format!(
        "GET /events?{} HTTP/1.1\r\nHost: x\r\n\r\n",
        flood.join("&")
    );
    let answer = raw(&s, request.as_bytes(), "\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");

    let big_targets: Vec<String> = (0..65).map(|i| format!("t{i}")).collect();
    let (status, v) = s
        .post_json("/publish", &json!({"topics": big_targets, "data": "x"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"], "too_many_targets");
    // Still healthy.
    assert_eq!(s.get("/healthz").await.0, StatusCode::OK);
}

/// Sends raw bytes; reads the answer until `until` shows up, the peer closes, or 3 seconds pass.
async fn raw(s: &Server, request: &[u8], until: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", s.port))
        .await
        .unwrap();
    // The server may answer and close before it has read all of a huge request.
    let _ = tcp.write_all(request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = tcp.read(&mut buf).await {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&out).contains(until) {
                break;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn hostile_bytes_in_every_field_are_refused_or_contained() {
    let s = Server::start(&[]).await;
    // Invalid UTF-8 and control characters, percent-encoded, in each query field.
    for query in [
        "topic=%FF",
        "topic=a%00b",
        "topic=a%0Ab",
        "user=%FF",
        "user=a%0Db",
        "user=a%0Aevent:x",
        "since=%FF",
        "since=1%0A2",
    ] {
        let r = s.open_events(query, &[]).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{query}");
        let (_, v) = json_of(r).await;
        assert!(v["error"].is_string(), "{query}: {v}");
    }
    // Raw bytes that are not UTF-8 in the request target and in a header.
    let answer = raw(
        &s,
        b"GET /events?topic=\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
        "\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    // Any bytes in Last-Event-ID are an id this hub never wrote: a gap, echoed only inside JSON.
    let answer = raw(
        &s,
        b"GET /events?topic=a HTTP/1.1\r\nHost: x\r\nLast-Event-ID: \xff\xfe z\r\n\r\n",
        "herald.gap",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("event: herald.gap\ndata: {"), "{answer}");
    // Newlines in event, user, topic and idempotency key are refused; in data they become lines.
    for body in [
        json!({"topic": "a", "event": "x\nid: 9", "data": "d"}),
        json!({"topic": "a", "event": "x\revent: y", "data": "d"}),
        json!({"users": ["a\ndata: x"], "data": "d"}),
        json!({"topic": "a\n", "data": "d"}),
        json!({"topic": "a", "idempotencyKey": "k\n", "data": "d"}),
    ] {
        let (status, v) = s.post_json("/publish", &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {v}");
    }
    // An id that a client makes up with a newline in it is only ever echoed inside JSON.
    let mut sse = s
        .subscribe("topic=a&lastEventId=1%0Aevent%3A%20evil%0Adata%3A%20x")
        .await;
    let first = sse.next().await;
    assert_eq!(first.event_type, "herald.gap");
    let v: Value = serde_json::from_str(&first.data).unwrap();
    assert_eq!(v["lastEventId"], "1\nevent: evil\ndata: x");
    s.publish(json!({"topic": "a", "data": "one\nevent: evil\r\nid: 7\rdata: x", "event": "ok"}))
        .await;
    let e = sse.next().await;
    assert_eq!(e.event_type, "ok");
    assert_eq!(e.data, "one\nevent: evil\nid: 7\ndata: x");
    assert!(
        sse.next_within(Duration::from_millis(300)).await.is_none(),
        "one event only"
    );
    // Form bodies: invalid UTF-8 and a NUL in the event type.
    for body in [
        &b"topic=a&data=%FF"[..],
        b"topic=a&data=x&event=a%00b",
        b"topic=%C0%80&data=x",
    ] {
        let r = s
            .http()
            .post(format!("{}/publish", s.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::BAD_REQUEST,
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

#[tokio::test]
async fn every_documented_route_is_served() {
    let s = Server::start(&[]).await;
    let (status, doc) = s.get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let url = format!("{}{}", s.url, path.replace("{id}", "someone"));
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let mut req = s
                .http()
                .request(m, url)
                .header("content-type", "application/json");
            if method == "post" {
                req = req.body(r#"{"data":"x","topic":"a"}"#);
            }
            if path == "/events" {
                req = req.query(&[("topic", "a")]);
            }
            let r = req.send().await.unwrap();
            let status = r.status();
            assert!(
                status != StatusCode::NOT_FOUND && status != StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path} answered {status}"
            );
        }
    }
}

/// Issue 12 (not yet tried): per-IP limits against an IPv6 /64. One subscriber line holds a whole
/// /64, so streams from addresses within it count together; another /64 is another client.
#[tokio::test]
async fn per_ip_limits_count_an_ipv6_slash_64_as_one_client() {
    let s = Server::start(&[
        "--max-connections-per-ip",
        "2",
        "--trusted-proxy",
        "127.0.0.1",
    ])
    .await;
    let from = |ip: &'static str| [("x-forwarded-for", ip)];
    let _a = s.subscribe_with("", &from("2001:db8:1:2::1")).await;
    let _b = s.subscribe_with("", &from("2001:db8:1:2:ffff::9")).await;
    let third = s
        .open_events("", &from("2001:db8:1:2:aaaa:bbbb:cccc:dddd"))
        .await;
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    let other = s.open_events("", &from("2001:db8:1:3::1")).await;
    assert_eq!(other.status(), StatusCode::OK);
}
