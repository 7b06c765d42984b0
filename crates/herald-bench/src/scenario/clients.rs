//! Client side shared by the scenarios: many SSE subscribers (spread over source addresses,
//! connected with bounded concurrency), per-subscriber counters, latency histograms, publish
//! payloads that carry a sequence number and a timestamp, and progress bars.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::{Row, emit};
use crate::http::Conn;
use crate::server::Server;
use crate::sse::{Parser, field};

/// Connections per source address (each address has ~28k ephemeral ports).
const PER_SOURCE: usize = 10_000;
/// Connections kept below the open-file limit of this process.
const FD_MARGIN: u64 = 300;

/// Microseconds since the Unix epoch (comparable across processes on this machine).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A process-wide monotonic origin, so instants fit in an atomic.
pub fn mono_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// The runtime publishers run on: one thread of its own, so that the time a publish answer
/// takes is the server's, not the wait behind thousands of subscriber tasks of this process.
pub fn publisher_runtime() -> &'static tokio::runtime::Handle {
    static HANDLE: OnceLock<tokio::runtime::Handle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("publisher runtime");
        let handle = rt.handle().clone();
        std::thread::Builder::new()
            .name("publishers".into())
            .spawn(move || rt.block_on(std::future::pending::<()>()))
            .expect("publisher thread");
        handle
    })
}

/// Connections opened so far by this process: each set of subscribers continues on fresh source
/// addresses, away from the TIME_WAIT sockets of the previous target.
static OPENED: AtomicUsize = AtomicUsize::new(0);

/// Source address for the `i`th connection of a set that starts at `base`: 127.0.0.2, .3, ...
/// in blocks of `PER_SOURCE`, from an offset drawn from the process id.
pub fn source_ip(base: usize, i: usize) -> IpAddr {
    let start = std::process::id() as usize % 250;
    let n = (start + (base + i) / PER_SOURCE) % 250;
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + n as u8))
}

/// Fails early when `n` connections would not fit under this process's open-file limit.
pub fn check_fd_budget(n: usize) -> anyhow::Result<()> {
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(1024u64);
    if n as u64 + FD_MARGIN > limit {
        bail!(
            "{n} connections do not fit under this process's open-file limit of {limit} \
             (ulimit -n); keep N <= {}",
            limit.saturating_sub(FD_MARGIN)
        );
    }
    Ok(())
}

/// The data of a published event: `t<µs> s<seq> ` padded with `x` to `size` bytes.
pub fn payload(seq: u64, ts_us: u64, size: usize) -> String {
    let mut s = format!("t{ts_us} s{seq} ");
    while s.len() < size {
        s.push('x');
    }
    s
}

/// Latency histograms in microseconds, sharded so that subscribers rarely contend.
#[derive(Debug)]
pub struct Latency {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Latency {
    pub fn new() -> Arc<Latency> {
        let shards = (0..64)
            .map(|_| Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3).expect("bounds")))
            .collect();
        Arc::new(Latency { shards })
    }

    pub fn record(&self, shard: usize, us: u64) {
        let mut h = self.shards[shard % self.shards.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        h.saturating_record(us.max(1));
    }

    /// Merges and clears all shards.
    pub fn take(&self) -> Histogram<u64> {
        let mut all = Histogram::new_with_bounds(1, 600_000_000, 3).expect("bounds");
        for s in &self.shards {
            let mut h = s.lock().unwrap_or_else(|e| e.into_inner());
            let _ = all.add(&*h);
            h.reset();
        }
        all
    }
}

/// Milliseconds at quantile `q`.
pub fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// What every subscriber counts, shared with the scenario while the subscribers run.
#[derive(Debug)]
pub struct Shared {
    /// Events received per subscriber.
    pub counts: Vec<AtomicU64>,
    /// `mono_ns` of each subscriber's latest event.
    pub last_ns: Vec<AtomicU64>,
    /// Events received whose sequence number was not above the previous one's.
    pub out_of_order: AtomicU64,
    pub total: AtomicU64,
    pub ready: AtomicUsize,
    pub failed: AtomicUsize,
    /// Subscribers whose stream ended or failed after it was open.
    pub dropped: AtomicUsize,
    pub first_error: Mutex<Option<String>>,
    pub latency: Option<Arc<Latency>>,
}

/// A set of SSE subscribers, each in its own task, closed when dropped.
#[derive(Debug)]
pub struct Subscribers {
    pub shared: Arc<Shared>,
    pub connect_elapsed: Duration,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Subscribers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>9} {msg:<28} [{bar:30}] {human_pos}/{human_len} {per_sec} eta {eta}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

