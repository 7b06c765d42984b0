//! The Mercure protocol at `/.well-known/mercure` (`--mercure`): publish (form `POST`) and
//! subscribe (`GET`, SSE) in both the draft-08 (1.0) and the v0.x (draft-07) dialects, over
//! herald's own engine. Each update is one herald event on the herald topic
//! [`update::HERALD_TOPIC`] (a subscription event: on the reserved [`update::SUBSCRIPTIONS_TOPIC`],
//! which only the subscribers that may receive one hold; see `update`), so history, resume, clusters and limits are herald's;
//! this module owns the Mercure names: the publishers' ids, topic matchers (`matcher`,
//! `selector`), tokens (`token`) and private updates, filtered here for every subscriber, live and
//! on replay alike; publisher ids are resolved by an index (`resume`); active subscriptions
//! (`--mercure-subscriptions`) are `subscriptions`. Rule: a Mercure subscriber never sees an
//! herald id, only the publisher's id or the hub's `#<herald id>`.

pub mod matcher;
pub mod resume;
pub mod selector;
pub mod subscriptions;
pub mod token;
pub mod update;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use bytes::Bytes;
use futures_util::StreamExt;
use herald_core::{
    EventId, Grant, Message, Selector, Start, SubscribeError, SubscribeRequest, Topic,
};
use parking_lot::Mutex;

use crate::error_code::ErrorCode;
use crate::http::{ApiError, AppState, cross_site_form, form_pairs, limits, rate_limit, read_body};
use selector::{TopicSelector, any_matches};
use token::{Grants, Refusal};
use update::{Envelope, HERALD_TOPIC, SUBSCRIPTIONS_TOPIC, Update};

/// The hub's path.
pub const PATH: &str = "/.well-known/mercure";
/// Most topic selectors of one subscription.
const MATCHERS_MAX: usize = 256;

/// Settings of the Mercure endpoint.
#[derive(Debug, Clone, Default)]
pub struct MercureOptions {
    /// `--mercure-resource`: the `aud` draft-08 tokens must name. Default: the request's
    /// `https://` and `http://` URL of the hub (`Host` + [`PATH`]).
    pub resource: Option<String>,
    /// `--mercure-subscriptions`: subscription events and the subscriptions API.
    pub subscriptions: bool,
}

/// Shared by every Mercure request.
#[derive(Debug)]
pub(crate) struct Mercure {
    options: MercureOptions,
    /// The updates decoded last, by herald id, newest at the back: subscribers writing at
    /// different points of a burst decode each event once between them, not once each.
    recent: Mutex<VecDeque<Arc<Update>>>,
    /// Publisher ids to herald ids, for resuming.
    ids: resume::PublisherIds,
    /// This node's active subscriptions, with `--mercure-subscriptions`.
    subscriptions: Option<Arc<subscriptions::Registry>>,
}

/// Updates kept decoded in [`Mercure::recent`].
const RECENT: usize = 256;

impl Mercure {
    fn decode(&self, herald: EventId, data: &str) -> Option<Arc<Update>> {
        if let Some(u) = self.recent.lock().iter().rev().find(|u| u.herald == herald) {
            return Some(u.clone());
        }
        let u = Arc::new(Update::decode(herald, data)?);
        let mut recent = self.recent.lock();
        if !recent.iter().any(|r| r.herald == herald) {
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(u.clone());
        }
        Some(u)
    }

    /// The identifiers a draft-08 token's `aud` may name.
    fn resources(&self, headers: &HeaderMap) -> Vec<String> {
        if let Some(r) = &self.options.resource {
            return vec![r.clone()];
        }
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost");
        vec![
            format!("https://{host}{PATH}"),
            format!("http://{host}{PATH}"),
        ]
    }
}

/// The Mercure routes, for [`crate::http::router_and_metrics`] to merge.
pub(crate) fn routes(options: MercureOptions, app: &AppState) -> Router<AppState> {
    let registry = options.subscriptions.then(|| {
        app.presence
            .on_peer_gone(subscriptions::on_peer_gone(app.hub.clone()));
        subscriptions::Registry::new(app.presence.clone())
    });
    let mercure = Arc::new(Mercure {
        options,
        recent: Mutex::new(VecDeque::with_capacity(RECENT)),
        ids: resume::PublisherIds::default(),
        subscriptions: registry,
    });
    let mut router = Router::new().route(PATH, get(subscribe).post(publish));
    if mercure.subscriptions.is_some() {
        router = router
            .route(subscriptions::BASE, get(subscriptions::api))
            .route(
                &format!("{}/{{*rest}}", subscriptions::BASE),
                get(subscriptions::api),
            );
    }
    router.layer(Extension(mercure))
}

