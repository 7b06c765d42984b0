//! Finite streams (issue 16) against the real binary: a streaming publish (`text/event-stream`
//! or NDJSON body sent slowly over a raw socket, chunk by chunk) reaches subscribers event by
//! event; `complete=true` ends the topic with `herald.complete` (204 on a reconnect after it,
//! `aborted` when the producer breaks off or stalls); bad lines are refused by number after the
//! events before them were published; `POST /cancel` answers the producer at once, on one node
//! and across two nodes sharing Redis; rights are checked before the body is read.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::{SECRET, token};
use crate::cluster::{Redis, node};
use crate::common::{PATIENCE, Server};

/// A producer's streaming request over a raw socket, its body sent as chunks when told.
struct Producer {
    tcp: TcpStream,
}

impl Producer {
    async fn open(s: &Server, query: &str, content_type: &str, headers: &[(&str, &str)]) -> Self {
        let mut tcp = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
        let mut head = format!(
            "POST /publish?{query} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n"
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        tcp.write_all(head.as_bytes()).await.unwrap();
        Producer { tcp }
    }

    async fn send(&mut self, text: &str) {
        let chunk = format!("{:x}\r\n{text}\r\n", text.len());
        self.tcp.write_all(chunk.as_bytes()).await.unwrap();
    }

    async fn finish(mut self) -> (u16, Value) {
        self.tcp.write_all(b"0\r\n\r\n").await.unwrap();
        self.answer().await
    }

    /// Reads the response: status and JSON body (by its Content-Length).
    async fn answer(mut self) -> (u16, Value) {
        let mut buf = Vec::new();
        let read = async {
            loop {
                let mut chunk = [0u8; 4096];
                let n = self.tcp.read(&mut chunk).await.unwrap_or(0);
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map(|v| v.trim().parse().unwrap())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + length {
                        let status = head[9..12].parse().unwrap();
                        let body = &buf[end + 4..end + 4 + length];
                        let value = if body.is_empty() {
                            Value::Null
                        } else {
                            serde_json::from_slice(body).unwrap()
                        };
                        return (status, value);
                    }
                }
                assert!(n > 0, "the connection closed before an answer: {buf:?}");
            }
        };
        tokio::time::timeout(PATIENCE, read)
            .await
            .expect("no answer to the streaming publish")
    }
}

fn sse_event(data: &str) -> String {
    format!("event: token\ndata: {data}\n\n")
}

#[tokio::test]
async fn a_streamed_event_is_delivered_before_the_producer_sends_the_next() {
    let s = Server::start(&[]).await;
    let mut sub = s.subscribe("topic=ai/answer/1").await;
    sub.opened().await;
    let mut p = Producer::open(&s, "topic=ai/answer/1", "text/event-stream", &[]).await;
    p.send(&sse_event("Hel")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    p.send("data: lo").await; // an event split across chunks
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The first event is delivered while the body is still open and before the third is sent.
    let first = sub.next().await;
    assert_eq!(
        (first.event_type.as_str(), first.data.as_str()),
        ("token", "Hel")
    );
    p.send("\n\n").await;
    let second = sub.next().await;
    assert_eq!(
        (second.event_type.as_str(), second.data.as_str()),
        ("message", "lo")
    );
    p.send(": a comment\nid: 77\ndata: {\"x\":1}\ndata: two lines\n\n")
        .await;
    let third = sub.next().await;
    assert_eq!(third.data, "{\"x\":1}\ntwo lines");
    let (status, answer) = p.finish().await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["published"], 3);
    assert_eq!(answer["first"].as_str(), first.id.as_deref());
    assert_eq!(answer["last"].as_str(), third.id.as_deref());
    assert!(answer.get("complete").is_none(), "{answer}");
}

