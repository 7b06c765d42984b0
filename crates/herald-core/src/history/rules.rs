//! Retention per topic: rules that keep the events of the topics they name in a log of their own,
//! with their own bounds, so a burst on other topics cannot push them out. Owns the rule syntax
//! (`SELECTOR:events=N,age=DUR,bytes=N,after-complete=DUR`), which log an event belongs to (the
//! first rule naming any of its topics; none: the default log), and which logs a reader's gap
//! verdict depends on ([`Interest`]).

use std::sync::Arc;
use std::time::Duration;

use super::Retention;
use crate::event::{Event, Targets};
use crate::name::{Selector, Topic};

/// Most rules: a reader's [`Interest`] is one bit per log, the default log included.
pub const MAX_RULES: usize = 63;

/// One rule: the events of the topics `topics` matches are kept by `keep`, apart from the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionRule {
    pub topics: Selector,
    /// Its log's bounds (a key the rule leaves out takes the global value).
    pub keep: Bounds,
    /// Once a topic's stream ended (`herald.complete` or `herald.cancel` on it), its events count
    /// as expired this long after that end.
    pub after_complete: Option<Duration>,
}

/// The bounds of one log; whichever is reached first drops its oldest events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub max_events: usize,
    pub max_age: Option<Duration>,
    pub max_bytes: Option<u64>,
}

impl Bounds {
    /// Events published before this time (ms) are past `max_age`.
    pub(crate) fn cutoff_ms(&self, now_ms: u64) -> Option<u64> {
        self.max_age.map(|a| now_ms.saturating_sub(millis(a)))
    }
}

pub(crate) fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// Why a rule is refused; the message names the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("retention rule '{rule}': {reason}")]
pub struct RuleError {
    pub rule: String,
    pub reason: String,
}

impl RetentionRule {
    /// Parses `SELECTOR:key=value,…` (keys `events`, `age`, `bytes`, `after-complete`); a key left
    /// out takes the value of `global`. `SELECTOR` alone keeps the topics apart with the global
    /// bounds.
    pub fn parse(spec: &str, global: &Retention) -> Result<RetentionRule, RuleError> {
        let bad = |reason: String| RuleError {
            rule: spec.to_string(),
            reason,
        };
        // Topics may hold `:` (`urn:x/**`): the keys follow the last `:` when what follows it
        // reads as keys (each part `key=value` or a key's name; or nothing, `SELECTOR:`).
        let keys_like = |k: &str| {
            k.trim().is_empty()
                || k.split(',').all(|p| {
                    p.contains('=')
                        || ["events", "age", "bytes", "after-complete"].contains(&p.trim())
                })
        };
        let (selector, keys) = match spec.rsplit_once(':') {
            Some((s, k)) if keys_like(k) => (s.trim(), k.trim()),
            _ => (spec.trim(), ""),
        };
        let topics = Selector::new(selector).map_err(|e| {
            bad(format!(
                "'{selector}' is not a topic selector like ai/** ({e})"
            ))
        })?;
        let mut rule = RetentionRule {
            topics,
            keep: Bounds {
                max_events: global.max_events,
                max_age: global.max_age,
                max_bytes: global.max_bytes,
            },
            after_complete: None,
        };
        let mut seen = Vec::new();
        for pair in keys.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(bad(format!("'{pair}' is not key=value")));
            };
            let (key, value) = (key.trim(), value.trim());
            if seen.contains(&key) {
                return Err(bad(format!("'{key}' is given twice")));
            }
            seen.push(key);
            let duration = |v: &str| {
                crate::duration::parse_duration(v)
                    .map_err(|e| bad(format!("{key}: {e}")))
                    .and_then(|d| {
                        if d.is_zero() {
                            Err(bad(format!("{key} must be above 0s")))
                        } else {
                            Ok(d)
                        }
                    })
            };
            let count = |v: &str| {
                v.parse::<u64>()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| bad(format!("{key} must be a whole number, at least 1")))
            };
            match key {
                "events" => rule.keep.max_events = count(value)? as usize,
                "age" => rule.keep.max_age = Some(duration(value)?),
                "bytes" => rule.keep.max_bytes = Some(count(value)?),
                "after-complete" => rule.after_complete = Some(duration(value)?),
                other => {
                    return Err(bad(format!(
                        "unknown key '{other}' (keys: events, age, bytes, after-complete)"
                    )));
                }
            }
        }
        Ok(rule)
    }
}