fn herald_topic() -> Topic {
    Topic::new(HERALD_TOPIC).expect("a valid topic")
}

/// An RFC 6750 refusal: the status, a `WWW-Authenticate: Bearer` challenge and herald's JSON body.
fn refuse(r: Refusal) -> Response {
    let (code, challenge, message) = match r {
        Refusal::Missing => (
            ErrorCode::Unauthorized,
            "Bearer".to_string(),
            "this needs a Mercure token (Authorization: Bearer, or the mercureAuthorization cookie)"
                .to_string(),
        ),
        Refusal::InvalidToken(m) => (
            ErrorCode::InvalidToken,
            "Bearer error=\"invalid_token\"".into(),
            m,
        ),
        Refusal::InsufficientScope(m) => (
            ErrorCode::ForbiddenTopic,
            "Bearer error=\"insufficient_scope\"".into(),
            m,
        ),
        Refusal::InvalidRequest(m) => (
            ErrorCode::InvalidMercureCredentials,
            "Bearer error=\"invalid_request\"".into(),
            m,
        ),
    };
    let mut response = ApiError::new(code, message).into_response();
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    response
}

/// The rights of a request: `None` when herald checks nothing (every right), else the token's
/// grants; `anonymous_ok` lets a token-less request through with no rights.
fn grants_of(
    app: &AppState,
    mercure: &Mercure,
    headers: &HeaderMap,
    query_token: Option<&str>,
    anonymous_ok: bool,
) -> Result<Option<Grants>, Refusal> {
    if app.auth.is_open() {
        return Ok(None);
    }
    match token::presented(headers, query_token)? {
        Some(t) if app.auth.is_publish_key(&t) => Ok(None),
        Some(t) => token::verify(&app.auth, &t, &mercure.resources(headers)).map(Some),
        None if anonymous_ok => Ok(Some(Grants::default())),
        None => Err(Refusal::Missing),
    }
}

fn bad_update(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidMercureUpdate, message)
}

/// Whether `topic`, resolved against the hub's URL, names a path in the hub's own namespace.
fn in_reserved_namespace(topic: &str) -> bool {
    let Ok(base) = url::Url::parse("http://hub.invalid/.well-known/mercure") else {
        return false;
    };
    let Ok(resolved) = base.join(topic) else {
        return false;
    };
    let path = percent_encoding::percent_decode_str(resolved.path()).decode_utf8_lossy();
    // Decoding may reveal dot segments: resolve once more.
    let path = match base.join(&path) {
        Ok(again) => again.path().to_string(),
        Err(_) => path.into_owned(),
    };
    path == PATH || path.starts_with("/.well-known/mercure/")
}

