//! The HTTP interface: routes, shared state and request helpers. Streams are `GET /events`;
//! everything else is plain JSON request/response. Every error is an [`ApiError`].

mod error;
mod events;
mod metrics;
mod presence;
mod publish;
mod web;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::routing::{delete, get, post};
use herald_core::Hub;
use tower_http::cors::{AllowOrigin, CorsLayer};

pub use error::ApiError;
pub use metrics::Metrics;

/// Options of the HTTP layer around a hub.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Largest request body accepted, in bytes (default 1 MiB).
    pub max_body: usize,
    /// Origins allowed by CORS; `*` allows any origin without credentials. Empty: no CORS headers.
    pub cors_origins: Vec<HeaderValue>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            max_body: 1 << 20,
            cors_origins: Vec::new(),
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct AppState {
    pub hub: Hub,
    pub max_body: usize,
    pub metrics: Arc<Metrics>,
}

/// The full herald HTTP interface for `hub`, ready to serve or to `nest` in an application.
pub fn router(hub: Hub) -> Router {
    router_with(hub, HttpOptions::default())
}

/// [`router`] with explicit options.
pub fn router_with(hub: Hub, options: HttpOptions) -> Router {
    let state = AppState {
        hub,
        max_body: options.max_body,
        metrics: Arc::new(Metrics::new()),
    };
    let mut app = Router::new()
        .route("/events", get(events::subscribe))
        .route("/publish", post(publish::publish))
        .route("/broadcast", post(publish::broadcast))
        .route("/users", get(presence::users))
        .route("/users/{id}", get(presence::user))
        .route(
            "/users/{id}/messages",
            get(presence::messages).post(publish::to_user),
        )
        .route("/users/{id}/connections", delete(presence::close))
        .route("/stats", get(presence::stats))
        .route("/healthz", get(presence::healthz))
        .route("/metrics", get(metrics::render))
        .merge(web::routes())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::count_requests,
        ))
        .with_state(state);
    if !options.cors_origins.is_empty() {
        app = app.layer(cors(&options.cors_origins));
    }
    app
}

fn cors(origins: &[HeaderValue]) -> CorsLayer {
    let layer = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
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
            .map_err(|_| ApiError::bad_request("invalid_encoding", "a field is not valid UTF-8"))
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
            form_pairs(b"data=%FF").unwrap_err().error,
            "invalid_encoding"
        );
    }
}
