//! Mercure's active subscriptions (`--mercure-subscriptions`): each topic selector of a Mercure
//! subscriber is one subscription, announced as a private update when it starts (`active: true`)
//! and ends (`active: false`), and listed by the subscriptions API under
//! `/.well-known/mercure/subscriptions`. A subscription is described in the dialect it was made
//! in: `match=`/`match_urlpattern=` (draft-08) on `…/subscriptions/{match_type}/{match}/{subscriber}`
//! as JSON with SSE type `mercure`; v0.x `topic=` on `…/subscriptions/{topic}/{subscriber}` as
//! JSON-LD. Cluster-wide: each node keeps its own subscriptions and shares them through
//! [`Presence::share`]; the API merges them with the other live nodes'; the node that reaps a dead
//! one announces the end of its subscriptions. Rule: the subscriber id is the hub's (a random
//! `urn:uuid:`), never taken from the client, and every document the API lists was announced.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Extension;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_core::{Hub, Message, PeerGone, Presence};
use parking_lot::Mutex;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use serde_json::{Map, Value, json};

use super::selector::TopicSelector;
use super::token::{Grants, Refusal};
use super::update::{Envelope, SUBSCRIPTIONS_TOPIC};
use super::{Mercure, PATH, grants_of, refuse};
use crate::error_code::ErrorCode;
use crate::http::{ApiError, AppState, form_pairs};

/// Where the subscriptions API and the subscription events' topics live.
pub const BASE: &str = "/.well-known/mercure/subscriptions";
/// The JSON-LD `@context` of v0.x documents.
const CONTEXT: &str = "https://mercure.rocks/";
/// RFC 6570 simple expansion: everything but the unreserved characters is percent-encoded.
const EXPANSION: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// How a subscriber named one topic selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked {
    /// Draft-08 `match=` / `match_exact=`.
    Exact(String),
    /// Draft-08 `match_urlpattern=`.
    UrlPattern(String),
    /// v0.x `topic=`.
    V0(String),
}

impl Asked {
    fn text(&self) -> &str {
        match self {
            Asked::Exact(t) | Asked::UrlPattern(t) | Asked::V0(t) => t,
        }
    }
}

fn expand(value: &str) -> String {
    utf8_percent_encode(value, EXPANSION).to_string()
}

/// The document of one active subscription (`active: true`).
pub fn document(subscriber: &str, asked: &Asked, payload: Option<&Value>) -> Value {
    let mut doc = Map::new();
    let (id, doc_type) = match asked {
        Asked::Exact(m) | Asked::UrlPattern(m) => {
            let kind = if matches!(asked, Asked::Exact(_)) {
                "exact"
            } else {
                "urlpattern"
            };
            doc.insert("match_type".into(), kind.into());
            doc.insert("match".into(), m.as_str().into());
            (
                format!("{BASE}/{kind}/{}/{}", expand(m), expand(subscriber)),
                "subscription",
            )
        }
        Asked::V0(t) => {
            doc.insert("topic".into(), t.as_str().into());
            (
                format!("{BASE}/{}/{}", expand(t), expand(subscriber)),
                "Subscription",
            )
        }
    };
    doc.insert("id".into(), id.into());
    doc.insert("type".into(), doc_type.into());
    doc.insert("subscriber".into(), subscriber.into());
    doc.insert("active".into(), true.into());
    if let Some(p) = payload {
        doc.insert("payload".into(), p.clone());
    }
    Value::Object(doc)
}

fn is_v0(doc: &Value) -> bool {
    doc["type"] == "Subscription"
}

fn doc_id(doc: &Value) -> &str {
    doc["id"].as_str().unwrap_or_default()
}

