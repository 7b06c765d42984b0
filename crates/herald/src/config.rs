//! Configuration, validated: [`Config`] is what a running hub uses, made from the settings as
//! given ([`RawConfig`], see [`crate::settings`]) by [`RawConfig::load`]. Each setting's default
//! and bounds come from its entry in `settings.rs`; this file keeps only the rules between
//! settings. A bad value or a named config file that cannot be read stops startup.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderValue;
use herald_core::{Retention, RetentionRule, RetentionRules};

use crate::acme::AcmeSettings;
use crate::auth::{Auth, JwtChecks};
use crate::ipnet::IpNet;
use crate::settings::{self as s, Value, invalid};
pub use crate::settings::{ConfigError, RawConfig};
use crate::tls::{Certificates, TlsFiles};

/// Validated settings of a running hub.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub heartbeat: Duration,
    pub retry: Duration,
    pub data_dir: Option<PathBuf>,
    pub retention: Retention,
    pub idempotency_window: Duration,
    /// Most idempotency keys and their bytes kept in memory (not in Redis, which expires its own).
    pub idempotency_keys: usize,
    pub idempotency_bytes: usize,
    /// Redis URL and key prefix, in cluster mode.
    pub redis: Option<(String, String)>,
    /// Redis replicas that must hold an append before it is acknowledged, and how long to wait.
    pub redis_replicas: usize,
    pub redis_wait_timeout: Duration,
    pub max_connections: usize,
    pub max_body: usize,
    pub cors_origins: Vec<HeaderValue>,
    pub shutdown_timeout: Duration,
    pub max_selectors: usize,
    pub queue: usize,
    pub queue_bytes: usize,
    /// The longest a stream lives, if limited, and the spread of its end.
    pub max_stream_age: Option<Duration>,
    pub max_stream_age_jitter: f64,
    pub auth: Auth,
    pub metrics_listen: Option<SocketAddr>,
    pub limits: Limits,
    pub log_format: LogFormat,
    /// The certificate served over HTTPS; `None` serves plain HTTP (or ACME's, with `acme`).
    pub tls: Option<Arc<Certificates>>,
    /// Most concurrent HTTP/2 streams per connection.
    pub h2_max_streams: u32,
    /// Certificates from ACME instead of `tls`.
    pub acme: Option<AcmeSettings>,
    /// How long a user's `online: false` presence event waits after their last stream closed.
    pub presence_grace: Duration,
    /// How often a cluster node reports its users and counters to Redis.
    pub cluster_report: Duration,
    /// Where events are POSTed (`--webhook`, with `--webhook-secret` and `--webhook-topics`).
    pub webhooks: Vec<crate::webhook::Hook>,
    /// `--mercure`: the Mercure endpoint and its settings.
    pub mercure: Option<crate::mercure::MercureOptions>,
    /// Connections the kernel queues on the listening socket before they are accepted.
    pub listen_backlog: u32,
}

/// The limits in force (all off by default, except the head and URL sizes).
#[derive(Debug, Clone)]
pub struct Limits {
    pub per_ip: usize,
    pub per_user: usize,
    pub trusted_proxies: Vec<IpNet>,
    /// Requests per second and burst size of each publisher's token bucket.
    pub publish_rate: Option<(f64, f64)>,
    pub header_timeout: Duration,
    /// Time a client has to send a whole request body once its head is in (slow-body guard).
    pub body_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_url: usize,
    pub max_topics: usize,
    /// Names a request's `Host` may give; `None`: any (`--allowed-host`; on a loopback listener
    /// the default is [`crate::host::HostPattern::loopback`]).
    pub allowed_hosts: Option<Vec<crate::host::HostPattern>>,
    /// Most messages in one batch publish.
    pub max_batch: usize,
    /// Most users blocked at once by `DELETE /users/{id}/connections?block=`.
    pub max_blocks: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Config::default().limits
    }
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd)]
pub enum LogFormat {
    /// Human-readable lines, coloured only on a terminal.
    Text,
    /// One JSON object per line.
    Json,
}

impl Value for LogFormat {
    fn parse(text: &str) -> Result<Self, String> {
        match text {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("'{text}' is not a log format: use text or json")),
        }
    }
}

