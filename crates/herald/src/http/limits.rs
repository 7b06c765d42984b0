//! Limits on what one client may hold or do: streams per IP and per user, publish rate (token
//! buckets per key, user or IP), request head size and URL length. Each refusal is a JSON error.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// The client's address as per-IP limits count it: the peer, or, when the peer is a trusted
/// proxy, the nearest address in `X-Forwarded-For` that is not a trusted proxy; an IPv6 address
/// stands for its /64. `None` when served without connection info (nested in an app): then per-IP
/// limits do not apply.
pub(crate) fn client_ip(
    limits: &Limits,
    extensions: &Extensions,
    headers: &HeaderMap,
) -> Option<IpAddr> {
    let peer = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| canonical(c.0.ip()))?;
    Some(network_of(forwarded_client(limits, peer, headers)))
}

/// An IPv4 address, or the /64 of an IPv6 one: a single subscriber line or host gets a whole /64,
/// so rotating addresses within it must gain nothing against per-IP limits.
fn network_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

fn forwarded_client(limits: &Limits, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    let trusted = |ip: IpAddr| limits.trusted_proxies.iter().any(|n| n.contains(ip));
    if !trusted(peer) {
        return peer;
    }
    let values: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    // From the right: each hop was appended by the proxy after it. The first address that is not
    // a trusted proxy is the client; what lies left of it was written by the client and is never
    // read, so junk there changes nothing. A hop a trusted proxy wrote that is not an address
    // ends the walk at the last address it could vouch for.
    let mut client = peer;
    for hop in values.iter().rev().flat_map(|v| v.rsplit(',')) {
        let Some(hop) = parse_hop(hop) else {
            break;
        };
        client = hop;
        if !trusted(hop) {
            break;
        }
    }
    client
}

/// One `X-Forwarded-For` element: an address, also with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_hop(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    s.parse::<IpAddr>()
        .or_else(|_| s.parse::<SocketAddr>().map(|a| a.ip()))
        .ok()
        .map(canonical)
}

/// Open streams per IP and per user.
#[derive(Debug, Default)]
pub(crate) struct Connections {
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    per_user: Mutex<HashMap<UserId, usize>>,
}

/// Held by a stream's body; gives its slots back when the stream ends. Nothing is counted for a
/// limit that is not set, and with none set a stream holds an empty slot: one pointer, not the
/// 48 bytes of a counted one (every idle stream carries it, see "Memory per idle stream").
#[derive(Debug)]
pub(crate) struct ConnectionSlot(Option<Box<Counted>>);

#[derive(Debug)]
struct Counted {
    owner: Arc<Connections>,
    ip: Option<IpAddr>,
    user: Option<UserId>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let Some(counted) = self.0.take() else { return };
        if let Some(ip) = counted.ip {
            release(&mut counted.owner.per_ip.lock(), &ip);
        }
        if let Some(user) = &counted.user {
            release(&mut counted.owner.per_user.lock(), user);
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
        // A limit that is not set needs no count.
        let ip = ip.filter(|_| limits.per_ip != usize::MAX);
        let user = user.filter(|_| limits.per_user != usize::MAX);
        if ip.is_none() && user.is_none() {
            return Ok(ConnectionSlot(None));
        }
        if let Some(ip) = ip {
            *per_ip.entry(ip).or_default() += 1;
        }
        if let Some(u) = user {
            *per_user.entry(u.clone()).or_default() += 1;
        }
        Ok(ConnectionSlot(Some(Box::new(Counted {
            owner: self.clone(),
            ip,
            user: user.cloned(),
        }))))
    }
}

/// Token buckets of publishers, keyed by publish key, user or IP.
#[derive(Debug, Default)]
pub(crate) struct PublishRate {
    buckets: Mutex<Buckets>,
}

#[derive(Debug, Default)]
struct Buckets {
    by_key: HashMap<String, Bucket>,
    /// When full buckets were last forgotten: at most once a second, so a publish past
    /// `SWEEP_ABOVE` keys does not scan them all each time.
    swept: Option<Instant>,
}

