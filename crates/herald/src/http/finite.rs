//! Finite streams (issue 16): the streaming publish (`POST /publish` with a `text/event-stream`
//! or `application/x-ndjson` body still being sent), `POST /complete` and `POST /cancel`, and the
//! 204 for a connection that resumes after its topic's `herald.complete`.
//!
//! The rules it keeps: rights on the query's targets are checked before a byte of the body is
//! read; each part is published as soon as it is whole and never half of one, so a refused line
//! leaves exactly the parts before it published (the answer says how many); `complete=true` ends
//! the topic with `herald.complete` (`{}` after a clean end, `{"reason":"aborted"}` when the
//! producer broke off, stalled or sent a bad part, `{"reason":"cancelled"}` after a cancel); a
//! `herald.cancel` fanned out on the topic, by this node or by the cluster follower, answers the
//! producer at once.

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_core::{EventId, EventType, Message, Selector, Start, Targets, Topic};
use http_body_util::BodyExt;
use serde::Serialize;
use serde_json::Value;

use super::publish::{self, Route, Strict};
use super::stream_body::{Decoder, Kind, LineError, Part};
use super::{ApiError, AppState, form_pairs};
use crate::auth::Caller;
use crate::error_code::ErrorCode;

/// The streaming kind of a publish, from its `Content-Type`.
pub(super) fn streaming_kind(headers: &HeaderMap) -> Option<Kind> {
    let ct = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let essence = ct.split(';').next()?.trim().to_ascii_lowercase();
    Kind::of(&essence)
}

/// What a streaming publish has published so far.
#[derive(Debug, Default, Serialize)]
struct Progress {
    published: usize,
    first: Option<String>,
    last: Option<String>,
}

impl Progress {
    fn add(&mut self, ids: impl IntoIterator<Item = EventId>) {
        for id in ids {
            self.published += 1;
            if self.first.is_none() {
                self.first = Some(id.to_string());
            }
            self.last = Some(id.to_string());
        }
    }

    fn said(&self) -> String {
        match (self.published, &self.first, &self.last) {
            (0, ..) => "nothing of the body was published".into(),
            (1, Some(first), _) => format!("the event before it was published (id {first})"),
            (n, Some(first), Some(last)) => {
                format!("the {n} events before it were published (ids {first} to {last})")
            }
            (n, ..) => format!("the {n} events before it were published"),
        }
    }
}

/// The answer of a streaming publish that ended.
#[derive(Debug, Serialize)]
struct Answer {
    #[serde(flatten)]
    progress: Progress,
    /// The `herald.complete` appended (with `complete=true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    complete: Option<String>,
    /// Ended by a `herald.cancel` on its topic.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    cancelled: bool,
    /// The id of that `herald.cancel`.
    #[serde(skip_serializing_if = "Option::is_none")]
    cancel: Option<String>,
}

/// An error after some events may have been published: the error's body also tells what was.
#[derive(Debug, Serialize)]
struct Failure<'a> {
    error: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<u64>,
    #[serde(flatten)]
    progress: &'a Progress,
    #[serde(skip_serializing_if = "Option::is_none")]
    complete: Option<String>,
}

/// The query of a streaming publish: its targets and options.
#[derive(Debug, Default)]
struct Query {
    targets: Targets,
    private: bool,
    complete: bool,
}

fn flag(key: &str, value: &str) -> Result<bool, ApiError> {
    match value {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(ApiError::new(
            ErrorCode::InvalidField,
            format!("'{key}' must be true, 1, false or 0"),
        )),
    }
}

fn query_topic(value: &str) -> Result<Topic, ApiError> {
    Topic::new(value).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidTopic,
            format!("'topic': topic '{value}' {e}"),
        )
    })
}

fn parse_query(query: Option<&str>) -> Result<Query, ApiError> {
    let mut q = Query::default();
    for (key, value) in form_pairs(query.unwrap_or_default().as_bytes())? {
        match key.as_str() {
            "topic" => q.targets.topics.push(query_topic(&value)?),
            "user" => q
                .targets
                .users
                .push(herald_core::UserId::new(&value).map_err(|e| {
                    ApiError::new(ErrorCode::InvalidUser, format!("'user': user id {e}"))
                })?),
            "broadcast" => q.targets.broadcast = flag(&key, &value)?,
            "private" => q.private = flag(&key, &value)?,
            "complete" => q.complete = flag(&key, &value)?,
            other => {
                return Err(ApiError::new(
                    ErrorCode::UnknownField,
                    format!(
                        "unknown query parameter '{other}' (a streaming publish takes topic, user, broadcast, private, complete)"
                    ),
                ));
            }
        }
    }
    Ok(q)
}