impl RetentionRule {
    /// The rule as `--retention` takes it, every bound spelled out (those it took from the global
    /// values too): `SELECTOR:events=N[,age=DUR][,bytes=N][,after-complete=DUR]`.
    pub fn spec(&self) -> String {
        let mut s = format!("{}:events={}", self.topics, self.keep.max_events);
        if let Some(age) = self.keep.max_age {
            s.push_str(&format!(",age={}", duration_spec(age)));
        }
        if let Some(bytes) = self.keep.max_bytes {
            s.push_str(&format!(",bytes={bytes}"));
        }
        if let Some(after) = self.after_complete {
            s.push_str(&format!(",after-complete={}", duration_spec(after)));
        }
        s
    }
}

/// A duration in the largest unit that holds it whole (`90m`, `1500ms`), as rules are written.
fn duration_spec(d: Duration) -> String {
    let ms = millis(d);
    for (unit, per) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= per && ms.is_multiple_of(per) {
            return format!("{}{unit}", ms / per);
        }
    }
    format!("{ms}ms")
}

/// The rules of a store, in the order given (the first that names a topic of an event keeps it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionRules(Arc<[RetentionRule]>);

impl RetentionRules {
    /// Checks the list as a whole: at most [`MAX_RULES`], no selector twice.
    pub fn new(rules: Vec<RetentionRule>) -> Result<RetentionRules, RuleError> {
        if rules.len() > MAX_RULES {
            return Err(RuleError {
                rule: rules[MAX_RULES].topics.to_string(),
                reason: format!("at most {MAX_RULES} rules"),
            });
        }
        for (i, r) in rules.iter().enumerate() {
            if rules[..i].iter().any(|o| o.topics == r.topics) {
                return Err(RuleError {
                    rule: r.topics.to_string(),
                    reason: "a rule for these topics is given twice".into(),
                });
            }
        }
        Ok(RetentionRules(rules.into()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &RetentionRule> {
        self.0.iter()
    }

    /// The rules, one [`RetentionRule::spec`] a line, in order (empty without rules): what a
    /// shared store records, so that a node with other rules is refused.
    pub fn specs(&self) -> String {
        self.0
            .iter()
            .map(RetentionRule::spec)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Logs of a store with these rules: the default log (0), then one per rule (`i + 1`).
    pub(crate) fn logs(&self) -> usize {
        self.0.len() + 1
    }

    /// The rule of log `log` (`None` for the default log).
    pub(crate) fn rule(&self, log: usize) -> Option<&RetentionRule> {
        log.checked_sub(1).and_then(|i| self.0.get(i))
    }

    /// The log that keeps an event with these targets: the first rule naming one of its topics.
    pub(crate) fn log_of(&self, targets: &Targets) -> usize {
        self.0
            .iter()
            .position(|r| targets.topics.iter().any(|t| r.topics.matches(t)))
            .map_or(0, |i| i + 1)
    }

    /// The logs whose dropped events a reader with these selectors may have wanted by topic.
    pub fn interest(&self, selectors: &[Selector]) -> Interest {
        if self.0.is_empty() {
            return Interest::ALL;
        }
        let mut bits = 0u64;
        // A topic a selector matches lands in the default log unless a rule covers the selector.
        if selectors
            .iter()
            .any(|s| !self.0.iter().any(|r| r.topics.covers(s)))
        {
            bits |= 1;
        }
        for (i, r) in self.0.iter().enumerate() {
            if selectors.iter().any(|s| overlaps(&r.topics, s)) {
                bits |= 1 << (i + 1);
            }
        }
        Interest {
            logs: bits,
            after: 0,
        }
    }
}

/// Whether some topic matches both selectors.
fn overlaps(a: &Selector, b: &Selector) -> bool {
    // A reserved topic is matched only by selectors naming its first segment.
    if a.is_reserved() != b.is_reserved() {
        return false;
    }
    let (mut x, mut y) = (a.segments(), b.segments());
    loop {
        match (x.next(), y.next()) {
            (None, None) => return true,
            (Some("**"), Some(_)) | (Some(_), Some("**")) => return true,
            (None, Some(_)) | (Some(_), None) => return false,
            (Some("*"), Some(_)) | (Some(_), Some("*")) => {}
            (Some(p), Some(q)) if p == q => {}
            (Some(_), Some(_)) => return false,
        }
    }
}

/// The logs whose dropped events count against a reader by topic (one bit per log, the default
/// log first), and the drops it already accepted. Dropped broadcasts and events to users count
/// against every reader, whatever the bits say: any reader may have wanted them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interest {
    logs: u64,
    /// Drops up to this count of the store's ([`super::Chunk::drops`]) are no gap: a replay that
    /// began at each log's oldest event goes on past events other logs dropped before it began.
    after: u64,
}

impl Interest {
    /// Every log: the verdict for a reader nothing is known of.
    pub const ALL: Interest = Interest {
        logs: u64::MAX,
        after: 0,
    };

    pub(crate) fn includes(self, log: usize) -> bool {
        log < 64 && self.logs & (1 << log) != 0
    }

    /// The same reader going on after a read that found `drops` (its [`super::Chunk::drops`]).
    pub fn after_drops(self, drops: u64) -> Interest {
        Interest {
            after: drops,
            ..self
        }
    }

    /// Whether a drop, the store's `nth`, counts against this reader.
    pub(crate) fn counts(self, nth: u64) -> bool {
        nth > self.after
    }

    /// The logs as `1`/`0` per log, for a store of `logs` logs (the Redis script's form).
    #[cfg(feature = "redis")]
    pub(crate) fn flags(self, logs: usize) -> String {
        (0..logs)
            .map(|l| if self.includes(l) { '1' } else { '0' })
            .collect()
    }

    /// The drops already accepted (for the Redis script).
    #[cfg(feature = "redis")]
    pub(crate) fn accepted(self) -> u64 {
        self.after
    }
}

/// Whether an event of the log of `rule` (`None`: the default log) counts against every reader
/// when dropped: a broadcast, sent to users, or with a topic the rule does not name (a reader of
/// only that topic does not reach the rule's log, yet wanted the event).
pub(crate) fn counts_for_all(targets: &Targets, rule: Option<&RetentionRule>) -> bool {
    targets.broadcast
        || !targets.users.is_empty()
        || rule.is_some_and(|r| targets.topics.iter().any(|t| !r.topics.matches(t)))
}

/// A log's newest dropped event: its id, publish time (ms), and which of the store's drops it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Drop {
    pub(crate) id: u64,
    pub(crate) at_ms: u64,
    pub(crate) nth: u64,
}

/// The newest events a log dropped: of any kind, and of the [`addressed`] ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Dropped {
    pub(crate) any: Option<Drop>,
    pub(crate) addressed: Option<Drop>,
}

impl Dropped {
    /// Records the store's `nth` drop (a log drops in id order, so it is the log's newest).
    pub(crate) fn record(&mut self, id: u64, at_ms: u64, nth: u64, addressed: bool) {
        let d = Drop { id, at_ms, nth };
        self.any = Some(d);
        if addressed {
            self.addressed = Some(d);
        }
    }