/// Above this many buckets, full ones (which behave exactly as new ones) are forgotten.
const SWEEP_ABOVE: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl PublishRate {
    /// Takes `n` tokens (one per published event) at once, or none and returns the seconds until
    /// they are there. `n` is at most `burst` (a larger batch can never pass: callers refuse it).
    pub(crate) fn take_n(
        &self,
        key: &str,
        n: f64,
        rate: f64,
        burst: f64,
        now: Instant,
    ) -> Result<(), u64> {
        let mut buckets = self.buckets.lock();
        let Buckets { by_key, swept } = &mut *buckets;
        if by_key.len() > SWEEP_ABOVE
            && swept.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
        {
            by_key.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
            *swept = Some(now);
        }
        let b = by_key.entry(key.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= n {
            b.tokens -= n;
            Ok(())
        } else {
            Err(((n - b.tokens) / rate).ceil().max(1.0) as u64)
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
    if let (Some(allowed), Some(host)) = (&limits.allowed_hosts, request.headers().get("host")) {
        let name = crate::host::host_name(host.to_str().unwrap_or(""));
        if !allowed.iter().any(|p| p.matches(&name)) {
            app.metrics.limited("host_not_allowed");
            return ApiError::new(
                ErrorCode::HostNotAllowed,
                format!("this hub does not answer for host '{name}' (see --allowed-host)"),
            )
            .into_response();
        }
    }
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
        // Issue 12: one junk element the client wrote made the whole header count as the proxy.
        let client = "1.2.3.4".parse::<IpAddr>().unwrap();
        for junk in [
            "garbage, 1.2.3.4",
            "6.6.6.6, <script>, 1.2.3.4, 10.0.0.5",
            ", 1.2.3.4:5678",
            "unknown,1.2.3.4 , 10.0.0.7",
        ] {
            h.insert("x-forwarded-for", HeaderValue::from_static(junk));
            assert_eq!(forwarded_client(&limits, local, &h), client, "{junk}");
        }
        // Several headers read as one list, in order.
        h.insert("x-forwarded-for", HeaderValue::from_static("junk, 6.6.6.6"));
        h.append("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        assert_eq!(forwarded_client(&limits, local, &h), client);
    }

    #[test]
    fn token_buckets_refill() {
        let r = PublishRate::default();
        let t0 = Instant::now();
        assert!(r.take_n("k", 1.0, 1.0, 2.0, t0).is_ok());
        assert!(r.take_n("k", 1.0, 1.0, 2.0, t0).is_ok());
        assert_eq!(r.take_n("k", 1.0, 1.0, 2.0, t0), Err(1));
        assert!(r.take_n("other", 1.0, 1.0, 2.0, t0).is_ok());
        assert!(
            r.take_n("k", 1.0, 1.0, 2.0, t0 + Duration::from_secs(1))
                .is_ok()
        );
    }

    /// Reproduces (issue 12): past 100,000 buckets every publish scanned them all (median
    /// publish 0.30 → 5.85 ms). Now the sweep runs at most once a second.
    #[test]
    fn buckets_are_swept_at_most_once_a_second() {
        let r = PublishRate::default();
        let t0 = Instant::now();
        for i in 0..=SWEEP_ABOVE {
            r.take_n(&format!("ip:{i}"), 1.0, 1.0, 2.0, t0).unwrap();
        }
        r.take_n("one-more", 1.0, 1.0, 2.0, t0).unwrap();
        let swept = r.buckets.lock().swept;
        assert_eq!(swept, Some(t0));
        // Within the second no sweep runs again, however many publishes come.
        let t1 = t0 + Duration::from_millis(500);
        r.take_n("again", 1.0, 1.0, 2.0, t1).unwrap();
        assert_eq!(r.buckets.lock().swept, Some(t0));
        // A second later, the buckets that refilled are forgotten.
        let t2 = t0 + Duration::from_secs(3);
        r.take_n("later", 1.0, 1.0, 2.0, t2).unwrap();
        let b = r.buckets.lock();
        assert_eq!(b.swept, Some(t2));
        assert!(b.by_key.len() < 10, "{}", b.by_key.len());
    }

    #[test]
    fn batches_take_one_token_per_event() {
        let r = PublishRate::default();
        let t0 = Instant::now();
        assert!(r.take_n("k", 5.0, 1.0, 10.0, t0).is_ok());
        assert_eq!(r.take_n("k", 6.0, 1.0, 10.0, t0), Err(1));
        assert!(r.take_n("k", 5.0, 1.0, 10.0, t0).is_ok());
        assert_eq!(r.take_n("k", 1.0, 1.0, 10.0, t0), Err(1));
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

    /// Without limits nothing is counted and a slot is one empty pointer.
    #[test]
    fn without_limits_a_slot_holds_nothing() {
        assert_eq!(std::mem::size_of::<ConnectionSlot>(), 8);
        let c = Arc::new(Connections::default());
        let ip = Some("1.2.3.4".parse().unwrap());
        let u = UserId::new("u").unwrap();
        let slots: Vec<_> = (0..3)
            .map(|_| c.acquire(&Limits::default(), ip, Some(&u)).unwrap())
            .collect();
        assert!(slots.iter().all(|s| s.0.is_none()));
        assert!(c.per_ip.lock().is_empty() && c.per_user.lock().is_empty());
        let only_ip = Limits {
            per_ip: 5,
            ..Limits::default()
        };
        let slot = c.acquire(&only_ip, ip, Some(&u)).unwrap();
        assert_eq!(c.per_ip.lock().len(), 1);
        assert!(c.per_user.lock().is_empty());
        drop(slot);
        assert!(c.per_ip.lock().is_empty());
    }
}