/// A fresh subscriber id: a random (version 4) UUID URN.
fn subscriber_id() -> String {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        // No system randomness: time and a counter still tell connections apart.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        b[..8].copy_from_slice(&herald_core::clock::now_ms().to_be_bytes());
        b[8..].copy_from_slice(&n.to_be_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!(
        "urn:uuid:{}-{}-{}-{}-{}",
        h(0..4),
        h(4..6),
        h(6..8),
        h(8..10),
        h(10..16)
    )
}

/// The subscription event of `doc` with `active`: a private Mercure update on its own topic.
fn event(doc: &Value, active: bool) -> Option<Message> {
    let mut doc = doc.clone();
    doc["active"] = active.into();
    let v0 = is_v0(&doc);
    if v0 && let Value::Object(m) = &mut doc {
        m.insert("@context".into(), CONTEXT.into());
    }
    let envelope = Envelope {
        id: None,
        topics: vec![doc_id(&doc).to_string()],
        r#type: (!v0).then(|| "mercure".to_string()),
        retry: None,
        private: true,
        data: doc.to_string(),
    };
    let json = serde_json::to_string(&envelope).ok()?;
    let topic = herald_core::Topic::new(SUBSCRIPTIONS_TOPIC).expect("a valid topic");
    Some(Message::to_topic(topic).private(true).data(json))
}

/// Whether a subscriber with these selectors and subscribe rights (`None`: every right) may
/// receive a subscription event (private, on a topic under [`BASE`]): only then does its stream
/// hold [`SUBSCRIPTIONS_TOPIC`]. Errs on the side of yes; the filter decides each event.
pub(crate) fn may_receive(selectors: &[TopicSelector], rights: Option<&[TopicSelector]>) -> bool {
    let under = format!("{BASE}/");
    let may = |list: &[TopicSelector]| list.iter().any(|s| s.may_match_under(&under));
    may(selectors) && rights.is_none_or(may)
}

/// Publishes the events of `docs` with `active`, in one batch.
async fn announce(hub: &Hub, docs: &[Value], active: bool) {
    if let Err(e) = try_announce(hub, docs, active).await {
        tracing::warn!(error = %e, subscriptions = docs.len(), active, "Mercure subscription events were not published");
    }
}

/// [`announce`], telling whether the events were published.
async fn try_announce(hub: &Hub, docs: &[Value], active: bool) -> Result<(), String> {
    let messages: Vec<Message> = docs.iter().filter_map(|d| event(d, active)).collect();
    if messages.is_empty() {
        return Ok(());
    }
    hub.publish_reserved(SUBSCRIPTIONS_TOPIC, messages)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The cluster entries of `docs`: set (`active`) or removed.
fn entries(docs: &[Value], active: bool) -> Vec<(String, Option<String>)> {
    docs.iter()
        .map(|d| (doc_id(d).to_string(), active.then(|| d.to_string())))
        .collect()
}

/// How often this node's whole registry is shared again, mending what a failed share (Redis
/// unreachable) left behind.
const RESHARE: std::time::Duration = std::time::Duration::from_secs(10);

/// This node's active subscriptions, and the task that shares them. Rule: no lock is held across
/// an `.await` (a share is a Redis round trip in a cluster). Changes are made here under a plain
/// lock and queued; one sharer task sends them, in order and batched (every change queued while
/// a share is in flight goes in the next one), and the whole registry every [`RESHARE`], so a
/// re-share never undoes a newer change and subscribers never wait on each other's round trips.
#[derive(Debug)]
pub struct Registry {
    state: Mutex<Shared>,
    /// Wakes the sharer: changes are queued. (Its own `Arc`: the idle sharer holds no registry.)
    wake: Arc<tokio::sync::Notify>,
    /// The number of the newest change the sharer has finished with (shared, or failed and left
    /// to the next re-share).
    done: tokio::sync::watch::Sender<u64>,
    /// Whether a sharer runs (none outside a runtime: then nothing waits for it).
    sharing: bool,
}

#[derive(Debug, Default)]
struct Shared {
    /// The subscriptions, by document id.
    local: BTreeMap<String, Value>,
    /// Changes not yet handed to the sharer, oldest first.
    queued: Vec<(String, Option<String>)>,
    /// Changes made so far (the newest one's number).
    changes: u64,
    /// A share failed: the next one sends the whole registry.
    whole: bool,
}

/// One subscriber's subscriptions; dropping it (the stream ended) ends them.
#[derive(Debug)]
pub struct Registration {
    hub: Hub,
    registry: Arc<Registry>,
    docs: Vec<Value>,
}

impl Registry {
    /// An empty registry whose changes are shared through `presence` (by a task of the current
    /// runtime, which ends with the registry).
    pub(crate) fn new(presence: Arc<dyn Presence>) -> Arc<Registry> {
        let runtime = tokio::runtime::Handle::try_current().ok();
        let registry = Arc::new(Registry {
            state: Mutex::new(Shared::default()),
            wake: Arc::new(tokio::sync::Notify::new()),
            done: tokio::sync::watch::channel(0).0,
            sharing: runtime.is_some(),
        });
        if let Some(runtime) = runtime {
            let wake = registry.wake.clone();
            runtime.spawn(share_changes(Arc::downgrade(&registry), wake, presence));
        }
        registry
    }

    /// Changes the registry (`docs` set or removed) and queues the change; its number.
    fn change(&self, docs: &[Value], active: bool) -> u64 {
        let mut state = self.state.lock();
        for d in docs {
            if active {
                state.local.insert(doc_id(d).to_string(), d.clone());
            } else {
                state.local.remove(doc_id(d));
            }
        }
        state.queued.extend(entries(docs, active));
        state.changes += 1;
        let n = state.changes;
        drop(state);
        self.wake.notify_one();
        n
    }

    /// Returns once the sharer has finished with change `n` (holding no lock meanwhile).
    async fn shared(&self, n: u64) {
        if self.sharing {
            let mut done = self.done.subscribe();
            let _ = done.wait_for(|d| *d >= n).await;
        }
    }

    /// Registers a new subscriber's subscriptions: kept here, shared with the other nodes, and
    /// announced (`active: true`) before this returns.
    pub(crate) async fn register(
        self: &Arc<Self>,
        hub: &Hub,
        asked: &[Asked],
        grants: Option<&Grants>,
    ) -> Registration {
        let subscriber = subscriber_id();
        let mut docs: Vec<Value> = Vec::new();
        for a in asked {
            let payload = grants.and_then(|g| g.payload_for(a.text()));
            let doc = document(&subscriber, a, payload);
            if !docs.iter().any(|d| doc_id(d) == doc_id(&doc)) {
                docs.push(doc);
            }
        }
        // The guard exists before the first await: a request dropped half-way still cleans up.
        let registration = Registration {
            hub: hub.clone(),
            registry: self.clone(),
            docs,
        };
        let n = self.change(&registration.docs, true);
        self.shared(n).await;
        announce(hub, &registration.docs, true).await;
        registration
    }

    fn snapshot(&self) -> Vec<Value> {
        self.state.lock().local.values().cloned().collect()
    }
}

/// The sharer: sends the queued changes as they come (one share for all that queued meanwhile),
/// and the whole registry every [`RESHARE`] or after a failed share; ends with the registry.
async fn share_changes(
    registry: std::sync::Weak<Registry>,
    wake: Arc<tokio::sync::Notify>,
    presence: Arc<dyn Presence>,
) {
    let mut tick = tokio::time::interval(RESHARE);
    tick.tick().await;
    loop {
        let reshare = tokio::select! {
            () = wake.notified() => false,
            _ = tick.tick() => true,
        };
        let Some(registry) = registry.upgrade() else {
            return;
        };
        // Under the lock every connection's register and drop take: only copies; the documents
        // are serialized after it.
        let (all, queued, replace, through) = {
            let mut state = registry.state.lock();
            let whole = reshare || std::mem::take(&mut state.whole);
            let queued = std::mem::take(&mut state.queued);
            let all = whole.then(|| state.local.values().cloned().collect::<Vec<_>>());
            (all, queued, whole, state.changes)
        };
        let entries = match all {
            Some(docs) => entries(&docs, true),
            None => queued,
        };
        if !entries.is_empty() || replace {
            // No lock is held here: changes made meanwhile queue for the next share.
            if let Err(e) = presence.share(&entries, replace).await {
                tracing::warn!(error = %e, "Mercure subscriptions were not shared with the cluster; retried with the next re-share");
                registry.state.lock().whole = true;
            }
        }
        registry.done.send_replace(through);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let docs = std::mem::take(&mut self.docs);
        let n = self.registry.change(&docs, false);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (hub, registry) = (self.hub.clone(), self.registry.clone());
        runtime.spawn(async move {
            registry.shared(n).await;
            announce(&hub, &docs, false).await;
        });
    }
}

/// The hook the cluster calls with a dead node's shared subscriptions: announces their end. An
/// announcement that fails is an `Err`, so the cluster keeps them and calls again later.
pub fn on_peer_gone(hub: Hub) -> PeerGone {
    Arc::new(move |shared: Vec<(String, String)>| {
        let hub = hub.clone();
        let docs: Vec<Value> = shared
            .iter()
            .filter_map(|(_, doc)| serde_json::from_str::<Value>(doc).ok())
            .filter(|doc| doc["id"].is_string())
            .collect();
        Box::pin(async move { try_announce(&hub, &docs, false).await })
    })
}

/// What an API request names.
#[derive(Debug, PartialEq, Eq)]
enum Wanted {
    /// `…/subscriptions`.
    All,
    /// v0.x `…/subscriptions/{topic}`.
    V0Topic(String),
    /// v0.x `…/subscriptions/{topic}/{subscriber}`.
    V0One { topic: String, subscriber: String },
    /// Draft-08 `…/subscriptions/{match_type}/{match}`.
    Matcher { kind: String, pattern: String },
    /// Draft-08 `…/subscriptions/{match_type}/{match}/{subscriber}`.
    One {
        kind: String,
        pattern: String,
        subscriber: String,
    },
}

const KINDS: [&str; 2] = ["exact", "urlpattern"];

impl Wanted {
    /// Reads the request's path (as sent, percent-encoded). A two-segment path is draft-08's
    /// per-matcher collection when its first segment is a matcher type, else v0.x's subscription.
    fn parse(path: &str) -> Result<Wanted, ApiError> {
        let rest = path.strip_prefix(BASE).unwrap_or_default();
        if rest.is_empty() {
            return Ok(Wanted::All);
        }
        let Some(rest) = rest.strip_prefix('/') else {
            return Err(ErrorCode::NotFound.into());
        };
        let segments = rest
            .split('/')
            .map(|s| {
                if s.is_empty() {
                    return Err(bad("a path segment is empty"));
                }
                percent_decode_str(s)
                    .decode_utf8()
                    .map(|d| d.into_owned())
                    .map_err(|_| bad("a path segment is not UTF-8 once percent-decoded"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let known = |k: &String| KINDS.contains(&k.as_str());
        match segments.as_slice() {
            [topic] => Ok(Wanted::V0Topic(topic.clone())),
            [kind, pattern] if known(kind) => Ok(Wanted::Matcher {
                kind: kind.clone(),
                pattern: pattern.clone(),
            }),
            [topic, subscriber] => Ok(Wanted::V0One {
                topic: topic.clone(),
                subscriber: subscriber.clone(),
            }),
            [kind, pattern, subscriber] if known(kind) => Ok(Wanted::One {
                kind: kind.clone(),
                pattern: pattern.clone(),
                subscriber: subscriber.clone(),
            }),
            [kind, _, _] => Err(bad(format!(
                "'{kind}' is not a matcher type (exact, urlpattern)"
            ))),
            _ => Err(ErrorCode::NotFound.into()),
        }
    }

    fn selects(&self, doc: &Value) -> bool {
        let is = |k: &str, v: &str| doc[k].as_str() == Some(v);
        match self {
            Wanted::All => true,
            Wanted::V0Topic(t) => is_v0(doc) && is("topic", t),
            Wanted::V0One { topic, subscriber } => {
                is_v0(doc) && is("topic", topic) && is("subscriber", subscriber)
            }
            Wanted::Matcher { kind, pattern } => is("match_type", kind) && is("match", pattern),
            Wanted::One {
                kind,
                pattern,
                subscriber,
            } => is("match_type", kind) && is("match", pattern) && is("subscriber", subscriber),
        }
    }

    fn single(&self) -> bool {
        matches!(self, Wanted::V0One { .. } | Wanted::One { .. })
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidMercureSubscription, message)
}

/// Whether the answer is v0.x JSON-LD: by the path's shape, else by the token's dialect, else
/// (no token checked) by `Accept: application/ld+json`.
fn json_ld(wanted: &Wanted, grants: Option<&Grants>, headers: &HeaderMap) -> bool {
    match wanted {
        Wanted::V0Topic(_) | Wanted::V0One { .. } => true,
        Wanted::Matcher { .. } | Wanted::One { .. } => false,
        Wanted::All => match grants {
            Some(g) => !g.draft08,
            None => headers
                .get_all(header::ACCEPT)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| v.contains("application/ld+json"))),
        },
    }
}

/// An entity-tag for `cursor`: bytes outside `etagc`, and `%`, percent-encoded.
fn etag(cursor: &str) -> String {
    let mut out = String::from("\"");
    for b in cursor.bytes() {
        // `,` too: `If-None-Match` lists tags separated by commas.
        if b < 0x21 || b == b'"' || b == b'%' || b == b',' || b == 0x7f {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(b as char);
        }
    }
    out.push('"');
    out
}

/// Whether `If-None-Match` names `tag` (weak comparison, RFC 9110 §13.1.2: `W/` ignored; `*`
/// names any).
fn none_match(headers: &HeaderMap, tag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == tag)
}

/// What every answer of the API varies on: the caller's token (header or cookie) decides the
/// refusal and the collection's dialect, and `Accept` decides it when no token is checked.
const VARY: &str = "Authorization, Cookie, Accept";

/// `GET /.well-known/mercure/subscriptions[/…]`: every answer, refusals included, with [`VARY`].
pub(crate) async fn api(
    State(app): State<AppState>,
    Extension(mercure): Extension<Arc<Mercure>>,
    request: Request,
) -> Response {
    // The head only: a body is not `Sync`, and the answer is a `Send` future.
    let (head, _) = request.into_parts();
    let mut response = answer(&app, &mercure, &head)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    response
        .headers_mut()
        .insert(header::VARY, HeaderValue::from_static(VARY));
    response
}

async fn answer(
    app: &AppState,
    mercure: &Mercure,
    request: &axum::http::request::Parts,
) -> Result<Response, ApiError> {
    let Some(registry) = &mercure.subscriptions else {
        return Err(ErrorCode::NotFound.into());
    };
    let path = request.uri.path().to_string();
    let headers = &request.headers;
    let wanted = Wanted::parse(&path)?;
    let query = form_pairs(request.uri.query().unwrap_or_default().as_bytes())?;
    let query_token = query
        .iter()
        .find(|(k, _)| k == "authorization")
        .map(|(_, v)| v.as_str());
    let grants = match grants_of(app, mercure, headers, query_token, false) {
        Ok(g) => g,
        Err(r) => return Ok(refuse(r)),
    };
    // The topic to authorize is the path as requested, without the query.
    if let Some(g) = &grants
        && !g.subscribe.iter().any(|s| s.matches(&path))
    {
        return Ok(refuse(Refusal::InsufficientScope(format!(
            "the token has no subscribe right on '{path}'"
        ))));
    }
    let ld = json_ld(&wanted, grants.as_ref(), headers);
    // The cursor first: whatever changes while the list is read comes after it.
    let newest = mercure
        .ids
        .newest(&app.hub)
        .await
        .map_err(|e| ApiError::unavailable(ErrorCode::StoreUnavailable, &e))?;
    // A publisher's id is the cursor when a header can carry it as is; `#<herald id>` names the
    // same event otherwise.
    let cursor = match (newest.mercure, newest.herald) {
        (Some(id), _) if id.bytes().all(|b| (0x20..0x7f).contains(&b)) => id,
        (_, Some(h)) => format!("#{h}"),
        (_, None) => "earliest".to_string(),
    };
    // The entity-tag is the cursor: every change of the list is announced, which moves it, on
    // every node alike (one history). So a matching tag is answered before anything is listed.
    let tag = etag(&cursor);
    let quoted = cursor.replace('\\', "\\\\").replace('"', "\\\"");
    let link = format!(
        "<{PATH}>; rel=\"mercure\"; last-event-id=\"{quoted}\"; type=\"mercure\"; content-type=\"application/json\""
    );
    let mut response = if none_match(headers, &tag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let body = listing(app, registry, &wanted, &path, ld, &cursor).await?;
        let content_type = if ld {
            "application/ld+json"
        } else {
            "application/json"
        };
        ([(header::CONTENT_TYPE, content_type)], body.to_string()).into_response()
    };
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&tag) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&link) {
        h.insert(header::LINK, v);
    }
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("must-revalidate"),
    );
    Ok(response)
}

