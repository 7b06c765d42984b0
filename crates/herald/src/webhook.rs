//! Webhooks: every event of history whose topics match a hook's selectors (`--webhook-topics`,
//! default `$presence/**`) is POSTed to the hook's URL as JSON, signed with `Herald-Signature`.
//! The rule it keeps: in event order, at least once. A hook's deliverer reads history after its
//! cursor, retries an event (exponential backoff with jitter, capped) until the receiver answers
//! 2xx, and only then moves the cursor on, before the next delivery; with `--data-dir` the cursor
//! is kept in `DIR/webhook-<hash of URL>.cursor` (one `pwrite` and `fdatasync` per delivery: see
//! [`cursor`] for the format), and in cluster mode in Redis, so a restart or a node's death
//! resumes where delivery stopped, repeating at most the delivery in flight. In a cluster one
//! node at a time delivers each hook: the holder of its Redis lease, renewed before every attempt.
//! Events that fell out of history before delivery are reported to the receiver as one
//! `herald.gap` delivery (with retention rules, only events the hook could receive: it reads
//! history with its selectors' interest, as a stream).

mod cursor;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cursor::CursorFile;
use herald_core::{Chunk, Cluster, Event, EventId, Hub, ReadFrom, Selector};
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

/// Events read from history per step.
const STEP: usize = 256;
/// First retry delay; doubled per failure up to [`BACKOFF_MAX`], each with jitter.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long a caught-up deliverer waits before looking at history again.
const IDLE_POLL: Duration = Duration::from_millis(20);
/// How long one POST may take.
const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// A cluster node's hold on a hook: lost after this long without renewal.
const LEASE_TTL: Duration = Duration::from_secs(10);
/// Renewed when older than this (so an idle deliverer does not ask Redis 50 times a second).
const LEASE_RENEW: Duration = Duration::from_secs(2);

/// One hook: where to, the signing secret, which topics.
#[derive(Clone, PartialEq)]
pub struct Hook {
    pub url: String,
    pub secret: Option<String>,
    pub topics: Vec<Selector>,
}

/// The secret is never shown (a `Config` may be logged).
impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hook")
            .field("url", &self.url)
            .field("secret", &self.secret.as_ref().map(|_| "<hidden>"))
            .field("topics", &self.topics)
            .finish()
    }
}

/// A hook's progress, read by `/metrics`.
#[derive(Debug, Default)]
pub struct Progress {
    pub url: String,
    /// Events (and gap notices) the receiver accepted.
    pub delivered: AtomicU64,
    /// Attempts that failed (an error, a timeout or a non-2xx answer).
    pub failures: AtomicU64,
    /// Milliseconds between the oldest undelivered event's publishing and now; 0 when caught up.
    pub lag_ms: AtomicU64,
}

/// `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub fn signature(secret: &str, t: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={t},v1={hex}")
}

/// Starts one deliverer per hook; `data_dir` keeps their cursors, or the cluster does (which also
/// lets one node at a time deliver each hook). With no hooks it builds nothing (so a binary alone
/// in an empty root, with no CA certificates to load, still serves); an HTTP client that cannot be
/// built (no CA certificates on this system) is an error for startup to report.
pub fn start(
    hub: &Hub,
    hooks: Vec<Hook>,
    data_dir: Option<&Path>,
    cluster: Option<Arc<Cluster>>,
) -> Result<Vec<Arc<Progress>>, reqwest::Error> {
    if hooks.is_empty() {
        return Ok(Vec::new());
    }
    let client = reqwest::Client::builder().timeout(POST_TIMEOUT).build()?;
    Ok(hooks
        .into_iter()
        .map(|hook| {
            let progress = Arc::new(Progress {
                url: hook.url.clone(),
                ..Progress::default()
            });
            let name = format!("webhook-{:016x}", fnv(&hook.url));
            let keeper = match (&cluster, data_dir) {
                (Some(cluster), _) => Keeper::Cluster {
                    cluster: cluster.clone(),
                    name,
                    renewed: parking_lot::Mutex::new(None),
                },
                (None, Some(dir)) => Keeper::File(Arc::new(parking_lot::Mutex::new(
                    CursorFile::new(dir.join(format!("{name}.cursor"))),
                ))),
                (None, None) => Keeper::Memory,
            };
            tokio::spawn(deliver(
                hub.clone(),
                client.clone(),
                hook,
                keeper,
                progress.clone(),
            ));
            progress
        })
        .collect())
}

/// Where a hook's cursor is kept, and whether this node may deliver it.
enum Keeper {
    Memory,
    /// Read and written on the blocking pool (a save waits for the disk), one at a time: only
    /// the hook's own deliverer uses it, awaiting each.
    File(Arc<parking_lot::Mutex<CursorFile>>),
    Cluster {
        cluster: Arc<Cluster>,
        name: String,
        /// When the lease was last renewed.
        renewed: parking_lot::Mutex<Option<tokio::time::Instant>>,
    },
}

