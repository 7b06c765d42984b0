//! The way to the Redis primary: a fixed address (`redis://`, `rediss://`), or whichever server
//! Redis Sentinel names the primary (`redis+sentinel://`, `rediss+sentinel://`), found again after
//! a failover. Every part of herald that talks to Redis goes through one [`RedisLink`] (history
//! appends and reads, the follower, presence reports, control messages), so a failover moves all
//! of them: a command that fails drops the connection it used, and the next command asks for the
//! primary afresh. While no primary answers, commands fail at once (no queue builds up).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::aio::{ConnectionLike, MultiplexedConnection, PubSub};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisError,
    RedisFuture, RedisResult, Value,
};

/// How long a failed search for the primary is remembered before the next one (so a burst of
/// publishes during a failover is answered 503 at once instead of each searching again).
const RETRY_SEARCH: Duration = Duration::from_millis(200);
/// The longest a search for the primary (all sentinels, then the primary itself) may take.
const SEARCH_TIMEOUT: Duration = Duration::from_secs(3);

/// A bad `--redis` URL.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LinkError(String);

/// Where the primary is: one address, or the master a set of sentinels names.
enum Target {
    Direct(Client),
    Sentinel {
        sentinels: tokio::sync::Mutex<SentinelClient>,
        /// `host:port,…` of the sentinels, for error messages.
        addresses: String,
        master: String,
    },
}

/// The connection in use and the primary it reaches.
struct Current {
    generation: u64,
    client: Client,
    conn: MultiplexedConnection,
}

struct Inner {
    target: Target,
    db: i64,
    config: AsyncConnectionConfig,
    current: Mutex<Option<Current>>,
    /// Serialises searches for the primary.
    searching: tokio::sync::Mutex<()>,
    /// The last failed search: when, and why.
    failed: Mutex<Option<(Instant, String)>>,
    generation: AtomicU64,
}

