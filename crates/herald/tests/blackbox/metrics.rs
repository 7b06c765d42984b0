//! `/metrics` scraped as Prometheus would: every family has `# HELP` and `# TYPE`, the histograms
//! (publish latency, request duration by route, replay length) have cumulative buckets that add up,
//! and on two nodes sharing a real Redis, a `sum()` over the nodes counts each publish once and
//! each delivery on the node that made it.

use std::collections::{BTreeMap, BTreeSet};

use reqwest::StatusCode;
use serde_json::json;

use crate::cluster::{Redis, node};
use crate::common::Server;

/// One scrape: `# HELP` and `# TYPE` per family, and every sample as `name{labels}` → value.
struct Scrape {
    help: BTreeMap<String, String>,
    types: BTreeMap<String, String>,
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    async fn of(s: &Server) -> Scrape {
        let r = s
            .http()
            .get(format!("{}/metrics", s.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let text = r.text().await.unwrap();
        let mut scrape = Scrape {
            help: BTreeMap::new(),
            types: BTreeMap::new(),
            samples: BTreeMap::new(),
        };
        for line in text.lines().filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP name text");
                scrape.help.insert(name.into(), help.into());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                scrape.types.insert(name.into(), kind.into());
            } else {
                assert!(!line.starts_with('#'), "unexpected comment {line:?}");
                let (key, value) = line.rsplit_once(' ').expect("sample value");
                let value: f64 = value
                    .parse()
                    .unwrap_or_else(|_| panic!("value in {line:?}"));
                scrape.samples.insert(key.into(), value);
            }
        }
        scrape
    }

    fn value(&self, key: &str) -> f64 {
        *self
            .samples
            .get(key)
            .unwrap_or_else(|| panic!("no sample {key}; have {:?}", self.samples.keys()))
    }

    /// The family a sample belongs to (histogram series end in _bucket, _sum, _count).
    fn family_of(&self, key: &str) -> String {
        let name = key.split('{').next().unwrap();
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix)
                && self.types.get(base).map(String::as_str) == Some("histogram")
            {
                return base.to_string();
            }
        }
        name.to_string()
    }

    /// The buckets of one histogram series (`labels` as written inside the braces, or ""), in
    /// order of their bound, checked to be cumulative and to end at `+Inf` = `_count`.
    fn buckets(&self, name: &str, labels: &str) -> Vec<(f64, f64)> {
        let mut buckets: Vec<(f64, f64)> = Vec::new();
        let mut inf = None;
        for (key, v) in &self.samples {
            let Some(rest) = key.strip_prefix(&format!("{name}_bucket{{")) else {
                continue;
            };
            let inner = rest.strip_suffix('}').unwrap();
            let (own, le) = match inner.rsplit_once(",le=") {
                Some((own, le)) => (own, le),
                None => ("", inner.strip_prefix("le=").unwrap()),
            };
            if own != labels {
                continue;
            }
            match le.trim_matches('"') {
                "+Inf" => inf = Some(*v),
                bound => buckets.push((bound.parse().unwrap(), *v)),
            }
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(
            buckets.len() >= 5,
            "{name}{{{labels}}} has buckets: {buckets:?}"
        );
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{name} buckets are cumulative: {buckets:?}"
        );
        let count = self.value(&if labels.is_empty() {
            format!("{name}_count")
        } else {
            format!("{name}_count{{{labels}}}")
        });
        let inf = inf.unwrap_or_else(|| panic!("{name}{{{labels}}} has no +Inf bucket"));
        assert_eq!(inf, count, "{name}: +Inf bucket = _count");
        assert!(buckets.last().unwrap().1 <= inf);
        buckets
    }
}

