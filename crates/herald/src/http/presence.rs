//! Presence and control: who is online, a user's recent messages, closing a user's streams, stats
//! and health.

use axum::Json;
use axum::extract::{Path, State, rejection::PathRejection};
use axum::http::{HeaderMap, Uri};
use herald_core::duration::parse_duration;
use herald_core::{ClusterError, Online, UserId};
use serde_json::{Value, json};

use super::{ApiError, AppState, form_pairs};

use crate::auth::Caller;
use crate::error_code::ErrorCode;

/// Presence and control need the publish key or an admin token.
fn admin(app: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    Ok(app.auth.caller(headers)?.require_admin()?)
}

/// The other nodes' shares of presence could not be read.
fn cluster_unavailable(e: ClusterError) -> ApiError {
    ApiError::unavailable(ErrorCode::ClusterUnavailable, &e)
}

const PAGE_DEFAULT: usize = 100;
const PAGE_MAX: usize = 1000;

pub(crate) fn user_from_path(
    path: Result<Path<String>, PathRejection>,
) -> Result<UserId, ApiError> {
    let Path(raw) = path.map_err(|e| ApiError::new(ErrorCode::InvalidUser, e.body_text()))?;
    UserId::new(&raw).map_err(|e| ApiError::new(ErrorCode::InvalidUser, format!("user id {e}")))
}

pub(crate) async fn users(
    State(app): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
    admin(&app, &headers)?;
    let mut limit = PAGE_DEFAULT;
    let mut after = None;
    for (key, value) in form_pairs(uri.query().unwrap_or_default().as_bytes())? {
        match key.as_str() {
            "limit" => limit = parse_limit(&value)?,
            "after" => {
                after = Some(UserId::new(&value).map_err(|e| {
                    ApiError::new(ErrorCode::InvalidUser, format!("'after': user id {e}"))
                })?)
            }
            _ => {}
        }
    }
    let Online { count, page } = app
        .presence
        .online(after.as_ref(), limit)
        .await
        .map_err(cluster_unavailable)?;
    let page: Vec<Value> = page
        .into_iter()
        .map(|(id, connections)| json!({ "id": id, "connections": connections }))
        .collect();
    Ok(Json(json!({ "count": count, "users": page })))
}

/// `GET /subscriptions?prefix=P&cursor=C&limit=N`: the selectors open streams hold (cluster-wide),
/// with their stream counts, sorted; a page starts after `cursor` (the previous page's `next`).
pub(crate) async fn subscriptions(
    State(app): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
    admin(&app, &headers)?;
    let mut limit = PAGE_DEFAULT;
    let (mut prefix, mut cursor) = (String::new(), None);
    for (key, value) in form_pairs(uri.query().unwrap_or_default().as_bytes())? {
        match key.as_str() {
            "limit" => limit = parse_limit(&value)?,
            "prefix" => prefix = value,
            "cursor" if !value.is_empty() => cursor = Some(value),
            _ => {}
        }
    }
    let all = app
        .presence
        .subscriptions()
        .await
        .map_err(cluster_unavailable)?;
    let mut matching = all.into_iter().filter(|(s, _)| {
        s.starts_with(&prefix) && cursor.as_ref().is_none_or(|c| s.as_str() > c.as_str())
    });
    let page: Vec<(String, usize)> = matching.by_ref().take(limit).collect();
    let next = match matching.next() {
        Some(_) => page.last().map(|(s, _)| s.clone()),
        None => None,
    };
    let page: Vec<Value> = page
        .into_iter()
        .map(|(selector, streams)| json!({ "selector": selector, "streams": streams }))
        .collect();
    Ok(Json(json!({ "subscriptions": page, "next": next })))
}

