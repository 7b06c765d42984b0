//! `POST /publish`, `/users/{id}/messages` and `/broadcast`: JSON or form bodies, validated whole
//! before anything is published, so a rejected request publishes nothing.

use axum::Json;
use axum::extract::{Path, Request, State, rejection::PathRejection};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use herald_core::{EventType, HistoryError, Message, PublishError, Targets, Topic, UserId};
use serde::Serialize;
use serde_json::{Map, Value};

use super::{ApiError, AppState, form_pairs, limits};
use crate::auth::Caller;
use crate::error_code::ErrorCode;

/// Which targets a route takes from the body.
#[derive(Debug, Clone)]
pub(super) enum Route {
    /// `/publish`: targets come from the body.
    Publish,
    /// A streaming publish whose query named the targets: its NDJSON lines name none.
    Given(Targets),
    /// `/users/{id}/messages`: the target is the user in the path.
    User(UserId),
    /// `/broadcast`: everyone.
    Broadcast,
}

#[derive(Debug, Serialize)]
struct Answer {
    id: String,
    delivered: usize,
    /// Present (true) when an idempotency key repeated an earlier publish.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
}

pub(crate) async fn publish(
    State(app): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    handle(app, Route::Publish, request).await
}

pub(crate) async fn broadcast(
    State(app): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    handle(app, Route::Broadcast, request).await
}

pub(crate) async fn to_user(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    request: Request,
) -> Result<Response, ApiError> {
    let user = super::presence::user_from_path(path)?;
    handle(app, Route::User(user), request).await
}

/// Parses a publish body as `/publish` does (`json`: JSON, else form): the messages, and whether
/// the body was a batch. Exposed for the fuzz targets.
pub fn parse_body(bytes: &[u8], json: bool) -> Result<(Vec<Message>, bool), ApiError> {
    if json {
        parse_json(bytes, &Route::Publish)
    } else {
        Ok((vec![parse_form(bytes, &Route::Publish)?], false))
    }
}

/// Who may publish what: every topic covered by the caller's publish rights; users and broadcast
/// need the publish key or admin. Also bounds the targets of each message.
pub(super) fn authorize(
    caller: &Caller,
    messages: &[Message],
    max_targets: usize,
) -> Result<(), ApiError> {
    for (i, m) in messages.iter().enumerate() {
        let t = &m.targets;
        let at = |e: ApiError| if messages.len() > 1 { e.at_index(i) } else { e };
        if t.topics.len() + t.users.len() > max_targets {
            return Err(at(ApiError::new(
                ErrorCode::TooManyTargets,
                format!("a message may have at most {max_targets} topics and users"),
            )));
        }
        for topic in &t.topics {
            caller.require_publish(topic).map_err(|e| at(e.into()))?;
        }
        if t.broadcast || !t.users.is_empty() {
            caller.require_admin().map_err(|e| at(e.into()))?;
        }
    }
    Ok(())
}

/// The caller's token bucket (per key, user, or else IP), when a publish rate is set.
pub(super) fn rate_key(app: &AppState, caller: &Caller, request: &Request) -> Option<String> {
    app.limits.publish_rate?;
    Some(match caller {
        Caller::PublishKey(i) => format!("key:{i}"),
        Caller::Token(t) if t.user.is_some() => {
            format!("user:{}", t.user.as_ref().map_or("", |u| u.as_str()))
        }
        _ => format!(
            "ip:{}",
            limits::client_ip(&app.limits, request.extensions(), request.headers())?
        ),
    })
}

/// Takes `n` publishes (one per event of a batch) from the caller's bucket.
pub(crate) fn rate_limit(app: &AppState, key: Option<&str>, n: usize) -> Result<(), ApiError> {
    let (Some((rate, burst)), Some(key)) = (app.limits.publish_rate, key) else {
        return Ok(());
    };
    app.publish_rate
        .take_n(key, n as f64, rate, burst, std::time::Instant::now())
        .map_err(|wait| {
            app.metrics.limited("publish_rate");
            ApiError::from(ErrorCode::RateLimited).retry_after(wait)
        })
}

