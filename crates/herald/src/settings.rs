//! Every setting of `herald serve`, written once in [`SETTINGS`]: its name (the flag `--NAME`, the
//! TOML key `NAME`, the env var `HERALD_<NAME>`), its kind, default, bounds and help. The command
//! line, the env vars, the config file, `--help` and the README's configuration table (a test
//! compares them) all come from that list. Values stay text until [`RawConfig::get`] parses one
//! with its type, falls back to the default and checks the bounds, so each rule lives in one place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, ArgMatches};

/// How a setting takes values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One value: `--name V`, `HERALD_NAME=V`, `name = V`.
    One,
    /// Repeatable: `--name A --name B`, `HERALD_NAME=A,B`, `name = ["A", "B"]`.
    List,
    /// On or off: `--name` (or `--name=false`), `HERALD_NAME=1|0|true|false|yes|no`, `name = true`.
    Switch,
}

/// One setting: everything the command line, the config file and the docs say about it.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// Flag without `--`, and TOML key; the env var is `HERALD_` and this in upper snake case.
    pub name: &'static str,
    /// Placeholder of the value in help, e.g. `DUR`.
    pub value: &'static str,
    pub kind: Kind,
    /// The value when none is given, written as a user would write it.
    pub default: Option<&'static str>,
    /// What no value means, when there is no default (e.g. "no limit").
    pub unset: &'static str,
    /// Inclusive lower bound, written as a value.
    pub min: Option<&'static str>,
    /// Exclusive lower bound, written as a value.
    pub above: Option<&'static str>,
    /// Inclusive upper bound, written as a value.
    pub max: Option<&'static str>,
    /// Another env var read when nothing else (flag, `HERALD_` var, file) gives a value.
    pub fallback_env: Option<&'static str>,
    /// Never shown in `--help` or logs.
    pub secret: bool,
    /// One line: what the setting does (the README's "meaning" column).
    pub help: &'static str,
}

impl Setting {
    const fn new(name: &'static str, value: &'static str, kind: Kind, help: &'static str) -> Self {
        Setting {
            name,
            value,
            kind,
            default: None,
            unset: "none",
            min: None,
            above: None,
            max: None,
            fallback_env: None,
            secret: false,
            help,
        }
    }
    pub const fn one(name: &'static str, value: &'static str, help: &'static str) -> Self {
        Self::new(name, value, Kind::One, help)
    }
    pub const fn list(name: &'static str, value: &'static str, help: &'static str) -> Self {
        Self::new(name, value, Kind::List, help)
    }
    pub const fn switch(name: &'static str, help: &'static str) -> Self {
        Self::new(name, "", Kind::Switch, help).unset("off")
    }
    pub const fn default(self, value: &'static str) -> Self {
        Setting {
            default: Some(value),
            ..self
        }
    }
    pub const fn unset(self, meaning: &'static str) -> Self {
        Setting {
            unset: meaning,
            ..self
        }
    }
    pub const fn min(self, value: &'static str) -> Self {
        Setting {
            min: Some(value),
            ..self
        }
    }
    pub const fn above(self, value: &'static str) -> Self {
        Setting {
            above: Some(value),
            ..self
        }
    }
    pub const fn max(self, value: &'static str) -> Self {
        Setting {
            max: Some(value),
            ..self
        }
    }
    pub const fn fallback_env(self, var: &'static str) -> Self {
        Setting {
            fallback_env: Some(var),
            ..self
        }
    }
    pub const fn secret(self) -> Self {
        Setting {
            secret: true,
            ..self
        }
    }

    /// `HERALD_` and the name in upper snake case.
    pub fn env(&self) -> String {
        format!("HERALD_{}", self.name.to_uppercase().replace('-', "_"))
    }

    /// The help, with the bounds and the default spelled out.
    pub fn long_help(&self) -> String {
        let mut help = self.help.to_string();
        let bounds: Vec<String> = match (self.min, self.max) {
            (Some(min), Some(max)) => vec![format!("from `{min}` to `{max}`")],
            (min, max) => [
                min.map(|m| format!("at least `{m}`")),
                max.map(|m| format!("at most `{m}`")),
            ]
            .into_iter()
            .flatten()
            .collect(),
        };
        let bounds: Vec<String> = [self.above.map(|m| format!("above `{m}`"))]
            .into_iter()
            .flatten()
            .chain(bounds)
            .collect();
        if !bounds.is_empty() {
            help.push_str(&format!(" ({})", bounds.join(", ")));
        }
        help
    }

    fn arg(&self) -> Arg {
        let shown = match self.default {
            Some(d) => d.to_string(),
            None => self.unset.to_string(),
        };
        let arg = Arg::new(self.name)
            .long(self.name)
            .env(self.env())
            .help(format!("{} [default: {shown}]", self.long_help()))
            .hide_env_values(self.secret);
        match self.kind {
            Kind::One => arg.value_name(self.value).action(ArgAction::Set),
            Kind::List => arg
                .value_name(self.value)
                .action(ArgAction::Append)
                .value_delimiter(','),
            Kind::Switch => arg
                .value_name("BOOL")
                .action(ArgAction::Set)
                .num_args(0..=1)
                .require_equals(true)
                .default_missing_value("true"),
        }
    }
}