/// `GET /users/{id}/messages?since=ID|DURATION|all&limit=N`: the messages sent to a user, oldest
/// first, for apps that poll instead of streaming.
pub(crate) async fn messages(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
    let user = user_from_path(path)?;
    // A user may read back their own messages with their own token.
    // A user may read back their own messages with their own token, unless an operator blocked
    // them (`DELETE /users/{id}/connections?block=`): then only an admin may.
    match app.auth.caller(&headers)? {
        Caller::Token(t) if t.user.as_ref() == Some(&user) && !t.admin => {
            if let Some(left) = app.hub.blocked_for(&user) {
                return Err(ApiError::new(
                    ErrorCode::UserBlocked,
                    format!(
                        "this user is blocked for another {}s",
                        left.as_secs().max(1)
                    ),
                ));
            }
        }
        other => other.require_admin()?,
    }
    let mut start = herald_core::Start::All;
    let mut limit = PAGE_DEFAULT;
    for (key, value) in form_pairs(uri.query().unwrap_or_default().as_bytes())? {
        match key.as_str() {
            "since" => start = super::events::parse_since(&value)?,
            "limit" => limit = parse_limit(&value)?,
            _ => {}
        }
    }
    let found = app
        .hub
        .user_messages(&user, &start, limit)
        .await
        .map_err(|e| ApiError::unavailable(ErrorCode::StoreUnavailable, &e))?;
    let messages: Vec<Value> = found
        .events
        .iter()
        .map(|e| {
            json!({
                "id": e.id.to_string(),
                "event": e.event_type.as_ref().map(|t| t.as_str()),
                "data": e.data.as_str(),
                "publishedAtMs": e.published_at_ms,
                // The snake_case name of earlier releases, kept for one more release.
                "published_at_ms": e.published_at_ms,
            })
        })
        .collect();
    let gap = found
        .gap
        .map(|gap| json!({ "oldest": gap.oldest.map(|o| o.to_string()) }));
    Ok(Json(
        json!({ "id": user.as_str(), "messages": messages, "gap": gap }),
    ))
}

fn parse_limit(value: &str) -> Result<usize, ApiError> {
    value
        .parse()
        .ok()
        .filter(|n| (1..=PAGE_MAX).contains(n))
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidLimit,
                format!("'limit' must be a number from 1 to {PAGE_MAX}"),
            )
        })
}

pub(crate) async fn user(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    admin(&app, &headers)?;
    let user = user_from_path(path)?;
    let connections = app
        .presence
        .connections(&user)
        .await
        .map_err(cluster_unavailable)?;
    Ok(Json(json!({
        "id": user.as_str(),
        "online": connections > 0,
        "connections": connections,
    })))
}

/// `DELETE /users/{id}/connections?block=DUR&reason=TEXT`
pub(crate) async fn close(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
    admin(&app, &headers)?;
    let user = user_from_path(path)?;
    let mut block = None;
    let mut reason = "closed".to_string();
    for (key, value) in form_pairs(uri.query().unwrap_or_default().as_bytes())? {
        match key.as_str() {
            "block" => {
                block =
                    Some(parse_duration(&value).map_err(|e| {
                        ApiError::new(ErrorCode::InvalidBlock, format!("'block': {e}"))
                    })?)
            }
            "reason" => {
                if value.is_empty() || value.len() > 256 {
                    return Err(ApiError::from(ErrorCode::InvalidReason));
                }
                reason = value;
            }
            _ => {}
        }
    }
    let closed = app
        .presence
        .close(&user, &reason, block)
        .await
        .map_err(cluster_unavailable)?;
    Ok(Json(json!({ "closed": closed })))
}

pub(crate) async fn stats(
    State(app): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    admin(&app, &headers)?;
    let s = app.presence.totals().await.map_err(cluster_unavailable)?;
    let nodes = app.presence.nodes().await.map_err(cluster_unavailable)?;
    let mut body = json!({
        "connections": s.connections,
        "users": s.users,
        "topics": s.topics,
        "published": s.published,
        "delivered": s.delivered,
        "replayed": s.replayed,
        "gaps": s.gaps,
        "unreadable": s.unreadable,
        "rewinds": s.rewinds,
        "lagging": s.lagging,
        "endedByAge": s.aged,
        "uptimeSeconds": s.uptime.as_secs(),
        // The snake_case name of earlier releases, kept for one more release.
        "uptime_s": s.uptime.as_secs(),
    });
    // In cluster mode, each live node with its connections.
    if let Some(nodes) = nodes {
        body["nodes"] = nodes
            .into_iter()
            .map(|(id, connections)| json!({ "id": id, "connections": connections }))
            .collect();
    }
    Ok(Json(body))
}

pub(crate) async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: 200 while this node can publish; 503 while its shared history (Redis) is
/// unreachable, so a load balancer can route around it.
pub(crate) async fn readyz(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    if app.hub.is_ready() {
        Ok(Json(json!({ "ready": true })))
    } else {
        Err(ApiError::from(ErrorCode::NotReady))
    }
}