#[tokio::test]
async fn every_family_has_help_and_type_and_the_histograms_add_up() {
    // A webhook (to a port nothing listens on: it is never delivered) so its families are served.
    let s = Server::start(&[
        "--max-connections-per-ip",
        "2",
        "--webhook",
        "http://127.0.0.1:9/hook",
    ])
    .await;
    let mut live = s.subscribe("topic=m").await;
    live.opened().await;
    let first = s.publish(json!({"topic": "m", "data": "1"})).await;
    s.publish(json!({"topic": "m", "data": "2"})).await;
    s.publish(json!({"topic": "m", "data": "3"})).await;
    live.next_data(3).await;
    // A resume replays the two events after the first.
    let mut resumed = s
        .subscribe_with("topic=m", &[("last-event-id", first.as_str())])
        .await;
    assert_eq!(resumed.next_data(2).await, ["2", "3"]);
    // A third stream from this address is refused by the limit.
    let refused = s.open_events("topic=m", &[]).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);

    let m = Scrape::of(&s).await;
    let families: BTreeSet<String> = m.samples.keys().map(|k| m.family_of(k)).collect();
    for family in [
        "herald_connections",
        "herald_users_online",
        "herald_topics",
        "herald_lagging_connections",
        "herald_published_total",
        "herald_delivered_total",
        "herald_replayed_total",
        "herald_gaps_total",
        "herald_limited_total",
        "herald_http_requests_total",
        "herald_http_request_duration_seconds",
        "herald_publish_duration_seconds",
        "herald_replay_events",
    ] {
        assert!(
            families.contains(family),
            "{family} is served: {families:?}"
        );
    }
    // The README's metrics table and the Grafana dashboard name exactly what is served.
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let documented: BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `herald_"))
        .map(|rest| format!("herald_{}", &rest[..rest.find('`').unwrap()]))
        .collect();
    assert_eq!(
        documented, families,
        "README metrics table = served families"
    );
    let dashboard = std::fs::read_to_string(format!("{root}/docs/grafana-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("herald_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                used.insert(m.family_of(&name));
            }
        }
    }
    assert!(used.len() >= 10, "the dashboard uses the metrics: {used:?}");
    for family in &used {
        assert!(
            families.contains(family),
            "the dashboard's {family} is served"
        );
    }
    for family in [
        "herald_publish_duration_seconds",
        "herald_http_request_duration_seconds",
        "herald_replay_events",
    ] {
        assert!(used.contains(family), "the dashboard charts {family}");
    }
    for family in &families {
        let help = m.help.get(family).map(String::as_str).unwrap_or_default();
        assert!(help.len() > 10, "{family} has a # HELP line");
        assert!(m.types.contains_key(family), "{family} has a # TYPE line");
    }
    for (family, kind) in [
        ("herald_connections", "gauge"),
        ("herald_published_total", "counter"),
        ("herald_limited_total", "counter"),
        ("herald_http_request_duration_seconds", "histogram"),
        ("herald_publish_duration_seconds", "histogram"),
        ("herald_replay_events", "histogram"),
    ] {
        assert_eq!(m.types[family], kind, "# TYPE of {family}");
    }

    assert_eq!(m.value("herald_published_total"), 3.0);
    assert_eq!(m.value("herald_delivered_total"), 3.0);
    assert_eq!(m.value("herald_replayed_total"), 2.0);
    assert_eq!(
        m.value(r#"herald_limited_total{limit="connections_per_ip"}"#),
        1.0
    );

    // Publish latency: one observation per publish request, all of them finite.
    let publish = m.buckets("herald_publish_duration_seconds", "");
    assert_eq!(m.value("herald_publish_duration_seconds_count"), 3.0);
    assert!(m.value("herald_publish_duration_seconds_sum") > 0.0);
    assert_eq!(publish.last().unwrap().1, 3.0, "every publish under 5s");

    // Request duration by route: three publishes, three streams opened (one refused).
    m.buckets(
        "herald_http_request_duration_seconds",
        r#"route="/publish",method="POST""#,
    );
    assert_eq!(
        m.value(r#"herald_http_request_duration_seconds_count{route="/publish",method="POST"}"#),
        3.0
    );
    assert_eq!(
        m.value(r#"herald_http_request_duration_seconds_count{route="/events",method="GET"}"#),
        3.0
    );

    // Replay length: the resume replayed 2 events; live streams replay nothing and are not counted.
    let replay = m.buckets("herald_replay_events", "");
    assert_eq!(m.value("herald_replay_events_count"), 1.0);
    assert_eq!(m.value("herald_replay_events_sum"), 2.0);
    let at = |bound: f64| replay.iter().find(|b| b.0 == bound).unwrap().1;
    assert_eq!((at(1.0), at(10.0)), (0.0, 1.0), "{replay:?}");
}

#[tokio::test]
async fn summed_over_cluster_nodes_each_publish_counts_once_and_each_delivery_where_it_happened() {
    let redis = Redis::start();
    let (a, b) = (node(&redis, &[]).await, node(&redis, &[]).await);
    let mut on_a = a.subscribe("topic=c").await;
    let mut on_b1 = b.subscribe("topic=c").await;
    let mut on_b2 = b.subscribe("topic=c").await;
    for s in [&mut on_a, &mut on_b1, &mut on_b2] {
        s.opened().await;
    }
    for i in 0..3 {
        a.publish(json!({"topic": "c", "data": format!("a{i}")}))
            .await;
    }
    for i in 0..2 {
        b.publish(json!({"topic": "c", "data": format!("b{i}")}))
            .await;
    }
    // Once every stream holds all five events, both nodes have fanned them out.
    for s in [&mut on_a, &mut on_b1, &mut on_b2] {
        assert_eq!(s.next_data(5).await, ["a0", "a1", "a2", "b0", "b1"]);
    }
    let (ma, mb) = (Scrape::of(&a).await, Scrape::of(&b).await);
    let published = |m: &Scrape| m.value("herald_published_total");
    let delivered = |m: &Scrape| m.value("herald_delivered_total");
    assert_eq!(
        (published(&ma), published(&mb)),
        (3.0, 2.0),
        "counted where accepted"
    );
    assert_eq!(
        published(&ma) + published(&mb),
        5.0,
        "sum() = events published"
    );
    assert_eq!(
        (delivered(&ma), delivered(&mb)),
        (5.0, 10.0),
        "counted where delivered"
    );
    assert_eq!(
        delivered(&ma) + delivered(&mb),
        15.0,
        "sum() = 5 events × 3 streams"
    );
    assert_eq!(ma.value("herald_publish_duration_seconds_count"), 3.0);
    assert_eq!(mb.value("herald_publish_duration_seconds_count"), 2.0);
    // /stats answers for the whole cluster with the same sums (once each node has reported).
    a.eventually("/stats", |v| v["published"] == 5 && v["delivered"] == 15)
        .await;
}