impl Keeper {
    /// Whether this node delivers the hook now (always, but in a cluster: while it holds the lease).
    async fn hold(&self) -> bool {
        let Keeper::Cluster {
            cluster,
            name,
            renewed,
        } = self
        else {
            return true;
        };
        let now = tokio::time::Instant::now();
        if renewed.lock().is_some_and(|at| now - at < LEASE_RENEW) {
            return true;
        }
        let held = cluster
            .hold_lease(name, LEASE_TTL)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "webhook: the lease could not be renewed");
                false
            });
        *renewed.lock() = held.then_some(now);
        held
    }

    fn parse(text: &str) -> Option<ReadFrom> {
        let text = text.trim();
        match text.strip_prefix("since:") {
            Some(ms) => ms.parse().ok().map(ReadFrom::Since),
            None => text.parse().ok().map(|id| ReadFrom::After(EventId(id))),
        }
    }

    /// The cursor: the last delivered id, or `since:<ms>` before the first delivery (the hook's
    /// first start), so a restart never skips what was published in between. `None`: there is
    /// none yet. A cursor that is there but cannot be read (a damaged file, a Redis error, text
    /// that is no cursor) delivers again from the oldest event history keeps: repeating is
    /// better than losing.
    async fn load(&self) -> Option<ReadFrom> {
        let text = match self {
            Keeper::Memory => return None,
            Keeper::File(file) => blocking(file, CursorFile::load)
                .await
                .map_err(|e| e.to_string()),
            Keeper::Cluster { cluster, name, .. } => {
                cluster.load(name).await.map_err(|e| e.to_string())
            }
        };
        let unreadable = |why: &str| {
            tracing::warn!(error = %why, "webhook: the cursor cannot be read: delivering again from the oldest event in history");
            Some(ReadFrom::Oldest)
        };
        match text {
            Ok(None) => None,
            Ok(Some(text)) => {
                Self::parse(&text).or_else(|| unreadable(&format!("not a cursor: {text:?}")))
            }
            Err(e) => unreadable(&e),
        }
    }

    async fn save(&self, cursor: &str, only_new: bool) {
        let failed = match self {
            Keeper::Memory => return,
            Keeper::File(file) => {
                let cursor = cursor.to_owned();
                blocking(file, move |f| f.save(&cursor))
                    .await
                    .err()
                    .map(|e| e.to_string())
            }
            Keeper::Cluster { cluster, name, .. } => cluster
                .keep(name, cursor, only_new)
                .await
                .err()
                .map(|e| e.to_string()),
        };
        if let Some(e) = failed {
            tracing::warn!(error = %e, "webhook: the cursor could not be saved");
        }
    }
}

/// Runs `op` on the cursor file on tokio's blocking pool, so a worker thread does not wait for
/// the disk.
async fn blocking<T: Send + 'static>(
    file: &Arc<parking_lot::Mutex<CursorFile>>,
    op: impl FnOnce(&mut CursorFile) -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let file = file.clone();
    tokio::task::spawn_blocking(move || op(&mut file.lock()))
        .await
        .map_err(std::io::Error::other)?
}