/// Refuses a form post a browser sent from another site: forms need no CORS preflight, so on an
/// open hub any page a visitor opens could publish. Allowed: no `Origin` (not a browser, or a
/// same-origin navigation of an old one), the hub's own origin, and `--cors-origin` origins.
pub(crate) fn cross_site_form(app: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    if app.cors_origins.iter().any(|o| o == "*" || o == origin) {
        return Ok(());
    }
    let authority = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, authority)| authority.to_ascii_lowercase());
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_ascii_lowercase);
    if authority.is_some() && authority == host {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::CrossOriginForm,
        format!(
            "a form post from origin {} is refused: add it with --cors-origin to allow it",
            String::from_utf8_lossy(origin.as_bytes())
        ),
    ))
}

enum Format {
    Json,
    Form,
}

fn format_of(headers: &HeaderMap) -> Result<Format, ApiError> {
    let unsupported = || ApiError::from(ErrorCode::UnsupportedMediaType);
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(unsupported)?;
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Ok(Format::Json),
        e if e.starts_with("application/") && e.ends_with("+json") => Ok(Format::Json),
        "application/x-www-form-urlencoded" => Ok(Format::Form),
        _ => Err(unsupported()),
    }
}

async fn handle(app: AppState, route: Route, request: Request) -> Result<Response, ApiError> {
    let arrived = std::time::Instant::now();
    let caller = app.auth.caller(request.headers())?;
    if matches!(caller, Caller::Nobody) {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "publishing needs a token or the publish key as Authorization: Bearer",
        ));
    }
    // Rights that do not depend on the body are checked before a byte of it is read, so a
    // token that may not publish cannot hold a request open by dripping a body.
    match route {
        Route::Publish | Route::Given(_) => caller.require_some_publish()?,
        Route::User(_) | Route::Broadcast => caller.require_admin()?,
    }
    // One token before the body is read (a refused publisher sends no body), one more for each
    // further event of a batch once it is parsed: the rate counts events, not requests.
    let bucket = rate_key(&app, &caller, &request);
    rate_limit(&app, bucket.as_deref(), 1)?;
    if let (Route::Publish, Some(kind)) = (&route, super::finite::streaming_kind(request.headers()))
    {
        return super::finite::stream_publish(app, caller, bucket, kind, request).await;
    }
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let format = format_of(&headers)?;
    if matches!(format, Format::Form) {
        cross_site_form(&app, &headers)?;
    }
    let bytes = read_body(&app, &headers, body).await?;
    let (mut messages, batch) = match format {
        Format::Json => parse_json(&bytes, &route)?,
        Format::Form => (vec![parse_form(&bytes, &route)?], false),
    };
    if messages.len() > app.limits.max_batch {
        return Err(ApiError::new(
            ErrorCode::BatchTooLarge,
            format!(
                "a batch may hold at most {} messages (--max-batch)",
                app.limits.max_batch
            ),
        ));
    }
    authorize(&caller, &messages, app.limits.max_topics)?;
    if let Some((_, burst)) = app.limits.publish_rate
        && messages.len() as f64 > burst
    {
        app.metrics.limited("publish_rate");
        return Err(ApiError::new(
            ErrorCode::RateLimited,
            format!(
                "a batch of {} events is more than the publish burst ({burst}) allows",
                messages.len()
            ),
        ));
    }
    if messages.len() > 1 {
        rate_limit(&app, bucket.as_deref(), messages.len() - 1)?;
    }
    // Idempotency keys are the publisher's own: another publisher's key never matches.
    if let Some(scope) = caller.idempotency_scope() {
        for m in &mut messages {
            if let Some(key) = m.idempotency_key.take() {
                m.idempotency_key = Some(format!("{scope}\u{1f}{key}"));
            }
        }
    }
    let published = app
        .hub
        .publish_batch(messages)
        .await
        .map_err(|e| publish_error(e, batch))?;
    app.metrics.published(arrived);
    let answers: Vec<Answer> = published
        .into_iter()
        .map(|p| Answer {
            id: p.id.to_string(),
            delivered: p.delivered,
            duplicate: p.duplicate,
        })
        .collect();
    Ok(if batch {
        Json(answers).into_response()
    } else {
        Json(answers.into_iter().next()).into_response()
    })
}