pub const LISTEN: Setting = Setting::one(
    "listen",
    "ADDR",
    "address to listen on: `HOST:PORT`, or `:PORT` or `PORT` for every interface (port `0`: any free port); `PORT` is read when nothing else sets it",
)
.default("127.0.0.1:8080")
.fallback_env("PORT");
pub const HEARTBEAT: Setting = Setting::one(
    "heartbeat",
    "DUR",
    "interval of the comment on idle streams",
)
.default("15s")
.min("10ms");
pub const RETRY: Setting = Setting::one(
    "retry",
    "DUR",
    "reconnect delay told to clients in the `retry:` line",
)
.default("3s")
.max("49d");
pub const HISTORY: Setting =
    Setting::one("history", "N", "events kept for replay").default("10000");
pub const HISTORY_AGE: Setting =
    Setting::one("history-age", "DUR", "also drop events older than this")
        .unset("no limit")
        .above("0s");
pub const HISTORY_BYTES: Setting = Setting::one(
    "history-bytes",
    "N",
    "also drop the oldest events beyond this many bytes",
)
.unset("`268435456` (256 MiB); none with `--redis`")
.min("1");
pub const DATA_DIR: Setting = Setting::one(
    "data-dir",
    "DIR",
    "keep history on disk in `DIR/herald.redb` (with its write-ahead log `DIR/herald.wal`), so it survives restarts and crashes",
)
.unset("none: in memory");
pub const IDEMPOTENCY_WINDOW: Setting = Setting::one(
    "idempotency-window",
    "DUR",
    "how long an `idempotencyKey` is remembered",
)
.default("5m");
pub const IDEMPOTENCY_KEYS: Setting = Setting::one(
    "idempotency-keys",
    "N",
    "most idempotency keys remembered (with `--redis`, for the whole cluster); past it the oldest are forgotten early",
)
.default("100000")
.min("1");
pub const IDEMPOTENCY_BYTES: Setting = Setting::one(
    "idempotency-bytes",
    "N",
    "most bytes of idempotency keys remembered; past it the oldest are forgotten early",
)
.default("33554432")
.min("1024");
pub const REDIS: Setting = Setting::one(
    "redis",
    "URL",
    "share history, fan-out and presence with other nodes through this Redis (`redis://host:port/db`, `rediss://…`, or through Sentinel: `redis+sentinel://h1:26379,h2:26379/MASTER[?db=N]`, `rediss+sentinel://…`); not with `--data-dir`",
)
.unset("none: one node");
pub const REDIS_PREFIX: Setting = Setting::one(
    "redis-prefix",
    "P",
    "prefix of herald's Redis keys, so several hubs can share one Redis",
)
.default("herald");
pub const REDIS_REPLICAS: Setting = Setting::one(
    "redis-replicas",
    "N",
    "with `--redis`: a publish is acknowledged only once N Redis replicas hold it (`WAIT`); fewer in time answers 503 `not_replicated`",
)
.default("0");
pub const REDIS_WAIT_TIMEOUT: Setting = Setting::one(
    "redis-wait-timeout",
    "DUR",
    "how long a publish waits for `--redis-replicas` replicas",
)
.default("1s")
.min("1ms")
.max("60s");
pub const MAX_CONNECTIONS: Setting = Setting::one(
    "max-connections",
    "N",
    "most open streams; beyond it `/events` answers 503",
)
.unset("a little under the open-file limit")
.min("1");
pub const MAX_BODY: Setting =
    Setting::one("max-body", "BYTES", "largest publish body; beyond it 413")
        .default("1048576")
        .min("1");