/// Why the loop over the body stopped.
enum End {
    /// The body ended cleanly and every part was published.
    Clean,
    /// A `herald.cancel` arrived on the topic.
    Cancelled(EventId),
    /// The producer broke off (connection closed, stalled) or sent something refused.
    Failed(ApiError, Option<u64>),
}

/// `POST /publish` with a streaming body. The caller may publish and took one token already.
pub(super) async fn stream_publish(
    app: AppState,
    caller: Caller,
    bucket: Option<String>,
    kind: Kind,
    request: Request,
) -> Result<Response, ApiError> {
    let query = parse_query(request.uri().query())?;
    let given = !query.targets.is_empty();
    if !given && kind == Kind::Sse {
        return Err(ApiError::new(
            ErrorCode::NoTarget,
            "a text/event-stream publish names its targets in the query: topic, user or broadcast",
        ));
    }
    if !given && query.complete {
        return Err(ApiError::new(
            ErrorCode::NoTarget,
            "complete=true needs the targets in the query (the topic it completes)",
        ));
    }
    // Every right the query's targets need, before the body is read.
    if given {
        let template = Message::to_targets(query.targets.clone());
        publish::authorize(&caller, &[template], app.limits.max_topics)?;
    }
    let mut watch = (!query.targets.topics.is_empty())
        .then(|| app.hub.watch_cancel(query.targets.topics.clone()));
    let route = if given {
        Route::Given(query.targets.clone())
    } else {
        Route::Publish
    };
    let scope = caller.idempotency_scope();
    let mut decoder = Decoder::new(kind, app.max_body);
    let mut progress = Progress::default();
    let mut body = request.into_body();
    // The first event's token was taken with the request.
    let mut prepaid = 1usize;
    let timeout = app.limits.body_timeout;
    let end = loop {
        let cancelled = async {
            match watch.as_mut() {
                Some(w) => w.cancelled().await,
                None => std::future::pending().await,
            }
        };
        let frame = tokio::select! {
            biased;
            id = cancelled => break End::Cancelled(id),
            frame = tokio::time::timeout(timeout, body.frame()) => frame,
        };
        let mut parts = Vec::new();
        let (decoded, last) = match frame {
            Err(_) => {
                app.metrics.limited("body_timeout");
                break End::Failed(
                    ApiError::new(
                        ErrorCode::BodyTimeout,
                        format!(
                            "nothing of the body arrived for {}ms (--body-timeout)",
                            timeout.as_millis()
                        ),
                    ),
                    None,
                );
            }
            Ok(Some(Err(_))) => {
                break End::Failed(ApiError::from(ErrorCode::IncompleteBody), None);
            }
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(bytes) => (decoder.feed(&bytes, &mut parts), false),
                Err(_) => continue, // trailers
            },
            Ok(None) => (decoder.finish(&mut parts), true),
        };
        let arrived = std::time::Instant::now();
        let before = progress.published;
        let published = publish_parts(
            &app,
            &caller,
            bucket.as_deref(),
            &mut prepaid,
            &route,
            &query,
            scope.as_deref(),
            parts,
            &mut progress,
        )
        .await;
        if progress.published > before {
            app.metrics.published(arrived);
        }
        match (published, decoded) {
            (Err(failed), _) => break failed,
            (Ok(()), Err(LineError { line, error })) => break End::Failed(error, Some(line)),
            (Ok(()), Ok(())) if last => break End::Clean,
            (Ok(()), Ok(())) => {}
        }
    };
    drop(watch);
    let reason = match &end {
        End::Clean => None,
        End::Cancelled(_) => Some("cancelled"),
        End::Failed(..) => Some("aborted"),
    };
    let complete = if query.complete {
        match append_complete(&app, &query.targets, query.private, reason).await {
            Ok(id) => Some(id.to_string()),
            Err(e) => return Err(e),
        }
    } else {
        None
    };
    match end {
        End::Clean | End::Cancelled(_) => {
            let cancel = match end {
                End::Cancelled(id) => Some(id.to_string()),
                _ => None,
            };
            Ok(Json(Answer {
                progress,
                complete,
                cancelled: cancel.is_some(),
                cancel,
            })
            .into_response())
        }
        End::Failed(error, line) => {
            let message = format!("{}; {}", error.message, progress.said());
            let body = Failure {
                error: error.code.as_str(),
                message: &message,
                line,
                progress: &progress,
                complete,
            };
            Ok((error.code.status(), Json(body)).into_response())
        }
    }
}

