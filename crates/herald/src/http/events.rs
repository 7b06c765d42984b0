//! `GET /events`: validates the request, registers the connection with the hub, then streams its
//! frames. The registration happens before the headers go out, so nothing published after is missed.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use herald_core::{
    Grant, ReplayObserver, Selector, Start, SubscribeError, SubscribeRequest, UserId,
};

use super::{ApiError, AppState, form_pairs, limits};
use crate::auth::Caller;
use crate::error_code::ErrorCode;

pub(crate) async fn subscribe(
    State(app): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    let ip = limits::client_ip(&app.limits, request.extensions(), request.headers());
    let (headers, uri) = (request.headers(), request.uri());
    let (mut request, access_token) = parse(headers, uri)?;
    // Whether it names a user itself (a token's user is filled in below, and does not count).
    let names_user = request.user.is_some();
    authorize(&app, headers, access_token.as_deref(), &mut request)?;
    if !names_user && super::finite::finished(&app, &request.start, &request.selectors).await {
        return Ok(super::finite::finished_response());
    }
    // Only a stream that starts with a replay reports one: a live stream holds no observer.
    if request.start != Start::Live {
        let metrics = app.metrics.clone();
        request.on_replayed = Some(ReplayObserver(Arc::new(move |n| metrics.replayed(n))));
    }
    let slot = app
        .connections
        .acquire(&app.limits, ip, request.user.as_ref())
        .map_err(|limit| {
            app.metrics.limited(limit);
            ApiError::new(
                ErrorCode::TooManyConnections,
                match limit {
                    "connections_per_ip" => "this address holds as many streams as it may",
                    _ => "this user holds as many streams as it may",
                },
            )
        })?;
    let stream = match app.hub.subscribe(request) {
        Ok(stream) => stream,
        Err(SubscribeError::Blocked(_)) => return Ok(StatusCode::NO_CONTENT.into_response()),
        Err(e @ SubscribeError::TooManySelectors { .. }) => {
            return Err(ApiError::new(ErrorCode::TooManySelectors, e.to_string()));
        }
        Err(e @ SubscribeError::SelectorTooDeep { .. }) => {
            return Err(ApiError::new(ErrorCode::SelectorTooDeep, e.to_string()));
        }
        Err(e @ SubscribeError::TooManySegments { .. }) => {
            return Err(ApiError::new(ErrorCode::TooManySegments, e.to_string()));
        }
        Err(e @ SubscribeError::AtCapacity(_)) => {
            app.metrics.limited("connections");
            return Err(ApiError::new(ErrorCode::AtCapacity, e.to_string()));
        }
        Err(e @ SubscribeError::ShuttingDown) => {
            return Err(ApiError::new(ErrorCode::ShuttingDown, e.to_string()));
        }
    };
    // The slot goes back when hyper drops the body, that is when the stream ends.
    let body = Body::from_stream(stream.map(move |frame| {
        let _held = &slot;
        Ok::<_, Infallible>(frame)
    }));
    let mut response = Response::new(body);
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// Applies the caller's rights to a parsed request: who the connection is, what it may ask for,
/// what private events it may see and when it ends.
fn authorize(
    app: &AppState,
    headers: &HeaderMap,
    access_token: Option<&str>,
    request: &mut SubscribeRequest,
) -> Result<(), ApiError> {
    let reserved = request.selectors.iter().find(|s| s.is_reserved()).cloned();
    let caller = app
        .auth
        .subscriber(headers, access_token, reserved.is_some())?;
    if let Some(selector) = &reserved {
        reserved_right(app, &caller, selector)?;
    }
    match &caller {
        Caller::Open | Caller::PublishKey(_) => return Ok(()),
        Caller::Nobody if !app.auth.allows_anonymous() => {
            return Err(ApiError::new(
                ErrorCode::Unauthorized,
                "subscribing needs a token (Authorization: Bearer, the herald_token cookie or access_token)",
            ));
        }
        Caller::Nobody => {
            if request.user.is_some() {
                return Err(ApiError::new(
                    ErrorCode::Unauthorized,
                    "naming a user needs that user's token",
                ));
            }
        }
        Caller::Token(token) => {
            match (&request.user, &token.user) {
                (Some(asked), Some(sub)) if asked != sub => {
                    return Err(ApiError::new(
                        ErrorCode::ForbiddenUser,
                        format!("the token is for another user than '{asked}'"),
                    ));
                }
                (Some(asked), None) => {
                    return Err(ApiError::new(
                        ErrorCode::ForbiddenUser,
                        format!("the token names no user, so it cannot connect as '{asked}'"),
                    ));
                }
                _ => request.user = token.user.clone(),
            }
            request.expires_at_ms = token.expires_at_ms;
        }
    }
    let grant = caller.grant();
    let admin = matches!(&caller, Caller::Token(t) if t.admin);
    if let Some(s) = request
        .selectors
        .iter()
        .find(|s| !(grant.covers(s) || (admin && s.is_reserved())))
    {
        return Err(ApiError::new(
            ErrorCode::ForbiddenSelector,
            format!("the token's subscribe rights do not cover '{s}'"),
        ));
    }
    debug_assert!(!matches!(grant, Grant::All));
    request.grant = grant;
    Ok(())
}

/// Topics starting with `$` (herald's own, such as `$presence/alice`) need an explicit right: an
/// open hub (no keys at all), the publish key, an admin token, or a token whose subscribe rights
/// name them (`$presence/**`; a right of `**` does not, see `Selector::covers`). Anonymous
/// connections never get them.
fn reserved_right(app: &AppState, caller: &Caller, selector: &Selector) -> Result<(), ApiError> {
    let allowed = match caller {
        Caller::Open => app.auth.is_open(),
        Caller::PublishKey(_) => true,
        Caller::Token(t) => t.admin || t.subscribe.iter().any(|r| r.covers(selector)),
        Caller::Nobody => false,
    };
    if allowed {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::ForbiddenSelector,
        format!(
            "'{selector}' is one of herald's own topics: subscribing needs the publish key, an admin token or a token whose subscribe rights name it"
        ),
    ))
}

