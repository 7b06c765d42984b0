//! Subscribing and publishing: headers and preamble, every kind of target and selector, the wire
//! format of data, batches, forms and the shortcut routes.

use reqwest::StatusCode;
use serde_json::json;

use crate::common::Server;

#[tokio::test]
async fn stream_opens_with_headers_retry_and_comment() {
    let s = Server::start(&["--retry", "1500ms"]).await;
    let mut sse = s.subscribe("topic=a").await;
    assert_eq!(sse.headers["content-type"], "text/event-stream");
    assert_eq!(sse.headers["cache-control"], "no-cache");
    assert_eq!(sse.headers["x-accel-buffering"], "no");
    sse.opened().await;
    assert_eq!(sse.parser.retry_ms, Some(1500));
    assert!(
        sse.raw.starts_with(b"retry: 1500\n:"),
        "{:?}",
        String::from_utf8_lossy(&sse.raw)
    );
}

#[tokio::test]
async fn selectors_match_exactly_one_or_many_segments() {
    let s = Server::start(&[]).await;
    let mut exact = s.subscribe("topic=chat/room1").await;
    let mut star = s.subscribe("topic=chat/*").await;
    let mut starstar = s.subscribe("topic=chat/**").await;
    let mut mid = s.subscribe("topic=*/room1").await;
    for topic in ["chat/room1", "chat/a/b", "chat", "news/room1", "chat/room2"] {
        s.publish(json!({"topic": topic, "data": topic})).await;
    }
    // A final broadcast marks the end: whatever a connection got before it is all it got.
    s.publish(json!({"broadcast": true, "data": "end"})).await;
    assert_eq!(exact.next_data(2).await, ["chat/room1", "end"]);
    assert_eq!(star.next_data(3).await, ["chat/room1", "chat/room2", "end"]);
    assert_eq!(
        starstar.next_data(4).await,
        ["chat/room1", "chat/a/b", "chat/room2", "end"]
    );
    assert_eq!(mid.next_data(3).await, ["chat/room1", "news/room1", "end"]);
}