pub const CORS_ORIGIN: Setting = Setting::list(
    "cors-origin",
    "ORIGIN",
    "origin allowed to call the hub from a browser; repeatable; `*` allows any origin, without credentials",
)
.unset("none: no CORS headers");
pub const SHUTDOWN_TIMEOUT: Setting = Setting::one(
    "shutdown-timeout",
    "DUR",
    "how long shutdown waits for streams and requests to end",
)
.default("10s");
pub const MAX_SELECTORS: Setting = Setting::one(
    "max-selectors",
    "N",
    "most `topic` selectors per connection",
)
.default("64")
.min("1");
pub const QUEUE: Setting = Setting::one(
    "queue",
    "N",
    "events queued per connection before it catches up from history instead",
)
.default("1024")
.min("1");
pub const QUEUE_BYTES: Setting = Setting::one(
    "queue-bytes",
    "N",
    "bytes of events queued per connection before it catches up from history instead (one event always fits); also what one step of a replay holds",
)
.default("1048576")
.min("1");
pub const MAX_STREAM_AGE: Setting = Setting::one(
    "max-stream-age",
    "DUR",
    "end each stream after this long, quietly, so clients reconnect with their last id; `10m` is a good value for clusters",
)
.unset("off")
.min("1s");
pub const MAX_STREAM_AGE_JITTER: Setting = Setting::one(
    "max-stream-age-jitter",
    "F",
    "each stream ends at a random point in `[age × (1 − F), age]`",
)
.default("0.2")
.min("0")
.max("0.9");
pub const JWT_SECRET: Setting = Setting::one(
    "jwt-secret",
    "S",
    "HS256 secret (16 bytes or more); turns authorization on",
)
.secret();
pub const JWT_PUBLIC_KEY: Setting = Setting::one(
    "jwt-public-key",
    "FILE",
    "PEM public key; RSA → RS256, P-256 → ES256, Ed25519 → EdDSA; turns authorization on",
);
pub const JWT_LEEWAY: Setting = Setting::one(
    "jwt-leeway",
    "DUR",
    "clock skew allowed on `exp`/`nbf` at admission",
)
.default("5s");
pub const JWT_ISSUER: Setting = Setting::one("jwt-issuer", "S", "required `iss`");
pub const JWT_AUDIENCE: Setting = Setting::one("jwt-audience", "S", "required `aud`");
pub const ANONYMOUS: Setting = Setting::switch(
    "anonymous",
    "let token-less connections subscribe (no private events, no user messages)",
);
pub const MERCURE: Setting = Setting::switch(
    "mercure",
    "also speak the Mercure protocol at `/.well-known/mercure` (publish, subscribe, draft-08 and v0.x tokens)",
);
pub const MERCURE_RESOURCE: Setting = Setting::one(
    "mercure-resource",
    "URL",
    "the hub's resource identifier: the `aud` draft-08 Mercure tokens must name",
)
.unset("the request's own URL of `/.well-known/mercure`");
pub const MERCURE_SUBSCRIPTIONS: Setting = Setting::switch(
    "mercure-subscriptions",
    "Mercure active subscriptions: subscription events on `/.well-known/mercure/subscriptions/…` and the subscriptions API there",
);
pub const OPEN_SUBSCRIBE: Setting = Setting::switch(
    "open-subscribe",
    "with `--publish-key` and no JWT key: let token-less connections name any `user` and receive private events (otherwise they are anonymous); only behind a gateway that authenticates subscribers",
);
pub const ALLOWED_HOST: Setting = Setting::list(
    "allowed-host",
    "H",
    "host names a request's `Host` may give (`*.example.com` for subdomains, `*` for any); others answer 421 (DNS rebinding guard)",
)
.unset("on a loopback listener `localhost`, `*.localhost`, IP literals and single-label names; elsewhere any");
pub const PUBLISH_KEY: Setting = Setting::list(
    "publish-key",
    "K",
    "static Bearer key for publishing, presence and control (16 bytes or more; repeatable for rotation)",
)
.secret();
pub const METRICS_LISTEN: Setting = Setting::one(
    "metrics-listen",
    "ADDR",
    "serve `/metrics` only on this address",
)
.unset("none: on the main address");
pub const MAX_CONNECTIONS_PER_IP: Setting = Setting::one(
    "max-connections-per-ip",
    "N",
    "open streams per client IP; beyond it 429",
)
.unset("no limit")
.min("1");
pub const MAX_CONNECTIONS_PER_USER: Setting = Setting::one(
    "max-connections-per-user",
    "N",
    "open streams per user; beyond it 429",
)
.unset("no limit")
.min("1");
pub const TRUSTED_PROXY: Setting = Setting::list(
    "trusted-proxy",
    "NET",
    "proxy IP or CIDR whose `X-Forwarded-For` names the client",
);
pub const PUBLISH_RATE: Setting = Setting::one(
    "publish-rate",
    "R",
    "published events per second per publish key, user or IP (token bucket; a batch counts each message); beyond it 429",
)
.unset("no limit")
.above("0");
pub const PUBLISH_BURST: Setting =
    Setting::one("publish-burst", "N", "bucket size of `--publish-rate`")
        .unset("twice the rate")
        .min("1");
pub const HEADER_TIMEOUT: Setting = Setting::one(
    "header-timeout",
    "DUR",
    "time to send a request head, a slowloris guard that also ends idle keep-alive (also on `--metrics-listen`)",
)
.default("30s")
.above("0s");
pub const BODY_TIMEOUT: Setting = Setting::one(
    "body-timeout",
    "DUR",
    "time to send a whole request body once the head is in; beyond it 408 (with `--max-body` this sets the slowest rate a full body may come at: 1 MiB in 10 s); for a streaming publish, the longest pause between two parts of its body",
)
.default("10s")
.above("0s");
pub const MAX_HEADER_BYTES: Setting = Setting::one(
    "max-header-bytes",
    "N",
    "largest request head; beyond it 431",
)
.default("16384")
.min("1");
pub const MAX_URL: Setting = Setting::one("max-url", "N", "longest URL; beyond it 414")
    .default("8192")
    .min("1");