/// The request, and the `access_token` query value (which is never logged).
fn parse(headers: &HeaderMap, uri: &Uri) -> Result<(SubscribeRequest, Option<String>), ApiError> {
    let pairs = form_pairs(uri.query().unwrap_or_default().as_bytes())?;
    let mut request = SubscribeRequest::default();
    let mut query_last_id = None;
    let mut since = None;
    let mut access_token = None;
    for (key, value) in pairs {
        match key.as_str() {
            "topic" => {
                let selector = Selector::new(&value).map_err(|e| {
                    ApiError::new(
                        ErrorCode::InvalidSelector,
                        format!("topic selector '{value}' {e}"),
                    )
                })?;
                request.selectors.push(selector);
            }
            "user" => {
                if request.user.is_some() {
                    return Err(ApiError::new(ErrorCode::InvalidUser, "give user once"));
                }
                let user = UserId::new(&value)
                    .map_err(|e| ApiError::new(ErrorCode::InvalidUser, format!("user id {e}")))?;
                request.user = Some(user);
            }
            "lastEventId" => query_last_id = Some(value),
            "access_token" => access_token = Some(value),
            "since" => since = Some(parse_since(&value)?),
            "route" => {
                request.route = match value.as_str() {
                    "1" => true,
                    "0" => false,
                    _ => {
                        return Err(ApiError::new(
                            ErrorCode::InvalidRoute,
                            format!("'route' must be 1 or 0; got '{value}'"),
                        ));
                    }
                }
            }
            "maxAge" => request.max_age = Some(parse_max_age(&value)?),
            // Anything else (cache busters, later options) is ignored.
            _ => {}
        }
    }
    // Any header value is taken: one this hub never wrote is answered with `herald.gap`.
    let header_last_id = headers
        .get("last-event-id")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    // Precedence: the Last-Event-ID header, then lastEventId, then since. Empty counts as none.
    request.start = match header_last_id
        .filter(|s| !s.is_empty())
        .or(query_last_id.filter(|s| !s.is_empty()))
    {
        Some(id) => Start::After(id),
        None => since.unwrap_or(Start::Live),
    };
    Ok((request, access_token))
}

/// `maxAge=DURATION`: the longest this stream may live (the hub's own limit wins when shorter).
fn parse_max_age(value: &str) -> Result<std::time::Duration, ApiError> {
    let invalid = |why: &str| {
        ApiError::new(
            ErrorCode::InvalidMaxAge,
            format!("'maxAge' must be a duration of at least 1s, like 5m; got '{value}'{why}"),
        )
    };
    let age = herald_core::duration::parse_duration(value).map_err(|_| invalid(""))?;
    if age < std::time::Duration::from_secs(1) {
        return Err(invalid(" (too short)"));
    }
    Ok(age)
}

/// `since=ID|DURATION|all`: after an event id, within a duration before now, or all retained.
pub fn parse_since(value: &str) -> Result<Start, ApiError> {
    if value == "all" {
        return Ok(Start::All);
    }
    if herald_core::EventId::parse(value).is_some() {
        return Ok(Start::After(value.to_string()));
    }
    herald_core::duration::parse_duration(value)
        .map(Start::Since)
        .map_err(|_| {
            ApiError::new(
                ErrorCode::InvalidSince,
                format!("'since' must be an event id, a duration like 1h, or all; got '{value}'"),
            )
        })
}
