//! Bad input: every rejection answers the right status with a JSON body naming the problem, and a
//! rejected request publishes nothing.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{Server, expect_error};

async fn raw_post(
    s: &Server,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let mut req = s.http().post(format!("{}{path}", s.url)).body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    crate::common::json_of(req.send().await.unwrap()).await
}

#[tokio::test]
async fn bad_publish_bodies_are_refused_and_publish_nothing() {
    let s = Server::start(&["--max-body", "1000"]).await;
    let json_cases: Vec<(Value, &str)> = vec![
        (json!({"topic": "a"}), "missing_data"),
        (json!({"data": "x"}), "no_target"),
        (
            json!({"topic": "a", "topics": ["b"], "data": "x"}),
            "conflicting_fields",
        ),
        (json!({"topic": "", "data": "x"}), "invalid_topic"),
        (json!({"topic": "a//b", "data": "x"}), "invalid_topic"),
        (json!({"topic": "a/*", "data": "x"}), "invalid_topic"),
        (json!({"topic": "a/**", "data": "x"}), "invalid_topic"),
        (json!({"topic": "a\nb", "data": "x"}), "invalid_topic"),
        (
            json!({"topic": "x".repeat(256), "data": "x"}),
            "invalid_topic",
        ),
        (json!({"topics": "a", "data": "x"}), "invalid_field"),
        (json!({"users": ["a/b"], "data": "x"}), "invalid_user"),
        (json!({"users": [""], "data": "x"}), "invalid_user"),
        (json!({"users": [7], "data": "x"}), "invalid_field"),
        (json!({"broadcast": "yes", "data": "x"}), "invalid_field"),
        (
            json!({"topic": "a", "data": "x", "event": "herald.close"}),
            "invalid_event",
        ),
        (
            json!({"topic": "a", "data": "x", "event": "a\nb"}),
            "invalid_event",
        ),
        (
            json!({"topic": "a", "data": "x", "event": ""}),
            "invalid_event",
        ),
        (
            json!({"topic": "a", "data": "x", "retry": "soon"}),
            "invalid_field",
        ),
        (
            json!({"topic": "a", "data": "x", "retry": 1.5}),
            "invalid_field",
        ),
        (
            json!({"topic": "a", "data": "x", "tpoic": "b"}),
            "unknown_field",
        ),
        (json!([]), "empty_batch"),
        (json!("just a string"), "invalid_json"),
    ];
    for (body, code) in json_cases {
        let (status, v) = s.post_json("/publish", &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(v["error"], code, "{body} -> {v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    expect_error(
        raw_post(
            &s,
            "/publish",
            Some("application/json"),
            b"{\"topic\":".to_vec(),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_json",
    );
    expect_error(
        raw_post(&s, "/publish", Some("text/plain"), b"hello".to_vec()).await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let (status, _) = raw_post(&s, "/publish", None, b"{}".to_vec()).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let big = json!({"topic": "a", "data": "x".repeat(2000)});
    expect_error(
        s.post_json("/publish", &big).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    let form_cases: Vec<(Vec<u8>, &str)> = vec![
        (b"topic=a".to_vec(), "missing_data"),
        (b"data=x".to_vec(), "no_target"),
        (b"topic=a&data=x&broadcast=maybe".to_vec(), "invalid_field"),
        (b"topic=a&data=1&data=2".to_vec(), "invalid_field"),
        (b"topic=a&data=%FF%FE".to_vec(), "invalid_encoding"),
        (b"topic=a&data=x&retry=-5".to_vec(), "invalid_field"),
        (b"topic=a&data=x&nope=1".to_vec(), "unknown_field"),
    ];
    for (body, code) in form_cases {
        let shown = String::from_utf8_lossy(&body).to_string();
        let (status, v) = raw_post(
            &s,
            "/publish",
            Some("application/x-www-form-urlencoded"),
            body,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{shown}");
        assert_eq!(v["error"], code, "{shown} -> {v}");
    }
    expect_error(
        s.post_json("/users/u/messages", &json!({"topic": "t", "data": "x"}))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_field",
    );
    expect_error(
        s.post_json("/broadcast", &json!({"users": ["u"], "data": "x"}))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_field",
    );
    let (_, stats) = s.get("/stats").await;
    assert_eq!(
        stats["published"], 0,
        "nothing was published by rejected requests"
    );
}

#[tokio::test]
async fn bad_subscriptions_are_refused() {
    let s = Server::start(&["--max-selectors", "3"]).await;
    let cases = [
        ("topic=a//b", "invalid_selector"),
        ("topic=a/**/b", "invalid_selector"),
        ("topic=", "invalid_selector"),
        ("topic=a%0Ab", "invalid_selector"),
        ("user=a/b", "invalid_user"),
        ("user=", "invalid_user"),
        ("user=a&user=b", "invalid_user"),
        ("topic=a&topic=b&topic=c&topic=d", "too_many_selectors"),
        ("topic=%FF", "invalid_encoding"),
    ];
    for (query, code) in cases {
        let r = s.open_events(query, &[]).await;
        let (status, v) = crate::common::json_of(r).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(v["error"], code, "{query} -> {v}");
    }
    assert_eq!(s.get("/stats").await.1["connections"], 0);
}

#[tokio::test]
async fn bad_paths_and_methods_answer_json() {
    let s = Server::start(&[]).await;
    expect_error(s.get("/nope").await, StatusCode::NOT_FOUND, "not_found");
    expect_error(
        s.delete("/publish").await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    expect_error(
        s.get(&format!("/users/{}", "u".repeat(129))).await,
        StatusCode::BAD_REQUEST,
        "invalid_user",
    );
    expect_error(
        s.get("/users/a%0Ab").await,
        StatusCode::BAD_REQUEST,
        "invalid_user",
    );
}

async fn form_from(s: &Server, origin: Option<&str>) -> (StatusCode, serde_json::Value) {
    let mut req = s
        .http()
        .post(format!("{}/publish", s.url))
        .form(&[("topic", "t"), ("data", "x")]);
    if let Some(o) = origin {
        req = req.header("origin", o);
    }
    crate::common::json_of(req.send().await.unwrap()).await
}

async fn status_for_host(s: &Server, path: &str, host: &str) -> StatusCode {
    s.http()
        .get(format!("{}{path}", s.url))
        .header("host", host)
        .send()
        .await
        .unwrap()
        .status()
}

/// Reproduces issue 12 (weak spot): an open hub accepted form posts from any site's page (a form
/// needs no CORS preflight) and answered any `Host`, so DNS rebinding reached a loopback-only hub.
#[tokio::test]
async fn cross_site_forms_and_foreign_hosts_are_refused() {
    let s = Server::start(&[]).await;
    crate::common::expect_error(
        form_from(&s, Some("https://evil.example")).await,
        StatusCode::FORBIDDEN,
        "cross_origin_form",
    );
    crate::common::expect_error(
        form_from(&s, Some("null")).await,
        StatusCode::FORBIDDEN,
        "cross_origin_form",
    );
    assert_eq!(form_from(&s, None).await.0, StatusCode::OK);
    assert_eq!(form_from(&s, Some(&s.url)).await.0, StatusCode::OK);
    // A loopback listener answers only loopback names by default.
    for path in ["/healthz", "/events"] {
        assert_eq!(
            status_for_host(&s, path, "evil.example").await,
            StatusCode::MISDIRECTED_REQUEST,
            "{path}"
        );
    }
    let port = s.port;
    for host in [
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        "app.localhost".into(),
        "10.1.2.3".into(),
        "x".into(),
    ] {
        assert_eq!(
            status_for_host(&s, "/healthz", &host).await,
            StatusCode::OK,
            "{host}"
        );
    }

    let s = Server::start(&[
        "--cors-origin",
        "https://app.example",
        "--allowed-host",
        "hub.example,*.hub.example,127.0.0.1",
    ])
    .await;
    assert_eq!(
        form_from(&s, Some("https://app.example")).await.0,
        StatusCode::OK
    );
    for (host, want) in [
        ("hub.example", StatusCode::OK),
        ("a.hub.example:443", StatusCode::OK),
        ("HUB.example.", StatusCode::OK),
        ("xhub.example", StatusCode::MISDIRECTED_REQUEST),
        ("localhost", StatusCode::MISDIRECTED_REQUEST),
    ] {
        assert_eq!(status_for_host(&s, "/healthz", host).await, want, "{host}");
    }
}