pub const MAX_TOPICS: Setting = Setting::one(
    "max-topics",
    "N",
    "most topics plus users per published message; a stored event holds at most 65535",
)
.default("64")
.min("1")
.max("65535");
pub const MAX_BATCH: Setting = Setting::one(
    "max-batch",
    "N",
    "most messages in one batch publish; beyond it 413",
)
.default("1000")
.min("1");
pub const MAX_BLOCKS: Setting = Setting::one(
    "max-blocks",
    "N",
    "most users blocked at once with `?block=`; past it the block that ends soonest is dropped",
)
.default("10000")
.min("1");
pub const LISTEN_BACKLOG: Setting = Setting::one(
    "listen-backlog",
    "N",
    "connections the kernel queues for `--listen` before herald accepts them (capped by `net.core.somaxconn`); a burst of new clients beyond it waits for SYN retries",
)
.default("65535")
.min("1")
.max("2147483647");
pub const RETENTION: Setting = Setting::list(
    "retention",
    "RULE",
    "keep the events of some topics apart from the others, by their own bounds: `SELECTOR:events=N,age=DUR,bytes=N,after-complete=DUR` (a key left out takes `--history`, `--history-age`, `--history-bytes`; `after-complete`: how long a topic's events stay once its stream ended with `herald.complete` or `herald.cancel`); an event goes to the first rule naming one of its topics; in TOML, `[[retention]]` tables with `topics` and those keys; repeatable",
)
.unset("none: every event keeps the global bounds");
pub const LOG_FORMAT: Setting = Setting::one(
    "log-format",
    "FORMAT",
    "`text` or `json` (one JSON object per line: timestamp, level, target, fields with the message); text has colour only on a terminal",
)
.default("text");

pub const TLS_CERT: Setting = Setting::one(
    "tls-cert",
    "FILE",
    "PEM certificate chain, leaf first; with `--tls-key`, `--listen` serves HTTPS with HTTP/2 and HTTP/1.1 (ALPN); reloaded on SIGHUP or when the files change",
)
.unset("none: plain HTTP");
pub const TLS_KEY: Setting = Setting::one(
    "tls-key",
    "FILE",
    "PEM private key of `--tls-cert` (RSA, ECDSA P-256/P-384 or Ed25519; PKCS#8, PKCS#1 or SEC1)",
);
pub const H2_MAX_STREAMS: Setting = Setting::one(
    "h2-max-streams",
    "N",
    "most concurrent streams on one HTTP/2 connection; the client's next ones are refused (`REFUSED_STREAM`), not the connection",
)
.default("256")
.min("1");
pub const ACME_DOMAIN: Setting = Setting::list(
    "acme-domain",
    "NAME",
    "serve HTTPS with a certificate for NAME from ACME (TLS-ALPN-01 on `--listen`); repeatable; not with `--tls-cert`",
);
pub const ACME_DIRECTORY: Setting = Setting::one("acme-directory", "URL", "ACME directory URL")
    .default("https://acme-v02.api.letsencrypt.org/directory");
pub const ACME_CONTACT: Setting = Setting::list(
    "acme-contact",
    "URL",
    "contact of the ACME account, e.g. `mailto:admin@example.com`; repeatable",
);
pub const ACME_CACHE: Setting = Setting::one(
    "acme-cache",
    "DIR",
    "keep the ACME account and certificates here across restarts",
)
.unset("none: order anew at each start");
pub const ACME_CA_ROOT: Setting = Setting::one(
    "acme-ca-root",
    "FILE",
    "PEM CA to trust for a private ACME server",
)
.unset("the web's roots");

pub const PRESENCE_GRACE: Setting = Setting::one(
    "presence-grace",
    "DUR",
    "how long after a user's last stream closes their `online: false` presence event waits for a new one (so a page reload is not an offline/online pair)",
)
.default("5s")
.min("0s");

pub const CLUSTER_REPORT: Setting = Setting::one(
    "cluster-report",
    "DUR",
    "with `--redis`: how often each node reports its users and counters to Redis; changes are pushed as they happen, the report keeps a node alive (a node silent for 5 reports, at least 5 s, is gone and its users go offline)",
)
.default("1s")
.min("100ms");

pub const WEBHOOK: Setting = Setting::list(
    "webhook",
    "URL",
    "POST every event of the `--webhook-topics` to this URL (JSON, signed with `--webhook-secret`), in order, at least once, retried until it answers 2xx; repeatable; the config file also takes `[[webhook]]` tables, each with its own `url`, `secret` and `topics`",
);
pub const WEBHOOK_SECRET: Setting = Setting::one(
    "webhook-secret",
    "S",
    "sign the deliveries of the `--webhook` URLs: `Herald-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of \"<t>.<body>\">`",
)
.secret();
pub const WEBHOOK_TOPICS: Setting = Setting::list(
    "webhook-topics",
    "SELECTOR",
    "the topics the `--webhook` URLs deliver; repeatable",
)
.default("$presence/**");