    /// The newest drop that counts against `interest`'s reader, this being log `log`.
    pub(crate) fn against(&self, interest: Interest, log: usize) -> Option<Drop> {
        let d = if interest.includes(log) {
            self.any
        } else {
            self.addressed
        };
        d.filter(|d| interest.counts(d.nth))
    }
}

/// Topics whose stream ended in a rule's log, for `after-complete`: each with the id and time of
/// its newest `herald.complete`/`herald.cancel`. An entry leaves with its end event.
#[derive(Debug, Default)]
pub(crate) struct Ends(std::collections::HashMap<Topic, (u64, u64)>);

impl Ends {
    /// Notes `event` if it ends its topics' streams.
    pub(crate) fn note(&mut self, event: &Event) {
        if ends_stream(event) {
            for t in &event.targets.topics {
                self.0
                    .insert(t.clone(), (event.id.0, event.published_at_ms));
            }
        }
    }

    /// Forgets the ends `event` recorded, as it leaves the log.
    pub(crate) fn forget(&mut self, event: &Event) {
        for t in &event.targets.topics {
            if self.0.get(t).is_some_and(|(id, _)| *id == event.id.0) {
                self.0.remove(t);
            }
        }
    }

    /// Whether `event` expired by `after`: every topic of it ended at or after it, longer than
    /// `after` before `now_ms`.
    pub(crate) fn expired(&self, event: &Event, after: Duration, now_ms: u64) -> bool {
        !event.targets.topics.is_empty()
            && event.targets.topics.iter().all(|t| {
                self.0.get(t).is_some_and(|(id, at)| {
                    *id >= event.id.0 && at.saturating_add(millis(after)) <= now_ms
                })
            })
    }
}

/// Whether an event ends its topics' streams: a `herald.complete` or a `herald.cancel`.
pub(crate) fn ends_stream(event: &Event) -> bool {
    is_end(event.event_type.as_ref())
}

/// Whether an event of this type ends its topics' streams (`herald.complete`, `herald.cancel`).
pub(crate) fn is_end(event_type: Option<&crate::name::EventType>) -> bool {
    event_type.is_some_and(|t| {
        let t = t.as_str();
        t == crate::name::COMPLETE || t == crate::name::CANCEL
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Message;

    fn global() -> Retention {
        Retention {
            max_events: 1000,
            max_age: None,
            max_bytes: Some(1 << 20),
            rules: RetentionRules::default(),
        }
    }

    #[test]
    fn rules_parse_with_global_defaults() {
        let r =
            RetentionRule::parse("ai/**:events=5000,age=1h,after-complete=10m", &global()).unwrap();
        assert_eq!(r.topics.as_str(), "ai/**");
        assert_eq!(
            r.keep,
            Bounds {
                max_events: 5000,
                max_age: Some(Duration::from_secs(3600)),
                max_bytes: Some(1 << 20)
            }
        );
        assert_eq!(r.after_complete, Some(Duration::from_secs(600)));
        let r = RetentionRule::parse("jobs/*", &global()).unwrap();
        assert_eq!((r.keep.max_events, r.after_complete), (1000, None));
        // A topic may hold `:`.
        let r = RetentionRule::parse("urn:x/**:events=5", &global()).unwrap();
        assert_eq!((r.topics.as_str(), r.keep.max_events), ("urn:x/**", 5));
        let r = RetentionRule::parse("urn:x/**", &global()).unwrap();
        assert_eq!((r.topics.as_str(), r.keep.max_events), ("urn:x/**", 1000));
    }

    #[test]
    fn a_rules_spec_spells_out_every_bound_and_parses_back() {
        let r = RetentionRule::parse("ai/**:age=90m,after-complete=1500ms", &global()).unwrap();
        assert_eq!(
            r.spec(),
            "ai/**:events=1000,age=90m,bytes=1048576,after-complete=1500ms"
        );
        assert_eq!(RetentionRule::parse(&r.spec(), &global()).unwrap(), r);
        let rules = RetentionRules::new(vec![
            r,
            RetentionRule::parse("jobs/*:events=5,age=2d", &global()).unwrap(),
        ])
        .unwrap();
        assert_eq!(
            rules.specs(),
            "ai/**:events=1000,age=90m,bytes=1048576,after-complete=1500ms\njobs/*:events=5,age=2d,bytes=1048576"
        );
        assert_eq!(RetentionRules::default().specs(), "");
    }

    #[test]
    fn bad_rules_are_named() {
        for (spec, says) in [
            ("ai/**:events=0", "events must be a whole number"),
            ("ai/**:events=lots", "events must be a whole number"),
            ("ai/**:age=0s", "age must be above 0s"),
            ("ai/**:age=soon", "age:"),
            ("ai/**:keep=5", "unknown key 'keep'"),
            ("ai/**:events=5,events=6", "given twice"),
            ("ai/**:events", "is not key=value"),
            ("a//b:events=5", "is not a topic selector"),
        ] {
            let e = RetentionRule::parse(spec, &global()).unwrap_err();
            let text = e.to_string();
            assert!(text.contains(says) && text.contains(spec), "{spec}: {text}");
        }
        let twice = vec![
            RetentionRule::parse("ai/**", &global()).unwrap(),
            RetentionRule::parse("ai/**:events=3", &global()).unwrap(),
        ];
        assert!(
            RetentionRules::new(twice)
                .unwrap_err()
                .to_string()
                .contains("given twice")
        );
    }

    #[test]
    fn events_go_to_the_first_rule_naming_a_topic() {
        let rules = RetentionRules::new(vec![
            RetentionRule::parse("ai/**", &global()).unwrap(),
            RetentionRule::parse("jobs/*", &global()).unwrap(),
        ])
        .unwrap();
        let log = |topics: &[&str]| {
            let mut m = Message::broadcast();
            m.targets.broadcast = false;
            m.targets.topics = topics.iter().map(|t| Topic::new(t).unwrap()).collect();
            rules.log_of(&m.targets)
        };
        assert_eq!(log(&["ai/answer/1"]), 1);
        assert_eq!(log(&["jobs/7"]), 2);
        assert_eq!(log(&["news", "jobs/7", "ai/x"]), 1);
        assert_eq!(log(&["news"]), 0);
        assert_eq!(log(&[]), 0);
    }

    #[test]
    fn a_reader_depends_on_the_logs_its_selectors_reach() {
        let rules = RetentionRules::new(vec![
            RetentionRule::parse("ai/**", &global()).unwrap(),
            RetentionRule::parse("jobs/*", &global()).unwrap(),
        ])
        .unwrap();
        let of = |sels: &[&str]| {
            let sels: Vec<Selector> = sels.iter().map(|s| Selector::new(s).unwrap()).collect();
            let i = rules.interest(&sels);
            (0..3).map(|l| i.includes(l)).collect::<Vec<_>>()
        };
        assert_eq!(of(&["ai/answer/1"]), [false, true, false]);
        assert_eq!(of(&["ai/*"]), [false, true, false]);
        assert_eq!(of(&["news"]), [true, false, false]);
        assert_eq!(of(&["ai/answer/1", "news"]), [true, true, false]);
        assert_eq!(of(&["*/7"]), [true, true, true]);
        assert_eq!(of(&["**"]), [true, true, true]);
        assert_eq!(of(&["$presence/**"]), [true, false, false]);
        assert!(Interest::ALL.includes(0) && Interest::ALL.includes(63));
    }
}