/// FNV-1a: a stable file name per URL.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn deliver(
    hub: Hub,
    client: reqwest::Client,
    hook: Hook,
    keeper: Keeper,
    progress: Arc<Progress>,
) {
    let mut announced = false;
    'lease: loop {
        if !keeper.hold().await {
            progress.lag_ms.store(0, Ordering::Relaxed);
            tokio::time::sleep(LEASE_RENEW).await;
            continue;
        }
        let mut from = match keeper.load().await {
            Some(from) => from,
            // No cursor yet: from now on (unless another node just started it).
            None => {
                let since = format!("since:{}", now_ms());
                keeper.save(&since, true).await;
                keeper
                    .load()
                    .await
                    .or(Keeper::parse(&since))
                    .unwrap_or(ReadFrom::Since(now_ms()))
            }
        };
        if !announced {
            tracing::info!(url = %hook.url, ?from, "webhook: delivering");
            announced = true;
        }
        // As a stream's: with retention rules, only drops of events the hook could receive are
        // its gaps; going on after a read, what was dropped before it is none.
        let mut interest = hub.history_interest(&hook.topics);
        loop {
            if !keeper.hold().await {
                continue 'lease;
            }
            let chunk: Chunk = match hub.read_history_for(from, STEP, interest).await {
                Ok(chunk) => chunk,
                Err(e) => {
                    tracing::warn!(url = %hook.url, error = %e, "webhook: history unavailable");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            interest = interest.after_drops(chunk.drops);
            if let Some(gap) = chunk.gap {
                let after = match from {
                    ReadFrom::After(id) => Some(id.to_string()),
                    _ => None,
                };
                let data =
                    json!({"lastEventId": after, "oldest": gap.oldest.map(|o| o.to_string())});
                let body = json!({
                    "id": null,
                    "topics": [],
                    "event": "herald.gap",
                    "data": data.to_string(),
                    "publishedAt": now_ms(),
                });
                if !post(&client, &hook, &body, &progress, &keeper).await {
                    continue 'lease;
                }
            }
            let Some(last) = chunk.events.last().map(|e| e.id) else {
                progress.lag_ms.store(0, Ordering::Relaxed);
                tokio::time::sleep(IDLE_POLL).await;
                continue;
            };
            for event in &chunk.events {
                if !wanted(&hook, event) {
                    continue;
                }
                progress.lag_ms.store(
                    now_ms().saturating_sub(event.published_at_ms),
                    Ordering::Relaxed,
                );
                if !post(&client, &hook, &body_of(event), &progress, &keeper).await {
                    continue 'lease;
                }
                keeper.save(&event.id.to_string(), false).await;
            }
            // Past the events not wanted too (unless the last one was delivered, and so saved).
            if !chunk.events.last().is_some_and(|e| wanted(&hook, e)) {
                keeper.save(&last.to_string(), false).await;
            }
            from = ReadFrom::After(last);
        }
    }
}

fn wanted(hook: &Hook, event: &Event) -> bool {
    event
        .targets
        .topics
        .iter()
        .any(|t| hook.topics.iter().any(|s| s.matches(t)))
}

fn body_of(event: &Event) -> serde_json::Value {
    json!({
        "id": event.id.to_string(),
        "topics": event.targets.topics.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
        "event": event.event_type.as_ref().map_or("message", |t| t.as_str()),
        "data": event.data.as_str(),
        "publishedAt": event.published_at_ms,
    })
}

/// POSTs `body` until the receiver answers 2xx (true), or this node loses the hook's lease
/// (false: another node goes on from the kept cursor).
async fn post(
    client: &reqwest::Client,
    hook: &Hook,
    body: &serde_json::Value,
    progress: &Progress,
    keeper: &Keeper,
) -> bool {
    let bytes = body.to_string().into_bytes();
    let mut failures = 0u32;
    loop {
        if !keeper.hold().await {
            return false;
        }
        let mut request = client
            .post(&hook.url)
            .header("content-type", "application/json")
            .body(bytes.clone());
        if let Some(secret) = &hook.secret {
            let t = now_ms() / 1000;
            request = request.header("herald-signature", signature(secret, t, &bytes));
        }
        match request.send().await {
            Ok(r) if r.status().is_success() => {
                progress.delivered.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            Ok(r) => tracing::debug!(url = %hook.url, status = %r.status(), "webhook: refused"),
            Err(e) => tracing::debug!(url = %hook.url, error = %e, "webhook: failed"),
        }
        progress.failures.fetch_add(1, Ordering::Relaxed);
        failures = failures.saturating_add(1);
        // Slept in steps shorter than the lease, renewing it in between.
        let mut wait = backoff(failures);
        while !wait.is_zero() {
            let step = wait.min(LEASE_RENEW);
            tokio::time::sleep(step).await;
            wait -= step;
            if !keeper.hold().await {
                return false;
            }
        }
    }
}

/// The wait after the `n`th failure in a row: 100 ms doubled per failure, capped at 30 s, then
/// a random point in its upper half (so many hooks do not retry in step).
fn backoff(n: u32) -> Duration {
    let full = BACKOFF_FIRST
        .saturating_mul(1u32 << n.saturating_sub(1).min(16))
        .min(BACKOFF_MAX);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let jitter = f64::from(nanos % 1000) / 1000.0;
    full.mul_f64(0.5 + jitter / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_time_dot_body() {
        // Computed independently: Python's hmac.new(b"Jefe", b'1700000000.{"a":1}', sha256).
        assert_eq!(
            signature("Jefe", 1_700_000_000, br#"{"a":1}"#),
            "t=1700000000,v1=fa5f6481efc59da48b19c9dc10196c9953e5651f8304b3a318b6b87d70272e0a"
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        for n in 1..40 {
            let d = backoff(n);
            let full = BACKOFF_FIRST
                .saturating_mul(1u32 << (n - 1).min(16))
                .min(BACKOFF_MAX);
            assert!(d >= full / 2 && d <= full, "{n}: {d:?} of {full:?}");
        }
        assert!(backoff(30) <= BACKOFF_MAX);
    }
}
