//! `/metrics` in Prometheus text and the per-route request counter. The recorder is owned by the
//! router, not installed globally, so several hubs (tests, embedding apps) can live in one process.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics::{Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use super::AppState;

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

static META: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, None);

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        Metrics { recorder, handle }
    }

    fn counter(&self, name: &'static str, labels: Vec<Label>) -> metrics::Counter {
        self.recorder
            .register_counter(&Key::from_parts(name, labels), &META)
    }

    /// Counts a request refused by a limit (`herald_limited_total{limit=...}`).
    pub(crate) fn limited(&self, limit: &'static str) {
        self.counter("herald_limited_total", vec![Label::new("limit", limit)])
            .increment(1);
    }

    fn gauge(&self, name: &'static str) -> metrics::Gauge {
        self.recorder.register_gauge(&Key::from_name(name), &META)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The `method` label: one of the standard methods, else `other`, so made-up methods cannot
/// grow `/metrics` without bound (routes are bounded already: a matched route or `unmatched`).
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

pub(crate) async fn count_requests(
    State(app): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = method_label(request.method());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    app.metrics
        .counter(
            "herald_http_requests_total",
            vec![
                Label::new("route", route),
                Label::new("method", method),
                Label::new("status", status),
            ],
        )
        .increment(1);
    response
}

pub(crate) async fn render(State(app): State<AppState>) -> Response {
    let s = app.hub.stats();
    let m = &app.metrics;
    m.gauge("herald_connections").set(s.connections as f64);
    m.gauge("herald_users_online").set(s.users as f64);
    m.gauge("herald_topics").set(s.topics as f64);
    m.gauge("herald_lagging_connections").set(s.lagging as f64);
    m.counter("herald_published_total", vec![])
        .absolute(s.published);
    m.counter("herald_delivered_total", vec![])
        .absolute(s.delivered);
    m.counter("herald_replayed_total", vec![])
        .absolute(s.replayed);
    m.counter("herald_gaps_total", vec![]).absolute(s.gaps);
    m.counter("herald_streams_ended_by_age_total", vec![])
        .absolute(s.aged);
    let mut response = m.handle.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