#[tokio::test]
async fn ndjson_lines_are_published_as_they_arrive() {
    let s = Server::start(&[]).await;
    let mut sub = s.subscribe("topic=jobs/7&topic=jobs/8").await;
    sub.opened().await;
    // Targets in the query: the lines carry only the message.
    let mut p = Producer::open(&s, "topic=jobs/7", "application/x-ndjson", &[]).await;
    p.send("{\"data\":{\"pct\":10},\"event\":\"progress\"}\n")
        .await;
    let e = sub.next().await;
    assert_eq!(
        (e.event_type.as_str(), e.data.as_str()),
        ("progress", "{\"pct\":10}")
    );
    p.send("\n{\"data\":\"done\"}").await; // the last line may lack its newline
    let (status, answer) = p.finish().await;
    assert_eq!(
        (status, answer["published"].clone()),
        (200, json!(2)),
        "{answer}"
    );
    assert_eq!(sub.next().await.data, "done");
    // Without query targets each line names its own, as in POST /publish.
    let mut p = Producer::open(&s, "", "application/x-ndjson", &[]).await;
    p.send("{\"topic\":\"jobs/8\",\"data\":\"a\"}\n{\"topic\":\"jobs/8\",\"data\":\"b\"}\n")
        .await;
    let (status, answer) = p.finish().await;
    assert_eq!(
        (status, answer["published"].clone()),
        (200, json!(2)),
        "{answer}"
    );
    assert_eq!(sub.next_data(2).await, ["a", "b"]);
    // A line naming a target when the query named them is refused by its number.
    let mut p = Producer::open(&s, "topic=jobs/7", "application/x-ndjson", &[]).await;
    p.send("{\"data\":\"ok\"}\n{\"topic\":\"jobs/8\",\"data\":\"no\"}\n")
        .await;
    let (status, answer) = p.finish().await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("invalid_field")),
        "{answer}"
    );
    assert_eq!(
        (answer["line"].clone(), answer["published"].clone()),
        (json!(2), json!(1))
    );
}

