//! Durable publishing and replay: publish throughput with N concurrent publishers against a hub
//! with `--data-dir` (every answer means fsynced), and how fast a resuming client is replayed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::json;

use crate::http::Conn;
use crate::server::{Bins, Kind, Server};
use crate::sse::Counter;

pub struct PublishResult {
    pub publishers: usize,
    pub events: u64,
    pub elapsed: Duration,
    pub latency: Histogram<u64>,
}

/// `publishers` connections publish `batch` events per request (a JSON array when more than one)
/// until `events` are acknowledged.
pub async fn publish(
    bins: &Bins,
    durable: bool,
    publishers: usize,
    events: u64,
    size: usize,
    batch: u64,
) -> anyhow::Result<PublishResult> {
    let dir = tempfile::tempdir()?;
    let mut args = vec!["--history".to_string(), (events * 2).to_string()];
    if durable {
        args.push("--data-dir".into());
        args.push(dir.path().join("data").to_string_lossy().into_owned());
    }
    let herald = Server::start(Kind::Herald, bins, &args).await?;
    let one = json!({"topic": "bench/durable", "data": "x".repeat(size)});
    let batch = batch.max(1);
    let body = if batch == 1 {
        serde_json::to_vec(&one)?
    } else {
        serde_json::to_vec(&vec![one; batch as usize])?
    };
    let body: Arc<[u8]> = body.into();
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..publishers {
        let (issued, body, addr) = (issued.clone(), body.clone(), herald.addr);
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::connect(addr).await?;
            let mut hist = Histogram::<u64>::new(3)?;
            while issued.fetch_add(batch, Ordering::Relaxed) < events {
                let t = Instant::now();
                let (status, answer) = conn.post_json("/publish", &body).await?;
                anyhow::ensure!(
                    status == 200,
                    "publish answered {status}: {}",
                    String::from_utf8_lossy(&answer)
                );
                hist.record(t.elapsed().as_micros() as u64)?;
            }
            anyhow::Ok(hist)
        }));
    }
    let mut latency = Histogram::<u64>::new(3)?;
    for t in tasks {
        latency.add(t.await??)?;
    }
    let elapsed = started.elapsed();
    herald.stop().await;
    Ok(PublishResult {
        publishers,
        events: events.div_ceil(batch) * batch,
        elapsed,
        latency,
    })
}

pub struct ResumeResult {
    pub events: u64,
    pub elapsed: Duration,
}

/// Fills history with `events` events (in batches), then times one client resuming from before
/// the first of them until it has received them all.
pub async fn resume(
    bins: &Bins,
    durable: bool,
    events: u64,
    size: usize,
) -> anyhow::Result<ResumeResult> {
    let dir = tempfile::tempdir()?;
    let mut args = vec!["--history".to_string(), (events + 10).to_string()];
    if durable {
        args.push("--data-dir".into());
        args.push(dir.path().join("data").to_string_lossy().into_owned());
    }
    let herald = Server::start(Kind::Herald, bins, &args).await?;
    let mut conn = Conn::connect(herald.addr).await?;
    let one = json!({"topic": "bench/resume", "data": "r".repeat(size)});
    let mut left = events;
    while left > 0 {
        let n = left.min(1000);
        let batch = serde_json::to_vec(&vec![one.clone(); n as usize])?;
        let (status, answer) = conn.post_json("/publish", &batch).await?;
        anyhow::ensure!(
            status == 200,
            "batch answered {status}: {}",
            String::from_utf8_lossy(&answer)
        );
        left -= n;
    }
    let started = Instant::now();
    let mut stream = Conn::connect(herald.addr)
        .await?
        .stream("/events?topic=bench/resume&since=all", &[])
        .await?;
    let mut counter = Counter::default();
    while counter.events < events {
        stream.next(|b| counter.feed(b)).await?;
    }
    let elapsed = started.elapsed();
    herald.stop().await;
    Ok(ResumeResult { events, elapsed })
}
