//! The Mercure endpoint (`--mercure`) against the real binary: publish fields and publisher ids,
//! draft-08 and v0.x subscriptions and tokens, private updates live and on replay, resume by a
//! publisher's id in memory, on disk and across a Redis cluster, RFC 6750 refusals, every bad
//! input of issue 17, heartbeats and CORS; active subscriptions (events and the API, on one node
//! and across a Redis cluster).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};

use herald_core::sse_parser::SseEvent;

use crate::auth::SECRET;
use crate::cluster::{Redis, node};
use crate::common::{PATIENCE, Server, Sse};

const RESOURCE: &str = "https://hub.example/.well-known/mercure";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A draft-08 RFC 9068 access token (`typ: at+jwt`) for `aud`, granting `details`.
fn draft08(aud: &str, exp: u64, details: Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.typ = Some("at+jwt".into());
    let claims = json!({
        "iss": "https://issuer.example", "aud": aud, "exp": exp, "sub": "tester",
        "client_id": "tests", "iat": now(), "jti": "1", "authorization_details": details,
    });
    jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn detail(actions: &[&str], matches: &[(&str, &str)]) -> Value {
    json!({
        "type": "https://mercure.rocks/authorization-detail",
        "actions": actions,
        "topics": matches.iter().map(|(m, t)| json!({"match": m, "match_type": t})).collect::<Vec<_>>(),
    })
}

/// A token publishing and subscribing to everything (draft-08).
fn all_rights() -> String {
    draft08(
        RESOURCE,
        now() + 3600,
        json!([detail(&["publish", "subscribe"], &[("*", "exact")])]),
    )
}

/// A v0.x token: the `mercure` claim and nothing else (no exp, aud, iss).
fn v0(claim: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({ "mercure": claim }),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn hub(extra: &[&str]) -> Server {
    let mut args = vec![
        "--mercure",
        "--jwt-secret",
        SECRET,
        "--mercure-resource",
        RESOURCE,
        "--anonymous",
    ];
    args.extend_from_slice(extra);
    Server::start(&args).await
}

/// POSTs a Mercure update; returns status, `Content-Type`, `WWW-Authenticate` and body.
async fn post(
    s: &Server,
    token: Option<&str>,
    form: &[(&str, &str)],
) -> (StatusCode, String, String, String) {
    let mut req = s
        .http()
        .post(format!("{}/.well-known/mercure", s.url))
        .form(form);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.expect("post");
    let header = |name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    let (ct, www) = (header("content-type"), header("www-authenticate"));
    (r.status(), ct, www, r.text().await.unwrap())
}

async fn publish(s: &Server, form: &[(&str, &str)]) -> String {
    let (status, ct, _, body) = post(s, Some(&all_rights()), form).await;
    assert_eq!(status, StatusCode::OK, "{form:?}: {body}");
    assert_eq!(ct, "text/plain; charset=utf-8");
    body
}

async fn open(s: &Server, query: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = s
        .http()
        .get(format!("{}/.well-known/mercure?{query}", s.url));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.expect("subscribe")
}

async fn subscribe(s: &Server, query: &str, headers: &[(&str, &str)]) -> Sse {
    let r = open(s, query, headers).await;
    assert_eq!(r.status(), StatusCode::OK, "subscribe {query}");
    let mut sse = Sse::new(r);
    sse.opened().await;
    sse
}

/// The ids of what `sse` receives until (and including) the update with id `last`.
async fn ids_until(sse: &mut Sse, last: &str) -> Vec<String> {
    let mut ids = Vec::new();
    loop {
        let e = sse.next().await;
        let id = e.id.clone().unwrap_or_default();
        ids.push(id.clone());
        if id == last {
            return ids;
        }
    }
}

#[tokio::test]
async fn mercure_publish_fields_reach_a_matching_subscriber_with_the_publishers_id() {
    let s = hub(&[]).await;
    let mut sub = subscribe(&s, "match=https://example.com/books/1", &[]).await;
    let data = "first line\n\n  indented\nlast";
    let id = publish(
        &s,
        &[
            ("topic", "https://example.com/books/1"),
            ("topic", "https://example.com/alternate"),
            ("data", data),
            ("id", "urn:uuid:publisher-chosen"),
            ("type", "book.updated"),
            ("retry", "2500"),
            ("unknown", "ignored"),
        ],
    )
    .await;
    assert_eq!(id, "urn:uuid:publisher-chosen");
    let e = sub.next().await;
    assert_eq!(e.id.as_deref(), Some("urn:uuid:publisher-chosen"));
    assert_eq!(e.event_type, "book.updated");
    assert_eq!(e.data, data);
    assert!(
        String::from_utf8_lossy(&sub.raw).contains("retry: 2500\n"),
        "the retry field is sent"
    );
    // Without an id the hub makes one, a fragment; an alternate topic alone also matches.
    let mut alt = subscribe(&s, "match=https://example.com/alternate", &[]).await;
    let hub_id = publish(
        &s,
        &[
            ("topic", "https://example.com/books/1"),
            ("topic", "https://example.com/alternate"),
            ("data", "x"),
        ],
    )
    .await;
    assert!(hub_id.starts_with('#'), "{hub_id}");
    assert_eq!(alt.next().await.id, Some(hub_id.clone()));
    assert_eq!(sub.next().await.id, Some(hub_id));
    // A duplicate of an earlier id is allowed.
    assert_eq!(
        publish(
            &s,
            &[
                ("topic", "https://example.com/books/1"),
                ("id", "urn:uuid:publisher-chosen")
            ]
        )
        .await,
        "urn:uuid:publisher-chosen"
    );
}

#[tokio::test]
async fn mercure_matchers_exact_wildcard_url_pattern_and_uri_template() {
    let s = hub(&[]).await;
    let mut pattern = subscribe(&s, "match_urlpattern=https://example.com/books/:id", &[]).await;
    let mut template = subscribe(&s, "topic=https://example.com/books/{id}", &[]).await;
    let mut any = subscribe(&s, "match=*", &[]).await;
    let mut exact = subscribe(&s, "match_exact=https://example.com/books/2", &[]).await;
    publish(
        &s,
        &[
            ("topic", "https://example.com/books/1/reviews"),
            ("id", "deep"),
        ],
    )
    .await;
    publish(
        &s,
        &[("topic", "https://example.com/books/1"), ("id", "one")],
    )
    .await;
    publish(
        &s,
        &[("topic", "https://example.com/books/2"), ("id", "two")],
    )
    .await;
    assert_eq!(ids_until(&mut pattern, "two").await, ["one", "two"]);
    assert_eq!(ids_until(&mut template, "two").await, ["one", "two"]);
    assert_eq!(ids_until(&mut any, "two").await, ["deep", "one", "two"]);
    assert_eq!(ids_until(&mut exact, "two").await, ["two"]);
}

#[tokio::test]
async fn mercure_private_updates_reach_only_matching_grants_live_and_on_replay() {
    let s = hub(&[]).await;
    let books = v0(json!({"subscribe": ["https://example.com/books/{id}"]}));
    let draft = draft08(
        RESOURCE,
        now() + 3600,
        json!([detail(
            &["subscribe"],
            &[("https://example.com/users/:id", "urlpattern")]
        )]),
    );
    let mut anonymous = subscribe(&s, "match=*", &[]).await;
    let mut by_header = subscribe(
        &s,
        "match=*",
        &[("authorization", &format!("Bearer {books}"))],
    )
    .await;
    let mut by_query = subscribe(&s, &format!("topic=*&authorization={books}"), &[]).await;
    let mut by_cookie = subscribe(
        &s,
        "match=*",
        &[("cookie", &format!("mercureAuthorization={draft}"))],
    )
    .await;
    let mut by_draft_cookie = subscribe(
        &s,
        "match=*",
        &[("cookie", &format!("__Secure-mercure_access_token={draft}"))],
    )
    .await;
    publish(
        &s,
        &[
            ("topic", "https://example.com/books/1"),
            ("private", ""),
            ("id", "pb"),
        ],
    )
    .await;
    publish(
        &s,
        &[
            ("topic", "https://example.com/users/7"),
            ("private", "on"),
            ("id", "pu"),
        ],
    )
    .await;
    // Private to the union of its topics' audiences.
    publish(
        &s,
        &[
            ("topic", "https://example.com/other"),
            ("topic", "https://example.com/users/8"),
            ("private", "on"),
            ("id", "pboth"),
        ],
    )
    .await;
    publish(
        &s,
        &[("topic", "https://example.com/books/1"), ("id", "public")],
    )
    .await;
    assert_eq!(ids_until(&mut anonymous, "public").await, ["public"]);
    assert_eq!(ids_until(&mut by_header, "public").await, ["pb", "public"]);
    assert_eq!(ids_until(&mut by_query, "public").await, ["pb", "public"]);
    assert_eq!(
        ids_until(&mut by_cookie, "public").await,
        ["pu", "pboth", "public"]
    );
    assert_eq!(
        ids_until(&mut by_draft_cookie, "public").await,
        ["pu", "pboth", "public"]
    );
    // On replay the same rules hold.
    let mut replay = subscribe(&s, "match=*&last_event_id=earliest", &[]).await;
    assert_eq!(ids_until(&mut replay, "public").await, ["public"]);
    let mut replay = subscribe(
        &s,
        "topic=*&lastEventID=earliest",
        &[("authorization", &format!("Bearer {books}"))],
    )
    .await;
    assert_eq!(ids_until(&mut replay, "public").await, ["pb", "public"]);
    // Without --anonymous a token-less subscriber is refused, RFC 6750 style.
    let closed = Server::start(&["--mercure", "--jwt-secret", SECRET]).await;
    let r = open(&closed, "match=*", &[]).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
}

/// Publishes a, b, c (and a duplicate id), then checks every way of resuming on `reader`.
async fn check_resume(writer: &Server, reader: &Server) {
    publish(writer, &[("topic", "r"), ("id", "a"), ("data", "A")]).await;
    publish(writer, &[("topic", "r"), ("id", "b"), ("data", "B")]).await;
    publish(writer, &[("topic", "r"), ("id", "a"), ("data", "A again")]).await;
    publish(writer, &[("topic", "r"), ("id", "c"), ("data", "C")]).await;
    // A repeated id resumes after its earliest occurrence, the later one included.
    let r = open(reader, "match=r", &[("last-event-id", "a")]).await;
    assert_eq!(r.headers()["mercure-last-event-id"], "a");
    assert_eq!(r.headers()["last-event-id"], "a");
    let mut sse = Sse::new(r);
    assert_eq!(ids_until(&mut sse, "c").await, ["b", "a", "c"]);
    let r = open(reader, "match=r&last_event_id=b", &[]).await;
    assert_eq!(r.headers()["mercure-last-event-id"], "b");
    assert_eq!(ids_until(&mut Sse::new(r), "c").await, ["a", "c"]);
    let r = open(reader, "topic=r&lastEventID=b", &[]).await;
    assert_eq!(ids_until(&mut Sse::new(r), "c").await, ["a", "c"]);
    // An unknown id and `earliest` send everything retained, naming `earliest`.
    for asked in ["never-published", "earliest"] {
        let r = open(reader, "match=r", &[("last-event-id", asked)]).await;
        assert_eq!(r.headers()["mercure-last-event-id"], "earliest");
        assert_eq!(ids_until(&mut Sse::new(r), "c").await, ["a", "b", "a", "c"]);
    }
    // A hub-made id resumes too.
    let made = publish(writer, &[("topic", "r"), ("data", "D")]).await;
    publish(writer, &[("topic", "r"), ("id", "e")]).await;
    let r = open(reader, "match=r", &[("last-event-id", &made)]).await;
    assert_eq!(ids_until(&mut Sse::new(r), "e").await, ["e"]);
}

#[tokio::test]
async fn mercure_resumes_from_a_publisher_id_in_memory() {
    let s = hub(&[]).await;
    check_resume(&s, &s).await;
}

#[tokio::test]
async fn mercure_resumes_from_a_publisher_id_on_disk_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    {
        let s = hub(&["--data-dir", data_dir]).await;
        publish(&s, &[("topic", "t"), ("id", "before-restart")]).await;
    }
    let s = hub(&["--data-dir", data_dir]).await;
    let r = open(&s, "match=t", &[("last-event-id", "before-restart")]).await;
    assert_eq!(r.headers()["mercure-last-event-id"], "before-restart");
    let mut sse = Sse::new(r);
    sse.opened().await;
    publish(&s, &[("topic", "t"), ("id", "after")]).await;
    assert_eq!(ids_until(&mut sse, "after").await, ["after"]);
    check_resume(&s, &s).await;
}

#[tokio::test]
async fn mercure_resumes_from_a_publisher_id_across_a_redis_cluster() {
    let redis = Redis::start();
    let base = [
        "--mercure",
        "--jwt-secret",
        SECRET,
        "--mercure-resource",
        RESOURCE,
        "--anonymous",
    ];
    let (a, b) = (node(&redis, &base).await, node(&redis, &base).await);
    let mut live_on_b = subscribe(&b, "match=r", &[]).await;
    check_resume(&a, &b).await;
    assert_eq!(ids_until(&mut live_on_b, "e").await.len(), 6);
}

#[tokio::test]
async fn mercure_refuses_bad_updates_with_400_and_publishes_nothing() {
    let s = hub(&[]).await;
    let mut sub = subscribe(&s, "match=*", &[]).await;
    let bad: &[&[(&str, &str)]] = &[
        &[("topic", "t"), ("id", "earliest")],
        &[("topic", "t"), ("id", "#x")],
        &[("topic", "t"), ("id", "a\u{1}b")],
        &[("topic", "/.well-known/mercure/subscriptions/x")],
        &[(
            "topic",
            "https://hub.example/.well-known/mercure/subscriptions/x/y",
        )],
        &[("topic", "https://hub.example/.well-known/%6Dercure/x")],
        &[("topic", "https://hub.example/a/../.well-known/mercure")],
        &[("topic", "*")],
        &[("topic", "t"), ("type", "mercure")],
        &[("topic", "t"), ("type", "herald.gap")],
        &[("topic", "t"), ("retry", "1s")],
        &[("topic", "t"), ("retry", "-1")],
        &[("data", "no topic")],
        &[("topic", "")],
    ];
    for form in bad {
        let (status, _, _, body) = post(&s, Some(&all_rights()), form).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{form:?}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "invalid_mercure_update", "{form:?}");
    }
    // A browser form from another site is refused before anything else, as on `POST /publish`.
    let r = s
        .http()
        .post(format!("{}/.well-known/mercure", s.url))
        .bearer_auth(all_rights())
        .header("origin", "https://evil.example")
        .form(&[("topic", "t"), ("id", "forged")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "cross_origin_form"
    );
    publish(&s, &[("topic", "t"), ("id", "marker")]).await;
    assert_eq!(ids_until(&mut sub, "marker").await, ["marker"]);
}

#[tokio::test]
async fn mercure_refuses_bad_tokens_per_rfc_6750_and_publishes_nothing() {
    let s = hub(&[]).await;
    let mut sub = subscribe(&s, "match=*", &[]).await;
    let form: &[(&str, &str)] = &[
        ("topic", "https://example.com/a"),
        ("topic", "https://example.com/b"),
    ];
    let publish_all = json!([detail(&["publish"], &[("*", "exact")])]);
    let cases = [
        (None, StatusCode::UNAUTHORIZED, "Bearer"),
        (
            Some(draft08(
                "https://other.example/.well-known/mercure",
                now() + 3600,
                publish_all.clone(),
            )),
            StatusCode::UNAUTHORIZED,
            "Bearer error=\"invalid_token\"",
        ),
        (
            Some(draft08(RESOURCE, now() - 3600, publish_all.clone())),
            StatusCode::UNAUTHORIZED,
            "Bearer error=\"invalid_token\"",
        ),
        (
            Some(v0(json!({"publish": ["https://example.com/a"]}))),
            StatusCode::FORBIDDEN,
            "Bearer error=\"insufficient_scope\"",
        ),
        (
            Some(draft08(
                RESOURCE,
                now() + 3600,
                json!([detail(&["publish"], &[("https://example.com/a", "exact")])]),
            )),
            StatusCode::FORBIDDEN,
            "Bearer error=\"insufficient_scope\"",
        ),
        (
            // A malformed Mercure detail refuses the whole token.
            Some(draft08(
                RESOURCE,
                now() + 3600,
                json!([detail(&["publish"], &[("*", "exact")]), {"type": "https://mercure.rocks/authorization-detail", "actions": ["publish"], "topics": []}]),
            )),
            StatusCode::UNAUTHORIZED,
            "Bearer error=\"invalid_token\"",
        ),
        (
            Some("not.a.token".to_string()),
            StatusCode::UNAUTHORIZED,
            "Bearer error=\"invalid_token\"",
        ),
    ];
    for (token, status, challenge) in cases {
        let (got, _, www, body) = post(&s, token.as_deref(), form).await;
        assert_eq!(
            (got, www.as_str()),
            (status, challenge),
            "{token:?}: {body}"
        );
    }
    // Both topics granted: published (v0.x token, no exp, URI Template grant).
    let ok = v0(json!({"publish": ["https://example.com/{x}"]}));
    let (status, _, _, _) = post(
        &s,
        Some(&ok),
        &[
            ("topic", "https://example.com/a"),
            ("topic", "https://example.com/b"),
            ("id", "marker"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        ids_until(&mut sub, "marker").await,
        ["marker"],
        "nothing refused was published"
    );
    // Subscriptions: a bad token is refused, not downgraded to anonymous.
    let r = open(&s, "match=*", &[("authorization", "Bearer not.a.token")]).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = open(&s, "match=*", &[("authorization", "Basic eA==")]).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.headers()["www-authenticate"],
        "Bearer error=\"invalid_request\""
    );
}

#[tokio::test]
async fn mercure_refuses_bad_subscriptions() {
    let s = hub(&[]).await;
    for query in [
        "",
        "other=1",
        "matchx=a",
        "MATCH_regex=a",
        "match=",
        "match_urlpattern=https://x/(\\d%2B)",
        "topic=https://x/{",
        "match=a%E2%80%8Bb",
    ] {
        let r = open(&s, query, &[]).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{query}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "invalid_mercure_subscription", "{query}");
    }
}

#[tokio::test]
async fn mercure_streams_send_heartbeats_and_cors_headers() {
    let s = hub(&["--heartbeat", "1s", "--cors-origin", "https://app.example"]).await;
    let r = open(&s, "match=t", &[("origin", "https://app.example")]).await;
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(r.headers()["access-control-allow-credentials"], "true");
    let exposed = r.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(
        exposed.contains("link") && exposed.contains("mercure-last-event-id"),
        "{exposed}"
    );
    let mut sse = Sse::new(r);
    sse.opened().await;
    let before = sse.parser.comments;
    let (ended, events) = sse.ends_within(Duration::from_millis(2500)).await;
    assert!(!ended && events.is_empty());
    assert!(sse.parser.comments > before, "a heartbeat comment came");
    let _ = PATIENCE;
}

// Active subscriptions (`--mercure-subscriptions`).

const SUBS: &str = "/.well-known/mercure/subscriptions";

/// A hub with active subscriptions; closed streams are noticed within a heartbeat.
async fn subscriptions_hub() -> Server {
    hub(&["--mercure-subscriptions", "--heartbeat", "1s"]).await
}

/// A v0.x token subscribing to the subscription events and the API (and `extra`).
fn v0_watcher() -> String {
    v0(json!({"subscribe": [format!("{SUBS}{{/topic}}{{/subscriber}}")]}))
}

/// A draft-08 token subscribing to everything under the subscriptions namespace and the
/// collection itself (`/.well-known/mercure/subscriptions*`).
fn draft08_watcher() -> String {
    draft08(
        RESOURCE,
        now() + 3600,
        json!([detail(
            &["subscribe"],
            &[(&format!("{SUBS}*"), "urlpattern")]
        )]),
    )
}

/// A subscriber's token carrying a payload (draft-08: on the detail whose matcher matches).
fn draft08_with_payload() -> String {
    let mut specific = detail(
        &["subscribe"],
        &[("https://example.com/books/:id", "urlpattern")],
    );
    specific["payload"] = json!({"tenant": "books"});
    let mut default = detail(&["subscribe"], &[("*", "exact")]);
    default["payload"] = json!({"tenant": "default"});
    draft08(RESOURCE, now() + 3600, json!([specific, default]))
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Reads `sse` until an event whose JSON data satisfies `check`; returns it and its data.
async fn event_where(sse: &mut Sse, check: impl Fn(&Value) -> bool) -> (SseEvent, Value) {
    loop {
        let e = sse.next().await;
        if let Ok(v) = serde_json::from_str::<Value>(&e.data)
            && check(&v)
        {
            return (e, v);
        }
    }
}

async fn api(s: &Server, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut req = s.http().get(format!("{}{path}", s.url));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.expect("subscriptions api")
}

/// The documents of a collection answer, or panics naming the status.
async fn listed(s: &Server, path: &str, token: &str) -> Vec<Value> {
    let r = api(s, path, Some(token)).await;
    assert_eq!(r.status(), StatusCode::OK, "{path}");
    let v: Value = r.json().await.unwrap();
    v["subscriptions"]
        .as_array()
        .expect("subscriptions")
        .clone()
}

/// Percent-encodes like an RFC 6570 simple expansion (independently of the hub's code).
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test]
async fn mercure_subscription_events_announce_a_subscriber_arriving_and_leaving() {
    let s = subscriptions_hub().await;
    // Watchers in each dialect: a v0.x URI Template over `{topic}/{subscriber}`, a draft-08 URL
    // Pattern over `{match_type}/{match}/{subscriber}`; an anonymous one gets nothing (private).
    let mut v0_watch = subscribe(
        &s,
        &format!("topic={SUBS}/{{topic}}/{{subscriber}}"),
        &[("authorization", &bearer(&v0_watcher()))],
    )
    .await;
    let mut d8_watch = subscribe(
        &s,
        &format!("match_urlpattern={SUBS}/:type/:match/:subscriber"),
        &[("authorization", &bearer(&draft08_watcher()))],
    )
    .await;
    let mut anonymous = subscribe(&s, &format!("match_urlpattern={SUBS}/*"), &[]).await;

    // A draft-08 subscriber, with a payload.
    let d8 = subscribe(
        &s,
        "match_urlpattern=https://example.com/books/:id",
        &[("authorization", &bearer(&draft08_with_payload()))],
    )
    .await;
    let (e, doc) = event_where(&mut d8_watch, |v| {
        v["match"] == "https://example.com/books/:id"
    })
    .await;
    assert_eq!(
        e.event_type, "mercure",
        "draft-08 events have the reserved SSE type"
    );
    assert_eq!(doc["type"], "subscription");
    assert_eq!(doc["match_type"], "urlpattern");
    assert_eq!(doc["active"], true);
    assert_eq!(doc["payload"], json!({"tenant": "books"}));
    let subscriber = doc["subscriber"].as_str().unwrap().to_string();
    assert!(subscriber.starts_with("urn:uuid:"), "{subscriber}");
    assert_eq!(
        doc["id"],
        format!(
            "{SUBS}/urlpattern/{}/{}",
            enc("https://example.com/books/:id"),
            enc(&subscriber)
        )
    );

    // A v0.x subscriber, with `mercure.payload`.
    let v0_token = v0(json!({"subscribe": ["https://example.com/{x}"], "payload": {"user": 7}}));
    let v0_sub = subscribe(
        &s,
        &format!("topic=https://example.com/{{x}}&authorization={v0_token}"),
        &[],
    )
    .await;
    let (e, v0_doc) = event_where(&mut v0_watch, |v| v["topic"] == "https://example.com/{x}").await;
    assert_eq!(e.event_type, "message", "v0.x events have no SSE type");
    assert_eq!(v0_doc["@context"], "https://mercure.rocks/");
    assert_eq!(v0_doc["type"], "Subscription");
    assert_eq!(v0_doc["active"], true);
    assert_eq!(v0_doc["payload"], json!({"user": 7}));
    let v0_subscriber = v0_doc["subscriber"].as_str().unwrap().to_string();
    assert_ne!(v0_subscriber, subscriber, "each connection has its own id");
    assert_eq!(
        v0_doc["id"],
        format!(
            "{SUBS}/{}/{}",
            enc("https://example.com/{x}"),
            enc(&v0_subscriber)
        )
    );

    // Leaving: the same documents with active false.
    drop(d8);
    let (_, gone) = event_where(&mut d8_watch, |v| v["subscriber"] == subscriber.as_str()).await;
    assert_eq!(gone["active"], false);
    assert_eq!(gone["id"], doc["id"]);
    drop(v0_sub);
    let (_, gone) = event_where(&mut v0_watch, |v| v["subscriber"] == v0_subscriber.as_str()).await;
    assert_eq!(gone["active"], false);
    assert_eq!(gone["id"], v0_doc["id"]);

    // The anonymous watcher saw none of it.
    publish(
        &s,
        &[("topic", "https://example.com/marker"), ("id", "marker")],
    )
    .await;
    let mut anonymous_all = subscribe(&s, "match=*&last_event_id=earliest", &[]).await;
    assert_eq!(ids_until(&mut anonymous_all, "marker").await, ["marker"]);
    let (ended, events) = anonymous.ends_within(Duration::from_millis(300)).await;
    assert!(!ended && events.is_empty(), "{events:?}");
}

#[tokio::test]
async fn mercure_subscriptions_api_answers_json_and_json_ld() {
    let s = subscriptions_hub().await;
    let _d8 = subscribe(
        &s,
        "match_urlpattern=https://example.com/books/:id&match=https://example.com/news",
        &[("authorization", &bearer(&draft08_with_payload()))],
    )
    .await;
    let v0_token = v0(json!({"subscribe": ["*"], "payload": {"user": 7}}));
    let v0_sub = subscribe(
        &s,
        "topic=https://example.com/{x}",
        &[("authorization", &bearer(&v0_token))],
    )
    .await;

    // draft-08: JSON, the cursor on the Link header.
    let r = api(&s, SUBS, Some(&draft08_watcher())).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/json");
    let link = r.headers()["link"].to_str().unwrap().to_string();
    assert!(
        link.starts_with("</.well-known/mercure>; rel=\"mercure\"; last-event-id=\"#"),
        "{link}"
    );
    assert!(r.headers().contains_key("etag"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["id"], SUBS);
    assert_eq!(body["type"], "subscriptions");
    assert!(body.get("@context").is_none());
    let docs = body["subscriptions"].as_array().unwrap();
    assert_eq!(docs.len(), 3, "{body}");
    let books = docs
        .iter()
        .find(|d| d["match"] == "https://example.com/books/:id")
        .unwrap()
        .clone();
    assert_eq!(books["payload"], json!({"tenant": "books"}));
    let news = docs
        .iter()
        .find(|d| d["match"] == "https://example.com/news")
        .unwrap();
    assert_eq!(
        news["payload"],
        json!({"tenant": "default"}),
        "the first matching detail"
    );
    assert_eq!(
        news["subscriber"], books["subscriber"],
        "one connection, one id"
    );
    let v0_doc = docs
        .iter()
        .find(|d| d["topic"] == "https://example.com/{x}")
        .unwrap()
        .clone();
    assert_eq!(v0_doc["type"], "Subscription");
    assert_eq!(v0_doc["payload"], json!({"user": 7}));

    // v0.x: JSON-LD, the cursor in the body.
    let r = api(&s, SUBS, Some(&v0_watcher())).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/ld+json");
    let ld: Value = r.json().await.unwrap();
    assert_eq!(ld["@context"], "https://mercure.rocks/");
    assert_eq!(ld["type"], "Subscriptions");
    assert_eq!(ld["id"], SUBS);
    assert_eq!(ld["subscriptions"].as_array().unwrap().len(), 3);
    let cursor = ld["lastEventID"].as_str().unwrap().to_string();
    assert!(
        link.contains(&format!("last-event-id=\"{cursor}\"")),
        "{link} vs {cursor}"
    );

    // One subscription: the event's document; JSON-LD adds @context and lastEventID.
    let one = api(&s, books["id"].as_str().unwrap(), Some(&draft08_watcher())).await;
    assert_eq!(one.status(), StatusCode::OK);
    assert_eq!(one.json::<Value>().await.unwrap(), books);
    let one = api(&s, v0_doc["id"].as_str().unwrap(), Some(&v0_watcher())).await;
    assert_eq!(one.headers()["content-type"], "application/ld+json");
    let mut one: Value = one.json().await.unwrap();
    assert_eq!(one["@context"], "https://mercure.rocks/");
    assert_eq!(one["lastEventID"], cursor.as_str());
    one.as_object_mut().unwrap().remove("@context");
    one.as_object_mut().unwrap().remove("lastEventID");
    assert_eq!(one, v0_doc);

    // Per matcher (draft-08) and per topic (v0.x).
    let by_matcher = listed(
        &s,
        &format!("{SUBS}/urlpattern/{}", enc("https://example.com/books/:id")),
        &draft08_watcher(),
    )
    .await;
    assert_eq!(by_matcher, vec![books.clone()]);
    let by_topic = listed(
        &s,
        &format!("{SUBS}/{}", enc("https://example.com/{x}")),
        &v0_watcher(),
    )
    .await;
    assert_eq!(by_topic, vec![v0_doc.clone()]);

    // Resuming the subscription events from the cursor misses nothing and repeats nothing.
    let mut watch = subscribe(
        &s,
        &format!(
            "topic={SUBS}/{{topic}}/{{subscriber}}&lastEventID={}",
            enc(&cursor)
        ),
        &[("authorization", &bearer(&v0_watcher()))],
    )
    .await;
    let _late = subscribe(
        &s,
        "topic=https://example.com/late",
        &[("authorization", &bearer(&v0_token))],
    )
    .await;
    // The watcher's own subscription first (announced before its stream opened), then the late.
    let first: Value = serde_json::from_str(&watch.next().await.data).unwrap();
    assert_eq!(first["topic"], format!("{SUBS}/{{topic}}/{{subscriber}}"));
    assert_eq!(first["active"], true);
    let next: Value = serde_json::from_str(&watch.next().await.data).unwrap();
    assert_eq!(next["topic"], "https://example.com/late");

    // Not found, bad shapes.
    let missing = format!("{SUBS}/exact/{}/{}", enc("nope"), enc("urn:uuid:x"));
    let r = api(&s, &missing, Some(&draft08_watcher())).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "not_found");
    let r = api(&s, &format!("{SUBS}/regex/a/b"), Some(&draft08_watcher())).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "invalid_mercure_subscription"
    );

    // Unauthorised: no token 401; a token without a subscribe right on the path 403.
    let r = api(&s, SUBS, None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    for token in [
        v0(json!({"subscribe": ["https://example.com/{x}"], "publish": ["*"]})),
        draft08(
            RESOURCE,
            now() + 3600,
            json!([detail(
                &["subscribe"],
                &[(&format!("{SUBS}/exact/*"), "urlpattern")]
            )]),
        ),
    ] {
        let r = api(&s, SUBS, Some(&token)).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            r.headers()["www-authenticate"],
            "Bearer error=\"insufficient_scope\""
        );
    }
    // That draft-08 token may read what its matcher covers.
    let narrow = draft08(
        RESOURCE,
        now() + 3600,
        json!([detail(
            &["subscribe"],
            &[(&format!("{SUBS}/urlpattern/*"), "urlpattern")]
        )]),
    );
    assert_eq!(
        listed(
            &s,
            &format!("{SUBS}/urlpattern/{}", enc("https://example.com/books/:id")),
            &narrow
        )
        .await,
        vec![books]
    );

    // A subscriber gone is gone from the list.
    drop(v0_sub);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while listed(&s, SUBS, &draft08_watcher())
        .await
        .iter()
        .any(|d| d["topic"] == "https://example.com/{x}")
    {
        assert!(tokio::time::Instant::now() < deadline, "still listed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The cursor is the newest update's id when a header can carry it, else its `#<id>`.
    let link_after = |id: &'static str| {
        let s = &s;
        async move {
            publish(s, &[("topic", "https://example.com/c"), ("id", id)]).await;
            let r = api(s, SUBS, Some(&draft08_watcher())).await;
            assert!(r.headers().contains_key("etag"));
            r.headers()["link"].to_str().unwrap().to_string()
        }
    };
    assert!(
        link_after("plain-id")
            .await
            .contains("last-event-id=\"plain-id\""),
        "a publisher's id"
    );
    assert!(
        link_after("ünïcode").await.contains("last-event-id=\"#"),
        "a hub id for an id no header can carry"
    );
}

#[tokio::test]
async fn mercure_subscriptions_are_off_unless_asked_for() {
    let s = hub(&[]).await;
    let r = api(&s, SUBS, Some(&draft08_watcher())).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let out = tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--mercure-subscriptions",
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("herald should exit")
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mercure-subscriptions"), "{stderr}");
}

async fn subscriber_on(s: &Server, topic: &str) -> Sse {
    subscribe(
        s,
        &format!("match={}", enc(topic)),
        &[("authorization", &bearer(&draft08_with_payload()))],
    )
    .await
}

/// A cluster node's Mercure hub with the subscriptions API and draft-08 tokens.
const SUBSCRIPTIONS_NODE: [&str; 6] = [
    "--mercure",
    "--mercure-subscriptions",
    "--jwt-secret",
    SECRET,
    "--mercure-resource",
    RESOURCE,
];

/// Two nodes on `redis` with the subscriptions API, and a watcher of every subscription on the
/// first.
async fn subscriptions_cluster(redis: &Redis) -> (Server, Server, Sse) {
    let mut base = SUBSCRIPTIONS_NODE.to_vec();
    base.push("--anonymous");
    let (a, b) = (node(redis, &base).await, node(redis, &base).await);
    let watch = subscribe(
        &a,
        &format!("match_urlpattern={SUBS}/:type/:match/:subscriber"),
        &[("authorization", &bearer(&draft08_watcher()))],
    )
    .await;
    (a, b, watch)
}

#[tokio::test]
async fn mercure_subscriptions_span_a_redis_cluster() {
    let redis = Redis::start();
    let (a, mut b, mut watch) = subscriptions_cluster(&redis).await;
    // A subscriber on B: announced to A's watcher, listed by A's API.
    let leaving = subscriber_on(&b, "https://example.com/leaving").await;
    let (_, doc) = event_where(&mut watch, |v| v["match"] == "https://example.com/leaving").await;
    assert_eq!(doc["active"], true);
    let on_a: Vec<Value> = listed(&a, SUBS, &draft08_watcher()).await;
    assert!(on_a.contains(&doc), "{on_a:?}");
    drop(leaving);
    let (_, gone) = event_where(&mut watch, |v| v["subscriber"] == doc["subscriber"]).await;
    assert_eq!(gone["active"], false);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while listed(&a, SUBS, &draft08_watcher())
        .await
        .iter()
        .any(|d| d["id"] == doc["id"])
    {
        assert!(tokio::time::Instant::now() < deadline, "still listed on A");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // B killed with a subscriber: A, reaping it, announces the end and stops listing it.
    let stays = subscriber_on(&b, "https://example.com/killed").await;
    let (_, doc) = event_where(&mut watch, |v| v["match"] == "https://example.com/killed").await;
    assert!(listed(&a, SUBS, &draft08_watcher()).await.contains(&doc));
    b.signal("KILL");
    b.wait_exit(PATIENCE).await;
    let (_, gone) = event_where(&mut watch, |v| {
        v["subscriber"] == doc["subscriber"] && v["active"] == false
    })
    .await;
    assert_eq!(gone["id"], doc["id"]);
    assert!(
        !listed(&a, SUBS, &draft08_watcher())
            .await
            .iter()
            .any(|d| d["id"] == doc["id"])
    );
    drop(stays);
}

/// Review finding: the subscriptions API read every node's subscriptions before it looked at
/// `If-None-Match`. Now a matching tag is a 304 at once: shown by a peer whose share cannot be
/// read (a listing answers 503), while the revalidation still answers 304 with the same tag.
#[tokio::test]
async fn mercure_subscriptions_api_answers_304_without_listing() {
    let redis = Redis::start();
    let a = node(&redis, &SUBSCRIPTIONS_NODE).await;
    let first = api(&a, SUBS, Some(&draft08_watcher())).await;
    assert_eq!(first.status(), StatusCode::OK);
    let tag = first.headers()["etag"].to_str().unwrap().to_string();
    // A live peer whose shared hash is not a hash: reading it fails.
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    let cli = |args: &[&str]| crate::redis_servers::cli(redis.port, args);
    cli(&["ZADD", "herald:nodes", &now_ms, "unreadable"]);
    cli(&["SET", "herald:node:unreadable:shared", "not a hash"]);
    let listing = api(&a, SUBS, Some(&draft08_watcher())).await;
    assert_eq!(listing.status(), StatusCode::SERVICE_UNAVAILABLE);
    for sent in [tag.clone(), format!("W/{tag}"), format!("\"other\", {tag}")] {
        let r = listed_if_none_match(&a, &sent).await;
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED, "{sent}");
        assert_eq!(r.headers()["etag"], tag.as_str());
        assert!(r.headers().contains_key("link"));
    }
    // An old tag still lists (and so fails here).
    let r = listed_if_none_match(&a, "\"#0\"").await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
}

/// The watcher's `GET` of the subscriptions API with `If-None-Match: tags`.
async fn listed_if_none_match(s: &Server, tags: &str) -> reqwest::Response {
    s.http()
        .get(format!("{}{SUBS}", s.url))
        .bearer_auth(draft08_watcher())
        .header("if-none-match", tags)
        .send()
        .await
        .unwrap()
}

/// Review finding: the subscriptions API's answers depend on the caller's credentials (and on
/// `Accept` without them) but said not so to caches: every answer now carries `Vary`.
#[tokio::test]
async fn mercure_subscriptions_api_answers_vary_on_credentials() {
    let s = subscriptions_hub().await;
    let ok = api(&s, SUBS, Some(&draft08_watcher())).await;
    assert_eq!(ok.status(), StatusCode::OK);
    let tag = ok.headers()["etag"].to_str().unwrap().to_string();
    let not_modified = listed_if_none_match(&s, &tag).await;
    assert_eq!(not_modified.status(), StatusCode::NOT_MODIFIED);
    let unauthorized = api(&s, SUBS, None).await;
    assert_eq!(unauthorized.status(), StatusCode::UNAUTHORIZED);
    let forbidden = api(&s, SUBS, Some(&v0(json!({"subscribe": ["x"]})))).await;
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
    for r in [ok, not_modified, unauthorized, forbidden] {
        let vary = r.headers()["vary"].to_str().unwrap().to_ascii_lowercase();
        for name in ["authorization", "cookie", "accept"] {
            assert!(vary.contains(name), "{}: vary {vary}", r.status());
        }
    }
}

/// Review finding: subscription events shared the herald topic of every Mercure update, so every
/// Mercure stream (and a herald stream on that topic) carried them. Now they travel on the
/// reserved `$mercure/subscriptions`, which only the subscribers that may receive one hold; what
/// those receive is unchanged.
#[tokio::test]
async fn mercure_subscription_events_travel_apart_from_updates() {
    // An open hub: every right, and herald's admin routes answer.
    let s = Server::start(&["--mercure", "--mercure-subscriptions", "--heartbeat", "1s"]).await;
    let mut herald_stream = s.subscribe("topic=.well-known/mercure").await;
    let mut ordinary = subscribe(&s, "match=https://example.com/books/1", &[]).await;
    let mut watcher = subscribe(&s, &format!("match_urlpattern={SUBS}/*"), &[]).await;
    let mut everything = subscribe(&s, "match=*", &[]).await;
    let selectors = s
        .eventually("/subscriptions", |v| {
            v["subscriptions"].as_array().is_some_and(|l| {
                l.iter()
                    .any(|e| e["selector"] == ".well-known/mercure" && e["streams"] == 4)
            })
        })
        .await;
    let reserved = selectors["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["selector"] == "$mercure/subscriptions")
        .unwrap_or_else(|| panic!("{selectors}"));
    assert_eq!(
        reserved["streams"], 2,
        "the watcher and match=*: {selectors}"
    );

    // A new subscriber is announced to those who may see it, then an update follows.
    let _late = subscribe(&s, "match=https://example.com/late", &[]).await;
    let (_, doc) = event_where(&mut watcher, |v| v["match"] == "https://example.com/late").await;
    assert_eq!(doc["active"], true);
    let (_, doc) = event_where(&mut everything, |v| {
        v["match"] == "https://example.com/late"
    })
    .await;
    assert_eq!(doc["active"], true);
    publish(
        &s,
        &[("topic", "https://example.com/books/1"), ("id", "marker")],
    )
    .await;
    assert_eq!(ordinary.next().await.id.as_deref(), Some("marker"));
    // The herald stream on the updates' topic gets the update, and no subscription event first.
    let first = herald_stream.next().await;
    let envelope: Value = serde_json::from_str(&first.data).unwrap();
    assert_eq!(envelope["id"], "marker", "{envelope}");
}

/// Review finding: the reaper of a dead node returned at the first failing Redis call after it
/// had taken the node out of the cluster, so the `active: false` of its subscriptions was lost
/// for good. Here the dead node's users cannot be read: its subscriptions still end, and the node
/// stays claimed for reaping until the rest succeeds on a later pass.
#[tokio::test]
async fn mercure_subscriptions_of_a_dead_node_end_even_when_reaping_fails_part_way() {
    let redis = Redis::start();
    let (_a, mut b, mut watch) = subscriptions_cluster(&redis).await;
    let stays = subscriber_on(&b, "https://example.com/killed").await;
    let (_, doc) = event_where(&mut watch, |v| v["match"] == "https://example.com/killed").await;
    let cli = |args: &[&str]| crate::redis_servers::cli(redis.port, args);
    // B's node id: the node whose shared hash holds that subscription.
    let shared = cli(&["KEYS", "herald:node:*:shared"]);
    let b_key = shared
        .lines()
        .find(|k| cli(&["HGETALL", k]).contains("https://example.com/killed"))
        .unwrap_or_else(|| panic!("B's shared hash among {shared:?}"));
    let b_node = b_key
        .strip_prefix("herald:node:")
        .and_then(|k| k.strip_suffix(":shared"))
        .unwrap()
        .to_string();
    b.signal("KILL");
    b.wait_exit(PATIENCE).await;
    // B's users are not a hash any more: reading them fails when A reaps B.
    let users = format!("herald:node:{b_node}:users");
    cli(&["SET", &users, "not a hash"]);
    let (_, gone) = tokio::time::timeout(
        Duration::from_secs(20),
        event_where(&mut watch, |v| {
            v["subscriber"] == doc["subscriber"] && v["active"] == false
        }),
    )
    .await
    .expect("the end of the dead node's subscription is announced");
    assert_eq!(gone["id"], doc["id"]);
    assert_eq!(
        cli(&["ZRANGE", "herald:reaping", "0", "-1"]),
        b_node,
        "B stays claimed while its users are unread"
    );
    // Once its users can be read, a later pass finishes B, announcing nothing twice.
    cli(&["DEL", &users]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cli(&["ZRANGE", "herald:reaping", "0", "-1"]).is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "B is never reaped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        cli(&["EXISTS", &format!("herald:node:{b_node}:shared")]),
        "0"
    );
    let (ended, again) = watch.ends_within(Duration::from_millis(300)).await;
    assert!(
        !ended
            && !again
                .iter()
                .any(|e| e.data.contains(doc["subscriber"].as_str().unwrap())),
        "{again:?}"
    );
    drop(stays);
}
