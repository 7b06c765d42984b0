//! Benchmark scenarios, one module each, run against every target in turn; plus the rows they
//! produce (one JSON line each) and the readable table with herald's ratios to each peer.

pub mod clients;
pub mod durable;
pub mod fanout;
pub mod finite;
pub mod floor;
pub mod idle;
pub mod latency;
pub mod presence;
pub mod protocols;

use serde_json::Value;

use crate::server::{Bins, Kind};

/// What every scenario needs: the binaries, the targets in order, extra `herald serve` flags.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub bins: Bins,
    pub targets: Vec<Kind>,
    pub herald_args: Vec<String>,
}

/// One result: `scenario`, `target` and the figures, in the order they were inserted.
#[derive(Debug, Clone, Default)]
pub struct Row {
    fields: Vec<(String, Value)>,
}

impl Row {
    pub fn insert(&mut self, key: &str, value: impl Into<Value>) {
        let value = value.into();
        match self.fields.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.fields.push((key.to_string(), value)),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.fields.iter().map(|(k, _)| k)
    }

    /// One JSON object, keys in insertion order.
    pub fn json(&self) -> String {
        let parts: Vec<String> = self
            .fields
            .iter()
            .map(|(k, v)| format!("{}:{v}", Value::String(k.clone())))
            .collect();
        format!("{{{}}}", parts.join(","))
    }

    /// From a parsed JSON line (keys come back sorted, `target` first).
    pub fn from_json(v: &Value) -> Option<Row> {
        let map = v.as_object()?;
        let mut r = Row::default();
        for k in ["scenario", "target"] {
            if let Some(v) = map.get(k) {
                r.insert(k, v.clone());
            }
        }
        for (k, v) in map {
            r.insert(k, v.clone());
        }
        Some(r)
    }
}

pub fn row(scenario: &str, target: Kind) -> Row {
    let mut r = Row::default();
    r.insert("scenario", scenario);
    r.insert("target", target.name());
    r
}

/// Rounds to 3 significant decimals for the output.
pub fn num(v: f64) -> Value {
    if !v.is_finite() {
        return Value::Null;
    }
    let r = if v.abs() >= 100.0 {
        v.round()
    } else {
        (v * 1000.0).round() / 1000.0
    };
    serde_json::Number::from_f64(r).map_or(Value::Null, Value::Number)
}

/// The figure a scenario is judged by, and whether higher is better.
pub fn headline(scenario: &str) -> Option<(&'static str, bool)> {
    Some(match scenario {
        "idle" => ("bytes_per_conn", false),
        "idle-h1" | "idle-h1-tls" => ("bytes_per_stream", false),
        "idle-h2" => ("bytes_per_extra_stream", false),
        "connect" => ("connects_per_s", true),
        "fanout" | "fanout-h1" | "fanout-h2" | "unicast" | "publish" | "resume" => {
            ("events_per_s", true)
        }
        "latency" | "finite-streams" => ("p99_ms", false),
        "finite-pipe" => ("events_per_s", true),
        _ => return None,
    })
}

/// How many times better `a` is than `b` (> 1: `a` is better).
pub fn advantage(a: f64, b: f64, higher_better: bool) -> f64 {
    if higher_better { a / b } else { b / a }
}

/// Prints a row as one JSON line right away.
pub fn emit(r: &Row) {
    println!("{}", r.json());
}

fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "–".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(v) => v.to_string(),
    }
}

/// A markdown table of `rows` (all keys but `scenario`), then herald's ratio to each peer on
/// the headline figure, grouped by `group` (e.g. the offered rate).
pub fn table(rows: &[Row], group: Option<&str>) -> String {
    let Some(first) = rows.first() else {
        return String::new();
    };
    let mut keys: Vec<&String> = first.keys().filter(|k| *k != "scenario").collect();
    keys.retain(|k| *k != "error");
    for r in rows {
        for k in r.keys() {
            if k != "scenario" && k != "error" && !keys.contains(&k) {
                keys.push(k);
            }
        }
    }
    let mut out = String::new();
    out.push_str(&format!(
        "| {} |\n",
        keys.iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(" | ")
    ));
    out.push_str(&format!(
        "|{}\n",
        keys.iter()
            .map(|k| if *k == "target" { ":---|" } else { "---:|" })
            .collect::<String>()
    ));
    for r in rows {
        out.push_str(&format!(
            "| {} |\n",
            keys.iter()
                .map(|k| cell(r.get(k)))
                .collect::<Vec<_>>()
                .join(" | ")
        ));
    }
    let scenario = first.get("scenario").and_then(Value::as_str).unwrap_or("");
    let ratios = ratios(rows, scenario, group);
    if !ratios.is_empty() {
        out.push('\n');
        out.push_str(&ratios);
    }
    out
}

/// Lines like `herald vs nchan: 5.1× better on bytes_per_conn` (and as a fraction of ceiling).
pub fn ratios(rows: &[Row], scenario: &str, group: Option<&str>) -> String {
    let Some((key, higher)) = headline(scenario) else {
        return String::new();
    };
    let get = |r: &Row| r.get(key).and_then(Value::as_f64);
    let mut out = String::new();
    let mut groups: Vec<Option<&Value>> = Vec::new();
    for r in rows {
        let g = group.and_then(|g| r.get(g));
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    for g in groups {
        let in_group: Vec<&Row> = rows
            .iter()
            .filter(|r| group.and_then(|k| r.get(k)) == g)
            .collect();
        let Some(h) = in_group
            .iter()
            .find(|r| r.get("target").and_then(Value::as_str) == Some("herald"))
            .and_then(|r| get(r))
        else {
            continue;
        };
        let mut parts = Vec::new();
        for r in &in_group {
            let t = r.get("target").and_then(Value::as_str).unwrap_or("");
            let Some(p) = get(r) else { continue };
            // The ceiling keeps only a socket per idle connection and spends a thread on each
            // new connection's head: no useful ratio for memory or connection rate.
            let no_ceiling = matches!(scenario, "idle" | "connect");
            if t == "herald" || p == 0.0 || h == 0.0 || (t == "ceiling" && no_ceiling) {
                continue;
            }
            if t == "ceiling" {
                parts.push(format!(
                    "{:.0}% of the ceiling",
                    advantage(h, p, higher) * 100.0
                ));
            } else {
                parts.push(format!("{:.2}× {t}", advantage(h, p, higher)));
            }
        }
        if parts.is_empty() {
            continue;
        }
        let label = match (group, g) {
            (Some(k), Some(v)) => format!(" at {k}={}", cell(Some(v))),
            _ => String::new(),
        };
        out.push_str(&format!(
            "herald on {key} ({}){label}: {}\n",
            if higher {
                "higher is better; ratio = herald / peer"
            } else {
                "lower is better; ratio = peer / herald"
            },
            parts.join(", ")
        ));
    }
    out
}