/// The answer to a publish the hub refused (`batch`: the request was a batch, so `index` counts).
pub(super) fn publish_error(e: PublishError, batch: bool) -> ApiError {
    match e {
        PublishError::IdempotencyConflict { index, id } => {
            let earlier = if id.0 == 0 {
                "an earlier message of this request".to_string()
            } else {
                format!("event {id}")
            };
            let e = ApiError::new(
                ErrorCode::IdempotencyConflict,
                format!("the idempotencyKey was used with a different payload by {earlier}"),
            );
            if batch { e.at_index(index) } else { e }
        }
        PublishError::NoTarget { index } => ApiError::from(ErrorCode::NoTarget).at_index(index),
        PublishError::EmptyBatch => ApiError::from(ErrorCode::EmptyBatch),
        e @ PublishError::ReservedTopic { index, .. } => {
            ApiError::new(ErrorCode::ReservedTopic, e.to_string()).at_index(index)
        }
        PublishError::Store(HistoryError::Unstorable(reason)) => {
            ApiError::new(ErrorCode::Unstorable, reason)
        }
        PublishError::Store(e @ HistoryError::NotReplicated { .. }) => {
            ApiError::unavailable(ErrorCode::NotReplicated, &e)
        }
        PublishError::Store(e) => ApiError::unavailable(ErrorCode::StoreUnavailable, &e),
    }
}

/// Reads the whole body within `--body-timeout` and `--max-body`. A body too large answers 413;
/// one that does not arrive in time 408; one cut short or with broken chunked framing 400.
pub(crate) async fn read_body(
    app: &AppState,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<bytes::Bytes, ApiError> {
    use http_body_util::BodyExt;
    let too_large = || {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the body is larger than {} bytes", app.max_body),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > app.max_body as u64) {
        return Err(too_large());
    }
    let timeout = app.limits.body_timeout;
    let read = http_body_util::Limited::new(body, app.max_body).collect();
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(_)) => Err(ApiError::from(ErrorCode::IncompleteBody)),
        Err(_) => {
            app.metrics.limited("body_timeout");
            Err(ApiError::new(
                ErrorCode::BodyTimeout,
                format!(
                    "the body did not arrive within {}ms (--body-timeout)",
                    timeout.as_millis()
                ),
            ))
        }
    }
}

/// A JSON value in which no object repeats a key: `{"private":true,"private":false}` must not
/// publish a public message because the last key wins.
pub(super) struct Strict(pub(super) Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Strict;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Strict, E> {
        Ok(Strict(Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Strict, E> {
        Ok(Strict(Value::String(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<Strict, E> {
        Ok(Strict(Value::String(v)))
    }
    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict(Value::Null))
    }
    fn visit_none<E>(self) -> Result<Strict, E> {
        Ok(Strict(Value::Null))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Strict(Value::Array(items)))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        let mut obj = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if obj.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("duplicate key '{key}'")));
            }
            let Strict(v) = map.next_value()?;
            obj.insert(key, v);
        }
        Ok(Strict(Value::Object(obj)))
    }
}

fn parse_json(bytes: &[u8], route: &Route) -> Result<(Vec<Message>, bool), ApiError> {
    let targets_allowed = matches!(route, Route::Publish);
    if let Some(parsed) =
        super::publish_fast::parse(bytes, targets_allowed, |d| d.finish(route).ok())
    {
        return Ok(parsed);
    }
    parse_json_full(bytes, route)
}

/// The full parser: every body, every error named.
fn parse_json_full(bytes: &[u8], route: &Route) -> Result<(Vec<Message>, bool), ApiError> {
    let Strict(value) = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::new(ErrorCode::InvalidJson, format!("the body is not JSON: {e}")))?;
    match value {
        Value::Object(obj) => Ok((vec![message_from_json(&obj, route)?], false)),
        Value::Array(items) if items.is_empty() => Err(ApiError::from(ErrorCode::EmptyBatch)),
        Value::Array(items) => {
            let messages = items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::Object(obj) => message_from_json(obj, route).map_err(|e| e.at_index(i)),
                    _ => Err(ApiError::new(
                        ErrorCode::InvalidJson,
                        format!("batch element {i} is not a JSON object"),
                    )
                    .at_index(i)),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok((messages, true))
        }
        _ => Err(ApiError::new(
            ErrorCode::InvalidJson,
            "the body must be a JSON object or an array of objects",
        )),
    }
}

