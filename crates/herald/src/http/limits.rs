//! Limits on what one client may hold or do: streams per IP and per user, publish rate (token
//! buckets per key, user or IP), request head size and URL length. Each refusal is a JSON error.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Extensions, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use herald_core::UserId;
use parking_lot::Mutex;

use super::{ApiError, AppState};
pub use crate::config::Limits;
use crate::error_code::ErrorCode;
use crate::ipnet::canonical;

/// The client's address: the peer, or, when the peer is a trusted proxy, the nearest address in
/// `X-Forwarded-For` that is not a trusted proxy. `None` when served without connection info
/// (nested in an app): then per-IP limits do not apply.
pub(crate) fn client_ip(
    limits: &Limits,
    extensions: &Extensions,
    headers: &HeaderMap,
) -> Option<IpAddr> {
    let peer = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| canonical(c.0.ip()))?;
    Some(forwarded_client(limits, peer, headers))
}

fn forwarded_client(limits: &Limits, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    let trusted = |ip: IpAddr| limits.trusted_proxies.iter().any(|n| n.contains(ip));
    if !trusted(peer) {
        return peer;
    }
    let hops: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().parse::<IpAddr>().map(canonical))
        .collect::<Result<_, _>>()
        // A forged or broken header: trust only what we saw ourselves.
        .unwrap_or_default();
    let mut client = peer;
    for hop in hops.into_iter().rev() {
        client = hop;
        if !trusted(hop) {
            break;
        }
    }
    client
}

/// Open streams per IP and per user.
#[derive(Debug, Default)]
pub(crate) struct Connections {
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    per_user: Mutex<HashMap<UserId, usize>>,
}

/// Held by a stream's body; gives its slots back when the stream ends.
#[derive(Debug)]
pub(crate) struct ConnectionSlot {
    owner: Arc<Connections>,
    ip: Option<IpAddr>,
    user: Option<UserId>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            release(&mut self.owner.per_ip.lock(), &ip);
        }
        if let Some(user) = &self.user {
            release(&mut self.owner.per_user.lock(), user);
        }
    }
}

fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Connections {
    /// Takes a slot for a new stream of `ip` and `user`, or says which limit it would break.
    pub(crate) fn acquire(
        self: &Arc<Self>,
        limits: &Limits,
        ip: Option<IpAddr>,
        user: Option<&UserId>,
    ) -> Result<ConnectionSlot, &'static str> {
        let mut per_ip = self.per_ip.lock();
        let mut per_user = self.per_user.lock();
        if let Some(ip) = ip
            && per_ip.get(&ip).copied().unwrap_or(0) >= limits.per_ip
        {
            return Err("connections_per_ip");
        }
        if let Some(u) = user
            && per_user.get(u).copied().unwrap_or(0) >= limits.per_user
        {
            return Err("connections_per_user");
        }
        if let Some(ip) = ip {
            *per_ip.entry(ip).or_default() += 1;
        }
        if let Some(u) = user {
            *per_user.entry(u.clone()).or_default() += 1;
        }
        Ok(ConnectionSlot {
            owner: self.clone(),
            ip,
            user: user.cloned(),
        })
    }
}

/// Token buckets of publishers, keyed by publish key, user or IP.
#[derive(Debug, Default)]
pub(crate) struct PublishRate {
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl PublishRate {
    /// Takes one token from `key`'s bucket, or returns the seconds until one is there.
    pub(crate) fn take(&self, key: &str, rate: f64, burst: f64, now: Instant) -> Result<(), u64> {
        let mut buckets = self.buckets.lock();
        if buckets.len() > 100_000 {
            // Forget the buckets that have refilled: they behave exactly as new ones.
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let b = buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - b.tokens) / rate).ceil().max(1.0) as u64)
        }
    }
}

/// Refuses a request whose URL or head is too large, before any handler runs.
pub(crate) async fn check_head(
    State(app): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let limits = &app.limits;
    let url = request.uri().to_string().len();
    if url > limits.max_url {
        app.metrics.limited("url_too_long");
        return ApiError::new(
            ErrorCode::UriTooLong,
            format!(
                "the URL is {url} bytes long, the limit is {}",
                limits.max_url
            ),
        )
        .into_response();
    }
    let head: usize = url
        + request
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if head > limits.max_header_bytes {
        app.metrics.limited("header_too_large");
        return ApiError::new(
            ErrorCode::HeaderTooLarge,
            format!(
                "the request head is {head} bytes, the limit is {}",
                limits.max_header_bytes
            ),
        )
        .into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use std::time::Duration;

    #[test]
    fn forwarded_for_is_read_only_from_trusted_proxies() {
        let limits = Limits {
            trusted_proxies: vec!["127.0.0.1".parse().unwrap(), "10.0.0.0/8".parse().unwrap()],
            ..Limits::default()
        };
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 1.2.3.4, 10.0.0.5"),
        );
        let local = "127.0.0.1".parse().unwrap();
        let outsider = "9.9.9.9".parse().unwrap();
        assert_eq!(
            forwarded_client(&limits, local, &h),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        assert_eq!(forwarded_client(&limits, outsider, &h), outsider);
        h.insert("x-forwarded-for", HeaderValue::from_static("garbage"));
        assert_eq!(forwarded_client(&limits, local, &h), local);
    }

    #[test]
    fn token_buckets_refill() {
        let r = PublishRate::default();
        let t0 = Instant::now();
        assert!(r.take("k", 1.0, 2.0, t0).is_ok());
        assert!(r.take("k", 1.0, 2.0, t0).is_ok());
        assert_eq!(r.take("k", 1.0, 2.0, t0), Err(1));
        assert!(r.take("other", 1.0, 2.0, t0).is_ok());
        assert!(r.take("k", 1.0, 2.0, t0 + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn connection_slots_are_given_back() {
        let c = Arc::new(Connections::default());
        let limits = Limits {
            per_ip: 1,
            per_user: 1,
            ..Limits::default()
        };
        let ip = Some("1.2.3.4".parse().unwrap());
        let u = UserId::new("u").unwrap();
        let slot = c.acquire(&limits, ip, Some(&u)).unwrap();
        assert_eq!(
            c.acquire(&limits, ip, None).unwrap_err(),
            "connections_per_ip"
        );
        assert_eq!(
            c.acquire(&limits, None, Some(&u)).unwrap_err(),
            "connections_per_user"
        );
        drop(slot);
        assert!(c.acquire(&limits, ip, Some(&u)).is_ok());
    }
}