impl Subscribers {
    /// Opens `n` streams, subscriber `i` on `topic(i)`, at most `concurrency` connecting at
    /// once, and returns when every stream's response head has arrived (or failed).
    pub async fn connect(
        server: &Server,
        n: usize,
        topic: impl Fn(usize) -> String,
        concurrency: usize,
        latency: Option<Arc<Latency>>,
    ) -> anyhow::Result<Subscribers> {
        check_fd_budget(n)?;
        let shared = Arc::new(Shared {
            counts: (0..n).map(|_| AtomicU64::new(0)).collect(),
            last_ns: (0..n).map(|_| AtomicU64::new(0)).collect(),
            out_of_order: AtomicU64::new(0),
            total: AtomicU64::new(0),
            ready: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            dropped: AtomicUsize::new(0),
            first_error: Mutex::new(None),
            latency,
        });
        let pb = bar(n as u64, &format!("{} connect", server.kind.name()));
        let gate = Arc::new(Semaphore::new(concurrency.max(1)));
        // Start on a fresh source address.
        let base = OPENED.fetch_add(n.div_ceil(PER_SOURCE) * PER_SOURCE, Ordering::Relaxed);
        let started = Instant::now();
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let path = server.sub_path(&topic(i));
            let (shared, gate, addr) = (shared.clone(), gate.clone(), server.node(i));
            tasks.push(tokio::spawn(async move {
                let permit = gate.acquire_owned().await;
                let opened = async {
                    let conn = Conn::connect_from(addr, Some(source_ip(base, i)), 4096).await?;
                    conn.stream(&path, &[]).await
                }
                .await;
                drop(permit);
                let mut stream = match opened {
                    Ok(s) => s,
                    Err(e) => {
                        shared.failed.fetch_add(1, Ordering::Relaxed);
                        let mut first =
                            shared.first_error.lock().unwrap_or_else(|e| e.into_inner());
                        first.get_or_insert_with(|| format!("{e:#}"));
                        return;
                    }
                };
                shared.ready.fetch_add(1, Ordering::Relaxed);
                let mut parser = Parser::default();
                let mut last_seq = 0u64;
                let sh = &*shared;
                loop {
                    let r = stream
                        .next(|bytes| {
                            parser.feed(bytes, |prefix| {
                                let now = mono_ns();
                                sh.counts[i].fetch_add(1, Ordering::Relaxed);
                                sh.last_ns[i].store(now, Ordering::Relaxed);
                                sh.total.fetch_add(1, Ordering::Relaxed);
                                if let Some(seq) = field(prefix, b's') {
                                    if seq <= last_seq && last_seq != 0 {
                                        sh.out_of_order.fetch_add(1, Ordering::Relaxed);
                                    }
                                    last_seq = seq;
                                }
                                if let (Some(lat), Some(t)) = (&sh.latency, field(prefix, b't')) {
                                    lat.record(i, now_us().saturating_sub(t));
                                }
                            })
                        })
                        .await;
                    if r.is_err() {
                        sh.dropped.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }));
        }
        loop {
            let done = shared.ready.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed);
            pb.set_position(done as u64);
            if done >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let connect_elapsed = started.elapsed();
        pb.finish_and_clear();
        Ok(Subscribers {
            shared,
            connect_elapsed,
            tasks,
        })
    }

    pub fn ready(&self) -> usize {
        self.shared.ready.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> usize {
        self.shared.failed.load(Ordering::Relaxed)
    }

    pub fn total(&self) -> u64 {
        self.shared.total.load(Ordering::Relaxed)
    }

    pub fn first_error(&self) -> Option<String> {
        self.shared
            .first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until `expected` events in all have arrived, no event has arrived for `quiet`, or
    /// `limit` has passed. Returns whether all arrived.
    pub async fn wait_total(
        &self,
        expected: u64,
        quiet: Duration,
        limit: Duration,
        pb: &ProgressBar,
    ) -> bool {
        let started = Instant::now();
        let mut last = self.total();
        let mut last_change = Instant::now();
        loop {
            let t = self.total();
            pb.set_position(t);
            if t >= expected {
                return true;
            }
            if t != last {
                last = t;
                last_change = Instant::now();
            }
            if last_change.elapsed() > quiet || started.elapsed() > limit {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Subscribers that received exactly `want` events.
    pub fn complete(&self, want: impl Fn(usize) -> u64) -> usize {
        self.shared
            .counts
            .iter()
            .enumerate()
            .filter(|(i, c)| c.load(Ordering::Relaxed) == want(*i))
            .count()
    }

    /// The latest `mono_ns` at which any subscriber received an event.
    pub fn last_delivery_ns(&self) -> u64 {
        self.shared
            .last_ns
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }

    /// Adds the first subscriber error (if any) to `r`, prints it as a JSON line and keeps it.
    pub fn report(&self, mut r: Row, rows: &mut Vec<Row>) {
        if let Some(e) = self.first_error() {
            r.insert("error", e);
        }
        emit(&r);
        rows.push(r);
    }

    /// Stops `server`, then closes the streams: the server closes first, so the TIME_WAIT
    /// sockets are on its side.
    pub async fn close_after(self, server: Server) {
        server.stop().await;
        drop(self);
    }

    pub fn reset_counts(&self) {
        for c in &self.shared.counts {
            c.store(0, Ordering::Relaxed);
        }
        self.shared.total.store(0, Ordering::Relaxed);
    }
}