fn field_error(field: &str, problem: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::InvalidField, format!("'{field}' {problem}"))
}

pub(super) fn topic(field: &str, s: &str) -> Result<Topic, ApiError> {
    let topic = Topic::new(s).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidTopic,
            format!("'{field}': topic '{s}' {e}"),
        )
    })?;
    if topic.is_reserved() {
        return Err(ApiError::new(
            ErrorCode::ReservedTopic,
            format!("'{field}': topic '{s}' starts with '$': those topics belong to herald"),
        ));
    }
    Ok(topic)
}

pub(super) fn user(field: &str, s: &str) -> Result<UserId, ApiError> {
    UserId::new(s)
        .map_err(|e| ApiError::new(ErrorCode::InvalidUser, format!("'{field}': user id {e}")))
}

/// Event types a browser's `EventSource` (and herald.js) dispatches itself: a published event of
/// such a type would fire every subscriber's `open` or `error` handlers. `message` is the default
/// type and stays allowed; `herald.*` is refused by [`EventType::new`].
const BROWSER_EVENT_TYPES: &[&str] = &["error", "open"];

pub(super) fn event_type(s: &str) -> Result<EventType, ApiError> {
    if BROWSER_EVENT_TYPES.contains(&s) {
        return Err(ApiError::new(
            ErrorCode::InvalidEvent,
            format!("'event' '{s}' is reserved: EventSource dispatches it itself"),
        ));
    }
    EventType::new(s).map_err(|e| ApiError::new(ErrorCode::InvalidEvent, format!("'event' {e}")))
}

/// The `retry` a publisher may set: it changes the reconnect delay of every subscriber's whole
/// EventSource, so it stays between 100 ms and one hour.
const RETRY_MS: std::ops::RangeInclusive<u32> = 100..=3_600_000;

pub(super) fn retry_in_bounds(ms: u32) -> Result<u32, ApiError> {
    if RETRY_MS.contains(&ms) {
        Ok(ms)
    } else {
        Err(field_error(
            "retry",
            format!(
                "must be from {} to {} milliseconds",
                RETRY_MS.start(),
                RETRY_MS.end()
            ),
        ))
    }
}

pub(super) fn idempotency_key(s: &str) -> Result<String, ApiError> {
    if s.is_empty() || s.len() > 256 || s.chars().any(char::is_control) {
        return Err(field_error(
            "idempotencyKey",
            "must be 1 to 256 bytes without control characters",
        ));
    }
    Ok(s.to_string())
}

pub(super) fn retry(s: &str) -> Result<u32, ApiError> {
    s.parse::<u32>()
        .map_err(|_| field_error("retry", "must be a whole number of milliseconds"))
        .and_then(retry_in_bounds)
}

fn strings<'a>(field: &str, v: &'a Value) -> Result<Vec<&'a str>, ApiError> {
    match v {
        Value::String(s) => Ok(vec![s]),
        Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .ok_or_else(|| field_error(field, "must hold strings"))
            })
            .collect(),
        _ => Err(field_error(
            field,
            "must be a string or an array of strings",
        )),
    }
}

/// The fields of one message as they are parsed, before the route adds its target.
#[derive(Default)]
pub(super) struct Draft {
    pub(super) targets: Targets,
    pub(super) data: Option<String>,
    pub(super) event: Option<EventType>,
    pub(super) retry_ms: Option<u32>,
    pub(super) idempotency_key: Option<String>,
    pub(super) private: bool,
}

