//! `/metrics` in Prometheus text: every family with `# HELP` and `# TYPE`, the per-route request
//! counter and duration histogram, the publish latency and replay length histograms. The recorder
//! is owned by the router, not installed globally, so several hubs (tests, embedding apps) can live
//! in one process. Rule: every family is named in [`FAMILIES`] (which gives its help text and, for
//! histograms, its buckets), and each node counts only its own work, so Prometheus `sum()` over
//! the nodes of a cluster is right.

use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics::{Key, KeyName, Label, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use super::AppState;

/// Upper bounds of the latency histograms, in seconds.
const SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Upper bounds of the replay length histogram, in events.
const EVENTS: &[f64] = &[0.0, 1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0];

enum Kind {
    Counter,
    Gauge,
    Histogram(&'static [f64]),
}

/// Every family `/metrics` serves: name, kind and help text (the README's metrics table lists the
/// same).
const FAMILIES: &[(&str, Kind, &str)] = &[
    (
        "herald_connections",
        Kind::Gauge,
        "Open event streams on this node.",
    ),
    (
        "herald_users_online",
        Kind::Gauge,
        "Users with at least one open stream on this node.",
    ),
    (
        "herald_topics",
        Kind::Gauge,
        "Distinct topic selectors subscribed on this node.",
    ),
    (
        "herald_lagging_connections",
        Kind::Gauge,
        "Streams on this node whose queue overflowed and that are catching up from history.",
    ),
    (
        "herald_published_total",
        Kind::Counter,
        "Events accepted by publish requests on this node (repeated idempotency keys excluded).",
    ),
    (
        "herald_delivered_total",
        Kind::Counter,
        "Events queued for streams on this node (one per event and stream).",
    ),
    (
        "herald_replayed_total",
        Kind::Counter,
        "Events sent from history to streams on this node (resume, since, catching up).",
    ),
    (
        "herald_gaps_total",
        Kind::Counter,
        "herald.gap notices sent on this node.",
    ),
    (
        "herald_unreadable_events_total",
        Kind::Counter,
        "Entries of the shared Redis stream this node could not read and skipped (each one a herald.gap).",
    ),
    (
        "herald_history_rewinds_total",
        Kind::Counter,
        "Rewind markers this node met: acknowledged events a Redis failover lost (every stream of the node got a herald.gap).",
    ),
    (
        "herald_streams_ended_by_age_total",
        Kind::Counter,
        "Streams on this node ended because they reached their maximum age (--max-stream-age or ?maxAge=).",
    ),
    (
        "herald_limited_total",
        Kind::Counter,
        "Requests refused by a limit, by limit.",
    ),
    (
        "herald_http_requests_total",
        Kind::Counter,
        "HTTP requests answered, by route, method and status.",
    ),
    (
        "herald_http_request_duration_seconds",
        Kind::Histogram(SECONDS),
        "Time from a request's arrival to its response head, by route and method (for /events: until the stream starts).",
    ),
    (
        "herald_publish_duration_seconds",
        Kind::Histogram(SECONDS),
        "Time from a publish request's arrival until its events are stored and queued for every matching stream on this node.",
    ),
    (
        "herald_replay_events",
        Kind::Histogram(EVENTS),
        "Events a new stream replayed from history before going live (Last-Event-ID or since).",
    ),
    (
        "herald_webhook_deliveries_total",
        Kind::Counter,
        "Webhook deliveries (events and gap notices) the receiver accepted with 2xx, by hook URL.",
    ),
    (
        "herald_webhook_failures_total",
        Kind::Counter,
        "Webhook attempts that failed (an error, a timeout or a non-2xx answer) and will be retried, by hook URL.",
    ),
    (
        "herald_webhook_lag_seconds",
        Kind::Gauge,
        "Age of the oldest event a webhook has not delivered yet (0 when caught up), by hook URL.",
    ),
];

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
        let mut builder = PrometheusBuilder::new();
        for (name, kind, _) in FAMILIES {
            if let Kind::Histogram(buckets) = kind {
                builder = builder
                    .set_buckets_for_metric(Matcher::Full((*name).to_string()), buckets)
                    .expect("the bucket lists are not empty");
            }
        }
        let recorder = builder.build_recorder();
        for (name, kind, help) in FAMILIES {
            let (name, help) = (KeyName::from_const_str(name), SharedString::const_str(help));
            match kind {
                Kind::Counter => recorder.describe_counter(name, None, help),
                Kind::Gauge => recorder.describe_gauge(name, None, help),
                Kind::Histogram(_) => recorder.describe_histogram(name, None, help),
            }
        }
        let handle = recorder.handle();
        let metrics = Metrics { recorder, handle };
        // Histograms without labels are served (empty) from the start.
        let _ = metrics.histogram("herald_publish_duration_seconds", vec![]);
        let _ = metrics.histogram("herald_replay_events", vec![]);
        metrics
    }

    fn counter(&self, name: &'static str, labels: Vec<Label>) -> metrics::Counter {
        self.recorder
            .register_counter(&Key::from_parts(name, labels), &META)
    }

    fn histogram(&self, name: &'static str, labels: Vec<Label>) -> metrics::Histogram {
        self.recorder
            .register_histogram(&Key::from_parts(name, labels), &META)
    }

    /// Counts a request refused by a limit (`herald_limited_total{limit=...}`).
    pub(crate) fn limited(&self, limit: &'static str) {
        self.counter("herald_limited_total", vec![Label::new("limit", limit)])
            .increment(1);
    }

    /// Records a publish answered now that arrived at `since` (`herald_publish_duration_seconds`).
    pub(crate) fn published(&self, since: Instant) {
        self.histogram("herald_publish_duration_seconds", vec![])
            .record(since.elapsed().as_secs_f64());
    }

    /// Records the length of a stream's replay (`herald_replay_events`).
    pub(crate) fn replayed(&self, events: u64) {
        self.histogram("herald_replay_events", vec![])
            .record(events as f64);
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
    let arrived = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = method_label(request.method());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    app.metrics
        .histogram(
            "herald_http_request_duration_seconds",
            vec![
                Label::new("route", route.clone()),
                Label::new("method", method),
            ],
        )
        .record(arrived.elapsed().as_secs_f64());
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
    m.counter("herald_unreadable_events_total", vec![])
        .absolute(s.unreadable);
    m.counter("herald_streams_ended_by_age_total", vec![])
        .absolute(s.aged);
    m.counter("herald_history_rewinds_total", vec![])
        .absolute(s.rewinds);
    for hook in app.webhooks.iter() {
        let label = || vec![Label::new("hook", hook.url.clone())];
        m.counter("herald_webhook_deliveries_total", label())
            .absolute(hook.delivered.load(Ordering::Relaxed));
        m.counter("herald_webhook_failures_total", label())
            .absolute(hook.failures.load(Ordering::Relaxed));
        m.recorder
            .register_gauge(
                &Key::from_parts("herald_webhook_lag_seconds", label()),
                &META,
            )
            .set(hook.lag_ms.load(Ordering::Relaxed) as f64 / 1000.0);
    }
    let mut response = m.handle.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_families_have_help_type_and_buckets() {
        let m = Metrics::new();
        m.limited("connections");
        m.published(Instant::now());
        m.replayed(3);
        let text = m.handle.render();
        for (name, kind) in [
            ("herald_limited_total", "counter"),
            ("herald_publish_duration_seconds", "histogram"),
            ("herald_replay_events", "histogram"),
        ] {
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no HELP for {name}:\n{text}"
            );
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "no TYPE for {name}:\n{text}"
            );
        }
        assert!(
            text.contains("herald_replay_events_bucket{le=\"1\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("herald_replay_events_bucket{le=\"10\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("herald_replay_events_count 1\n"), "{text}");
    }
}
