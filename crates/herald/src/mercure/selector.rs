//! What a subscription or a grant names: a [`TopicSelector`] is `*`, an exact topic, a v0.x URI
//! Template or a draft-08 URL Pattern. Built only from checked text; see `matcher` for patterns.

use super::matcher::{Pattern, PatternError, check_text};

/// One topic selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicSelector {
    /// `*`: every topic.
    Any,
    Exact(String),
    Template(Pattern),
    UrlPattern(Pattern),
}

impl TopicSelector {
    /// Draft-08 `match=` / `match_exact=` (and `match_type: exact`): the topic itself, or `*`.
    pub fn exact(s: &str) -> Result<Self, PatternError> {
        check_text(s)?;
        Ok(if s == "*" {
            TopicSelector::Any
        } else {
            TopicSelector::Exact(s.to_string())
        })
    }

    /// Draft-08 `match_urlpattern=` (and `match_type: urlpattern`).
    pub fn url_pattern(s: &str) -> Result<Self, PatternError> {
        if s == "*" {
            return Ok(TopicSelector::Any);
        }
        Pattern::url_pattern(s).map(TopicSelector::UrlPattern)
    }

    /// v0.x `topic=` and the `mercure` claim: `*`, a URI Template, or (without `{`) an exact topic.
    pub fn v0(s: &str) -> Result<Self, PatternError> {
        check_text(s)?;
        if s == "*" {
            return Ok(TopicSelector::Any);
        }
        if s.contains(['{', '}']) {
            return Pattern::uri_template(s).map(TopicSelector::Template);
        }
        Ok(TopicSelector::Exact(s.to_string()))
    }

    pub fn matches(&self, topic: &str) -> bool {
        match self {
            TopicSelector::Any => true,
            TopicSelector::Exact(t) => t == topic,
            TopicSelector::Template(p) | TopicSelector::UrlPattern(p) => p.matches(topic),
        }
    }

    /// The selector as given, and its kind, for the subscriptions API.
    pub fn describe(&self) -> (&str, &'static str) {
        match self {
            TopicSelector::Any => ("*", "exact"),
            TopicSelector::Exact(t) => (t, "exact"),
            TopicSelector::Template(p) => (p.as_str(), "uritemplate"),
            TopicSelector::UrlPattern(p) => (p.as_str(), "urlpattern"),
        }
    }
}

impl TopicSelector {
    /// Whether this selector may match some topic starting with `prefix` (false only when it
    /// surely matches none): what decides who receives the subscription events.
    pub fn may_match_under(&self, prefix: &str) -> bool {
        match self {
            TopicSelector::Any => true,
            TopicSelector::Exact(t) => t.starts_with(prefix),
            TopicSelector::Template(p) | TopicSelector::UrlPattern(p) => {
                let literal = p.literal_prefix();
                literal.starts_with(prefix) || prefix.starts_with(literal)
            }
        }
    }
}

/// Whether any selector of `selectors` matches any of `topics`.
pub fn any_matches(selectors: &[TopicSelector], topics: &[String]) -> bool {
    topics
        .iter()
        .any(|t| selectors.iter().any(|s| s.matches(t)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_by_kind() {
        assert_eq!(TopicSelector::exact("*").unwrap(), TopicSelector::Any);
        assert!(
            TopicSelector::exact("https://x/{id}")
                .unwrap()
                .matches("https://x/{id}")
        );
        assert!(
            !TopicSelector::exact("https://x/{id}")
                .unwrap()
                .matches("https://x/1")
        );
        assert!(
            TopicSelector::v0("https://x/{id}")
                .unwrap()
                .matches("https://x/1")
        );
        assert!(TopicSelector::v0("*").unwrap().matches("anything"));
        assert!(
            TopicSelector::url_pattern("https://x/:id")
                .unwrap()
                .matches("https://x/1")
        );
        assert!(TopicSelector::exact("").is_err());
        assert!(TopicSelector::v0("https://x/{").is_err());
        let s = [TopicSelector::exact("a").unwrap()];
        assert!(any_matches(&s, &["b".into(), "a".into()]));
        assert!(!any_matches(&s, &["b".into()]));
    }

    #[test]
    fn selectors_that_may_match_under_a_prefix() {
        let under = "/.well-known/mercure/subscriptions/";
        for yes in [
            TopicSelector::exact("*").unwrap(),
            TopicSelector::exact("/.well-known/mercure/subscriptions/exact/a/b").unwrap(),
            TopicSelector::url_pattern("/.well-known/mercure/subscriptions/:t/:m/:s").unwrap(),
            TopicSelector::url_pattern("/.well-known/:rest").unwrap(),
            TopicSelector::url_pattern("/.well-known/mercure/subscriptions*").unwrap(),
            TopicSelector::v0("/.well-known/mercure/subscriptions{/topic}{/subscriber}").unwrap(),
            TopicSelector::v0("{+anything}").unwrap(),
        ] {
            assert!(yes.may_match_under(under), "{yes:?}");
        }
        for no in [
            TopicSelector::exact("https://example.com/books/1").unwrap(),
            TopicSelector::exact("/.well-known/mercure/subscriptions").unwrap(),
            TopicSelector::url_pattern("https://example.com/:id").unwrap(),
            TopicSelector::v0("https://example.com/{id}").unwrap(),
        ] {
            assert!(!no.may_match_under(under), "{no:?}");
        }
    }
}
