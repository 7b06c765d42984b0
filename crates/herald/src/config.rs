//! Configuration in two stages: `RawConfig` (flags, `HERALD_*` env vars, TOML file, all optional)
//! then `Config`, validated and typed. A bad value or a named config file that cannot be read stops startup.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::http::HeaderValue;
use herald_core::Retention;
use herald_core::duration::parse_duration;
use serde::Deserialize;

use crate::auth::{Auth, JwtChecks};
use crate::http::limits::{IpNet, Limits};

/// Settings as given; each is a flag, an env var `HERALD_<NAME>` and a key of the TOML file.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawConfig {
    /// TOML file with any of these settings (flags and env vars win over it).
    #[arg(long, env = "HERALD_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "HERALD_LISTEN")]
    pub listen: Option<String>,
    /// Interval of the heartbeat comment on idle streams, e.g. 15s [default: 15s].
    #[arg(long, env = "HERALD_HEARTBEAT")]
    pub heartbeat: Option<String>,
    /// Reconnect delay told to clients [default: 3s].
    #[arg(long, env = "HERALD_RETRY")]
    pub retry: Option<String>,
    /// Keep history durably in this folder (created if missing); without it history is in memory.
    #[arg(long, env = "HERALD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Events kept for replay [default: 10000].
    #[arg(long, env = "HERALD_HISTORY")]
    pub history: Option<usize>,
    /// Drop events older than this, e.g. 24h [default: no age limit].
    #[arg(long, env = "HERALD_HISTORY_AGE")]
    pub history_age: Option<String>,
    /// Drop the oldest events when history holds more than this many bytes [default: no limit].
    #[arg(long, env = "HERALD_HISTORY_BYTES")]
    pub history_bytes: Option<u64>,
    /// How long an idempotency key makes repeats of a publish no-ops [default: 5m].
    #[arg(long, env = "HERALD_IDEMPOTENCY_WINDOW")]
    pub idempotency_window: Option<String>,
    /// Share history, fan-out and presence with other nodes through this Redis
    /// (`redis://host:port/db` or `rediss://…`).
    #[arg(long, env = "HERALD_REDIS")]
    pub redis: Option<String>,
    /// Prefix of herald's Redis keys, so several hubs can share one Redis [default: herald].
    #[arg(long, env = "HERALD_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// Most open streams [default: a little under the open-file limit].
    #[arg(long, env = "HERALD_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Largest publish body in bytes [default: 1048576].
    #[arg(long, env = "HERALD_MAX_BODY")]
    pub max_body: Option<usize>,
    /// Origin allowed to call the hub from a browser (repeatable; `*` for any, without credentials).
    #[arg(
        long = "cors-origin",
        env = "HERALD_CORS_ORIGIN",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub cors_origin: Vec<String>,
    /// How long shutdown waits for streams and requests to end [default: 10s].
    #[arg(long, env = "HERALD_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<String>,
    /// Most topic selectors per connection [default: 64].
    #[arg(long, env = "HERALD_MAX_SELECTORS")]
    pub max_selectors: Option<usize>,
    /// Events queued per connection before it falls back to catching up from history [default: 1024].
    #[arg(long, env = "HERALD_QUEUE")]
    pub queue: Option<usize>,
    /// End each stream after this long, so clients reconnect (with their last id) and a load
    /// balancer can rebalance, e.g. 10m; at least 1s [default: off].
    #[arg(long, env = "HERALD_MAX_STREAM_AGE")]
    pub max_stream_age: Option<String>,
    /// Spread of stream ages: each stream ends at a random point in [age × (1 − jitter), age];
    /// from 0 to 0.9 [default: 0.2].
    #[arg(long, env = "HERALD_MAX_STREAM_AGE_JITTER")]
    pub max_stream_age_jitter: Option<f64>,
    /// Shared secret for HS256 tokens (at least 16 bytes); turns authorization on.
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM public key file for RS256, ES256 or EdDSA tokens (by key type); turns authorization on.
    #[arg(long, env = "HERALD_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// Clock skew allowed on a token's exp and nbf at admission [default: 5s].
    #[arg(long, env = "HERALD_JWT_LEEWAY")]
    pub jwt_leeway: Option<String>,
    /// Required `iss` of tokens.
    #[arg(long, env = "HERALD_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` of tokens.
    #[arg(long, env = "HERALD_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Let connections without a token subscribe (never to private events or users' messages).
    #[arg(long, env = "HERALD_ANONYMOUS")]
    #[serde(default)]
    pub anonymous: bool,
    /// Static key for publishing, presence and control, as `Authorization: Bearer` (repeatable).
    #[arg(
        long = "publish-key",
        env = "HERALD_PUBLISH_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    #[serde(default)]
    pub publish_key: Vec<String>,
    /// Serve /metrics on this address only, instead of on the main listener.
    #[arg(long, env = "HERALD_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Most open streams per client IP [default: no limit].
    #[arg(long, env = "HERALD_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// Most open streams per user [default: no limit].
    #[arg(long, env = "HERALD_MAX_CONNECTIONS_PER_USER")]
    pub max_connections_per_user: Option<usize>,
    /// Proxy address (IP or CIDR, repeatable) whose X-Forwarded-For names the client.
    #[arg(
        long = "trusted-proxy",
        env = "HERALD_TRUSTED_PROXY",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub trusted_proxy: Vec<String>,
    /// Publish requests per second per key, user or IP (token bucket) [default: no limit].
    #[arg(long, env = "HERALD_PUBLISH_RATE")]
    pub publish_rate: Option<f64>,
    /// Burst size of the publish rate limit [default: twice the rate, at least 1].
    #[arg(long, env = "HERALD_PUBLISH_BURST")]
    pub publish_burst: Option<u32>,
    /// Time a client has to send a request head (slowloris guard) [default: 30s].
    #[arg(long, env = "HERALD_HEADER_TIMEOUT")]
    pub header_timeout: Option<String>,
    /// Largest request head (request line and headers) in bytes [default: 16384].
    #[arg(long, env = "HERALD_MAX_HEADER_BYTES")]
    pub max_header_bytes: Option<usize>,
    /// Longest request URL in bytes [default: 8192].
    #[arg(long, env = "HERALD_MAX_URL")]
    pub max_url: Option<usize>,
    /// Most targets (topics plus users) per published message [default: 64].
    #[arg(long, env = "HERALD_MAX_TOPICS")]
    pub max_topics: Option<usize>,
}