/// The body of a `200`: this node's registry and the other live nodes' shares, as `wanted`.
async fn listing(
    app: &AppState,
    registry: &Registry,
    wanted: &Wanted,
    path: &str,
    ld: bool,
    cursor: &str,
) -> Result<Value, ApiError> {
    let mut docs = registry.snapshot();
    let peers = app
        .presence
        .shared_by_peers()
        .await
        .map_err(|e| ApiError::unavailable(ErrorCode::ClusterUnavailable, &e))?;
    docs.extend(
        peers
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_str::<Value>(&v).ok()),
    );
    docs.retain(|d| wanted.selects(d));
    docs.sort_by(|a, b| doc_id(a).cmp(doc_id(b)));
    Ok(if wanted.single() {
        let Some(mut doc) = docs.into_iter().next() else {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no active subscription at {path}"),
            ));
        };
        if ld && let Value::Object(m) = &mut doc {
            m.insert("@context".into(), CONTEXT.into());
            m.insert("lastEventID".into(), cursor.into());
        }
        doc
    } else if ld {
        json!({
            "@context": CONTEXT,
            "id": path,
            "type": "Subscriptions",
            "lastEventID": cursor,
            "subscriptions": docs,
        })
    } else {
        json!({
            "id": path,
            "type": "subscriptions",
            "subscriptions": docs,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_in_both_dialects() {
        let d = document(
            "urn:uuid:1",
            &Asked::UrlPattern("https://example.com/:selector".into()),
            Some(&json!({"foo": "bar"})),
        );
        assert_eq!(
            d,
            json!({
                "id": "/.well-known/mercure/subscriptions/urlpattern/https%3A%2F%2Fexample.com%2F%3Aselector/urn%3Auuid%3A1",
                "type": "subscription", "match_type": "urlpattern",
                "match": "https://example.com/:selector", "subscriber": "urn:uuid:1",
                "active": true, "payload": {"foo": "bar"},
            })
        );
        let d = document("urn:uuid:1", &Asked::V0("https://e.com/{x} y".into()), None);
        assert_eq!(
            d,
            json!({
                "id": "/.well-known/mercure/subscriptions/https%3A%2F%2Fe.com%2F%7Bx%7D%20y/urn%3Auuid%3A1",
                "type": "Subscription", "topic": "https://e.com/{x} y",
                "subscriber": "urn:uuid:1", "active": true,
            })
        );
        let id = subscriber_id();
        assert_eq!(id.len(), "urn:uuid:".len() + 36, "{id}");
        assert_ne!(id, subscriber_id());
    }

    #[test]
    fn paths_name_what_they_select() {
        use Wanted as W;
        assert_eq!(W::parse(BASE).unwrap(), W::All);
        assert_eq!(
            W::parse(&format!("{BASE}/a%2Fb")).unwrap(),
            W::V0Topic("a/b".into())
        );
        assert_eq!(
            W::parse(&format!("{BASE}/exact/a")).unwrap(),
            W::Matcher {
                kind: "exact".into(),
                pattern: "a".into()
            }
        );
        assert_eq!(
            W::parse(&format!("{BASE}/t/s")).unwrap(),
            W::V0One {
                topic: "t".into(),
                subscriber: "s".into()
            }
        );
        assert!(matches!(
            W::parse(&format!("{BASE}/urlpattern/p/s")).unwrap(),
            W::One { .. }
        ));
        for bad in ["/regex/a/b", "//a", "/a%FF", "/a/b/c/d", "x"] {
            assert!(W::parse(&format!("{BASE}{bad}")).is_err(), "{bad}");
        }
        assert_eq!(etag("a \"b%"), "\"a%20%22b%25\"");
        // A cursor with a comma still matches itself in an `If-None-Match` list.
        let tag = etag("urn:a,b");
        let mut headers = HeaderMap::new();
        headers.insert(
            header::IF_NONE_MATCH,
            format!("\"x\", {tag}").parse().unwrap(),
        );
        assert!(none_match(&headers, &tag), "{tag}");
    }

    /// A cluster whose every share is a slow round trip; counts them and what they carried.
    #[derive(Debug, Default)]
    struct SlowCluster {
        shares: parking_lot::Mutex<Vec<usize>>,
    }

    #[async_trait::async_trait]
    impl Presence for SlowCluster {
        async fn online(
            &self,
            _after: Option<&herald_core::UserId>,
            _limit: usize,
        ) -> Result<herald_core::Online, herald_core::ClusterError> {
            unreachable!()
        }
        async fn connections(
            &self,
            _user: &herald_core::UserId,
        ) -> Result<usize, herald_core::ClusterError> {
            unreachable!()
        }
        async fn close(
            &self,
            _user: &herald_core::UserId,
            _reason: &str,
            _block: Option<std::time::Duration>,
        ) -> Result<usize, herald_core::ClusterError> {
            unreachable!()
        }
        async fn totals(&self) -> Result<herald_core::Stats, herald_core::ClusterError> {
            unreachable!()
        }
        async fn subscriptions(&self) -> Result<Vec<(String, usize)>, herald_core::ClusterError> {
            unreachable!()
        }
        async fn share(
            &self,
            entries: &[(String, Option<String>)],
            _replace: bool,
        ) -> Result<(), herald_core::ClusterError> {
            self.shares.lock().push(entries.len());
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            Ok(())
        }
    }

    /// Review finding: a node-wide lock was held across the share (a Redis round trip), so
    /// subscribers arriving together waited for each other's round trips, one after another.
    /// Now changes queue and one sharer sends them batched, holding no lock while it waits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn subscribers_arriving_together_share_in_batches_not_one_by_one() {
        let cluster = Arc::new(SlowCluster::default());
        let registry = Registry::new(cluster.clone());
        let hub = Hub::builder().build().unwrap();
        let started = std::time::Instant::now();
        let registrations = futures_util::future::join_all((0..10).map(|i| {
            let (registry, hub) = (registry.clone(), hub.clone());
            async move {
                let asked = [Asked::Exact(format!("https://example.com/{i}"))];
                registry.register(&hub, &asked, None).await
            }
        }))
        .await;
        let took = started.elapsed();
        let shares = cluster.shares.lock().clone();
        assert!(
            took < std::time::Duration::from_millis(1000),
            "10 registrations took {took:?} (shares {shares:?})"
        );
        assert!(shares.len() <= 3, "{shares:?}");
        assert_eq!(shares.iter().sum::<usize>(), 10, "every change shared once");
        assert_eq!(registry.snapshot().len(), 10);
        drop(registrations);
        assert!(registry.snapshot().is_empty());
    }
}