async fn publish(
    State(app): State<AppState>,
    Extension(mercure): Extension<Arc<Mercure>>,
    request: Request,
) -> Result<Response, ApiError> {
    let ip = limits::client_ip(&app.limits, request.extensions(), request.headers());
    let (parts, body) = request.into_parts();
    // A browser form from another site needs no preflight: refused, as on `POST /publish`.
    cross_site_form(&app, &parts.headers)?;
    let query = form_pairs(parts.uri.query().unwrap_or_default().as_bytes())?;
    let query_token = query
        .iter()
        .find(|(k, _)| k == "authorization")
        .map(|(_, v)| v.as_str());
    let grants = match grants_of(&app, &mercure, &parts.headers, query_token, false) {
        Ok(g) => g,
        Err(r) => return Ok(refuse(r)),
    };
    // `--publish-rate`: one bucket per subject, else per client address.
    let key =
        app.limits
            .publish_rate
            .map(|_| match grants.as_ref().and_then(|g| g.subject.as_ref()) {
                Some(sub) => format!("mercure:{sub}"),
                None => format!("ip:{}", ip.map_or_else(String::new, |ip| ip.to_string())),
            });
    rate_limit(&app, key.as_deref(), 1)?;
    let started = std::time::Instant::now();
    let body = read_body(&app, &parts.headers, body).await?;
    let mut update = Envelope {
        id: None,
        topics: Vec::new(),
        r#type: None,
        retry: None,
        private: false,
        data: String::new(),
    };
    for (key, value) in form_pairs(&body)? {
        match key.as_str() {
            "topic" => {
                matcher::check_text(&value)
                    .map_err(|e| bad_update(format!("the topic '{value}' {e}")))?;
                if value == "*" {
                    return Err(bad_update(
                        "'*' is not a topic: it is the wildcard selector",
                    ));
                }
                if in_reserved_namespace(&value) {
                    return Err(bad_update(format!(
                        "the topic '{value}' is in the hub's reserved namespace {PATH}/"
                    )));
                }
                update.topics.push(value);
            }
            "data" => update.data = value,
            "private" => update.private = true,
            "id" if value.is_empty() => {}
            "id" => {
                if value.starts_with('#') || value == "earliest" {
                    return Err(bad_update(
                        "an id must not start with '#' nor be 'earliest' (both are the hub's)",
                    ));
                }
                if value.chars().any(matcher::is_control_or_format) {
                    return Err(bad_update("the id contains a control or format character"));
                }
                update.id = Some(value);
            }
            "type" if value.is_empty() => {}
            "type" => {
                if value == "mercure" || value.starts_with("herald.") {
                    return Err(bad_update(format!(
                        "the type '{value}' is reserved for events the hub sends"
                    )));
                }
                if value.chars().any(matcher::is_control_or_format) {
                    return Err(bad_update(
                        "the type contains a control or format character",
                    ));
                }
                update.r#type = Some(value);
            }
            "retry" => {
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad_update(format!("retry must be digits; got '{value}'")));
                }
                update.retry = Some(
                    value
                        .parse()
                        .map_err(|_| bad_update("retry is too large"))?,
                );
            }
            _ => {} // unknown fields are ignored, as the spec requires
        }
    }
    if update.topics.is_empty() {
        return Err(bad_update("a Mercure update needs at least one topic"));
    }
    if update.topics.len() > app.limits.max_topics {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "{} topics, at most {} are allowed (--max-topics)",
                update.topics.len(),
                app.limits.max_topics
            ),
        ));
    }
    if let Some(g) = &grants
        && let Some(t) = update
            .topics
            .iter()
            .find(|t| !g.publish.iter().any(|s| s.matches(t)))
    {
        return Ok(refuse(Refusal::InsufficientScope(format!(
            "the token may not publish to '{t}'; nothing was published"
        ))));
    }
    let id = update.id.clone();
    let json = serde_json::to_string(&update)
        .map_err(|e| ApiError::unavailable(ErrorCode::StoreUnavailable, &e))?;
    let message = Message::to_topic(herald_topic()).private(true).data(json);
    let published = app
        .hub
        .publish(message)
        .await
        .map_err(|e| ApiError::unavailable(ErrorCode::StoreUnavailable, &e))?;
    app.metrics.published(started);
    let id = update::mercure_id(id.as_deref(), published.id);
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        id,
    )
        .into_response())
}

fn bad_subscription(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidMercureSubscription, message)
}