impl Draft {
    fn finish(self, route: &Route) -> Result<Message, ApiError> {
        let mut targets = self.targets;
        match route {
            Route::Publish => {}
            Route::Given(given) => {
                targets.topics.extend(given.topics.iter().cloned());
                targets.users.extend(given.users.iter().cloned());
                targets.broadcast |= given.broadcast;
            }
            Route::User(u) => targets.users.push(u.clone()),
            Route::Broadcast => targets.broadcast = true,
        }
        let data = self
            .data
            .ok_or_else(|| ApiError::from(ErrorCode::MissingData))?;
        if targets.is_empty() {
            return Err(ApiError::from(ErrorCode::NoTarget));
        }
        let mut message = Message::to_targets(targets).data(data);
        message.event_type = self.event;
        message.retry_ms = self.retry_ms;
        message.idempotency_key = self.idempotency_key;
        Ok(message.private(self.private))
    }
}

fn target_not_taken(field: &str) -> ApiError {
    field_error(field, "is not taken here: this route sets the target")
}

fn unknown_field(field: &str) -> ApiError {
    ApiError::new(ErrorCode::UnknownField, format!("unknown field '{field}'"))
}

/// Builds a message from a JSON object; every field is checked, unknown fields are refused.
pub(super) fn message_from_json(
    obj: &Map<String, Value>,
    route: &Route,
) -> Result<Message, ApiError> {
    let mut d = Draft::default();
    let targets_allowed = matches!(route, Route::Publish);
    for (one, many) in [("topic", "topics"), ("user", "users")] {
        if obj.contains_key(one) && obj.contains_key(many) {
            return Err(ApiError::new(
                ErrorCode::ConflictingFields,
                format!("give '{one}' or '{many}', not both"),
            ));
        }
    }
    let boolean = |key: &str, value: &Value| {
        value
            .as_bool()
            .ok_or_else(|| field_error(key, "must be true or false"))
    };
    for (key, value) in obj {
        match key.as_str() {
            "topic" | "topics" | "user" | "users" | "broadcast" if !targets_allowed => {
                return Err(target_not_taken(key));
            }
            "topic" => match value {
                Value::String(s) => d.targets.topics.push(topic(key, s)?),
                _ => return Err(field_error(key, "must be a string")),
            },
            "topics" => match value {
                Value::Array(_) => {
                    for s in strings(key, value)? {
                        d.targets.topics.push(topic(key, s)?);
                    }
                }
                _ => return Err(field_error(key, "must be an array of strings")),
            },
            "user" | "users" => {
                for s in strings(key, value)? {
                    d.targets.users.push(user(key, s)?);
                }
            }
            "broadcast" => d.targets.broadcast = boolean(key, value)?,
            "data" => {
                d.data = Some(match value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
            }
            "event" => match value {
                Value::String(s) => d.event = Some(event_type(s)?),
                Value::Null => {}
                _ => return Err(field_error(key, "must be a string")),
            },
            "retry" => match value.as_u64().and_then(|n| u32::try_from(n).ok()) {
                Some(ms) => d.retry_ms = Some(retry_in_bounds(ms)?),
                None => return Err(field_error(key, "must be a whole number of milliseconds")),
            },
            "idempotencyKey" => match value {
                Value::String(s) => d.idempotency_key = Some(idempotency_key(s)?),
                _ => return Err(field_error(key, "must be a string")),
            },
            "private" => d.private = boolean(key, value)?,
            other => return Err(unknown_field(other)),
        }
    }
    d.finish(route)
}

/// Builds a message from form fields: topic and user repeat; data, event, retry at most once.
fn parse_form(bytes: &[u8], route: &Route) -> Result<Message, ApiError> {
    let mut d = Draft::default();
    let targets_allowed = matches!(route, Route::Publish);
    let (mut seen_private, mut seen_broadcast) = (false, false);
    for (key, value) in form_pairs(bytes)? {
        let once = |seen: bool| {
            if seen {
                Err(field_error(&key, "is given more than once"))
            } else {
                Ok(())
            }
        };
        let flag = || match value.as_str() {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err(field_error(&key, "must be true, 1, false or 0")),
        };
        match key.as_str() {
            "topic" | "user" | "broadcast" if !targets_allowed => {
                return Err(target_not_taken(&key));
            }
            "topic" => d.targets.topics.push(topic(&key, &value)?),
            "user" => d.targets.users.push(user(&key, &value)?),
            "broadcast" => {
                once(std::mem::replace(&mut seen_broadcast, true))?;
                d.targets.broadcast = flag()?;
            }
            "private" => {
                once(std::mem::replace(&mut seen_private, true))?;
                d.private = flag()?;
            }
            "data" => {
                once(d.data.is_some())?;
                d.data = Some(value);
            }
            "event" => {
                once(d.event.is_some())?;
                d.event = Some(event_type(&value)?);
            }
            "retry" => {
                once(d.retry_ms.is_some())?;
                d.retry_ms = Some(retry(&value)?);
            }
            "idempotencyKey" => {
                once(d.idempotency_key.is_some())?;
                d.idempotency_key = Some(idempotency_key(&value)?);
            }
            other => return Err(unknown_field(other)),
        }
    }
    d.finish(route)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(body: &str) -> Result<(Vec<Message>, bool), ApiError> {
        parse_json(body.as_bytes(), &Route::Publish)
    }

    #[test]
    fn json_messages() {
        let (m, batch) = json(r#"{"topic":"a/b","data":{"x":1},"event":"e","retry":500}"#).unwrap();
        assert!(!batch);
        assert_eq!(m[0].data, r#"{"x":1}"#);
        assert_eq!(m[0].targets.topics[0].as_str(), "a/b");
        assert_eq!(m[0].retry_ms, Some(500));
        let (m, batch) =
            json(r#"[{"users":["u1"],"data":""},{"broadcast":true,"data":"x"}]"#).unwrap();
        assert!(batch);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].data, "");
    }

    #[test]
    fn json_errors_name_the_problem() {
        let code = |body: &str| json(body).unwrap_err().code.as_str();
        assert_eq!(
            code(r#"{"topic":"a","topics":["b"],"data":""}"#),
            "conflicting_fields"
        );
        assert_eq!(code(r#"{"topic":"a"}"#), "missing_data");
        assert_eq!(code(r#"{"data":"x"}"#), "no_target");
        assert_eq!(code(r#"{"broadcast":false,"data":"x"}"#), "no_target");
        assert_eq!(code(r#"{"topic":"a/*","data":"x"}"#), "invalid_topic");
        assert_eq!(
            code(r#"{"topic":"a","data":"x","event":"herald.x"}"#),
            "invalid_event"
        );
        assert_eq!(
            code(r#"{"topic":"a","data":"x","retry":-1}"#),
            "invalid_field"
        );
        assert_eq!(
            code(r#"{"topic":"a","data":"x","colour":1}"#),
            "unknown_field"
        );
        assert_eq!(code(r#"[]"#), "empty_batch");
        // Issue 12: the last of two equal keys won, so this published a public message.
        assert_eq!(
            code(r#"{"topic":"a","data":"x","private":true,"private":false}"#),
            "invalid_json"
        );
        assert_eq!(
            code(r#"[{"topic":"a","data":"x","topic":"b"}]"#),
            "invalid_json"
        );
        assert_eq!(
            code(r#"{"topic":"a","data":"x","retry":0}"#),
            "invalid_field"
        );
        assert_eq!(
            code(r#"{"topic":"a","data":"x","retry":4294967295}"#),
            "invalid_field"
        );
        assert_eq!(
            code(r#"{"topic":"a","data":"x","event":"error"}"#),
            "invalid_event"
        );
        assert_eq!(
            code(r#"{"topic":"a","data":"x","event":"open"}"#),
            "invalid_event"
        );
        assert!(json(r#"{"topic":"a","data":"x","event":"message","retry":100}"#).is_ok());
        assert_eq!(code(r#"42"#), "invalid_json");
        assert_eq!(code(r#"{"#), "invalid_json");
        let e = json(r#"[{"topic":"a","data":"x"},{"topic":"","data":"x"}]"#).unwrap_err();
        assert_eq!(e.index, Some(1));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// The body parsers never panic; what they accept always has a target, and private is
            /// taken as given.
            #[test]
            fn publish_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..200), json in any::<bool>()) {
                if let Ok((messages, _)) = parse_body(&body, json) {
                    prop_assert!(messages.iter().all(|m| !m.targets.is_empty()));
                }
            }

            #[test]
            fn json_shaped_bodies_never_panic(body in r#"\{("(topic|topics|users|data|event|retry|private|broadcast|idempotencyKey)":("[a-z/*\n]{0,6}"|true|1|-1|null|\[\]|\["a"\]),?){0,5}\}"#) {
                let _ = parse_body(body.as_bytes(), true);
            }

            /// The quick read of a body, whenever it takes one, means what the full parser
            /// makes of it.
            #[test]
            fn quick_read_agrees_with_the_full_parser(
                body in r#"\[?\{("(topic|topics|user|users|data|event|retry|private|broadcast|idempotencyKey)":("[a-z/*\\]{0,5}"|true|false|null|1|500|-1|1e3|\{\}|\[\]|\["a"\]|\["a","b/c"\]),?){0,5}\}\]?"#,
                route in 0..3u8,
            ) {
                let route = match route {
                    0 => Route::Publish,
                    1 => Route::User(UserId::new("u").unwrap()),
                    _ => Route::Broadcast,
                };
                let allowed = matches!(route, Route::Publish);
                if let Some(quick) = crate::http::publish_fast::parse(body.as_bytes(), allowed, |d| d.finish(&route).ok()) {
                    let full = parse_json_full(body.as_bytes(), &route);
                    prop_assert!(full.is_ok(), "{body}: quick read took it, the full parser: {:?}", full.err());
                    prop_assert_eq!(quick, full.unwrap(), "{}", body);
                }
            }

            #[test]
            fn since_never_panics(s in "\\PC{0,20}|[0-9a-z]{0,8}") {
                let _ = crate::http::parse_since(&s);
            }
        }
    }

    #[test]
    fn common_bodies_take_the_quick_read() {
        let quick = |body: &str| {
            crate::http::publish_fast::parse(body.as_bytes(), true, |d| {
                d.finish(&Route::Publish).ok()
            })
        };
        let (m, batch) = quick(r#"{"topic":"u1","data":"hello"}"#).expect("quick");
        assert!(!batch);
        assert_eq!(m[0].targets.topics[0].as_str(), "u1");
        assert_eq!(m[0].data, "hello");
        let (m, batch) = quick(
            r#"[{"users":["a","b"],"data":"x","retry":500},{"user":"c","data":"y","event":"e"}]"#,
        )
        .expect("quick");
        assert!(batch);
        assert_eq!(m[0].targets.users.len(), 2);
        assert_eq!(m[1].event_type.as_ref().map(|e| e.as_str()), Some("e"));
        // What it leaves to the full parser: non-string data, escapes, nulls, errors.
        assert!(quick(r#"{"topic":"a","data":{"x":1}}"#).is_none());
        assert!(quick(r#"{"topic":"a","data":"a\nb"}"#).is_none());
        assert!(quick(r#"{"topic":null,"users":["u"],"data":"x"}"#).is_none());
        assert!(quick(r#"{"topic":"a","data":"x","topic":"b"}"#).is_none());
        assert!(quick(r#"{"topic":"a/*","data":"x"}"#).is_none());
    }

    #[test]
    fn private_flag() {
        let (m, _) = parse_body(br#"{"topic":"a","data":"x","private":true}"#, true).unwrap();
        assert!(m[0].private);
        let (m, _) = parse_body(b"topic=a&data=x&private=1", false).unwrap();
        assert!(m[0].private);
        assert!(parse_body(br#"{"topic":"a","data":"x","private":"yes"}"#, true).is_err());
    }

    #[test]
    fn form_messages() {
        let m = parse_form(
            b"topic=a&topic=b&user=u&data=hi&broadcast=1",
            &Route::Publish,
        )
        .unwrap();
        assert_eq!(m.targets.topics.len(), 2);
        assert!(m.targets.broadcast);
        assert_eq!(m.data, "hi");
        let e = parse_form(b"topic=a&data=1&data=2", &Route::Publish).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidField);
        let e = parse_form(b"topic=a&data=1&private=1&private=0", &Route::Publish).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidField);
        let route = Route::User(UserId::new("u").unwrap());
        let m = parse_form(b"data=x&event=e", &route).unwrap();
        assert_eq!(m.targets.users[0].as_str(), "u");
        assert_eq!(
            parse_form(b"data=x&topic=a", &route).unwrap_err().code,
            ErrorCode::InvalidField
        );
    }
}