/// Every setting, in the order of `--help` and the README's table.
pub const SETTINGS: &[Setting] = &[
    LISTEN,
    HEARTBEAT,
    RETRY,
    HISTORY,
    HISTORY_AGE,
    HISTORY_BYTES,
    DATA_DIR,
    IDEMPOTENCY_WINDOW,
    IDEMPOTENCY_KEYS,
    IDEMPOTENCY_BYTES,
    REDIS,
    REDIS_PREFIX,
    REDIS_REPLICAS,
    REDIS_WAIT_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_BODY,
    CORS_ORIGIN,
    SHUTDOWN_TIMEOUT,
    MAX_SELECTORS,
    QUEUE,
    QUEUE_BYTES,
    MAX_STREAM_AGE,
    MAX_STREAM_AGE_JITTER,
    JWT_SECRET,
    JWT_PUBLIC_KEY,
    JWT_LEEWAY,
    JWT_ISSUER,
    JWT_AUDIENCE,
    ANONYMOUS,
    OPEN_SUBSCRIBE,
    PUBLISH_KEY,
    METRICS_LISTEN,
    MAX_CONNECTIONS_PER_IP,
    MAX_CONNECTIONS_PER_USER,
    TRUSTED_PROXY,
    ALLOWED_HOST,
    PUBLISH_RATE,
    PUBLISH_BURST,
    HEADER_TIMEOUT,
    BODY_TIMEOUT,
    MAX_HEADER_BYTES,
    MAX_URL,
    MAX_TOPICS,
    MAX_BATCH,
    MAX_BLOCKS,
    LOG_FORMAT,
    TLS_CERT,
    TLS_KEY,
    H2_MAX_STREAMS,
    ACME_DOMAIN,
    ACME_DIRECTORY,
    ACME_CONTACT,
    ACME_CACHE,
    ACME_CA_ROOT,
    PRESENCE_GRACE,
    CLUSTER_REPORT,
    WEBHOOK,
    WEBHOOK_SECRET,
    WEBHOOK_TOPICS,
    MERCURE,
    MERCURE_RESOURCE,
    LISTEN_BACKLOG,
    RETENTION,
    MERCURE_SUBSCRIPTIONS,
];

/// A setting's value type: parsed from text (a flag, an env var, a TOML value, a default or a
/// bound), ordered for the bounds.
pub trait Value: Sized + PartialOrd {
    fn parse(text: &str) -> Result<Self, String>;
}

/// Why the settings cannot make a configuration.
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

pub(crate) fn invalid(name: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        name,
        message: message.into(),
    }
}

/// Settings as given (flags and `HERALD_*` env vars, a TOML file), as text: nothing is parsed yet.
#[derive(Default, Clone)]
pub struct RawConfig {
    /// The TOML file named by `--config` / `HERALD_CONFIG`.
    pub config: Option<PathBuf>,
    values: BTreeMap<&'static str, Vec<String>>,
    /// The config file's `[[webhook]]` tables (its `webhook` strings are URLs in `values`).
    pub(crate) hook_tables: Vec<HookTable>,
}

/// One `[[webhook]]` table of the config file, as given: a hook with its own secret and topics
/// (validated with the other settings, in `config.rs`).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct HookTable {
    /// Its place in the file's `webhook` list (from 1), as errors name it.
    pub number: usize,
    pub url: String,
    pub secret: Option<String>,
    pub topics: Option<Vec<String>>,
}

impl std::fmt::Debug for HookTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookTable")
            .field("url", &self.url)
            .field("secret", &self.secret.as_ref().map(|_| "<hidden>"))
            .field("topics", &self.topics)
            .finish()
    }
}

impl HookTable {
    /// The `n`-th (from 1) item of the file's `webhook` array: a table `{url, secret, topics}`.
    fn parse(n: usize, table: &toml::Table) -> Result<HookTable, String> {
        let at = |what: String| format!("[[webhook]] {n}: {what}");
        let text = |key: &str| -> Result<Option<String>, String> {
            match table.get(key) {
                None => Ok(None),
                Some(toml::Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(at(format!("'{key}' must be a string"))),
            }
        };
        if let Some(key) = table
            .keys()
            .find(|k| !["url", "secret", "topics"].contains(&k.as_str()))
        {
            return Err(at(format!(
                "unknown key '{key}' (a hook takes url, secret and topics)"
            )));
        }
        let url = text("url")?.ok_or_else(|| at("'url' is missing".into()))?;
        let topics = match table.get("topics") {
            None => None,
            Some(toml::Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|i| i.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| at("'topics' must be an array of selectors (strings)".into()))?,
            ),
            Some(_) => {
                return Err(at(
                    "'topics' must be an array of selectors, like [\"$presence/**\"]".into(),
                ));
            }
        };
        Ok(HookTable {
            number: n,
            url,
            secret: text("secret")?,
            topics,
        })
    }
}

impl std::fmt::Debug for RawConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: BTreeMap<&str, Vec<&str>> = self
            .values
            .iter()
            .map(|(name, values)| {
                let secret = find(name).is_some_and(|s| s.secret);
                let values = values
                    .iter()
                    .map(|v| if secret { "<hidden>" } else { v.as_str() })
                    .collect();
                (*name, values)
            })
            .collect();
        f.debug_struct("RawConfig")
            .field("config", &self.config)
            .field("values", &shown)
            .field("hook_tables", &self.hook_tables)
            .finish()
    }
}

fn find(name: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.name == name)
}

impl RawConfig {
    /// Sets `setting` to `value` (for a list, adds it), as a flag would.
    pub fn set(mut self, setting: &Setting, value: impl Into<String>) -> Self {
        let values = self.values.entry(setting.name).or_default();
        if setting.kind != Kind::List {
            values.clear();
        }
        values.push(value.into());
        self
    }