/// A shared handle on the current Redis primary; cheap to clone. As a [`ConnectionLike`] each
/// command goes to the current primary.
#[derive(Clone)]
pub struct RedisLink {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLink")
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

/// One connection to the primary of one generation; a failed command on it drops it from the link.
#[derive(Clone)]
pub struct Primary {
    link: RedisLink,
    generation: u64,
    conn: MultiplexedConnection,
}

/// Whether an error means the connection or the server behind it is no longer the primary.
fn drops_connection(e: &RedisError) -> bool {
    !matches!(
        e.code(),
        Some("NOSCRIPT" | "BUSYGROUP" | "WRONGTYPE" | "ERR")
    ) || e.to_string().contains("READONLY")
}

fn bad(url: &str, why: impl std::fmt::Display) -> LinkError {
    LinkError(format!("'{url}' is not a valid Redis URL: {why}"))
}

impl RedisLink {
    /// Parses `url`: `redis://host:port/db`, `rediss://…`, or
    /// `redis+sentinel://[user:password@]h1:26379,h2:26379/MASTER[?db=N]` (`rediss+sentinel` for
    /// TLS to the sentinels and the primary; the credentials are the primary's). Nothing is
    /// contacted yet. `response_timeout` bounds every command.
    pub fn open(url: &str, response_timeout: Duration) -> Result<RedisLink, LinkError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(response_timeout));
        let (target, db) = if let Some(rest) = url
            .strip_prefix("redis+sentinel://")
            .map(|r| (r, false))
            .or_else(|| url.strip_prefix("rediss+sentinel://").map(|r| (r, true)))
        {
            sentinel_target(url, rest.0, rest.1)?
        } else {
            let client = Client::open(url).map_err(|e| bad(url, e))?;
            let db = client.get_connection_info().redis_settings().db();
            (Target::Direct(client), db)
        };
        Ok(RedisLink {
            inner: Arc::new(Inner {
                target,
                db,
                config,
                current: Mutex::new(None),
                searching: tokio::sync::Mutex::new(()),
                failed: Mutex::new(None),
                generation: AtomicU64::new(0),
            }),
        })
    }

    /// How many times a primary has been (re)connected; changes when the primary may have.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// A connection to the current primary, searching for it when none is held.
    pub async fn primary(&self) -> RedisResult<Primary> {
        if let Some(p) = self.held() {
            return Ok(p);
        }
        let _searching = self.inner.searching.lock().await;
        if let Some(p) = self.held() {
            return Ok(p);
        }
        if let Some((at, why)) = self.inner.failed.lock().clone()
            && at.elapsed() < RETRY_SEARCH
        {
            return Err(RedisError::from((
                redis::ErrorKind::Io,
                "no Redis primary",
                why,
            )));
        }
        match tokio::time::timeout(SEARCH_TIMEOUT, self.search()).await {
            Ok(Ok(current)) => {
                let p = Primary {
                    link: self.clone(),
                    generation: current.generation,
                    conn: current.conn.clone(),
                };
                *self.inner.current.lock() = Some(current);
                *self.inner.failed.lock() = None;
                Ok(p)
            }
            Ok(Err(e)) => {
                let why = e.detail().map_or_else(|| e.to_string(), str::to_string);
                *self.inner.failed.lock() = Some((Instant::now(), why));
                Err(e)
            }
            Err(_) => {
                let why = "the search for the Redis primary timed out".to_string();
                *self.inner.failed.lock() = Some((Instant::now(), why.clone()));
                Err(RedisError::from((
                    redis::ErrorKind::Io,
                    "no Redis primary",
                    why,
                )))
            }
        }
    }

    fn held(&self) -> Option<Primary> {
        self.inner.current.lock().as_ref().map(|c| Primary {
            link: self.clone(),
            generation: c.generation,
            conn: c.conn.clone(),
        })
    }

    /// The client of the current primary, for connections of their own (pub/sub, blocking reads),
    /// with the generation it belongs to.
    pub async fn client(&self) -> RedisResult<(u64, Client)> {
        self.primary().await?;
        let current = self.inner.current.lock();
        match current.as_ref() {
            Some(c) => Ok((c.generation, c.client.clone())),
            None => Err(RedisError::from((redis::ErrorKind::Io, "no Redis primary"))),
        }
    }

    /// A connection of its own to the current primary (for a blocking command), with `config`.
    pub async fn dedicated(&self, config: &AsyncConnectionConfig) -> RedisResult<Primary> {
        let (generation, client) = self.client().await?;
        let conn = client
            .get_multiplexed_async_connection_with_config(config)
            .await
            .inspect_err(|_| self.drop_generation(generation))?;
        Ok(Primary {
            link: self.clone(),
            generation,
            conn,
        })
    }

    /// A pub/sub connection to the current primary, with its generation.
    pub async fn pubsub(&self) -> RedisResult<(u64, PubSub)> {
        let (generation, client) = self.client().await?;
        let pubsub = client
            .get_async_pubsub()
            .await
            .inspect_err(|_| self.drop_generation(generation))?;
        Ok((generation, pubsub))
    }

    /// Forgets the connection of `generation` (if still held): the next command searches anew.
    pub fn drop_generation(&self, generation: u64) {
        let mut current = self.inner.current.lock();
        if current.as_ref().is_some_and(|c| c.generation == generation) {
            *current = None;
        }
    }

    async fn search(&self) -> RedisResult<Current> {
        let client = match &self.inner.target {
            Target::Direct(client) => client.clone(),
            Target::Sentinel {
                sentinels,
                addresses,
                master,
            } => sentinels.lock().await.async_get_client().await.map_err(|e| {
                RedisError::from((
                    redis::ErrorKind::Io,
                    "no Redis primary",
                    format!("sentinels {addresses} name no reachable primary for master '{master}': {e}"),
                ))
            })?,
        };
        let conn = client
            .get_multiplexed_async_connection_with_config(&self.inner.config)
            .await?;
        let generation = self.inner.generation.fetch_add(1, Ordering::AcqRel) + 1;
        if let Target::Sentinel { master, .. } = &self.inner.target {
            tracing::info!(
                master,
                primary = %client.get_connection_info().addr(),
                generation,
                "connected to the Redis primary"
            );
        }
        Ok(Current {
            generation,
            client,
            conn,
        })
    }

    /// Checks the sentinels and the primary once, for startup: a clear error when no sentinel
    /// answers or none knows the master.
    pub async fn check(&self) -> Result<(), LinkError> {
        if let Target::Sentinel {
            sentinels,
            addresses,
            master,
        } = &self.inner.target
        {
            let mut s = sentinels.lock().await;
            let client = tokio::time::timeout(SEARCH_TIMEOUT, s.async_get_sentinel_client())
                .await
                .map_err(|_| LinkError(format!("no sentinel answered at {addresses} (timed out)")))?
                .map_err(|e| LinkError(format!("no sentinel answered at {addresses}: {e}")))?;
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&self.inner.config)
                .await
                .map_err(|e| LinkError(format!("no sentinel answered at {addresses}: {e}")))?;
            let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(master)
                .query_async(&mut conn)
                .await
                .map_err(|e| LinkError(format!("sentinel at {addresses}: {e}")))?;
            if addr.is_none() {
                return Err(LinkError(format!(
                    "the sentinels at {addresses} know no master named '{master}'"
                )));
            }
        }
        self.primary()
            .await
            .map(drop)
            .map_err(|e| LinkError(e.to_string()))
    }
}