/// Validated settings of a running hub.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub heartbeat: Duration,
    pub retry: Duration,
    pub data_dir: Option<PathBuf>,
    pub retention: Retention,
    pub idempotency_window: Duration,
    /// Redis URL and key prefix, in cluster mode.
    pub redis: Option<(String, String)>,
    pub max_connections: usize,
    pub max_body: usize,
    pub cors_origins: Vec<HeaderValue>,
    pub shutdown_timeout: Duration,
    pub max_selectors: usize,
    pub queue: usize,
    /// The longest a stream lives, if limited, and the spread of its end.
    pub max_stream_age: Option<Duration>,
    pub max_stream_age_jitter: f64,
    pub auth: Auth,
    pub metrics_listen: Option<SocketAddr>,
    pub limits: Limits,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid {name}: {message}")]
    Invalid { name: &'static str, message: String },
}

fn invalid(name: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        name,
        message: message.into(),
    }
}

impl RawConfig {
    /// Reads the TOML file at `path`.
    pub fn from_file(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Fills what `self` leaves unset from `fallback`.
    pub fn or(self, fallback: RawConfig) -> RawConfig {
        RawConfig {
            config: self.config.or(fallback.config),
            listen: self.listen.or(fallback.listen),
            heartbeat: self.heartbeat.or(fallback.heartbeat),
            retry: self.retry.or(fallback.retry),
            data_dir: self.data_dir.or(fallback.data_dir),
            history: self.history.or(fallback.history),
            history_age: self.history_age.or(fallback.history_age),
            history_bytes: self.history_bytes.or(fallback.history_bytes),
            idempotency_window: self.idempotency_window.or(fallback.idempotency_window),
            redis: self.redis.or(fallback.redis),
            redis_prefix: self.redis_prefix.or(fallback.redis_prefix),
            max_connections: self.max_connections.or(fallback.max_connections),
            max_body: self.max_body.or(fallback.max_body),
            cors_origin: if self.cors_origin.is_empty() {
                fallback.cors_origin
            } else {
                self.cors_origin
            },
            shutdown_timeout: self.shutdown_timeout.or(fallback.shutdown_timeout),
            max_selectors: self.max_selectors.or(fallback.max_selectors),
            queue: self.queue.or(fallback.queue),
            max_stream_age: self.max_stream_age.or(fallback.max_stream_age),
            max_stream_age_jitter: self
                .max_stream_age_jitter
                .or(fallback.max_stream_age_jitter),
            jwt_secret: self.jwt_secret.or(fallback.jwt_secret),
            jwt_public_key: self.jwt_public_key.or(fallback.jwt_public_key),
            jwt_leeway: self.jwt_leeway.or(fallback.jwt_leeway),
            jwt_issuer: self.jwt_issuer.or(fallback.jwt_issuer),
            jwt_audience: self.jwt_audience.or(fallback.jwt_audience),
            anonymous: self.anonymous || fallback.anonymous,
            publish_key: if self.publish_key.is_empty() {
                fallback.publish_key
            } else {
                self.publish_key
            },
            metrics_listen: self.metrics_listen.or(fallback.metrics_listen),
            max_connections_per_ip: self
                .max_connections_per_ip
                .or(fallback.max_connections_per_ip),
            max_connections_per_user: self
                .max_connections_per_user
                .or(fallback.max_connections_per_user),
            trusted_proxy: if self.trusted_proxy.is_empty() {
                fallback.trusted_proxy
            } else {
                self.trusted_proxy
            },
            publish_rate: self.publish_rate.or(fallback.publish_rate),
            publish_burst: self.publish_burst.or(fallback.publish_burst),
            header_timeout: self.header_timeout.or(fallback.header_timeout),
            max_header_bytes: self.max_header_bytes.or(fallback.max_header_bytes),
            max_url: self.max_url.or(fallback.max_url),
            max_topics: self.max_topics.or(fallback.max_topics),
        }
    }

    /// Merges the config file (if named) under these settings and validates the result.
    pub fn load(self) -> Result<Config, ConfigError> {
        let raw = match &self.config {
            Some(path) => {
                let file = RawConfig::from_file(path)?;
                self.or(file)
            }
            None => self,
        };
        raw.validate()
    }

    pub fn validate(self) -> Result<Config, ConfigError> {
        let duration = |name: &'static str, v: Option<String>, default: Duration| match v {
            None => Ok(default),
            Some(s) => parse_duration(&s).map_err(|e| invalid(name, e.to_string())),
        };
        let listen = self.listen.as_deref().unwrap_or("127.0.0.1:8080");
        let listen: SocketAddr = listen.parse().map_err(|_| {
            invalid(
                "listen",
                format!("'{listen}' is not an address like 127.0.0.1:8080"),
            )
        })?;
        let heartbeat = duration("heartbeat", self.heartbeat, Duration::from_secs(15))?;
        if heartbeat < Duration::from_millis(10) {
            return Err(invalid("heartbeat", "must be at least 10ms"));
        }
        let retry = duration("retry", self.retry, Duration::from_secs(3))?;
        if retry.as_millis() > u128::from(u32::MAX) {
            return Err(invalid("retry", "is too long"));
        }
        let shutdown_timeout = duration(
            "shutdown-timeout",
            self.shutdown_timeout,
            Duration::from_secs(10),
        )?;
        let history_age = match self.history_age {
            None => None,
            Some(s) => {
                let d = parse_duration(&s).map_err(|e| invalid("history-age", e.to_string()))?;
                if d.is_zero() {
                    return Err(invalid("history-age", "must be greater than zero"));
                }
                Some(d)
            }
        };
        if self.history_bytes == Some(0) {
            return Err(invalid("history-bytes", "must be greater than zero"));
        }
        let retention = Retention {
            max_events: self.history.unwrap_or(10_000),
            max_age: history_age,
            max_bytes: self.history_bytes,
        };
        let idempotency_window = duration(
            "idempotency-window",
            self.idempotency_window,
            Duration::from_secs(300),
        )?;
        let redis = match self.redis {
            None => None,
            Some(url) => {
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    return Err(invalid(
                        "redis",
                        format!("'{url}' is not a URL like redis://127.0.0.1:6379/0"),
                    ));
                }
                if self.data_dir.is_some() {
                    return Err(invalid(
                        "redis",
                        "with --redis, history lives in Redis: drop --data-dir",
                    ));
                }
                if self.history_bytes.is_some() {
                    return Err(invalid(
                        "redis",
                        "--history-bytes is not supported with Redis: use --history or --history-age",
                    ));
                }
                let prefix = self.redis_prefix.unwrap_or_else(|| "herald".to_string());
                if prefix.is_empty() || prefix.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(invalid("redis-prefix", "must be a non-empty word"));
                }
                Some((url, prefix))
            }
        };
        let max_connections = match self.max_connections {
            Some(0) => return Err(invalid("max-connections", "must be at least 1")),
            Some(n) => n,
            None => default_max_connections(),
        };
        let max_body = self.max_body.unwrap_or(1 << 20);
        if max_body == 0 {
            return Err(invalid("max-body", "must be at least 1"));
        }
        let max_selectors = self.max_selectors.unwrap_or(64);
        if max_selectors == 0 {
            return Err(invalid("max-selectors", "must be at least 1"));
        }
        let max_stream_age = match self.max_stream_age {
            None => None,
            Some(s) => {
                let d = parse_duration(&s).map_err(|e| invalid("max-stream-age", e.to_string()))?;
                if d < Duration::from_secs(1) {
                    return Err(invalid("max-stream-age", "must be at least 1s"));
                }
                Some(d)
            }
        };
        let max_stream_age_jitter = self.max_stream_age_jitter.unwrap_or(0.2);
        if !(0.0..=0.9).contains(&max_stream_age_jitter) {
            return Err(invalid(
                "max-stream-age-jitter",
                format!("{max_stream_age_jitter} is not a fraction from 0 to 0.9"),
            ));
        }
        let queue = self.queue.unwrap_or(1024);
        if queue == 0 {
            return Err(invalid("queue", "must be at least 1"));
        }
        let cors_origins = self
            .cors_origin
            .iter()
            .map(|o| {
                let valid = o == "*"
                    || ((o.starts_with("http://") || o.starts_with("https://"))
                        && !o.trim_end_matches('/').ends_with(':'));
                if !valid {
                    return Err(invalid(
                        "cors-origin",
                        format!("'{o}' is not an origin like https://app.example.com or *"),
                    ));
                }
                HeaderValue::from_str(o.trim_end_matches('/')).map_err(|_| {
                    invalid("cors-origin", format!("'{o}' is not a valid header value"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let checks = JwtChecks {
            leeway: duration("jwt-leeway", self.jwt_leeway, Duration::from_secs(5))?,
            issuer: self.jwt_issuer,
            audience: self.jwt_audience,
        };
        let auth = match (&self.jwt_secret, &self.jwt_public_key) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "jwt-secret",
                    "give --jwt-secret or --jwt-public-key, not both",
                ));
            }
            (Some(secret), None) => Auth::with_secret(secret.as_bytes(), &checks)
                .map_err(|e| invalid("jwt-secret", e.to_string()))?,
            (None, Some(path)) => Auth::with_public_key_file(path, &checks)
                .map_err(|e| invalid("jwt-public-key", e.to_string()))?,
            (None, None) => {
                if self.anonymous {
                    return Err(invalid(
                        "anonymous",
                        "only means something with --jwt-secret or --jwt-public-key",
                    ));
                }
                Auth::open()
            }
        };
        if let Some(k) = self.publish_key.iter().find(|k| k.len() < 16) {
            return Err(invalid(
                "publish-key",
                format!("a key of {} bytes is too short: use at least 16", k.len()),
            ));
        }
        let auth = auth
            .publish_keys(self.publish_key)
            .anonymous(self.anonymous);
        if auth.has_jwt() && self.cors_origin.iter().any(|o| o == "*") {
            return Err(invalid(
                "cors-origin",
                "'*' cannot go with authorization (tokens in cookies need credentials): list the origins",
            ));
        }
        let metrics_listen = match &self.metrics_listen {
            None => None,
            Some(a) => Some(a.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "metrics-listen",
                    format!("'{a}' is not an address like 127.0.0.1:9090"),
                )
            })?),
        };
        let positive = |name: &'static str, v: Option<usize>, default: usize| match v {
            Some(0) => Err(invalid(name, "must be at least 1")),
            Some(n) => Ok(n),
            None => Ok(default),
        };
        let publish_rate = match self.publish_rate {
            Some(r) if !(r > 0.0 && r.is_finite()) => {
                return Err(invalid("publish-rate", "must be a number above 0"));
            }
            r => r,
        };
        if self.publish_burst == Some(0) {
            return Err(invalid("publish-burst", "must be at least 1"));
        }
        let limits = Limits {
            per_ip: positive(
                "max-connections-per-ip",
                self.max_connections_per_ip,
                usize::MAX,
            )?,
            per_user: positive(
                "max-connections-per-user",
                self.max_connections_per_user,
                usize::MAX,
            )?,
            trusted_proxies: self
                .trusted_proxy
                .iter()
                .map(|p| {
                    p.parse::<IpNet>()
                        .map_err(|e| invalid("trusted-proxy", format!("'{p}' {e}")))
                })
                .collect::<Result<_, _>>()?,
            publish_rate: publish_rate.map(|rate| {
                let burst = self
                    .publish_burst
                    .map_or_else(|| (rate * 2.0).max(1.0), f64::from);
                (rate, burst)
            }),
            header_timeout: duration(
                "header-timeout",
                self.header_timeout,
                Duration::from_secs(30),
            )?,
            max_header_bytes: positive("max-header-bytes", self.max_header_bytes, 16 * 1024)?,
            max_url: positive("max-url", self.max_url, 8 * 1024)?,
            max_topics: positive("max-topics", self.max_topics, 64)?,
        };
        if limits.header_timeout.is_zero() {
            return Err(invalid("header-timeout", "must be greater than zero"));
        }
        Ok(Config {
            listen,
            heartbeat,
            retry,
            data_dir: self.data_dir,
            retention,
            idempotency_window,
            redis,
            max_connections,
            max_body,
            cors_origins,
            shutdown_timeout,
            max_selectors,
            queue,
            max_stream_age,
            max_stream_age_jitter,
            auth,
            metrics_listen,
            limits,
        })
    }
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
        assert!(c.max_connections >= 1);
    }

    #[test]
    fn flags_win_over_the_file() {
        let flags = RawConfig {
            heartbeat: Some("2s".into()),
            ..RawConfig::default()
        };
        let file: RawConfig = toml::from_str(
            "heartbeat = \"9s\"\nhistory = 5\ncors-origin = [\"https://a.example\"]",
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
        bad(
            RawConfig {
                heartbeat: Some("15".into()),
                ..Default::default()
            },
            "heartbeat",
        );
        bad(
            RawConfig {
                listen: Some("nowhere".into()),
                ..Default::default()
            },
            "listen",
        );
        bad(
            RawConfig {
                cors_origin: vec!["example.com".into()],
                ..Default::default()
            },
            "cors-origin",
        );
        bad(
            RawConfig {
                max_connections: Some(0),
                ..Default::default()
            },
            "max-connections",
        );
        assert!(toml::from_str::<RawConfig>("hearbeat = \"1s\"").is_err());
    }
}