/// Publishes the parts one chunk completed, as one batch (all or none; the hub commits it as a
/// group). A part refused on its own publishes the parts before it first.
#[allow(clippy::too_many_arguments)]
async fn publish_parts(
    app: &AppState,
    caller: &Caller,
    bucket: Option<&str>,
    prepaid: &mut usize,
    route: &Route,
    query: &Query,
    scope: Option<&str>,
    parts: Vec<Part>,
    progress: &mut Progress,
) -> Result<(), End> {
    let mut messages = Vec::with_capacity(parts.len());
    let mut refused = None;
    for part in parts {
        match message_of(part, route, query, caller, app.limits.max_topics) {
            Ok(mut m) => {
                if let (Some(scope), Some(key)) = (scope, m.idempotency_key.take()) {
                    m.idempotency_key = Some(format!("{scope}\u{1f}{key}"));
                }
                messages.push(m);
            }
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    if !messages.is_empty() {
        let free = (*prepaid).min(messages.len());
        *prepaid -= free;
        if let Err(e) = publish::rate_limit(app, bucket, messages.len() - free) {
            return Err(End::Failed(e, None));
        }
        publish_batch(app, messages, progress).await?;
    }
    match refused {
        Some((error, line)) => Err(End::Failed(error, Some(line))),
        None => Ok(()),
    }
}

/// Publishes `messages` all or none; an idempotency conflict publishes the ones before it.
async fn publish_batch(
    app: &AppState,
    mut messages: Vec<Message>,
    progress: &mut Progress,
) -> Result<(), End> {
    match app.hub.publish_batch(messages.clone()).await {
        Ok(published) => {
            progress.add(published.iter().map(|p| p.id));
            Ok(())
        }
        Err(herald_core::PublishError::IdempotencyConflict { index, id }) if index > 0 => {
            messages.truncate(index);
            Box::pin(publish_batch(app, messages, progress)).await?;
            Err(End::Failed(
                publish::publish_error(
                    herald_core::PublishError::IdempotencyConflict { index: 0, id },
                    false,
                ),
                None,
            ))
        }
        Err(e) => Err(End::Failed(publish::publish_error(e, false), None)),
    }
}

/// The message of one part, checked as `POST /publish` checks it; an error names its line.
fn message_of(
    part: Part,
    route: &Route,
    query: &Query,
    caller: &Caller,
    max_topics: usize,
) -> Result<Message, (ApiError, u64)> {
    match part {
        Part::Event {
            event_type,
            data,
            retry_ms,
        } => {
            let mut m = Message::to_targets(query.targets.clone())
                .data(data)
                .private(query.private);
            m.event_type = event_type;
            m.retry_ms = retry_ms;
            Ok(m)
        }
        Part::Json { line, text } => {
            let at = |e: ApiError| {
                let message = format!("line {line}: {}", e.message);
                (ApiError::new(e.code, message), line)
            };
            let Strict(value) = serde_json::from_str(&text).map_err(|e| {
                at(ApiError::new(
                    ErrorCode::InvalidJson,
                    format!("the line is not JSON: {e}"),
                ))
            })?;
            let Value::Object(obj) = value else {
                return Err(at(ApiError::new(
                    ErrorCode::InvalidJson,
                    "each line must be a JSON object",
                )));
            };
            let mut m = publish::message_from_json(&obj, route).map_err(at)?;
            m.private |= query.private;
            if matches!(route, Route::Publish) {
                publish::authorize(caller, std::slice::from_ref(&m), max_topics).map_err(at)?;
            }
            Ok(m)
        }
    }
}

/// The data of a `herald.complete` or `herald.cancel`: `{}`, or `{"reason":…}`.
fn reason_data(reason: Option<&str>) -> String {
    match reason {
        None => "{}".to_string(),
        Some(r) => serde_json::json!({ "reason": r }).to_string(),
    }
}

async fn append_complete(
    app: &AppState,
    targets: &Targets,
    private: bool,
    reason: Option<&str>,
) -> Result<EventId, ApiError> {
    let m = Message::to_targets(targets.clone())
        .event(EventType::complete())
        .data(reason_data(reason))
        .private(private);
    let published = app
        .hub
        .publish(m)
        .await
        .map_err(|e| publish::publish_error(e, false))?;
    Ok(published.id)
}

/// The query of `/complete` and `/cancel`: topics (at least one) and an optional reason.
fn control_query(query: Option<&str>) -> Result<(Vec<Topic>, Option<String>), ApiError> {
    let mut topics = Vec::new();
    let mut reason = None;
    for (key, value) in form_pairs(query.unwrap_or_default().as_bytes())? {
        match key.as_str() {
            "topic" => topics.push(query_topic(&value)?),
            "reason" => {
                if value.is_empty() || value.len() > 64 || value.chars().any(char::is_control) {
                    return Err(ApiError::new(
                        ErrorCode::InvalidReason,
                        "'reason' must be 1 to 64 bytes without control characters",
                    ));
                }
                reason = Some(value);
            }
            other => {
                return Err(ApiError::new(
                    ErrorCode::UnknownField,
                    format!("unknown query parameter '{other}' (this takes topic and reason)"),
                ));
            }
        }
    }
    if topics.is_empty() {
        return Err(ApiError::new(
            ErrorCode::NoTarget,
            "give topic=… in the query",
        ));
    }
    Ok((topics, reason))
}

#[derive(Serialize)]
struct Appended {
    id: String,
}

/// `POST /complete?topic=T`: appends `herald.complete` to the topics (publish rights needed).
pub(crate) async fn complete(
    State(app): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    let caller = app.auth.caller(request.headers())?;
    let (topics, reason) = control_query(request.uri().query())?;
    for topic in &topics {
        caller.require_publish(topic)?;
    }
    let bucket = publish::rate_key(&app, &caller, &request);
    publish::rate_limit(&app, bucket.as_deref(), 1)?;
    let targets = Targets {
        topics,
        ..Targets::default()
    };
    let id = append_complete(&app, &targets, false, reason.as_deref()).await?;
    Ok(Json(Appended { id: id.to_string() }).into_response())
}

/// `POST /cancel?topic=T`: appends `herald.cancel` to the topics. A subscribe right on each
/// topic is enough (a browser's stop button), as is a publish right.
pub(crate) async fn cancel(
    State(app): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    let caller = app.auth.caller(request.headers())?;
    let (topics, reason) = control_query(request.uri().query())?;
    for topic in &topics {
        may_cancel(&app, &caller, topic)?;
    }
    let bucket = publish::rate_key(&app, &caller, &request);
    publish::rate_limit(&app, bucket.as_deref(), 1)?;
    let m = Message::to_targets(Targets {
        topics,
        ..Targets::default()
    })
    .event(EventType::cancel())
    .data(reason_data(reason.as_deref()));
    let published = app
        .hub
        .publish(m)
        .await
        .map_err(|e| publish::publish_error(e, false))?;
    Ok(Json(Appended {
        id: published.id.to_string(),
    })
    .into_response())
}

fn may_cancel(app: &AppState, caller: &Caller, topic: &Topic) -> Result<(), ApiError> {
    match caller {
        Caller::Nobody if app.auth.subscribe_is_open() => Ok(()),
        Caller::Nobody => Err(ApiError::new(
            ErrorCode::Unauthorized,
            "cancelling needs a token with a right on the topic as Authorization: Bearer",
        )),
        Caller::Token(_) => {
            let selector = Selector::new(topic.as_str()).map_err(|e| {
                ApiError::new(ErrorCode::InvalidTopic, format!("topic '{topic}' {e}"))
            })?;
            if caller.require_publish(topic).is_ok() || caller.grant().covers(&selector) {
                Ok(())
            } else {
                Err(ApiError::new(
                    ErrorCode::ForbiddenTopic,
                    format!("the token has neither a subscribe nor a publish right on '{topic}'"),
                ))
            }
        }
        Caller::Open | Caller::PublishKey(_) => Ok(()),
    }
}

/// Whether a `GET /events` is answered 204: it resumes (`Last-Event-ID`) right after its only
/// topic's `herald.complete`, so the stream it asks for is over and a browser stops for good.
/// A connection with other selectors too, or naming a user, continues as any other.
pub(super) async fn finished(app: &AppState, start: &Start, selectors: &[Selector]) -> bool {
    let (Start::After(id), [selector]) = (start, selectors) else {
        return false;
    };
    let (Some(id), true) = (EventId::parse(id), selector.is_exact()) else {
        return false;
    };
    let Ok(topic) = Topic::new(selector.as_str()) else {
        return false;
    };
    match app.hub.is_completion(&topic, id).await {
        Ok(done) => done,
        Err(e) => {
            tracing::warn!(error = %e, "could not read history to check for a completed stream");
            false
        }
    }
}

/// The status of a finished stream's reconnect.
pub(super) fn finished_response() -> Response {
    StatusCode::NO_CONTENT.into_response()
}