fn sentinel_target(url: &str, rest: &str, tls: bool) -> Result<(Target, i64), LinkError> {
    let (authority, path) = rest
        .split_once('/')
        .ok_or_else(|| bad(url, "no master name (…/MASTER)"))?;
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let master = path.trim_end_matches('/');
    if master.is_empty() || master.contains('/') {
        return Err(bad(url, "no master name (…/MASTER)"));
    }
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let mut db = 0i64;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("db", n)) => {
                db = n
                    .parse()
                    .ok()
                    .filter(|n| *n >= 0)
                    .ok_or_else(|| bad(url, "db must be a number"))?;
            }
            _ => return Err(bad(url, format!("unknown parameter '{pair}' (only db=N)"))),
        }
    }
    let scheme = if tls { "rediss" } else { "redis" };
    let mut sentinels: Vec<ConnectionInfo> = Vec::new();
    for host in hosts.split(',') {
        if host.is_empty() {
            return Err(bad(url, "an empty sentinel address"));
        }
        let host = if host.contains(':') {
            host.to_string()
        } else {
            format!("{host}:26379")
        };
        let info = format!("{scheme}://{host}")
            .into_connection_info()
            .map_err(|e| bad(url, e))?;
        sentinels.push(info);
    }
    let mut redis = redis::RedisConnectionInfo::default()
        .set_db(db)
        .set_protocol(redis::ProtocolVersion::RESP2);
    if let Some(userinfo) = userinfo {
        let (user, password) = userinfo.split_once(':').unwrap_or(("", userinfo));
        let decode = |s: &str| {
            percent_decode(s).ok_or_else(|| bad(url, "bad percent-encoding in credentials"))
        };
        if !user.is_empty() {
            redis = redis.set_username(decode(user)?);
        }
        if !password.is_empty() {
            redis = redis.set_password(decode(password)?);
        }
    }
    let mut node = SentinelNodeConnectionInfo::default().set_redis_connection_info(redis);
    if tls {
        node = node.set_tls_mode(redis::TlsMode::Secure);
    }
    let addresses = sentinels
        .iter()
        .map(|s| s.addr().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let client = SentinelClient::build(sentinels, master, Some(node), SentinelServerType::Master)
        .map_err(|e| bad(url, e))?;
    Ok((
        Target::Sentinel {
            sentinels: tokio::sync::Mutex::new(client),
            addresses,
            master: master.to_string(),
        },
        db,
    ))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl std::fmt::Debug for Primary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Primary")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Primary {
    /// The generation of the link this connection belongs to.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn observe<T>(&self, result: RedisResult<T>) -> RedisResult<T> {
        if let Err(e) = &result
            && drops_connection(e)
        {
            self.link.drop_generation(self.generation);
        }
        result
    }
}

impl ConnectionLike for Primary {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = self.conn.req_packed_command(cmd).await;
            self.observe(result)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = self.conn.req_packed_commands(pipeline, offset, count).await;
            self.observe(result)
        })
    }

    fn get_db(&self) -> i64 {
        self.link.inner.db
    }
}

impl ConnectionLike for RedisLink {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move { self.primary().await?.req_packed_command(cmd).await })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            self.primary()
                .await?
                .req_packed_commands(pipeline, offset, count)
                .await
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.db
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_parse_and_bad_ones_say_why() {
        let t = Duration::from_secs(1);
        assert!(
            RedisLink::open(
                "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster",
                t
            )
            .is_ok()
        );
        let link = RedisLink::open("redis+sentinel://:pw@h1,h2:1/m?db=3", t).unwrap();
        assert_eq!(link.inner.db, 3);
        assert!(RedisLink::open("rediss+sentinel://h1:26379/m", t).is_ok());
        for (url, why) in [
            ("redis+sentinel://h1:26379", "no master name"),
            ("redis+sentinel://h1:26379/", "no master name"),
            ("redis+sentinel://h1:26379,/m", "empty sentinel address"),
            ("redis+sentinel://h1/m?db=x", "db must be a number"),
            ("redis+sentinel://h1/m?foo=1", "unknown parameter 'foo=1'"),
        ] {
            let e = RedisLink::open(url, t).unwrap_err().to_string();
            assert!(e.contains(why), "{url}: {e}");
        }
        assert_eq!(percent_decode("a%40b").as_deref(), Some("a@b"));
    }
}
