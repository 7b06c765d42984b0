//! `GET /events`: validates the request, registers the connection with the hub, then streams its
//! frames. The registration happens before the headers go out, so nothing published after is missed.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use herald_core::{Selector, Start, SubscribeError, SubscribeRequest, UserId};

use super::{ApiError, AppState, form_pairs};

pub(crate) async fn subscribe(
    State(app): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    let request = parse(&headers, &uri)?;
    let stream = match app.hub.subscribe(request) {
        Ok(stream) => stream,
        Err(SubscribeError::Blocked(_)) => return Ok(StatusCode::NO_CONTENT.into_response()),
        Err(e @ SubscribeError::TooManySelectors { .. }) => {
            return Err(ApiError::bad_request("too_many_selectors", e.to_string()));
        }
        Err(e @ SubscribeError::AtCapacity(_)) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "at_capacity",
                e.to_string(),
            )
            .retry_after(5));
        }
        Err(e @ SubscribeError::ShuttingDown) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                e.to_string(),
            )
            .retry_after(1));
        }
    };
    let body = Body::from_stream(stream.map(Ok::<_, Infallible>));
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

fn parse(headers: &HeaderMap, uri: &Uri) -> Result<SubscribeRequest, ApiError> {
    let pairs = form_pairs(uri.query().unwrap_or_default().as_bytes())?;
    let mut request = SubscribeRequest::default();
    let mut query_last_id = None;
    let mut since = None;
    for (key, value) in pairs {
        match key.as_str() {
            "topic" => {
                let selector = Selector::new(&value).map_err(|e| {
                    ApiError::bad_request(
                        "invalid_selector",
                        format!("topic selector '{value}' {e}"),
                    )
                })?;
                request.selectors.push(selector);
            }
            "user" => {
                if request.user.is_some() {
                    return Err(ApiError::bad_request("invalid_user", "give user once"));
                }
                let user = UserId::new(&value)
                    .map_err(|e| ApiError::bad_request("invalid_user", format!("user id {e}")))?;
                request.user = Some(user);
            }
            "lastEventId" => query_last_id = Some(value),
            "since" => since = Some(parse_since(&value)?),
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
    Ok(request)
}

/// `since=ID|DURATION|all`: after an event id, within a duration before now, or all retained.
pub(crate) fn parse_since(value: &str) -> Result<Start, ApiError> {
    if value == "all" {
        return Ok(Start::All);
    }
    if herald_core::EventId::parse(value).is_some() {
        return Ok(Start::After(value.to_string()));
    }
    herald_core::duration::parse_duration(value)
        .map(Start::Since)
        .map_err(|_| {
            ApiError::bad_request(
                "invalid_since",
                format!("'since' must be an event id, a duration like 1h, or all; got '{value}'"),
            )
        })
}
