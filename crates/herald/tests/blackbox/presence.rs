//! Presence events against the real binary: `herald.presence` on `$presence/{user}` (one online
//! event, none for more streams or a reload inside the grace, one offline event after it, growing
//! generations); `$` topics are herald's own (publishing refused, subscribing only with an explicit
//! right); a restart with `--data-dir` takes offline the users a killed run left online.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::auth::{KEY, SECRET, token};
use crate::cluster::Redis;
use crate::common::{PATIENCE, Server, Sse, expect_error, json_of};

/// The data of the next event, which must be a presence event.
async fn presence(sse: &mut Sse) -> (String, Value) {
    let e = sse.next().await;
    assert_eq!(e.event_type, "herald.presence", "{e:?}");
    let id = e.id.clone().expect("presence events have ids");
    (id, serde_json::from_str(&e.data).unwrap())
}

async fn quiet(sse: &mut Sse, within: Duration) {
    if let Some(e) = sse.next_within(within).await {
        panic!("expected no presence event, got {e:?}");
    }
}

#[tokio::test]
async fn one_online_event_no_event_for_more_streams_or_a_reload_one_offline_event() {
    let s = Server::start(&["--presence-grace", "3s"]).await;
    let mut watch = s.subscribe("topic=$presence/*").await;
    watch.opened().await;

    let mut first = s.subscribe("topic=app&user=alice").await;
    first.opened().await;
    let (_, online) = presence(&mut watch).await;
    assert_eq!(
        (&online["user"], &online["online"], &online["connections"]),
        (&json!("alice"), &json!(true), &json!(1)),
        "{online}"
    );
    let g1 = online["generation"].as_u64().unwrap();

    let mut more = Vec::new();
    for _ in 0..2 {
        let mut sse = s.subscribe("topic=app&user=alice").await;
        sse.opened().await;
        more.push(sse);
    }
    let (_, v) = s.get("/users/alice").await;
    assert_eq!(v["connections"], 3, "{v}");
    quiet(&mut watch, Duration::from_secs(1)).await;

    // A page reload: every stream closes and a new one opens at once, inside the 3 s grace.
    drop(first);
    drop(more);
    let mut reloaded = s.subscribe("topic=app&user=alice").await;
    reloaded.opened().await;
    quiet(&mut watch, Duration::from_secs(4)).await;

    // The last stream closes: one offline event, after the grace.
    drop(reloaded);
    let (_, offline) = presence(&mut watch).await;
    assert_eq!(
        (
            &offline["user"],
            &offline["online"],
            &offline["connections"]
        ),
        (&json!("alice"), &json!(false), &json!(0)),
        "{offline}"
    );
    let g2 = offline["generation"].as_u64().unwrap();
    assert!(g2 > g1, "generations grow: {g1} then {g2}");
    quiet(&mut watch, Duration::from_secs(1)).await;

    let mut back = s.subscribe("topic=app&user=alice").await;
    back.opened().await;
    let (_, again) = presence(&mut watch).await;
    assert_eq!(again["online"], true);
    assert!(again["generation"].as_u64().unwrap() > g2, "{again}");

    // Ordinary events: a new subscriber resumes them from history.
    let mut replay = s.subscribe("topic=$presence/alice&since=all").await;
    let seen: Vec<bool> = [
        presence(&mut replay).await,
        presence(&mut replay).await,
        presence(&mut replay).await,
    ]
    .iter()
    .map(|(_, v)| v["online"].as_bool().unwrap())
    .collect();
    assert_eq!(seen, [true, false, true]);
}