    /// Reads the TOML file at `path`; its keys are the settings' names.
    pub fn from_file(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses a TOML document of settings; scalars of any TOML type are taken as their text.
    pub fn from_toml(text: &str) -> Result<RawConfig, String> {
        let table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut raw = RawConfig::default();
        for (key, value) in table {
            let Some(setting) = find(&key) else {
                return Err(format!("unknown key '{key}'"));
            };
            // `[[retention]]` tables: each becomes the rule's flag text.
            if setting.name == RETENTION.name
                && let toml::Value::Array(items) = &value
                && items.iter().all(toml::Value::is_table)
            {
                let rules = items
                    .iter()
                    .map(retention_rule_text)
                    .collect::<Result<_, _>>()?;
                raw.values.insert(setting.name, rules);
                continue;
            }
            // `webhook` also takes tables, one per hook: `[[webhook]] url = …`.
            if setting.name == WEBHOOK.name {
                let items = match value {
                    toml::Value::Array(items) => items,
                    table @ toml::Value::Table(_) => vec![table],
                    other => vec![other],
                };
                let mut urls = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item {
                        toml::Value::String(url) => urls.push(url.clone()),
                        toml::Value::Table(t) => raw.hook_tables.push(HookTable::parse(i + 1, t)?),
                        _ => {
                            return Err(
                                "'webhook' takes URLs (strings) or [[webhook]] tables".to_string()
                            );
                        }
                    }
                }
                if !urls.is_empty() {
                    raw.values.insert(setting.name, urls);
                }
                continue;
            }
            let scalar = |v: &toml::Value| match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                toml::Value::Boolean(b) => Ok(b.to_string()),
                _ => Err(format!("'{key}' must be a string, a number or a boolean")),
            };
            let values = match (&value, setting.kind) {
                (toml::Value::Array(items), Kind::List) => {
                    items.iter().map(scalar).collect::<Result<_, _>>()?
                }
                (toml::Value::Array(_), _) => {
                    return Err(format!("'{key}' takes one value, not an array"));
                }
                (v, _) => vec![scalar(v)?],
            };
            raw.values.insert(setting.name, values);
        }
        Ok(raw)
    }

    /// Fills what `self` leaves unset from `fallback` (a list is taken whole from one side).
    pub fn or(mut self, fallback: RawConfig) -> RawConfig {
        self.config = self.config.or(fallback.config);
        // Hook tables come only from the file: they add to the `--webhook` URLs, whichever side
        // gave those.
        if self.hook_tables.is_empty() {
            self.hook_tables = fallback.hook_tables;
        }
        for (name, values) in fallback.values {
            self.values.entry(name).or_insert(values);
        }
        self
    }

    /// Adds the settings' fallback env vars (such as `PORT`) where nothing else gave a value.
    pub fn or_fallback_env(mut self) -> RawConfig {
        for s in SETTINGS {
            if let Some(var) = s.fallback_env
                && !self.values.contains_key(s.name)
                && let Ok(value) = std::env::var(var)
                && !value.is_empty()
            {
                self.values.insert(s.name, vec![value]);
            }
        }
        self
    }

    /// The texts given for `setting`, or its default.
    fn texts(&self, setting: &Setting) -> Vec<&str> {
        match self.values.get(setting.name) {
            Some(v) => v.iter().map(String::as_str).collect(),
            None => setting.default.into_iter().collect(),
        }
    }

    /// The value of `setting`: as given, else its default, else `None`; checked against its bounds.
    /// Whether a value was given (by flag, env var or file), not taken from the default.
    pub fn given(&self, setting: &Setting) -> bool {
        self.values.contains_key(setting.name)
    }
    pub fn value<T: Value>(&self, setting: &Setting) -> Result<Option<T>, ConfigError> {
        debug_assert!(
            find(setting.name).is_some(),
            "{} is not in SETTINGS",
            setting.name
        );
        self.texts(setting)
            .last()
            .map(|text| parse_within(setting, text))
            .transpose()
    }

    /// The value of a setting that has a default.
    pub fn get<T: Value>(&self, setting: &Setting) -> Result<T, ConfigError> {
        self.value(setting)?
            .ok_or_else(|| invalid(setting.name, "has no value and no default"))
    }

    /// Every value of a list setting.
    pub fn list<T: Value>(&self, setting: &Setting) -> Result<Vec<T>, ConfigError> {
        self.texts(setting)
            .into_iter()
            .map(|text| parse_within(setting, text))
            .collect()
    }

    /// A switch: off unless given.
    pub fn switch(&self, setting: &Setting) -> Result<bool, ConfigError> {
        Ok(self.value(setting)?.unwrap_or(false))
    }
}

/// A `[[retention]]` table as the flag's rule text: `topics`, then `key=value` for each other key
/// (the rule's parser names a bad or unknown one).
fn retention_rule_text(table: &toml::Value) -> Result<String, String> {
    let table = table.as_table().expect("a table");
    let topics = match table.get("topics") {
        Some(toml::Value::String(s)) => s.clone(),
        Some(_) => return Err("[[retention]] topics must be a string like \"ai/**\"".into()),
        None => return Err("a [[retention]] table needs topics = \"SELECTOR\"".into()),
    };
    let mut keys = Vec::new();
    for (k, v) in table.iter().filter(|(k, _)| *k != "topics") {
        let v = match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            _ => {
                return Err(format!(
                    "[[retention]] {k} (topics \"{topics}\") must be a string or a whole number"
                ));
            }
        };
        keys.push(format!("{k}={v}"));
    }
    Ok(format!("{topics}:{}", keys.join(",")))
}

