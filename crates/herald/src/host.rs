//! Host names a request may give in `Host` (`--allowed-host`), against DNS rebinding: a page of
//! evil.example whose name now resolves to 127.0.0.1 reaches a loopback hub, but its requests still
//! say `Host: evil.example`.

use std::net::IpAddr;

/// A host name a request may give in `Host`: exact, `*.suffix` for its subdomains, or `*`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd)]
pub struct HostPattern(Pattern);

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd)]
enum Pattern {
    Any,
    Exact(String),
    /// `*.suffix`: held as `.suffix`.
    Subdomains(String),
    /// Names DNS rebinding cannot use: IP literals (the page's origin is then that address, so the
    /// same-origin policy holds) and single-label names (no public DNS name has one label).
    NotRebindable,
}

impl HostPattern {
    pub fn parse(s: &str) -> Result<Self, &'static str> {
        let s = s.trim().trim_end_matches('.').to_ascii_lowercase();
        if s == "*" {
            return Ok(HostPattern(Pattern::Any));
        }
        let (name, sub) = match s.strip_prefix("*.") {
            Some(name) => (name, true),
            None => (s.as_str(), false),
        };
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':' | '_');
        if name.is_empty() || !name.chars().all(plain) {
            return Err("is not a host name (without port or scheme), *.suffix or *");
        }
        Ok(HostPattern(if sub {
            Pattern::Subdomains(format!(".{name}"))
        } else {
            Pattern::Exact(name.to_string())
        }))
    }

    /// What a loopback listener accepts when `--allowed-host` is not given: `localhost` and its
    /// subdomains, IP literals and single-label names; any other name may be an attacker's that
    /// now resolves to 127.0.0.1.
    pub fn loopback() -> Vec<HostPattern> {
        vec![
            HostPattern(Pattern::Exact("localhost".into())),
            HostPattern(Pattern::Subdomains(".localhost".into())),
            HostPattern(Pattern::NotRebindable),
        ]
    }

    pub(crate) fn matches(&self, host: &str) -> bool {
        match &self.0 {
            Pattern::Any => true,
            Pattern::Exact(name) => host == name,
            Pattern::Subdomains(suffix) => host.ends_with(suffix.as_str()),
            Pattern::NotRebindable => host.parse::<IpAddr>().is_ok() || !host.contains('.'),
        }
    }
}

/// The host name of a `Host` header value: lowercased, without port, brackets or final dot.
pub(crate) fn host_name(value: &str) -> String {
    let value = value.trim();
    let name = if let Some(rest) = value.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        match value.rsplit_once(':') {
            Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
            _ => value,
        }
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl crate::settings::Value for HostPattern {
    fn parse(text: &str) -> Result<Self, String> {
        HostPattern::parse(text).map_err(|why| format!("'{text}' {why}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_exactly_by_suffix_or_when_not_rebindable() {
        let p = |s| HostPattern::parse(s).unwrap();
        assert!(p("hub.example").matches(&host_name("HUB.example.:443")));
        assert!(p("*.hub.example").matches(&host_name("a.hub.example")));
        assert!(!p("*.hub.example").matches(&host_name("xhub.example")));
        let loopback = HostPattern::loopback();
        let ok = |h: &str| loopback.iter().any(|p| p.matches(&host_name(h)));
        assert!(ok("localhost:8080") && ok("[::1]:80") && ok("10.0.0.1") && ok("x"));
        assert!(!ok("evil.example") && !ok("evil.example:8080"));
        assert!(HostPattern::parse("http://x/").is_err());
    }
}