async fn subscribe(
    State(app): State<AppState>,
    Extension(mercure): Extension<Arc<Mercure>>,
    request: Request,
) -> Result<Response, ApiError> {
    let ip = limits::client_ip(&app.limits, request.extensions(), request.headers());
    let headers = request.headers();
    let mut selectors = Vec::new();
    let mut asked = Vec::new();
    let mut query_token = None;
    let mut query_last = None;
    let mut v0_last = None;
    for (key, value) in form_pairs(request.uri().query().unwrap_or_default().as_bytes())? {
        let made = match key.as_str() {
            "match" | "match_exact" => {
                asked.push(subscriptions::Asked::Exact(value.clone()));
                TopicSelector::exact(&value)
            }
            "match_urlpattern" => {
                asked.push(subscriptions::Asked::UrlPattern(value.clone()));
                TopicSelector::url_pattern(&value)
            }
            "topic" => {
                asked.push(subscriptions::Asked::V0(value.clone()));
                TopicSelector::v0(&value)
            }
            k if k.len() >= 5 && k[..5].eq_ignore_ascii_case("match") => {
                return Err(bad_subscription(format!(
                    "'{key}' is not a matcher this hub supports (match, match_exact, match_urlpattern)"
                )));
            }
            "authorization" => {
                query_token = Some(value);
                continue;
            }
            "last_event_id" => {
                query_last.get_or_insert(value);
                continue;
            }
            "lastEventID" => {
                v0_last.get_or_insert(value);
                continue;
            }
            _ => continue,
        };
        selectors.push(made.map_err(|e| bad_subscription(format!("the selector '{value}' {e}")))?);
    }
    if selectors.is_empty() {
        return Err(bad_subscription(
            "name at least one topic: match=, match_urlpattern= or topic=",
        ));
    }
    if selectors.len() > MATCHERS_MAX {
        return Err(bad_subscription(format!(
            "{} topic selectors, at most {MATCHERS_MAX} are allowed",
            selectors.len()
        )));
    }
    let grants = match grants_of(
        &app,
        &mercure,
        headers,
        query_token.as_deref(),
        app.auth.allows_anonymous(),
    ) {
        Ok(g) => g,
        Err(r) => return Ok(refuse(r)),
    };
    let last_id = headers
        .get("last-event-id")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .filter(|s| !s.is_empty())
        .or(query_last.filter(|s| !s.is_empty()))
        .or(v0_last.filter(|s| !s.is_empty()));
    let (start, answered) = match last_id.as_deref() {
        None => (Start::Live, None),
        Some("earliest") => (Start::All, Some("earliest".to_string())),
        Some(id) => match mercure
            .ids
            .resolve(&app.hub, id)
            .await
            .map_err(|e| ApiError::unavailable(ErrorCode::StoreUnavailable, &e))?
        {
            Some(h) => (Start::After(h.to_string()), Some(id.to_string())),
            None => (Start::All, Some("earliest".to_string())),
        },
    };
    let slot = app
        .connections
        .acquire(&app.limits, ip, None)
        .map_err(|limit| {
            app.metrics.limited(limit);
            ApiError::new(
                ErrorCode::TooManyConnections,
                "this address holds as many streams as it may",
            )
        })?;
    // The subscription events travel apart: only a subscriber that may receive one holds them.
    let mut herald_selectors = vec![Selector::new(HERALD_TOPIC).expect("a valid selector")];
    if mercure.subscriptions.is_some()
        && subscriptions::may_receive(&selectors, grants.as_ref().map(|g| g.subscribe.as_slice()))
    {
        herald_selectors.push(Selector::new(SUBSCRIPTIONS_TOPIC).expect("a valid selector"));
    }
    let stream = app
        .hub
        .subscribe(SubscribeRequest {
            selectors: herald_selectors,
            start,
            grant: Grant::All,
            expires_at_ms: grants.as_ref().and_then(|g| g.expires_at_ms),
            ..SubscribeRequest::default()
        })
        .map_err(|e| match e {
            SubscribeError::AtCapacity(_) => {
                app.metrics.limited("connections");
                ApiError::new(ErrorCode::AtCapacity, e.to_string())
            }
            SubscribeError::ShuttingDown => ApiError::new(ErrorCode::ShuttingDown, e.to_string()),
            other => ApiError::new(ErrorCode::InvalidMercureSubscription, other.to_string()),
        })?;
    let registration = match &mercure.subscriptions {
        Some(registry) => Some(registry.register(&app.hub, &asked, grants.as_ref()).await),
        None => None,
    };
    let subscriber = Subscriber {
        mercure,
        selectors,
        rights: grants.map(|g| g.subscribe),
        asked: last_id,
    };
    let body = Body::from_stream(stream.filter_map(move |frame| {
        let _held = (&slot, &registration);
        let out = subscriber.translate(frame);
        async move { out.map(Ok::<_, Infallible>) }
    }));
    let mut response = Response::new(body);
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Some(v) = answered.and_then(|a| HeaderValue::from_str(&a).ok()) {
        h.insert("mercure-last-event-id", v.clone());
        h.insert("last-event-id", v);
    }
    Ok(response)
}

/// One Mercure subscriber: what it asked for and may see.
struct Subscriber {
    mercure: Arc<Mercure>,
    selectors: Vec<TopicSelector>,
    /// Subscribe rights for private updates; `None`: all (herald checks nothing).
    rights: Option<Vec<TopicSelector>>,
    /// The id it resumed from, as it sent it (named in `herald.gap`).
    asked: Option<String>,
}

impl Subscriber {
    /// One herald frame to what this subscriber gets: an update's Mercure frame if it is for it,
    /// herald's comments, heartbeats and `retry:` as they are, `herald.gap` with the Mercure id.
    fn translate(&self, frame: Bytes) -> Option<Bytes> {
        if frame.starts_with(b"id: ") {
            let (id, data) = update::split_frame(&frame)?;
            let u = self.mercure.decode(id, data)?;
            if !any_matches(&self.selectors, &u.topics) {
                return None;
            }
            if u.private
                && let Some(rights) = &self.rights
                && !any_matches(rights, &u.topics)
            {
                return None;
            }
            return Some(u.frame.clone());
        }
        if frame.starts_with(b"event: herald.gap\n") {
            let json = serde_json::json!({ "lastEventId": self.asked });
            return Some(herald_core::event::encode_frame(
                None,
                Some("herald.gap"),
                None,
                &json.to_string(),
            ));
        }
        Some(frame)
    }
}