fn parse_within<T: Value>(setting: &Setting, text: &str) -> Result<T, ConfigError> {
    let name = setting.name;
    let value = T::parse(text).map_err(|e| invalid(name, e))?;
    let bound =
        |b: &str| T::parse(b).map_err(|e| invalid(name, format!("has a bad bound '{b}': {e}")));
    let range = |min: &str| match setting.max {
        Some(max) => format!("must be from {min} to {max}"),
        None => format!("must be at least {min}"),
    };
    if let Some(min) = setting.min
        && value < bound(min)?
    {
        return Err(invalid(name, range(min)));
    }
    if let Some(above) = setting.above
        && value <= bound(above)?
    {
        return Err(invalid(name, format!("must be above {above}")));
    }
    if let Some(max) = setting.max
        && value > bound(max)?
    {
        return Err(invalid(
            name,
            setting
                .min
                .map_or_else(|| format!("must be at most {max}"), range),
        ));
    }
    Ok(value)
}

impl Value for std::time::Duration {
    fn parse(text: &str) -> Result<Self, String> {
        herald_core::duration::parse_duration(text).map_err(|e| e.to_string())
    }
}

macro_rules! whole_numbers {
    ($($t:ty),*) => {$(
        impl Value for $t {
            fn parse(text: &str) -> Result<Self, String> {
                text.trim()
                    .parse()
                    .map_err(|_| format!("'{text}' is not a whole number"))
            }
        }
    )*};
}
whole_numbers!(usize, u64, u32);

impl Value for f64 {
    fn parse(text: &str) -> Result<Self, String> {
        text.trim()
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .ok_or_else(|| format!("'{text}' is not a number"))
    }
}

impl Value for String {
    fn parse(text: &str) -> Result<Self, String> {
        Ok(text.to_string())
    }
}

impl Value for PathBuf {
    fn parse(text: &str) -> Result<Self, String> {
        Ok(PathBuf::from(text))
    }
}

impl Value for bool {
    fn parse(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(format!(
                "'{text}' is not a boolean: use 1/0, true/false, yes/no or on/off"
            )),
        }
    }
}

/// An address to listen on: `HOST:PORT`, or `:PORT` / `PORT` for every (IPv4) interface.
impl Value for std::net::SocketAddr {
    fn parse(text: &str) -> Result<Self, String> {
        let all = |port: &str| {
            port.parse::<u16>()
                .ok()
                .map(|p| std::net::SocketAddr::from(([0, 0, 0, 0], p)))
        };
        let parsed = match text.strip_prefix(':') {
            Some(port) => all(port),
            None => text.parse().ok().or_else(|| all(text)),
        };
        parsed.ok_or_else(|| {
            format!("'{text}' is not an address like 127.0.0.1:8080, or a port like :8080 or 8080")
        })
    }
}

