//! Authorization against the real binary: every token rejection, rights on subscribe and publish,
//! private and user messages (live, resume, since), presence and control, expiry and CORS.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{PATIENCE, Server, Sse, json_of};

pub const SECRET: &str = "a-test-secret-of-32-bytes-length";
pub const KEY: &str = "publish-key-for-tests-0123456789";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn keys_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys")
}

/// A token signed with `SECRET`; `claims` are merged over `{exp: now + 1h}`.
pub fn token(claims: Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        claims,
    )
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: Value) -> String {
    let mut all = json!({ "exp": now() + 3600 });
    for (k, v) in claims.as_object().unwrap() {
        all[k] = v.clone();
    }
    jsonwebtoken::encode(&Header::new(alg), &all, key).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn rights(user: &str, subscribe: &[&str], publish: &[&str], admin: bool) -> String {
    token(json!({
        "sub": user,
        "herald": { "subscribe": subscribe, "publish": publish, "admin": admin },
    }))
}

async fn status_of(s: &Server, query: &str, headers: &[(&str, &str)]) -> (StatusCode, Value) {
    let r = s.open_events(query, headers).await;
    let status = r.status();
    if status == StatusCode::OK {
        return (status, Value::Null);
    }
    json_of(r).await
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

async fn with_auth(
    s: &Server,
    method: reqwest::Method,
    path: &str,
    auth: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = s.http().request(method, format!("{}{path}", s.url));
    if let Some(a) = auth {
        req = req.header("authorization", bearer(a));
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    json_of(req.send().await.unwrap()).await
}

#[tokio::test]
async fn auth_subscribe_rejections() {
    let s = Server::start(&["--jwt-secret", SECRET, "--publish-key", KEY]).await;
    let good = rights("alice", &["chat/*"], &[], false);
    let cases: Vec<(&str, String, StatusCode, &str)> = vec![
        (
            "topic=chat/a",
            String::new(),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "topic=chat/a",
            sign(
                Algorithm::HS256,
                &EncodingKey::from_secret(b"another-secret-of-enough-length"),
                json!({"sub": "alice", "herald": {"subscribe": ["chat/*"]}}),
            ),
            StatusCode::UNAUTHORIZED,
            "invalid_token",
        ),
        (
            "topic=chat/a",
            format!(
                "{}.{}.",
                b64(br#"{"alg":"none","typ":"JWT"}"#),
                b64(format!(
                    r#"{{"sub":"alice","exp":{},"herald":{{"subscribe":["chat/*"]}}}}"#,
                    now() + 60
                )
                .as_bytes())
            ),
            StatusCode::UNAUTHORIZED,
            "invalid_token",
        ),
        (
            "topic=chat/a",
            token(json!({"sub": "alice", "exp": now() - 120, "herald": {"subscribe": ["chat/*"]}})),
            StatusCode::UNAUTHORIZED,
            "invalid_token",
        ),
        (
            "topic=chat/a",
            token(json!({"sub": "alice", "nbf": now() + 600, "herald": {"subscribe": ["chat/*"]}})),
            StatusCode::UNAUTHORIZED,
            "invalid_token",
        ),
        (
            "topic=chat/**",
            good.clone(),
            StatusCode::FORBIDDEN,
            "forbidden_selector",
        ),
        (
            "topic=news/a",
            good.clone(),
            StatusCode::FORBIDDEN,
            "forbidden_selector",
        ),
        (
            "topic=chat/a&user=bob",
            good.clone(),
            StatusCode::FORBIDDEN,
            "forbidden_user",
        ),
        // The publish key is not a subscribe credential.
        (
            "topic=chat/a",
            KEY.to_string(),
            StatusCode::UNAUTHORIZED,
            "invalid_token",
        ),
        (
            "topic=chat/a",
            "not.a.jwt".into(),
            StatusCode::UNAUTHORIZED,
            "invalid_token",
        ),
    ];
    for (query, tok, status, code) in cases {
        let auth = bearer(&tok);
        let headers: Vec<(&str, &str)> = if tok.is_empty() {
            vec![]
        } else {
            vec![("authorization", auth.as_str())]
        };
        let (got, v) = status_of(&s, query, &headers).await;
        assert_eq!(got, status, "{query} with {tok}: {v}");
        assert_eq!(v["error"], code, "{query}: {v}");
    }
    let (_, v) = status_of(&s, "topic=chat/**", &[("authorization", &bearer(&good))]).await;
    assert!(v["message"].as_str().unwrap().contains("chat/**"), "{v}");
    // The three ways to carry a token.
    for (query, headers) in [
        (
            "topic=chat/a".to_string(),
            vec![("authorization", bearer(&good))],
        ),
        (
            "topic=chat/a".to_string(),
            vec![("cookie", format!("x=1; herald_token={good}"))],
        ),
        (format!("topic=chat/a&access_token={good}"), vec![]),
        (
            format!("topic=chat/a&user=alice&access_token={good}"),
            vec![],
        ),
    ] {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (got, v) = status_of(&s, &query, &h).await;
        assert_eq!(got, StatusCode::OK, "{query}: {v}");
    }
    // The connection's user is the token's sub.
    let _alice = s
        .subscribe_with("topic=chat/a", &[("authorization", &bearer(&good))])
        .await;
    let (_, v) = with_auth(&s, reqwest::Method::GET, "/users/alice", Some(KEY), None).await;
    assert_eq!(v["connections"], 1, "{v}");
}

#[tokio::test]
async fn auth_issuer_audience_and_public_keys() {
    let s = Server::start(&[
        "--jwt-secret",
        SECRET,
        "--jwt-issuer",
        "https://issuer.example",
        "--jwt-audience",
        "herald",
    ])
    .await;
    let claims = |aud: &str, iss: &str| {
        token(json!({"sub": "u", "aud": aud, "iss": iss, "herald": {"subscribe": ["a"]}}))
    };
    for (tok, status) in [
        (claims("herald", "https://issuer.example"), StatusCode::OK),
        (
            claims("other", "https://issuer.example"),
            StatusCode::UNAUTHORIZED,
        ),
        (
            claims("herald", "https://evil.example"),
            StatusCode::UNAUTHORIZED,
        ),
        (
            token(json!({"sub": "u", "herald": {"subscribe": ["a"]}})),
            StatusCode::UNAUTHORIZED,
        ),
    ] {
        let (got, v) = status_of(&s, "topic=a", &[("authorization", &bearer(&tok))]).await;
        assert_eq!(got, status, "{v}");
    }
    drop(s);

    let dir = keys_dir();
    let claims = json!({"sub": "u", "herald": {"subscribe": ["a"]}});
    for (public, private, alg) in [
        ("rsa.pub.pem", "rsa.pem", Algorithm::RS256),
        ("ec.pub.pem", "ec.pem", Algorithm::ES256),
        ("ed.pub.pem", "ed.pem", Algorithm::EdDSA),
    ] {
        let public = dir.join(public);
        let s = Server::start(&["--jwt-public-key", public.to_str().unwrap()]).await;
        let pem = std::fs::read(dir.join(private)).unwrap();
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
            _ => EncodingKey::from_ed_pem(&pem),
        }
        .unwrap();
        let ok = sign(alg, &key, claims.clone());
        let (got, v) = status_of(&s, "topic=a", &[("authorization", &bearer(&ok))]).await;
        assert_eq!(got, StatusCode::OK, "{alg:?}: {v}");
        // Algorithm confusion: HS256 "signed" with the public key's PEM text as the secret.
        let public_pem = std::fs::read(&public).unwrap();
        let forged = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(&public_pem),
            claims.clone(),
        );
        let (got, v) = status_of(&s, "topic=a", &[("authorization", &bearer(&forged))]).await;
        assert_eq!(got, StatusCode::UNAUTHORIZED, "{alg:?} confusion: {v}");
        assert_eq!(v["error"], "invalid_token");
    }
}

/// Reads events until one with `data` arrives or the stream goes quiet; returns all data seen.
async fn drain(sse: &mut Sse, within: Duration) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(e) = sse.next_within(within).await {
        out.push(e.data);
    }
    out
}

#[tokio::test]
async fn auth_private_and_user_messages_stay_private() {
    let s = Server::start(&["--jwt-secret", SECRET, "--publish-key", KEY, "--anonymous"]).await;
    let alice = rights("alice", &["chat/**"], &[], false);
    let bob = rights("bob", &["chat/**"], &[], false);
    let news_only = rights("carol", &["news/**"], &[], false);
    let h = |t: &str| bearer(t);
    let mut live_alice = s
        .subscribe_with("topic=chat/a", &[("authorization", &h(&alice))])
        .await;
    let mut live_bob = s
        .subscribe_with("topic=chat/a", &[("authorization", &h(&bob))])
        .await;
    let mut live_anon = s.subscribe("topic=chat/a").await;
    let mut live_carol = s
        .subscribe_with("topic=news/x", &[("authorization", &h(&news_only))])
        .await;
    // Naming a user without a token is refused.
    let (got, _) = status_of(&s, "topic=chat/a&user=alice", &[]).await;
    assert_eq!(got, StatusCode::UNAUTHORIZED);
    for sse in [
        &mut live_alice,
        &mut live_bob,
        &mut live_anon,
        &mut live_carol,
    ] {
        sse.opened().await;
    }
    let publish = async |body: Value| {
        with_auth(&s, reqwest::Method::POST, "/publish", Some(KEY), Some(body)).await
    };
    let (st, first) = publish(json!({"topic": "chat/a", "data": "public"})).await;
    assert_eq!(st, StatusCode::OK);
    publish(json!({"topic": "chat/a", "data": "private", "private": true})).await;
    publish(json!({"users": ["alice"], "data": "for alice"})).await;
    publish(json!({"users": ["alice"], "topic": "chat/a", "data": "alice and chat"})).await;
    publish(json!({"topic": "news/x", "data": "news private", "private": true})).await;
    let (_, last) = publish(json!({"topic": "chat/a", "data": "end"})).await;
    let quiet = Duration::from_millis(700);
    assert_eq!(
        drain(&mut live_alice, quiet).await,
        ["public", "private", "for alice", "alice and chat", "end"]
    );
    assert_eq!(
        drain(&mut live_bob, quiet).await,
        ["public", "private", "alice and chat", "end"]
    );
    assert_eq!(drain(&mut live_anon, quiet).await, ["public", "end"]);
    assert_eq!(drain(&mut live_carol, quiet).await, ["news private"]);
    let _ = last;

    // The same rules on resume (Last-Event-ID) and with since.
    let before_first = (first["id"].as_str().unwrap().parse::<u64>().unwrap() - 1).to_string();
    for start in [
        ("since=all".to_string(), vec![]),
        (String::new(), vec![("last-event-id", before_first.clone())]),
        (format!("lastEventId={before_first}"), vec![]),
    ] {
        let mut bob_s = open_as(&s, &start.0, &start.1, Some(&bob)).await;
        assert_eq!(
            drain(&mut bob_s, quiet).await,
            ["public", "private", "alice and chat", "end"],
            "bob resuming with {start:?}"
        );
        let mut anon = open_as(&s, &start.0, &start.1, None).await;
        assert_eq!(
            drain(&mut anon, quiet).await,
            ["public", "end"],
            "anonymous with {start:?}"
        );
        let mut alice_s = open_as(&s, &start.0, &start.1, Some(&alice)).await;
        assert_eq!(
            drain(&mut alice_s, quiet).await.len(),
            5,
            "alice with {start:?}"
        );
    }
    // Reading a user's messages back: that user, the key or admin only.
    let path = "/users/alice/messages";
    let get = async |tok: &str| with_auth(&s, reqwest::Method::GET, path, Some(tok), None).await;
    assert_eq!(get(&bob).await.0, StatusCode::FORBIDDEN);
    assert_eq!(get(&alice).await.0, StatusCode::OK);
    assert_eq!(get(KEY).await.1["messages"].as_array().unwrap().len(), 2);
}

async fn open_as(s: &Server, query: &str, headers: &[(&str, String)], tok: Option<&str>) -> Sse {
    let mut hs: Vec<(&str, String)> = headers.to_vec();
    if let Some(t) = tok {
        hs.push(("authorization", bearer(t)));
    }
    let hs: Vec<(&str, &str)> = hs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    s.subscribe_with(&format!("topic=chat/a&{query}"), &hs)
        .await
}

/// Method, path, bearer credential, JSON body, expected status.
type Case<'a> = (
    reqwest::Method,
    &'a str,
    Option<&'a str>,
    Option<Value>,
    StatusCode,
);

