//! The HTTP interface: routes, shared state and request helpers. Streams are `GET /events`;
//! everything else is plain JSON request/response. Every error is an [`ApiError`].

mod error;
mod events;
mod finite;
pub mod limits;
mod metrics;
mod openapi;
mod presence;
mod publish;
mod publish_fast;
mod stream_body;
mod web;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::routing::{delete, get, post};
use herald_core::Hub;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::auth::Auth;
use crate::error_code::ErrorCode;
pub use error::ApiError;
pub use events::parse_since;
pub use limits::Limits;
pub use metrics::Metrics;
pub use publish::parse_body as parse_publish_body;
pub(crate) use publish::{cross_site_form, rate_limit, read_body};

/// Options of the HTTP layer around a hub.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Largest request body accepted, in bytes.
    pub max_body: usize,
    /// Origins allowed by CORS; `*` allows any origin without credentials. Empty: no CORS headers.
    pub cors_origins: Vec<HeaderValue>,
    /// Who may subscribe, publish and control (default: everyone).
    pub auth: Auth,
    pub limits: Limits,
    /// Serve `/metrics` on this router (false when it has its own listener).
    pub metrics_route: bool,
    /// In cluster mode, presence, stats and closes answer for every node.
    pub cluster: Option<Arc<herald_core::Cluster>>,
    /// The webhooks' progress, for `/metrics`.
    pub webhooks: Vec<Arc<crate::webhook::Progress>>,
    /// `--mercure`: also serve the Mercure protocol at `/.well-known/mercure`.
    pub mercure: Option<crate::mercure::MercureOptions>,
}

impl Default for HttpOptions {
    /// The defaults of `herald serve`.
    fn default() -> Self {
        let config = crate::config::Config::default();
        HttpOptions {
            max_body: config.max_body,
            cors_origins: Vec::new(),
            auth: Auth::open(),
            limits: config.limits,
            metrics_route: true,
            cluster: None,
            webhooks: Vec::new(),
            mercure: None,
        }
    }
}

/// What every handler and middleware shares. One `Arc`, so the clone each layer of every request
/// takes is one count, not one per field (unicast profiles showed ~2% of the CPU in those clones
/// and drops).
#[derive(Clone, Debug)]
pub(crate) struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub hub: Hub,
    pub max_body: usize,
    pub metrics: Arc<Metrics>,
    pub auth: Arc<Auth>,
    pub limits: Arc<Limits>,
    pub connections: Arc<limits::Connections>,
    pub publish_rate: Arc<limits::PublishRate>,
    /// Presence and control: the cluster's when there is one, else this hub's.
    pub presence: Arc<dyn herald_core::Presence>,
    /// `--cors-origin`: also the origins whose browser form posts are accepted.
    pub cors_origins: Arc<[HeaderValue]>,
    pub webhooks: Arc<[Arc<crate::webhook::Progress>]>,
}

/// Every route of the interface, as `(method, path)`; `openapi.json` documents exactly these.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/events"),
    ("post", "/publish"),
    ("post", "/broadcast"),
    ("post", "/complete"),
    ("post", "/cancel"),
    ("get", "/users"),
    ("get", "/users/{id}"),
    ("get", "/subscriptions"),
    ("get", "/users/{id}/messages"),
    ("post", "/users/{id}/messages"),
    ("delete", "/users/{id}/connections"),
    ("get", "/stats"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/"),
    ("get", "/index.html"),
    ("get", "/app.js"),
    ("get", "/app.css"),
    ("get", "/favicon.svg"),
    ("get", "/herald.js"),
    ("get", "/herald.global.js"),
    ("get", "/herald.d.ts"),
];

/// The full herald HTTP interface for `hub`, ready to serve or to `nest` in an application.
pub fn router(hub: Hub) -> Router {
    router_with(hub, HttpOptions::default())
}

/// [`router`] with explicit options.
pub fn router_with(hub: Hub, options: HttpOptions) -> Router {
    router_and_metrics(hub, options).0
}