impl clap::Args for RawConfig {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        cmd.arg(
            Arg::new("config")
                .long("config")
                .env("HERALD_CONFIG")
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .help("TOML file with any of these settings, by name (flags and env vars win over it)"),
        )
        .args(SETTINGS.iter().map(Setting::arg))
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for RawConfig {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut raw = RawConfig::default();
        raw.update_from_arg_matches(matches)?;
        Ok(raw)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        if let Some(path) = matches.get_one::<PathBuf>("config") {
            self.config = Some(path.clone());
        }
        for s in SETTINGS {
            if let Some(values) = matches.get_many::<String>(s.name) {
                self.values.insert(s.name, values.cloned().collect());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The server's defaults are the engine's (`herald_core::defaults`): an embedding app and
    /// `herald serve` with no flags behave alike, and a default changed in one place fails here.
    #[test]
    fn defaults_are_the_engines() {
        use herald_core::defaults as core;
        fn default_of<T: Value>(s: &Setting) -> T {
            T::parse(
                s.default
                    .unwrap_or_else(|| panic!("{} has no default", s.name)),
            )
            .unwrap()
        }
        assert_eq!(default_of::<Duration>(&HEARTBEAT), core::HEARTBEAT);
        assert_eq!(default_of::<Duration>(&RETRY), core::RETRY);
        assert_eq!(default_of::<usize>(&HISTORY), core::HISTORY_EVENTS);
        assert!(
            HISTORY_BYTES
                .unset
                .starts_with(&format!("`{}`", core::HISTORY_BYTES))
        );
        assert_eq!(
            default_of::<Duration>(&IDEMPOTENCY_WINDOW),
            core::IDEMPOTENCY_WINDOW
        );
        assert_eq!(
            default_of::<usize>(&IDEMPOTENCY_KEYS),
            core::IDEMPOTENCY_KEYS
        );
        assert_eq!(
            default_of::<usize>(&IDEMPOTENCY_BYTES),
            core::IDEMPOTENCY_BYTES
        );
        assert_eq!(default_of::<usize>(&QUEUE), core::QUEUE_EVENTS);
        assert_eq!(default_of::<usize>(&QUEUE_BYTES), core::QUEUE_BYTES);
        assert_eq!(default_of::<usize>(&MAX_SELECTORS), core::MAX_SELECTORS);
        assert_eq!(default_of::<usize>(&MAX_BLOCKS), core::MAX_BLOCKS);
        assert_eq!(
            default_of::<f64>(&MAX_STREAM_AGE_JITTER),
            core::STREAM_AGE_JITTER
        );
    }

    #[test]
    fn names_are_unique_and_flags_look_alike() {
        let mut names: Vec<&str> = SETTINGS.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SETTINGS.len());
        for s in SETTINGS {
            assert!(
                // Digits too: `h2-max-streams`.
                s.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{}",
                s.name
            );
            assert!(!s.help.is_empty() && !s.help.ends_with('.'), "{}", s.name);
        }
        assert_eq!(
            MAX_CONNECTIONS_PER_IP.env(),
            "HERALD_MAX_CONNECTIONS_PER_IP"
        );
    }

    #[test]
    fn defaults_bounds_and_given_values() {
        let raw = RawConfig::default();
        assert_eq!(
            raw.get::<Duration>(&HEARTBEAT).unwrap(),
            Duration::from_secs(15)
        );
        assert_eq!(raw.value::<Duration>(&HISTORY_AGE).unwrap(), None);
        let raw = raw.set(&HEARTBEAT, "5ms");
        let err = raw.get::<Duration>(&HEARTBEAT).unwrap_err().to_string();
        assert_eq!(err, "invalid heartbeat: must be at least 10ms");
        let raw = raw.set(&HEARTBEAT, "10ms").set(&HISTORY_AGE, "0s");
        assert_eq!(
            raw.get::<Duration>(&HEARTBEAT).unwrap(),
            Duration::from_millis(10)
        );
        let err = raw.value::<Duration>(&HISTORY_AGE).unwrap_err().to_string();
        assert_eq!(err, "invalid history-age: must be above 0s");
        let raw = RawConfig::default().set(&RETRY, "50d");
        assert!(raw.get::<Duration>(&RETRY).is_err());
    }

    #[test]
    fn booleans_take_the_usual_spellings() {
        for yes in ["1", "true", "YES", "on"] {
            assert_eq!(bool::parse(yes), Ok(true));
        }
        for no in ["0", "false", "No", "off"] {
            assert_eq!(bool::parse(no), Ok(false));
        }
        assert!(bool::parse("maybe").unwrap_err().contains("yes/no"));
    }

    #[test]
    fn listen_addresses_take_a_bare_port() {
        use std::net::SocketAddr;
        let p = |s| <SocketAddr as Value>::parse(s);
        assert_eq!(p("127.0.0.1:9"), Ok("127.0.0.1:9".parse().unwrap()));
        assert_eq!(p(":8080"), Ok("0.0.0.0:8080".parse().unwrap()));
        assert_eq!(p("8080"), Ok("0.0.0.0:8080".parse().unwrap()));
        assert_eq!(p("[::1]:80"), Ok("[::1]:80".parse().unwrap()));
        assert!(p("nowhere").is_err());
        assert!(p(":99999").is_err());
    }

    #[test]
    fn toml_takes_any_scalar_and_arrays_for_lists() {
        let raw = RawConfig::from_toml(
            "heartbeat = \"9s\"\nhistory = 5\nanonymous = true\npublish-rate = 2.5\ncors-origin = [\"https://a.example\"]",
        )
        .unwrap();
        assert_eq!(raw.get::<usize>(&HISTORY).unwrap(), 5);
        assert!(raw.switch(&ANONYMOUS).unwrap());
        assert_eq!(raw.value::<f64>(&PUBLISH_RATE).unwrap(), Some(2.5));
        assert_eq!(
            raw.list::<String>(&CORS_ORIGIN).unwrap(),
            vec!["https://a.example"]
        );
        assert!(
            RawConfig::from_toml("hearbeat = \"1s\"")
                .unwrap_err()
                .contains("hearbeat")
        );
        assert!(RawConfig::from_toml("heartbeat = [\"1s\"]").is_err());
        assert!(RawConfig::from_toml("config = \"x.toml\"").is_err());
    }

    /// The README's configuration table, as the settings say it should read.
    fn readme_table() -> String {
        let mut t = String::from(
            "| flag | env | TOML key | default | meaning |\n|------|-----|----------|---------|---------|\n",
        );
        for s in SETTINGS {
            let flag = match s.kind {
                Kind::Switch => format!("`--{}`", s.name),
                _ => format!("`--{} {}`", s.name, s.value),
            };
            let mut env = format!("`{}`", s.env());
            if let Some(var) = s.fallback_env {
                env.push_str(&format!(", then `{var}`"));
            }
            let mut key = format!("`{}`", s.name);
            if s.kind == Kind::List {
                env.push_str(" (comma-separated)");
                key.push_str(" (array)");
            }
            let default = match s.default {
                Some(d) => format!("`{d}`"),
                None => s.unset.to_string(),
            };
            t.push_str(&format!(
                "| {flag} | {env} | {key} | {default} | {} |\n",
                s.long_help()
            ));
        }
        t
    }

    #[test]
    fn readme_configuration_table_is_the_settings() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
                .expect("README.md");
        let table = readme_table();
        assert!(
            readme.contains(&table),
            "README.md's configuration table differs from the settings; it should read:\n\n{table}"
        );
    }
}