#[tokio::test]
async fn auth_publish_presence_and_control_rights() {
    let s = Server::start(&[
        "--jwt-secret",
        SECRET,
        "--publish-key",
        KEY,
        "--publish-key",
        "second-key-for-rotation-000",
    ])
    .await;
    let writer = rights("w", &[], &["chat/**"], false);
    let admin = rights("root", &[], &[], true);
    use reqwest::Method as M;
    let cases: Vec<Case> = vec![
        (
            M::POST,
            "/publish",
            None,
            Some(json!({"topic": "chat/a", "data": "x"})),
            StatusCode::UNAUTHORIZED,
        ),
        (
            M::POST,
            "/publish",
            Some(&writer),
            Some(json!({"topic": "chat/a", "data": "x"})),
            StatusCode::OK,
        ),
        (
            M::POST,
            "/publish",
            Some(&writer),
            Some(json!({"topics": ["chat/a", "news/a"], "data": "x"})),
            StatusCode::FORBIDDEN,
        ),
        (
            M::POST,
            "/publish",
            Some(&writer),
            Some(json!({"users": ["u"], "data": "x"})),
            StatusCode::FORBIDDEN,
        ),
        (
            M::POST,
            "/publish",
            Some(&writer),
            Some(json!({"broadcast": true, "data": "x"})),
            StatusCode::FORBIDDEN,
        ),
        (
            M::POST,
            "/broadcast",
            Some(&writer),
            Some(json!({"data": "x"})),
            StatusCode::FORBIDDEN,
        ),
        (
            M::POST,
            "/users/u/messages",
            Some(&writer),
            Some(json!({"data": "x"})),
            StatusCode::FORBIDDEN,
        ),
        (
            M::POST,
            "/users/u/messages",
            Some(&admin),
            Some(json!({"data": "x"})),
            StatusCode::OK,
        ),
        (
            M::POST,
            "/broadcast",
            Some(KEY),
            Some(json!({"data": "x"})),
            StatusCode::OK,
        ),
        (
            M::POST,
            "/broadcast",
            Some("second-key-for-rotation-000"),
            Some(json!({"data": "x"})),
            StatusCode::OK,
        ),
        (
            M::POST,
            "/publish",
            Some("wrong-key-wrong-key-wrong"),
            Some(json!({"topic": "a", "data": "x"})),
            StatusCode::UNAUTHORIZED,
        ),
        (M::GET, "/stats", None, None, StatusCode::UNAUTHORIZED),
        (M::GET, "/stats", Some(&writer), None, StatusCode::FORBIDDEN),
        (M::GET, "/stats", Some(&admin), None, StatusCode::OK),
        (M::GET, "/users", None, None, StatusCode::UNAUTHORIZED),
        (M::GET, "/users", Some(KEY), None, StatusCode::OK),
        (
            M::GET,
            "/users/u",
            Some(&writer),
            None,
            StatusCode::FORBIDDEN,
        ),
        (
            M::DELETE,
            "/users/u/connections",
            None,
            None,
            StatusCode::UNAUTHORIZED,
        ),
        (
            M::DELETE,
            "/users/u/connections",
            Some(&writer),
            None,
            StatusCode::FORBIDDEN,
        ),
        (
            M::DELETE,
            "/users/u/connections",
            Some(KEY),
            None,
            StatusCode::OK,
        ),
        (M::GET, "/healthz", None, None, StatusCode::OK),
    ];
    for (method, path, auth, body, status) in cases {
        let shown = format!("{method} {path} {auth:?} {body:?}");
        let (got, v) = with_auth(&s, method, path, auth, body).await;
        assert_eq!(got, status, "{shown}: {v}");
        if status != StatusCode::OK {
            assert!(
                v["error"].is_string() && v["message"].is_string(),
                "{shown}: {v}"
            );
        }
    }
    let r = s
        .http()
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "/metrics stays open");
    // A cookie is no publish credential (it would let any page publish as its user).
    let r = s
        .http()
        .post(format!("{}/publish", s.url))
        .header("cookie", format!("herald_token={writer}"))
        .json(&json!({"topic": "chat/a", "data": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn auth_streams_end_when_their_token_expires() {
    let s = Server::start(&["--jwt-secret", SECRET, "--jwt-leeway", "0s"]).await;
    let tok = token(json!({"sub": "u", "exp": now() + 2, "herald": {"subscribe": ["a"]}}));
    let mut sse = s
        .subscribe_with("topic=a", &[("authorization", &bearer(&tok))])
        .await;
    sse.opened().await;
    let (ended, events) = sse.ends_within(PATIENCE).await;
    assert!(ended, "the stream ended");
    let last = events.last().expect("a close event");
    assert_eq!(last.event_type, "herald.close");
    assert_eq!(
        serde_json::from_str::<Value>(&last.data).unwrap(),
        json!({"reason": "token_expired"})
    );
}

#[tokio::test]
async fn auth_cors_allows_only_listed_origins() {
    let s = Server::start(&[
        "--jwt-secret",
        SECRET,
        "--cors-origin",
        "https://app.example",
    ])
    .await;
    let preflight = |origin: &'static str| {
        s.http()
            .request(reqwest::Method::OPTIONS, format!("{}/events", s.url))
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header(
                "access-control-request-headers",
                "authorization,last-event-id",
            )
            .send()
    };
    let ok = preflight("https://app.example").await.unwrap();
    let h = ok.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    assert_eq!(h["access-control-allow-credentials"], "true");
    let evil = preflight("https://evil.example").await.unwrap();
    assert!(evil.headers().get("access-control-allow-origin").is_none());
    let r = s
        .http()
        .get(format!("{}/healthz", s.url))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    drop(s);
    // No wildcard together with authorization (cookies).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--jwt-secret",
            SECRET,
            "--cors-origin",
            "*",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cors-origin"));
}

/// Reproduces issue 12 (weak spot): with only `--publish-key`, anyone could subscribe as
/// `user=alice` and read her private events (while `GET /users/alice/messages` answered 401).
/// Token-less subscribers are now anonymous unless `--open-subscribe` asks for openness.
#[tokio::test]
async fn publish_key_only_subscribers_are_anonymous_unless_open_subscribe() {
    let s = Server::start(&["--publish-key", KEY]).await;
    let r = s.open_events("user=alice", &[]).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let mut anon = s.subscribe("topic=t").await;
    anon.opened().await;
    for body in [
        json!({"users": ["alice"], "data": "for alice"}),
        json!({"topic": "t", "private": true, "data": "private"}),
        json!({"topic": "t", "data": "public"}),
    ] {
        let (status, v) =
            with_auth(&s, reqwest::Method::POST, "/publish", Some(KEY), Some(body)).await;
        assert_eq!(status, StatusCode::OK, "{v}");
    }
    assert_eq!(anon.next().await.data, "public");

    let open = Server::start(&["--publish-key", KEY, "--open-subscribe"]).await;
    let mut alice = open.subscribe("user=alice").await;
    let (status, _) = with_auth(
        &open,
        reqwest::Method::POST,
        "/publish",
        Some(KEY),
        Some(json!({"users": ["alice"], "data": "for alice"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(alice.next().await.data, "for alice");
}

/// Issue 12 (not yet tried): cookie tossing of `herald_token` from a sibling subdomain. Two
/// `herald_token` cookies are refused (either may be the attacker's); `__Host-herald_token`, which
/// no other host can set, wins over them.
#[tokio::test]
async fn a_tossed_herald_token_cookie_is_not_trusted() {
    let s = Server::start(&["--jwt-secret", SECRET, "--publish-key", KEY]).await;
    let alice = rights("alice", &["a"], &[], false);
    let mallory = rights("mallory", &["a"], &[], false);
    let both = format!("herald_token={alice}; herald_token={mallory}");
    let (status, v) = status_of(&s, "topic=a", &[("cookie", &both)]).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_token"))
    );
    let host = format!("herald_token={mallory}; __Host-herald_token={alice}");
    let mut sse = s.subscribe_with("topic=a", &[("cookie", &host)]).await;
    let (status, _) = with_auth(
        &s,
        reqwest::Method::POST,
        "/publish",
        Some(KEY),
        Some(json!({"users": ["alice"], "data": "for alice"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sse.next().await.data, "for alice", "connected as alice");
}