#[tokio::test]
async fn complete_ends_the_topic_and_a_reconnect_after_it_is_answered_204() {
    let s = Server::start(&[]).await;
    let topic = "ai/answer/2";
    let mut sub = s.subscribe(&format!("topic={topic}")).await;
    sub.opened().await;
    let mut p = Producer::open(
        &s,
        &format!("topic={topic}&complete=true"),
        "text/event-stream",
        &[],
    )
    .await;
    for word in ["The", " answer", " is", " 42"] {
        p.send(&sse_event(word)).await;
    }
    let (status, answer) = p.finish().await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["published"], 4);
    let complete_id = answer["complete"]
        .as_str()
        .expect("the complete id")
        .to_string();
    let mut events = Vec::new();
    for _ in 0..5 {
        events.push(sub.next().await);
    }
    assert_eq!(
        events.iter().map(|e| e.data.as_str()).collect::<Vec<_>>(),
        ["The", " answer", " is", " 42", "{}"]
    );
    assert_eq!(events[4].event_type, "herald.complete");
    assert_eq!(events[4].id.as_deref(), Some(complete_id.as_str()));

    // A browser's reconnect after the complete: 204, so it stops for good.
    let again = s
        .open_events(
            &format!("topic={topic}"),
            &[("last-event-id", &complete_id)],
        )
        .await;
    assert_eq!(again.status(), StatusCode::NO_CONTENT);
    let again = s
        .open_events(&format!("topic={topic}&lastEventId={complete_id}"), &[])
        .await;
    assert_eq!(again.status(), StatusCode::NO_CONTENT);
    // A connection that asked for more than that topic continues.
    let more = s
        .open_events(
            &format!("topic={topic}&topic=other"),
            &[("last-event-id", &complete_id)],
        )
        .await;
    assert_eq!(more.status(), StatusCode::OK);
    // Resuming from the middle is not finished: it gets the rest, then the complete.
    let middle = events[1].id.clone().unwrap();
    let mut late = s
        .subscribe_with(&format!("topic={topic}"), &[("last-event-id", &middle)])
        .await;
    let rest: Vec<_> = [late.next().await, late.next().await, late.next().await]
        .into_iter()
        .map(|e| (e.event_type, e.data))
        .collect();
    assert_eq!(
        rest,
        [
            ("token".to_string(), " is".to_string()),
            ("token".to_string(), " 42".to_string()),
            ("herald.complete".to_string(), "{}".to_string())
        ]
    );
    // A late subscriber gets every event, then the complete, in order.
    let mut all = s.subscribe(&format!("topic={topic}&since=all")).await;
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(all.next().await);
    }
    assert_eq!(
        seen.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        events.iter().map(|e| e.id.clone()).collect::<Vec<_>>()
    );
    // POST /complete does the same for producers that publish event by event.
    let (status, done) = s.post_json("/complete?topic=jobs/1", &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{done}");
    let id = done["id"].as_str().unwrap();
    let after = s
        .open_events("topic=jobs/1", &[("last-event-id", id)])
        .await;
    assert_eq!(after.status(), StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn a_producer_that_breaks_off_or_stalls_completes_the_topic_as_aborted() {
    let s = Server::start(&["--body-timeout", "500ms"]).await;
    let mut sub = s.subscribe("topic=ai/3&topic=ai/4").await;
    sub.opened().await;
    // The producer's socket closes mid-body.
    let mut p = Producer::open(&s, "topic=ai/3&complete=true", "text/event-stream", &[]).await;
    p.send(&sse_event("partial")).await;
    p.send("data: never fini").await;
    assert_eq!(sub.next().await.data, "partial");
    drop(p);
    let end = sub.next().await;
    assert_eq!(
        (end.event_type.as_str(), end.data.as_str()),
        ("herald.complete", "{\"reason\":\"aborted\"}")
    );
    // The producer stalls: --body-timeout between two chunks ends it, as aborted.
    let mut p = Producer::open(&s, "topic=ai/4&complete=true", "text/event-stream", &[]).await;
    p.send(&sse_event("slow")).await;
    assert_eq!(sub.next().await.data, "slow");
    let (status, answer) = p.answer().await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (408, Some("body_timeout")),
        "{answer}"
    );
    assert_eq!(answer["published"], 1);
    let end = sub.next().await;
    assert_eq!(
        (end.event_type.as_str(), end.data.as_str()),
        ("herald.complete", "{\"reason\":\"aborted\"}")
    );
    assert_eq!(end.id.as_deref(), answer["complete"].as_str());
}

#[tokio::test]
async fn bad_parts_are_refused_by_line_after_the_events_before_them_are_published() {
    let s = Server::start(&["--max-body", "64"]).await;
    let mut sub = s.subscribe("topic=t").await;
    sub.opened().await;
    let mut p = Producer::open(&s, "topic=t", "text/event-stream", &[]).await;
    p.send("data: a\n\ndata: b\n\n{\"not\":\"sse\"}\n\ndata: never\n\n")
        .await;
    let (status, answer) = p.finish().await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("invalid_stream")),
        "{answer}"
    );
    assert_eq!(
        (answer["line"].clone(), answer["published"].clone()),
        (json!(5), json!(2))
    );
    let message = answer["message"].as_str().unwrap();
    assert!(message.starts_with("line 5:"), "{message}");
    assert!(
        message.contains("the 2 events before it were published"),
        "{message}"
    );
    assert_eq!(sub.next_data(2).await, ["a", "b"]);

    // --max-body applies to each event, not to the body.
    let mut p = Producer::open(&s, "topic=t", "text/event-stream", &[]).await;
    for i in 0..5 {
        p.send(&format!("data: {}\n\n", i.to_string().repeat(40)))
            .await;
    }
    p.send(&format!(
        "data: {}\ndata: {}\n\n",
        "x".repeat(40),
        "y".repeat(40)
    ))
    .await;
    let (status, answer) = p.finish().await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (413, Some("payload_too_large")),
        "{answer}"
    );
    assert_eq!(
        (answer["line"].clone(), answer["published"].clone()),
        (json!(12), json!(5))
    );

    // Not JSON, in NDJSON.
    let mut p = Producer::open(&s, "topic=t", "application/x-ndjson", &[]).await;
    p.send("{\"data\":\"ok\"}\nnot json\n").await;
    let (status, answer) = p.finish().await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("invalid_json")),
        "{answer}"
    );
    assert_eq!(answer["line"], 2);
    // Reserved event types and bad query parameters.
    let mut p = Producer::open(&s, "topic=t", "text/event-stream", &[]).await;
    p.send("event: herald.complete\ndata: x\n\n").await;
    let (status, answer) = p.finish().await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("invalid_event")),
        "{answer}"
    );
    assert_eq!(answer["published"], 0);
    let p = Producer::open(&s, "topic=t&complete=maybe", "text/event-stream", &[]).await;
    let (status, answer) = p.answer().await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("invalid_field")),
        "{answer}"
    );
    let p = Producer::open(&s, "", "text/event-stream", &[]).await;
    let (status, answer) = p.answer().await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("no_target")),
        "{answer}"
    );
}