#[tokio::test]
async fn dollar_topics_are_herald_s_own() {
    let s = Server::start(&["--jwt-secret", SECRET, "--publish-key", KEY, "--anonymous"]).await;
    let key = format!("Bearer {KEY}");
    // Nobody publishes to `$…`, not even the publish key or an admin token.
    let admin = format!("Bearer {}", token(json!({"herald": {"admin": true}})));
    for auth in [&key, &admin] {
        let r = s
            .http()
            .post(format!("{}/publish", s.url))
            .header("authorization", auth.as_str())
            .json(&json!({"topic": "$presence/alice", "data": "{\"online\":true}"}))
            .send()
            .await
            .unwrap();
        let answer = json_of(r).await;
        assert!(
            answer.1["message"]
                .as_str()
                .unwrap()
                .contains("$presence/alice"),
            "{answer:?}"
        );
        expect_error(answer, StatusCode::BAD_REQUEST, "reserved_topic");
    }
    let everything = format!(
        "Bearer {}",
        token(json!({"sub": "u", "herald": {"subscribe": ["**"]}}))
    );
    let presence_right = format!(
        "Bearer {}",
        token(json!({"sub": "u", "herald": {"subscribe": ["$presence/**"]}}))
    );
    let cases: [(&str, Option<&str>, StatusCode); 6] = [
        ("topic=$presence/*", None, StatusCode::FORBIDDEN),
        (
            "topic=$presence/*",
            Some(&everything),
            StatusCode::FORBIDDEN,
        ),
        ("topic=$presence/*", Some(&presence_right), StatusCode::OK),
        ("topic=$presence/*", Some(&admin), StatusCode::OK),
        ("topic=$presence/*&topic=chat", Some(&key), StatusCode::OK),
        // The publish key stays no subscribe credential for ordinary topics.
        ("topic=chat", Some(&key), StatusCode::UNAUTHORIZED),
    ];
    for (query, auth, status) in cases {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let r = s.open_events(query, &headers).await;
        assert_eq!(r.status(), status, "{query} with {auth:?}");
        if status == StatusCode::FORBIDDEN {
            let (_, v) = json_of(r).await;
            assert_eq!(v["error"], "forbidden_selector", "{v}");
        }
    }

    // A `**` subscriber sees ordinary topics, never `$presence/…`; the presence right sees them.
    let mut all = s
        .subscribe_with("topic=**", &[("authorization", &everything)])
        .await;
    all.opened().await;
    let mut watch = s
        .subscribe_with("topic=$presence/*", &[("authorization", &presence_right)])
        .await;
    watch.opened().await;
    let bob = format!(
        "Bearer {}",
        token(json!({"sub": "bob", "herald": {"subscribe": ["app"]}}))
    );
    let mut bob_stream = s
        .subscribe_with("topic=app", &[("authorization", &bob)])
        .await;
    bob_stream.opened().await;
    let (_, online) = presence(&mut watch).await;
    assert_eq!(online["user"], "bob");
    let r = s
        .http()
        .post(format!("{}/publish", s.url))
        .header("authorization", key.as_str())
        .json(&json!({"topic": "news", "data": "n"}))
        .send()
        .await
        .unwrap();
    let (status, v) = json_of(r).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let e = all.next().await;
    assert_eq!((e.id.as_deref(), e.data.as_str()), (Some(id.as_str()), "n"));
}

#[tokio::test]
async fn a_restart_with_the_data_dir_takes_offline_who_the_killed_run_left_online() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let s = Server::start(&["--data-dir", data, "--presence-grace", "1s"]).await;
    let mut watch = s.subscribe("topic=$presence/*").await;
    watch.opened().await;
    let mut carol = s.subscribe("topic=app&user=carol").await;
    carol.opened().await;
    let (online_id, online) = presence(&mut watch).await;
    assert_eq!(online["online"], true);
    s.kill().await;
    drop((watch, carol));

    let s = Server::start(&["--data-dir", data, "--presence-grace", "1s"]).await;
    let mut resumed = s
        .subscribe_with("topic=$presence/*", &[("last-event-id", &online_id)])
        .await;
    let e = resumed
        .next_within(PATIENCE)
        .await
        .expect("the offline event");
    assert_eq!(e.event_type, "herald.presence");
    let offline: Value = serde_json::from_str(&e.data).unwrap();
    assert_eq!(
        (&offline["user"], &offline["online"]),
        (&json!("carol"), &json!(false)),
        "{offline}"
    );
    assert!(
        offline["generation"].as_u64() > online["generation"].as_u64(),
        "{online} then {offline}"
    );
    quiet(&mut resumed, Duration::from_secs(2)).await;
}

/// Two nodes on one real Redis, `report` apart.
async fn two_nodes(redis: &Redis, report: &str) -> (Server, Server) {
    let url = redis.url();
    let args = [
        "--redis",
        url.as_str(),
        "--cluster-report",
        report,
        "--presence-grace",
        "1s",
    ];
    (Server::start(&args).await, Server::start(&args).await)
}