#[tokio::test]
async fn users_get_their_messages_on_every_connection_and_broadcasts_reach_all() {
    let s = Server::start(&[]).await;
    let mut u1a = s.subscribe("user=u1").await;
    let mut u1b = s.subscribe("user=u1&topic=x").await;
    let mut u2 = s.subscribe("user=u2").await;
    let mut anon = s.subscribe("").await;
    let (status, answer) = s
        .post_json("/publish", &json!({"users": ["u1"], "data": "for u1"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["delivered"], 2);
    let (_, answer) = s
        .post_json("/broadcast", &json!({"data": "all", "event": "news"}))
        .await;
    assert_eq!(answer["delivered"], 4);
    assert_eq!(u1a.next_data(2).await, ["for u1", "all"]);
    assert_eq!(u1b.next_data(2).await, ["for u1", "all"]);
    let e = u2.next().await;
    assert_eq!((e.event_type.as_str(), e.data.as_str()), ("news", "all"));
    assert_eq!(anon.next().await.data, "all");
}

#[tokio::test]
async fn a_connection_gets_an_event_once_even_when_several_targets_match() {
    let s = Server::start(&[]).await;
    let mut sse = s
        .subscribe("user=u&topic=a&topic=a/*&topic=a/**&topic=a")
        .await;
    let (_, answer) = s
        .post_json(
            "/publish",
            &json!({"topics": ["a", "a/b"], "users": ["u"], "broadcast": true, "data": "once"}),
        )
        .await;
    assert_eq!(answer["delivered"], 1);
    s.publish(json!({"topic": "a", "data": "next"})).await;
    assert_eq!(sse.next_data(2).await, ["once", "next"]);
}

#[tokio::test]
async fn data_survives_line_breaks_unicode_and_json() {
    let s = Server::start(&[]).await;
    let mut sse = s.subscribe("topic=t").await;
    let cases = [
        json!(""),
        json!("a\n"),
        json!("line1\nline2\r\nline3\rline4"),
        json!("\n\n"),
        json!("ünïcødé ✓ 🚀 日本"),
        json!("data: injected\n\nid: 1\nevent: evil"),
        json!({"nested": [1, 2, {"x": null}]}),
        json!(42),
        json!(null),
    ];
    for data in &cases {
        s.publish(json!({"topic": "t", "data": data})).await;
    }
    let expected = [
        "",
        "a\n",
        "line1\nline2\nline3\nline4",
        "\n\n",
        "ünïcødé ✓ 🚀 日本",
        "data: injected\n\nid: 1\nevent: evil",
        r#"{"nested":[1,2,{"x":null}]}"#,
        "42",
        "null",
    ];
    for want in expected {
        let e = sse.next().await;
        assert_eq!(e.data, want);
        assert_eq!(e.event_type, "message");
    }
}

#[tokio::test]
async fn frames_carry_id_type_and_retry() {
    let s = Server::start(&[]).await;
    let mut sse = s.subscribe("topic=t").await;
    let id = s
        .publish(json!({"topic": "t", "data": "x", "event": "order.updated", "retry": 2500}))
        .await;
    let e = sse.next().await;
    assert_eq!(e.id.as_deref(), Some(id.as_str()));
    assert_eq!(e.event_type, "order.updated");
    assert_eq!(sse.parser.retry_ms, Some(2500));
    let frame = format!("id: {id}\nevent: order.updated\nretry: 2500\ndata: x\n\n");
    assert!(
        sse.raw.windows(frame.len()).any(|w| w == frame.as_bytes()),
        "frame on the wire: {}",
        String::from_utf8_lossy(&sse.raw)
    );
}

#[tokio::test]
async fn ids_increase_in_publish_order() {
    let s = Server::start(&[]).await;
    let mut last: Option<u64> = None;
    for i in 0..20 {
        let id: u64 = s
            .publish(json!({"topic": "t", "data": i}))
            .await
            .parse()
            .expect("this hub's ids are decimal");
        assert!(last.is_none_or(|l| id > l));
        last = Some(id);
    }
}

#[tokio::test]
async fn batches_publish_in_order_and_all_or_nothing() {
    let s = Server::start(&[]).await;
    let mut sse = s.subscribe("topic=b&user=u").await;
    let (status, answer) = s
        .post_json(
            "/publish",
            &json!([
                {"topic": "b", "data": "1"},
                {"users": ["u"], "data": "2"},
                {"topic": "elsewhere", "data": "3"},
            ]),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let results = answer.as_array().expect("array of results");
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["delivered"], 1);
    assert_eq!(results[2]["delivered"], 0);
    let ids: Vec<u64> = results
        .iter()
        .map(|r| r["id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));

    let (status, answer) = s
        .post_json(
            "/publish",
            &json!([{"topic": "b", "data": "never"}, {"topic": "b/*", "data": "bad"}]),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["index"], 1);
    assert_eq!(answer["error"], "invalid_topic");
    s.publish(json!({"topic": "b", "data": "after"})).await;
    assert_eq!(sse.next_data(3).await, ["1", "2", "after"]);
    let (_, stats) = s.get("/stats").await;
    assert_eq!(stats["published"], 4);
}

#[tokio::test]
async fn forms_and_shortcut_routes_publish() {
    let s = Server::start(&[]).await;
    let mut sse = s.subscribe("topic=chat&topic=news&user=u1").await;
    let (status, answer) = s
        .post_form(
            "/publish",
            &[
                ("topic", "chat"),
                ("topic", "news"),
                ("data", "hi there"),
                ("event", "greet"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["delivered"], 1);
    let (status, _) = s
        .post_form(
            "/users/u1/messages",
            &[("data", "direct"), ("retry", "100")],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = s
        .post_json(
            "/users/u1/messages",
            &json!({"data": {"k": "v"}, "event": "dm"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = s.post_form("/broadcast", &[("data", "everyone")]).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = s
        .post_form(
            "/publish",
            &[("broadcast", "1"), ("data", "form broadcast")],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let e = sse.next().await;
    assert_eq!(
        (e.event_type.as_str(), e.data.as_str()),
        ("greet", "hi there")
    );
    assert_eq!(sse.next().await.data, "direct");
    let e = sse.next().await;
    assert_eq!(
        (e.event_type.as_str(), e.data.as_str()),
        ("dm", r#"{"k":"v"}"#)
    );
    assert_eq!(sse.next_data(2).await, ["everyone", "form broadcast"]);
}

#[tokio::test]
async fn a_subscription_is_live_as_soon_as_headers_arrive() {
    let s = Server::start(&[]).await;
    for i in 0..20 {
        let topic = format!("race/{i}");
        let mut sse = s.subscribe(&format!("topic={topic}")).await;
        s.publish(json!({"topic": topic, "data": i})).await;
        assert_eq!(sse.next().await.data, i.to_string());
    }
}

#[tokio::test]
async fn route_1_names_where_each_event_went_and_a_plain_stream_is_unchanged() {
    let s = Server::start(&[]).await;
    let mut routed = s.subscribe("topic=chat/*&user=ann&route=1").await;
    let mut plain = s.subscribe("topic=chat/*&user=ann").await;
    routed.opened().await;
    plain.opened().await;
    let to_topics = s
        .publish(json!({"topics": ["chat/a", "news/x"], "data": "t", "event": "chat"}))
        .await;
    let everyone = s.publish(json!({"broadcast": true, "data": "b"})).await;
    let to_users = s
        .publish(json!({"users": ["ann", "bob"], "data": "u"}))
        .await;
    let to_bob = s
        .publish(json!({"users": ["bob"], "topic": "chat/b", "data": "v"}))
        .await;
    for sse in [&mut routed, &mut plain] {
        let got: Vec<_> = [
            sse.next().await,
            sse.next().await,
            sse.next().await,
            sse.next().await,
        ]
        .into_iter()
        .map(|e| (e.id.unwrap(), e.event_type, e.data))
        .collect();
        assert_eq!(
            got,
            [
                (to_topics.clone(), "chat".to_string(), "t".to_string()),
                (everyone.clone(), "message".into(), "b".into()),
                (to_users.clone(), "message".into(), "u".into()),
                (to_bob.clone(), "message".into(), "v".into()),
            ],
            "the routing lines change nothing for a WHATWG parser"
        );
    }
    let raw = String::from_utf8_lossy(&routed.raw).into_owned();
    let want = format!(
        "topic: chat/a\ntopic: news/x\nid: {to_topics}\nevent: chat\ndata: t\n\n\
         broadcast: 1\nid: {everyone}\ndata: b\n\n\
         user: ann\nid: {to_users}\ndata: u\n\n\
         topic: chat/b\nid: {to_bob}\ndata: v\n\n"
    );
    assert!(raw.ends_with(&want), "{raw}");
    assert!(
        !raw.contains("bob"),
        "other recipients are never named: {raw}"
    );
    let plain_raw = String::from_utf8_lossy(&plain.raw).into_owned();
    assert!(!plain_raw.contains("topic:") && !plain_raw.contains("user:"));

    // A replay carries the same lines.
    let mut resumed = s
        .subscribe_with("user=ann&route=1", &[("last-event-id", &everyone)])
        .await;
    assert_eq!(resumed.next().await.data, "u");
    assert!(
        String::from_utf8_lossy(&resumed.raw).contains(&format!("user: ann\nid: {to_users}\n")),
        "{}",
        String::from_utf8_lossy(&resumed.raw)
    );

    let refused = s.open_events("route=yes", &[]).await;
    crate::common::expect_error(
        crate::common::json_of(refused).await,
        StatusCode::BAD_REQUEST,
        "invalid_route",
    );
}