/// [`router_with`], plus a router serving only `/metrics` of the same hub (for `--metrics-listen`).
pub fn router_and_metrics(hub: Hub, options: HttpOptions) -> (Router, Router) {
    let presence: Arc<dyn herald_core::Presence> = match options.cluster {
        Some(cluster) => cluster,
        None => Arc::new(hub.clone()),
    };
    let state = AppState(Arc::new(Shared {
        hub,
        max_body: options.max_body,
        metrics: Arc::new(Metrics::new()),
        auth: Arc::new(options.auth),
        limits: Arc::new(options.limits),
        connections: Arc::default(),
        publish_rate: Arc::default(),
        presence,
        cors_origins: options.cors_origins.clone().into(),
        webhooks: options.webhooks.into(),
    }));
    let metrics_only = Router::new()
        .route("/metrics", get(metrics::render))
        .with_state(state.clone());
    let mut app = Router::new()
        .route("/events", get(events::subscribe))
        .route("/publish", post(publish::publish))
        .route("/broadcast", post(publish::broadcast))
        .route("/complete", post(finite::complete))
        .route("/cancel", post(finite::cancel))
        .route("/users", get(presence::users))
        .route("/subscriptions", get(presence::subscriptions))
        .route("/users/{id}", get(presence::user))
        .route(
            "/users/{id}/messages",
            get(presence::messages).post(publish::to_user),
        )
        .route("/users/{id}/connections", delete(presence::close))
        .route("/stats", get(presence::stats))
        .route("/healthz", get(presence::healthz))
        .route("/readyz", get(presence::readyz))
        .route("/openapi.json", get(openapi::document));
    if options.metrics_route {
        app = app.route("/metrics", get(metrics::render));
    }
    if let Some(mercure) = options.mercure.clone() {
        app = app.merge(crate::mercure::routes(mercure, &state));
    }
    let mut app = app
        .merge(web::routes())
        .fallback(|| async { ApiError::from(ErrorCode::NotFound) })
        .method_not_allowed_fallback(|| async { ApiError::from(ErrorCode::MethodNotAllowed) })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::check_head,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::count_requests,
        ))
        .with_state(state);
    if !options.cors_origins.is_empty() {
        app = app.layer(cors(&options.cors_origins));
    }
    (app, metrics_only)
}

fn cors(origins: &[HeaderValue]) -> CorsLayer {
    let layer = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            HeaderName::from_static("last-event-id"),
            header::CACHE_CONTROL,
        ])
        .expose_headers([
            header::RETRY_AFTER,
            header::LINK,
            HeaderName::from_static("mercure-last-event-id"),
            HeaderName::from_static("last-event-id"),
        ])
        .max_age(std::time::Duration::from_secs(600));
    if origins.iter().any(|o| o == "*") {
        layer.allow_origin(AllowOrigin::any())
    } else {
        layer
            .allow_origin(AllowOrigin::list(origins.iter().cloned()))
            .allow_credentials(true)
    }
}

/// Decodes `application/x-www-form-urlencoded` pairs (also query strings), refusing invalid
/// UTF-8 instead of replacing it, so what is published is exactly what was sent.
pub(crate) fn form_pairs(input: &[u8]) -> Result<Vec<(String, String)>, ApiError> {
    let decode = |part: &[u8]| -> Result<String, ApiError> {
        let plus: Vec<u8> = part
            .iter()
            .map(|&b| if b == b'+' { b' ' } else { b })
            .collect();
        percent_encoding::percent_decode(&plus)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| ApiError::from(ErrorCode::InvalidEncoding))
    };
    input
        .split(|&b| b == b'&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let mut it = pair.splitn(2, |&b| b == b'=');
            let key = decode(it.next().unwrap_or_default())?;
            let value = decode(it.next().unwrap_or_default())?;
            Ok((key, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_pairs_decode_and_refuse_bad_utf8() {
        let pairs = form_pairs(b"topic=a%2Fb&topic=c&data=hi+there%0A&empty=&flag").unwrap();
        assert_eq!(
            pairs,
            vec![
                ("topic".into(), "a/b".into()),
                ("topic".into(), "c".into()),
                ("data".into(), "hi there\n".into()),
                ("empty".into(), "".into()),
                ("flag".into(), "".into()),
            ]
        );
        assert_eq!(
            form_pairs(b"data=%FF").unwrap_err().code,
            ErrorCode::InvalidEncoding
        );
    }
}