#[tokio::test]
async fn a_stream_opened_on_one_node_is_pushed_to_the_others_at_once() {
    let redis = Redis::start();
    // Reports an hour apart: whatever node A learns of node B's streams, B pushed as it happened.
    let (a, b) = two_nodes(&redis, "1h").await;
    let mut watch = a.subscribe("topic=$presence/*").await;
    watch.opened().await;
    let mut alice = b.subscribe("topic=app&user=alice").await;
    alice.opened().await;
    let v = a
        .eventually("/users/alice", |v| v["connections"] == 1)
        .await;
    assert_eq!(v["online"], true, "{v}");
    a.eventually("/users", |v| v["count"] == 1).await;
    let (_, online) = presence(&mut watch).await;
    assert_eq!(
        (&online["user"], &online["online"]),
        (&json!("alice"), &json!(true))
    );
    let mut second = a.subscribe("topic=app&user=alice").await;
    second.opened().await;
    a.eventually("/users/alice", |v| v["connections"] == 2)
        .await;
    b.eventually("/users/alice", |v| v["connections"] == 2)
        .await;
    drop(alice);
    drop(second);
    a.eventually("/users/alice", |v| v["online"] == false).await;
    b.eventually("/users/alice", |v| v["online"] == false).await;
    let (_, offline) = presence(&mut watch).await;
    assert_eq!(offline["online"], false, "{offline}");
    assert!(offline["generation"].as_u64() > online["generation"].as_u64());
    // One event per transition, though two nodes held her streams.
    quiet(&mut watch, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_killed_node_s_users_go_offline_once_announced_by_a_survivor() {
    let redis = Redis::start();
    let (a, b) = two_nodes(&redis, "1s").await;
    let c = Server::start(&["--redis", &redis.url(), "--presence-grace", "1s"]).await;
    let mut watch = a.subscribe("topic=$presence/*").await;
    watch.opened().await;
    let mut alice = b.subscribe("topic=app&user=alice").await;
    alice.opened().await;
    let (online_id, online) = presence(&mut watch).await;
    assert_eq!(online["online"], true);
    a.eventually("/users/alice", |v| v["connections"] == 1)
        .await;

    b.signal("KILL");
    drop(alice);
    // Node B is declared gone 5 reports (5 s) after its last one; a survivor reaps it then.
    let e = watch
        .next_within(Duration::from_secs(30))
        .await
        .expect("the offline event of a killed node's user");
    let offline: Value = serde_json::from_str(&e.data).unwrap();
    assert_eq!(
        (&offline["user"], &offline["online"]),
        (&json!("alice"), &json!(false)),
        "{offline}"
    );
    assert!(offline["generation"].as_u64() > online["generation"].as_u64());
    a.eventually("/users/alice", |v| v["online"] == false).await;
    // Exactly one: both survivors watched, one announced; nothing more arrives.
    quiet(&mut watch, Duration::from_secs(3)).await;
    let mut from_c = c
        .subscribe_with("topic=$presence/alice", &[("last-event-id", &online_id)])
        .await;
    // History agrees: after the online event, one offline event and nothing else.
    let (_, replayed) = presence(&mut from_c).await;
    assert_eq!(replayed, offline);
    quiet(&mut from_c, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn subscriptions_list_selectors_with_stream_counts_paged_and_cluster_wide() {
    let redis = Redis::start();
    let (a, b) = two_nodes(&redis, "200ms").await;
    let mut held = Vec::new();
    for (node, query) in [
        (&a, "topic=chat/a&topic=chat/*"),
        (&a, "topic=chat/a"),
        (&b, "topic=chat/a"),
        (&b, "topic=news/**"),
    ] {
        let mut sse = node.subscribe(query).await;
        sse.opened().await;
        held.push(sse);
    }
    let v = a
        .eventually("/subscriptions", |v| {
            v["subscriptions"].as_array().is_some_and(|s| s.len() == 3)
                && v["subscriptions"][1]["streams"] == 3
        })
        .await;
    assert_eq!(
        v,
        json!({"subscriptions": [
            {"selector": "chat/*", "streams": 1},
            {"selector": "chat/a", "streams": 3},
            {"selector": "news/**", "streams": 1},
        ], "next": null})
    );
    let (_, page) = a.get("/subscriptions?prefix=chat/&limit=1").await;
    assert_eq!(
        page,
        json!({"subscriptions": [{"selector": "chat/*", "streams": 1}], "next": "chat/*"})
    );
    let (_, page) = a
        .get("/subscriptions?prefix=chat/&limit=1&cursor=chat/*")
        .await;
    assert_eq!(
        page,
        json!({"subscriptions": [{"selector": "chat/a", "streams": 3}], "next": null})
    );
    let (status, v) = a.get("/subscriptions?limit=0").await;
    assert_eq!(
        (status, v["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_limit"))
    );
}

#[tokio::test]
async fn subscriptions_are_for_the_publish_key_or_admins() {
    let s = Server::start(&["--jwt-secret", SECRET, "--publish-key", KEY]).await;
    let r = s
        .http()
        .get(format!("{}/subscriptions", s.url))
        .send()
        .await
        .unwrap();
    expect_error(json_of(r).await, StatusCode::UNAUTHORIZED, "unauthorized");
    let user = token(json!({"sub": "u"}));
    let r = s
        .http()
        .get(format!("{}/subscriptions", s.url))
        .bearer_auth(&user)
        .send()
        .await
        .unwrap();
    expect_error(json_of(r).await, StatusCode::FORBIDDEN, "forbidden");
    let r = s
        .http()
        .get(format!("{}/subscriptions", s.url))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    let (status, v) = json_of(r).await;
    assert_eq!(
        (status, v),
        (StatusCode::OK, json!({"subscriptions": [], "next": null}))
    );
}