#[tokio::test]
async fn a_cancel_from_a_subscriber_answers_the_producer_at_once() {
    let s = Server::start(&[]).await;
    let mut sub = s.subscribe("topic=ai/5").await;
    sub.opened().await;
    let mut p = Producer::open(&s, "topic=ai/5&complete=true", "text/event-stream", &[]).await;
    p.send(&sse_event("one")).await;
    assert_eq!(sub.next().await.data, "one");
    let (status, cancel) = s.post_json("/cancel?topic=ai/5", &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{cancel}");
    // The body is still open: the answer comes because of the cancel.
    let (status, answer) = p.answer().await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["cancelled"], true);
    assert_eq!(answer["cancel"], cancel["id"]);
    assert_eq!(answer["published"], 1);
    let c = sub.next().await;
    assert_eq!(
        (c.event_type.as_str(), c.id.as_deref()),
        ("herald.cancel", cancel["id"].as_str())
    );
    let end = sub.next().await;
    assert_eq!(
        (end.event_type.as_str(), end.data.as_str()),
        ("herald.complete", "{\"reason\":\"cancelled\"}")
    );
    assert_eq!(end.id.as_deref(), answer["complete"].as_str());
}

#[tokio::test]
async fn a_cancel_on_another_node_answers_the_producer() {
    let redis = Redis::start();
    let (a, b) = (node(&redis, &[]).await, node(&redis, &[]).await);
    let mut sub = b.subscribe("topic=ai/6").await;
    sub.opened().await;
    let mut p = Producer::open(&a, "topic=ai/6&complete=true", "text/event-stream", &[]).await;
    p.send(&sse_event("one")).await;
    assert_eq!(sub.next().await.data, "one");
    let (status, cancel) = b.post_json("/cancel?topic=ai/6", &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{cancel}");
    let (status, answer) = p.answer().await;
    assert_eq!(
        (status, answer["cancelled"].clone()),
        (200, json!(true)),
        "{answer}"
    );
    assert_eq!(answer["cancel"], cancel["id"]);
    let c = sub.next().await;
    assert_eq!(c.event_type, "herald.cancel");
    let end = sub.next().await;
    assert_eq!(end.data, "{\"reason\":\"cancelled\"}");
    // The reconnect after the complete is answered 204 by either node.
    let id = end.id.unwrap();
    for n in [&a, &b] {
        let r = n.open_events("topic=ai/6", &[("last-event-id", &id)]).await;
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
    }
}

#[tokio::test]
async fn rights_are_checked_before_the_body_and_a_subscribe_right_may_cancel() {
    let s = Server::start(&["--jwt-secret", SECRET]).await;
    let bearer = |t: &str| format!("Bearer {t}");
    let viewer = token(json!({"sub": "v", "herald": {"subscribe": ["ai/**"]}}));
    let producer = token(json!({"sub": "p", "herald": {"publish": ["ai/**"]}}));
    let stranger =
        token(json!({"sub": "x", "herald": {"subscribe": ["other"], "publish": ["other"]}}));
    // A producer without rights on the query's topic is refused before it sends a body.
    let p = Producer::open(
        &s,
        "topic=ai/7",
        "text/event-stream",
        &[("authorization", &bearer(&stranger))],
    )
    .await;
    let (status, answer) = p.answer().await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (403, Some("forbidden_topic")),
        "{answer}"
    );
    let p = Producer::open(&s, "topic=ai/7", "text/event-stream", &[]).await;
    assert_eq!(p.answer().await.0, 401);

    let post = |path: &str, t: Option<&str>| {
        let mut r = s.http().post(format!("{}{path}", s.url));
        if let Some(t) = t {
            r = r.header("authorization", bearer(t));
        }
        r.send()
    };
    let code = |r: reqwest::Response| r.status();
    assert_eq!(
        code(post("/cancel?topic=ai/7", Some(&viewer)).await.unwrap()),
        StatusCode::OK
    );
    assert_eq!(
        code(post("/cancel?topic=ai/7", Some(&producer)).await.unwrap()),
        StatusCode::OK
    );
    assert_eq!(
        code(post("/cancel?topic=ai/7", Some(&stranger)).await.unwrap()),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        code(post("/cancel?topic=ai/7", None).await.unwrap()),
        StatusCode::UNAUTHORIZED
    );
    // Completing needs a publish right.
    assert_eq!(
        code(post("/complete?topic=ai/7", Some(&viewer)).await.unwrap()),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        code(post("/complete?topic=ai/7", Some(&producer)).await.unwrap()),
        StatusCode::OK
    );
    assert_eq!(
        code(post("/complete", Some(&producer)).await.unwrap()),
        StatusCode::BAD_REQUEST
    );
    // The allowed producer streams.
    let mut p = Producer::open(
        &s,
        "topic=ai/7",
        "text/event-stream",
        &[("authorization", &bearer(&producer))],
    )
    .await;
    p.send("data: x\n\n").await;
    let (status, answer) = p.finish().await;
    assert_eq!(
        (status, answer["published"].clone()),
        (200, json!(1)),
        "{answer}"
    );
}