impl Value for IpNet {
    fn parse(text: &str) -> Result<Self, String> {
        text.parse().map_err(|e| format!("'{text}' {e}"))
    }
}

/// A CORS origin: `*`, or a scheme, host and optional port.
#[derive(Debug, Clone, PartialEq, PartialOrd)]
struct Origin(String);

impl Value for Origin {
    fn parse(text: &str) -> Result<Self, String> {
        let valid = text == "*"
            || ((text.starts_with("http://") || text.starts_with("https://"))
                && !text.trim_end_matches('/').ends_with(':'));
        let trimmed = text.trim_end_matches('/');
        if valid && HeaderValue::from_str(trimmed).is_ok() {
            Ok(Origin(trimmed.to_string()))
        } else {
            Err(format!(
                "'{text}' is not an origin like https://app.example.com or *"
            ))
        }
    }
}

impl RawConfig {
    /// Merges the config file (if named) under these settings, then the fallback env vars (such
    /// as `PORT`), and validates the result.
    pub fn load(self) -> Result<Config, ConfigError> {
        let raw = match &self.config {
            Some(path) => {
                let file = RawConfig::from_file(path)?;
                self.or(file)
            }
            None => self,
        };
        raw.or_fallback_env().validate()
    }

    /// The configuration these settings make: each parsed by its entry in `settings.rs`, then
    /// the rules between settings.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let listen: SocketAddr = self.get(&s::LISTEN)?;
        let heartbeat: Duration = self.get(&s::HEARTBEAT)?;
        let retry: Duration = self.get(&s::RETRY)?;
        let retention = Retention {
            max_events: self.get(&s::HISTORY)?,
            max_age: self.value(&s::HISTORY_AGE)?,
            max_bytes: self.value(&s::HISTORY_BYTES)?,
            rules: herald_core::RetentionRules::default(),
        };
        let mut retention = retention;
        let data_dir: Option<PathBuf> = self.value(&s::DATA_DIR)?;
        let redis = match self.value::<String>(&s::REDIS)? {
            None => None,
            Some(url) => {
                if ![
                    "redis://",
                    "rediss://",
                    "redis+sentinel://",
                    "rediss+sentinel://",
                ]
                .iter()
                .any(|scheme| url.starts_with(scheme))
                {
                    return Err(invalid(
                        "redis",
                        format!(
                            "'{url}' is not a URL like redis://127.0.0.1:6379/0 or redis+sentinel://127.0.0.1:26379/mymaster"
                        ),
                    ));
                }
                if let Err(e) = herald_core::RedisLink::open(&url, Duration::from_secs(1)) {
                    return Err(invalid("redis", e.to_string()));
                }
                if data_dir.is_some() {
                    return Err(invalid(
                        "redis",
                        "with --redis, history lives in Redis: drop --data-dir",
                    ));
                }
                if retention.max_bytes.is_some() {
                    return Err(invalid(
                        "redis",
                        "--history-bytes is not supported with Redis: use --history or --history-age",
                    ));
                }
                let prefix: String = self.get(&s::REDIS_PREFIX)?;
                if prefix.is_empty() || prefix.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(invalid("redis-prefix", "must be a non-empty word"));
                }
                Some((url, prefix))
            }
        };
        let redis_replicas: usize = self.get(&s::REDIS_REPLICAS)?;
        if redis.is_none() && redis_replicas > 0 {
            return Err(invalid(
                "redis-replicas",
                "replicas are Redis's: give --redis as well",
            ));
        }
        // Redis streams cannot bound bytes; elsewhere history has a byte bound by default.
        if redis.is_none() && retention.max_bytes.is_none() {
            retention.max_bytes = Some(herald_core::DEFAULT_HISTORY_BYTES);
        }
        retention.rules = retention_rules(&self.list(&s::RETENTION)?, &retention)?;
        if redis.is_some()
            && let Some(r) = retention.rules.iter().find(|r| r.keep.max_bytes.is_some())
        {
            return Err(invalid(
                "retention",
                format!(
                    "rule '{}': bytes is not supported with Redis (a Redis stream cannot bound bytes): use events, age and after-complete",
                    r.topics
                ),
            ));
        }
        let max_connections = match self.value(&s::MAX_CONNECTIONS)? {
            Some(n) => n,
            None => default_max_connections(),
        };
        let origins: Vec<Origin> = self.list(&s::CORS_ORIGIN)?;
        let checks = JwtChecks {
            leeway: self.get(&s::JWT_LEEWAY)?,
            issuer: self.value(&s::JWT_ISSUER)?,
            audience: self.value(&s::JWT_AUDIENCE)?,
        };
        let anonymous = self.switch(&s::ANONYMOUS)?;
        let secret: Option<String> = self.value(&s::JWT_SECRET)?;
        let public_key: Option<PathBuf> = self.value(&s::JWT_PUBLIC_KEY)?;
        let auth = match (secret, public_key) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "jwt-secret",
                    "give --jwt-secret or --jwt-public-key, not both",
                ));
            }
            (Some(secret), None) => Auth::with_secret(secret.as_bytes(), &checks)
                .map_err(|e| invalid("jwt-secret", e.to_string()))?,
            (None, Some(path)) => Auth::with_public_key_file(&path, &checks)
                .map_err(|e| invalid("jwt-public-key", e.to_string()))?,
            (None, None) => {
                if anonymous && self.list::<String>(&s::PUBLISH_KEY)?.is_empty() {
                    return Err(invalid(
                        "anonymous",
                        "only means something with --jwt-secret, --jwt-public-key or --publish-key",
                    ));
                }
                Auth::open()
            }
        };
        let publish_keys: Vec<String> = self.list(&s::PUBLISH_KEY)?;
        if let Some(k) = publish_keys.iter().find(|k| k.len() < 16) {
            return Err(invalid(
                "publish-key",
                format!("a key of {} bytes is too short: use at least 16", k.len()),
            ));
        }
        let open_subscribe = self.switch(&s::OPEN_SUBSCRIBE)?;
        if open_subscribe && (auth.has_jwt() || publish_keys.is_empty()) {
            return Err(invalid(
                "open-subscribe",
                "only means something with --publish-key and no JWT key",
            ));
        }
        let auth = auth
            .publish_keys(publish_keys)
            .anonymous(anonymous)
            .open_subscribe(open_subscribe);
        if auth.has_jwt() && origins.iter().any(|o| o.0 == "*") {
            return Err(invalid(
                "cors-origin",
                "'*' cannot go with authorization (tokens in cookies need credentials): list the origins",
            ));
        }
        let cors_origins = origins
            .into_iter()
            .map(|o| {
                HeaderValue::from_str(&o.0)
                    .map_err(|_| invalid("cors-origin", "is not a header value"))
            })
            .collect::<Result<_, _>>()?;
        let burst: Option<u32> = self.value(&s::PUBLISH_BURST)?;
        let publish_rate = self.value::<f64>(&s::PUBLISH_RATE)?.map(|rate| {
            let burst = burst.map_or_else(|| (rate * 2.0).max(1.0), f64::from);
            (rate, burst)
        });
        let limits = Limits {
            per_ip: self
                .value(&s::MAX_CONNECTIONS_PER_IP)?
                .unwrap_or(usize::MAX),
            per_user: self
                .value(&s::MAX_CONNECTIONS_PER_USER)?
                .unwrap_or(usize::MAX),
            trusted_proxies: self.list(&s::TRUSTED_PROXY)?,
            publish_rate,
            header_timeout: self.get(&s::HEADER_TIMEOUT)?,
            body_timeout: self.get(&s::BODY_TIMEOUT)?,
            max_header_bytes: self.get(&s::MAX_HEADER_BYTES)?,
            max_url: self.get(&s::MAX_URL)?,
            max_topics: self.get(&s::MAX_TOPICS)?,
            allowed_hosts: Some(self.list(&s::ALLOWED_HOST)?).filter(|h: &Vec<_>| !h.is_empty()),
            max_batch: self.get(&s::MAX_BATCH)?,
            max_blocks: self.get(&s::MAX_BLOCKS)?,
        };
        let (tls, acme) = self.tls_and_acme()?;
        let mercure_resource: Option<String> = self.value(&s::MERCURE_RESOURCE)?;
        let mercure_subscriptions = self.switch(&s::MERCURE_SUBSCRIPTIONS)?;
        let mercure = if self.switch(&s::MERCURE)? {
            Some(crate::mercure::MercureOptions {
                resource: mercure_resource,
                subscriptions: mercure_subscriptions,
            })
        } else if mercure_resource.is_some() {
            return Err(invalid(
                "mercure-resource",
                "only means something with --mercure",
            ));
        } else if mercure_subscriptions {
            return Err(invalid(
                "mercure-subscriptions",
                "only means something with --mercure",
            ));
        } else {
            None
        };
        Ok(Config {
            listen,
            heartbeat,
            retry,
            data_dir,
            retention,
            idempotency_window: self.get(&s::IDEMPOTENCY_WINDOW)?,
            idempotency_keys: self.get(&s::IDEMPOTENCY_KEYS)?,
            idempotency_bytes: self.get(&s::IDEMPOTENCY_BYTES)?,
            redis,
            redis_replicas,
            redis_wait_timeout: self.get(&s::REDIS_WAIT_TIMEOUT)?,
            max_connections,
            max_body: self.get(&s::MAX_BODY)?,
            cors_origins,
            shutdown_timeout: self.get(&s::SHUTDOWN_TIMEOUT)?,
            max_selectors: self.get(&s::MAX_SELECTORS)?,
            queue: self.get(&s::QUEUE)?,
            queue_bytes: self.get(&s::QUEUE_BYTES)?,
            max_stream_age: self.value(&s::MAX_STREAM_AGE)?,
            max_stream_age_jitter: self.get(&s::MAX_STREAM_AGE_JITTER)?,
            auth,
            metrics_listen: self.value(&s::METRICS_LISTEN)?,
            limits,
            log_format: self.get(&s::LOG_FORMAT)?,
            tls,
            h2_max_streams: self.get(&s::H2_MAX_STREAMS)?,
            listen_backlog: self.get(&s::LISTEN_BACKLOG)?,
            acme,
            presence_grace: self.get(&s::PRESENCE_GRACE)?,
            cluster_report: self.get(&s::CLUSTER_REPORT)?,
            webhooks: self.webhooks()?,
            mercure,
        })
    }

    /// The hooks: every `--webhook` URL with `--webhook-secret` and `--webhook-topics`, then every
    /// `[[webhook]]` table of the config file with its own `secret` and `topics` (default
    /// `$presence/**`). URLs are http(s) and distinct (a hook's cursor is kept by its URL).
    fn webhooks(&self) -> Result<Vec<crate::webhook::Hook>, ConfigError> {
        let urls: Vec<String> = self.list(&s::WEBHOOK)?;
        let secret: Option<String> = self.value(&s::WEBHOOK_SECRET)?;
        let texts: Vec<String> = self.list(&s::WEBHOOK_TOPICS)?;
        let topics = selectors(&texts, |e| invalid("webhook-topics", e))?;
        if urls.is_empty() && !self.hook_tables.is_empty() {
            // Given beside tables only, they would silently apply to nothing.
            for (setting, given) in [
                ("webhook-secret", secret.is_some()),
                ("webhook-topics", self.given(&s::WEBHOOK_TOPICS)),
            ] {
                if given {
                    return Err(invalid(
                        setting,
                        format!(
                            "applies to --webhook URLs, and there are none: a [[webhook]] table takes its own `{}`",
                            setting.trim_start_matches("webhook-")
                        ),
                    ));
                }
            }
        }
        let mut hooks = urls
            .into_iter()
            .map(|url| {
                Ok(crate::webhook::Hook {
                    url: hook_url(url, |e| invalid("webhook", e))?,
                    secret: secret.clone(),
                    topics: topics.clone(),
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        for table in &self.hook_tables {
            let at = |e: String| invalid("webhook", format!("[[webhook]] {}: {e}", table.number));
            if table.secret.as_deref() == Some("") {
                return Err(at(
                    "'secret' is empty: leave it out to send unsigned deliveries".into(),
                ));
            }
            let topics = match &table.topics {
                Some(t) if t.is_empty() => {
                    return Err(at("'topics' is empty: leave it out for $presence/**".into()));
                }
                Some(t) => selectors(t, |e| at(format!("'topics': {e}")))?,
                None => selectors(&[], at)?,
            };
            hooks.push(crate::webhook::Hook {
                url: hook_url(table.url.clone(), at)?,
                secret: table.secret.clone(),
                topics,
            });
        }
        for (i, hook) in hooks.iter().enumerate() {
            if hooks[..i].iter().any(|h| h.url == hook.url) {
                return Err(invalid(
                    "webhook",
                    format!(
                        "'{}' is given twice (a hook's progress is kept by its URL): give each URL once",
                        hook.url
                    ),
                ));
            }
        }
        Ok(hooks)
    }

    /// The source of HTTPS certificates, if any: files (loaded and checked here) or ACME.
    fn tls_and_acme(
        &self,
    ) -> Result<(Option<Arc<Certificates>>, Option<AcmeSettings>), ConfigError> {
        let cert: Option<PathBuf> = self.value(&s::TLS_CERT)?;
        let key: Option<PathBuf> = self.value(&s::TLS_KEY)?;
        let tls = match (cert, key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(Arc::new(
                Certificates::open(TlsFiles { cert, key })
                    .map_err(|e| invalid("tls-cert/tls-key", e.to_string()))?,
            )),
            (Some(_), None) => return Err(invalid("tls-key", "--tls-cert needs --tls-key")),
            (None, Some(_)) => return Err(invalid("tls-cert", "--tls-key needs --tls-cert")),
        };
        let domains: Vec<String> = self.list(&s::ACME_DOMAIN)?;
        let contacts: Vec<String> = self.list(&s::ACME_CONTACT)?;
        let cache: Option<PathBuf> = self.value(&s::ACME_CACHE)?;
        let ca_root: Option<PathBuf> = self.value(&s::ACME_CA_ROOT)?;
        if domains.is_empty() {
            if self.given(&s::ACME_DIRECTORY)
                || !contacts.is_empty()
                || cache.is_some()
                || ca_root.is_some()
            {
                return Err(invalid(
                    "acme-domain",
                    "the --acme-* settings need at least one --acme-domain",
                ));
            }
            return Ok((tls, None));
        }
        if tls.is_some() {
            return Err(invalid(
                "acme-domain",
                "give --tls-cert/--tls-key or --acme-domain, not both",
            ));
        }
        if let Some(d) = domains
            .iter()
            .find(|d| d.is_empty() || d.contains(|c: char| c.is_whitespace() || c == '/'))
        {
            return Err(invalid(
                "acme-domain",
                format!("'{d}' is not a domain name"),
            ));
        }
        if let Some(c) = contacts.iter().find(|c| !c.contains(':')) {
            return Err(invalid(
                "acme-contact",
                format!("'{c}' is not a URL like mailto:admin@example.com"),
            ));
        }
        let directory: String = self.get(&s::ACME_DIRECTORY)?;
        if !directory.starts_with("https://") {
            return Err(invalid(
                "acme-directory",
                format!("'{directory}' is not an https:// URL"),
            ));
        }
        let settings = AcmeSettings {
            domains,
            directory,
            contacts,
            cache,
            ca_root,
        };
        settings
            .validate()
            .map_err(|e| invalid("acme-ca-root", e))?;
        Ok((None, Some(settings)))
    }
}

/// Webhook topic selectors; none given means the default, `$presence/**`.
fn selectors(
    texts: &[String],
    error: impl Fn(String) -> ConfigError,
) -> Result<Vec<herald_core::Selector>, ConfigError> {
    let default: Vec<String> = s::WEBHOOK_TOPICS
        .default
        .into_iter()
        .map(String::from)
        .collect();
    let texts = if texts.is_empty() { &default } else { texts };
    texts
        .iter()
        .map(|t| herald_core::Selector::new(t).map_err(|e| error(format!("'{t}' {e}"))))
        .collect()
}

/// A webhook URL: http or https.
fn hook_url(url: String, error: impl Fn(String) -> ConfigError) -> Result<String, ConfigError> {
    let parsed =
        reqwest::Url::parse(&url).map_err(|e| error(format!("'{url}' is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(error(format!("'{url}' is not an http(s) URL")));
    }
    Ok(url)
}

impl Default for Config {
    fn default() -> Self {
        RawConfig::default()
            .validate()
            .expect("the defaults are valid")
    }
}

/// A little under the process's open-file limit, leaving room for listeners, logs and stores.
fn default_max_connections() -> usize {
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((1024, 1024));
    let soft = usize::try_from(soft).unwrap_or(usize::MAX);
    soft.saturating_sub((soft / 20).max(32)).max(1)
}

/// The retention rules of `--retention`, each checked. A flag or env value is split at commas,
/// so a rule's `key=value` pieces come apart: a piece without `SELECTOR:` continues the rule
/// before it.
fn retention_rules(pieces: &[String], global: &Retention) -> Result<RetentionRules, ConfigError> {
    let mut specs: Vec<String> = Vec::new();
    for piece in pieces.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        let head = piece.split('=').next().unwrap_or(piece);
        let starts_rule = head.contains(':') || !piece.contains('=');
        match specs.last_mut() {
            Some(spec) if !starts_rule => {
                spec.push(',');
                spec.push_str(piece);
            }
            None if !starts_rule => {
                return Err(invalid(
                    "retention",
                    format!("'{piece}' is not a rule like ai/**:events=5000,age=1h"),
                ));
            }
            _ => specs.push(piece.to_string()),
        }
    }
    let rules = specs
        .iter()
        .map(|spec| RetentionRule::parse(spec, global))
        .collect::<Result<Vec<_>, _>>()
        .and_then(RetentionRules::new)
        .map_err(|e| invalid("retention", e.to_string()))?;
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::default();
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.heartbeat, Duration::from_secs(15));
        assert_eq!(c.retry, Duration::from_secs(3));
        assert_eq!(c.retention, Retention::default());
        assert_eq!(c.data_dir, None);
        assert_eq!(c.idempotency_window, Duration::from_secs(300));
        assert_eq!(c.max_body, 1 << 20);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.limits.max_url, 8192);
        assert_eq!(c.limits.per_ip, usize::MAX);
        assert!(c.max_connections >= 1);
    }

    #[test]
    fn flags_win_over_the_file() {
        let flags = RawConfig::default().set(&s::HEARTBEAT, "2s");
        let file = RawConfig::from_toml(
            "heartbeat = \"9s\"\nhistory = 5\ncors-origin = [\"https://a.example/\"]",
        )
        .unwrap();
        let c = flags.or(file).validate().unwrap();
        assert_eq!(c.heartbeat, Duration::from_secs(2));
        assert_eq!(c.retention.max_events, 5);
        assert_eq!(
            c.cors_origins,
            vec![HeaderValue::from_static("https://a.example")]
        );
    }

    #[test]
    fn bad_values_name_the_setting() {
        let bad = |raw: RawConfig, name: &str| {
            let err = raw.validate().unwrap_err().to_string();
            assert!(err.contains(name), "{err} should name {name}");
        };
        let raw = RawConfig::default;
        bad(raw().set(&s::HEARTBEAT, "15"), "heartbeat");
        bad(raw().set(&s::LISTEN, "nowhere"), "listen");
        bad(raw().set(&s::CORS_ORIGIN, "example.com"), "cors-origin");
        bad(raw().set(&s::MAX_CONNECTIONS, "0"), "max-connections");
        bad(raw().set(&s::PUBLISH_BURST, "0"), "publish-burst");
        bad(raw().set(&s::PUBLISH_RATE, "0"), "publish-rate");
        bad(raw().set(&s::ANONYMOUS, "maybe"), "anonymous");
        bad(raw().set(&s::LOG_FORMAT, "xml"), "log-format");
        bad(raw().set(&s::TRUSTED_PROXY, "proxy"), "trusted-proxy");
        bad(raw().set(&s::H2_MAX_STREAMS, "0"), "h2-max-streams");
        bad(raw().set(&s::TLS_CERT, "cert.pem"), "tls-key");
        let acme = || raw().set(&s::ACME_DOMAIN, "push.example.com");
        bad(
            acme().set(&s::ACME_CONTACT, "admin@example.com"),
            "acme-contact",
        );
        bad(
            acme().set(&s::ACME_DIRECTORY, "http://acme.internal/dir"),
            "acme-directory",
        );
        bad(
            acme().set(&s::ACME_CA_ROOT, "/nonexistent/ca.pem"),
            "acme-ca-root",
        );
        bad(raw().set(&s::ACME_CACHE, "/tmp/acme"), "acme-domain");
        let c = acme().validate().unwrap();
        assert_eq!(
            c.acme.map(|a| a.directory),
            Some(crate::acme::LETS_ENCRYPT.to_string())
        );
        assert_eq!(Config::default().h2_max_streams, 256);
    }

    #[test]
    fn webhook_tables_add_to_the_webhook_urls() {
        let file = RawConfig::from_toml(
            "webhook-secret = \"s0\"\n\
             [[webhook]]\nurl = \"http://a.example/hook\"\nsecret = \"sa\"\ntopics = [\"orders/**\", \"$presence/*\"]\n\
             [[webhook]]\nurl = \"https://b.example/hook\"\n",
        )
        .unwrap();
        let flags = RawConfig::default().set(&s::WEBHOOK, "http://flag.example/hook");
        let hooks = flags.or(file).validate().unwrap().webhooks;
        let seen: Vec<(&str, Option<&str>, Vec<String>)> = hooks
            .iter()
            .map(|h| {
                (
                    h.url.as_str(),
                    h.secret.as_deref(),
                    h.topics.iter().map(ToString::to_string).collect(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                (
                    "http://flag.example/hook",
                    Some("s0"),
                    vec!["$presence/**".into()]
                ),
                (
                    "http://a.example/hook",
                    Some("sa"),
                    vec!["orders/**".into(), "$presence/*".into()]
                ),
                ("https://b.example/hook", None, vec!["$presence/**".into()]),
            ]
        );
        assert!(!format!("{hooks:?}").contains("sa\""), "secrets are hidden");

        // Plain URLs in the file still work, and strings and tables mix in one array.
        let mixed = RawConfig::from_toml(
            "webhook = [\"http://c.example/\", { url = \"http://d.example/\", secret = \"sd\" }]",
        )
        .unwrap();
        assert_eq!(mixed.validate().unwrap().webhooks.len(), 2);
    }

    #[test]
    fn the_readmes_webhook_tables_are_valid() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
                .expect("README.md");
        let block = readme
            .split("```toml\n[[webhook]]")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("the README's [[webhook]] example");
        let hooks = RawConfig::from_toml(&format!("[[webhook]]{block}"))
            .unwrap()
            .validate()
            .unwrap()
            .webhooks;
        assert_eq!(hooks.len(), 2);
        assert_eq!(hooks[1].topics.len(), 2);
    }

    #[test]
    fn bad_webhook_tables_are_named() {
        let parse_err = |toml: &str| RawConfig::from_toml(toml).unwrap_err();
        assert!(
            parse_err("[[webhook]]\nsecret = \"x\"").contains("[[webhook]] 1: 'url' is missing")
        );
        assert!(
            parse_err("[[webhook]]\nurl = \"http://a/\"\nsecrte = \"x\"")
                .contains("unknown key 'secrte'")
        );
        assert!(
            parse_err("[[webhook]]\nurl = \"http://a/\"\ntopics = \"a/**\"")
                .contains("'topics' must be an array")
        );
        assert!(parse_err("[[webhook]]\nurl = 7").contains("'url' must be a string"));
        let invalid = |toml: &str| {
            RawConfig::from_toml(toml)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string()
        };
        let err = invalid("[[webhook]]\nurl = \"http://a/\"\n[[webhook]]\nurl = \"ftp://b/\"");
        assert_eq!(
            err,
            "invalid webhook: [[webhook]] 2: 'ftp://b/' is not an http(s) URL"
        );
        let err = invalid("[[webhook]]\nurl = \"http://a/\"\ntopics = [\"a/**/b\"]");
        assert!(
            err.starts_with("invalid webhook: [[webhook]] 1: 'topics': 'a/**/b'"),
            "{err}"
        );
        let err = invalid("[[webhook]]\nurl = \"http://a/\"\ntopics = []");
        assert!(err.contains("'topics' is empty"), "{err}");
        let err = invalid("[[webhook]]\nurl = \"http://a/\"\nsecret = \"\"");
        assert!(err.contains("'secret' is empty"), "{err}");
        let err = invalid("webhook = [\"http://a/\", { url = \"http://a/\" }]");
        assert!(err.contains("'http://a/' is given twice"), "{err}");
        let err = invalid("webhook-secret = \"s\"\n[[webhook]]\nurl = \"http://a/\"");
        assert!(
            err.starts_with("invalid webhook-secret: applies to --webhook URLs"),
            "{err}"
        );
    }
}
