//! `finite`: finite streams (LLM answers) fed by streaming publishes, herald beside Vercel's
//! `resumable-stream` on Redis doing the same job through the same two routes
//! (`POST /publish?topic=S` with a `text/event-stream` body still being sent, `GET /events?topic=S`).
//!
//! - `finite-pipe`: one streaming publish of E events written as fast as the connection takes
//!   them (`chunk` events per write) to one viewer: events/s from the first byte sent to the last
//!   event received, and until the producer's answer.
//! - `finite-streams`: S concurrent streaming publishes, each writing one token every 1/R s (the
//!   token carries its scheduled time, so a producer held back shows as latency), V viewers per
//!   stream: token latency percentiles and the server's CPU per token (its processes and its
//!   Redis, if any). herald's streams end with `complete=true`, so its viewers also receive one
//!   `herald.complete` each; `resumable-stream` ends a viewer's response instead.
//!
//! The rule it keeps: both targets get the same bytes from the same producers at the same times,
//! and every token is counted at every viewer (`lost` says what did not arrive).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::clients::{Latency, Subscribers, bar, mono_ns, ms, now_us, payload, publisher_runtime};
use super::{Ctx, Row, num, row};
use crate::http::{Conn, Upload};
use crate::server::{Kind, Server};

/// The load of `finite-streams`.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub streams: usize,
    /// Tokens per second of each stream.
    pub rate: f64,
    pub secs: f64,
    pub viewers: usize,
    /// Bytes of each token's data.
    pub size: usize,
}

/// The load of `finite-pipe`.
#[derive(Debug, Clone, Copy)]
pub struct Pipe {
    pub events: u64,
    /// Events per write (per chunk of the request body).
    pub chunk: u64,
    pub size: usize,
}

/// One SSE event of a producer's body.
fn token(seq: u64, ts_us: u64, size: usize) -> String {
    format!("event: token\ndata: {}\n\n", payload(seq, ts_us, size))
}

/// herald's targets append `herald.complete`: one more event per viewer.
fn completes(kind: Kind) -> u64 {
    u64::from(kind != Kind::ResumableStream)
}

/// Opens a streaming publish to `topic` (its head only; the body follows).
async fn producer(server: &Server, topic: &str) -> anyhow::Result<Upload> {
    let conn = Conn::connect(server.addr).await?;
    conn.upload(
        &format!("/publish?topic={topic}&complete=true"),
        "text/event-stream",
    )
    .await
}

/// `herald serve` flags of this scenario. Producers wait, head sent, while the viewers connect,
/// so the pause allowed between two parts of a body is raised above that wait. History holds
/// every event of the run, as `resumable-stream` holds every stream until it is done: a viewer
/// that falls behind the pipe's burst catches up from history rather than meeting a gap.
fn herald_args(ctx: &Ctx, pipe: Pipe, load: Load) -> Vec<String> {
    let tokens = (load.rate * load.secs).round().max(1.0) as u64;
    let events = pipe.events + load.streams as u64 * (tokens + 1) + 10_000;
    let mut args = vec![
        "--body-timeout".to_string(),
        "300s".into(),
        "--history".into(),
        events.to_string(),
    ];
    args.extend_from_slice(&ctx.herald_args);
    args
}

pub async fn finite(
    ctx: &Ctx,
    pipe: Pipe,
    load: Load,
    concurrency: usize,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let args = herald_args(ctx, pipe, load);
    for &kind in &ctx.targets {
        let server = Arc::new(Server::start(kind, &ctx.bins, &args).await?);
        rows.push(run_pipe(&server, pipe, concurrency).await?);
        rows.push(run_streams(&server, load, concurrency).await?);
        if let Ok(server) = Arc::try_unwrap(server) {
            server.stop().await;
        }
    }
    Ok(rows)
}

async fn run_pipe(server: &Arc<Server>, pipe: Pipe, concurrency: usize) -> anyhow::Result<Row> {
    let kind = server.kind;
    // The producer first: resumable-stream knows a stream only once its producer has begun.
    let upload = producer(server, "pipe").await?;
    let subs = Subscribers::connect(server, 1, |_| "pipe".into(), concurrency, None).await?;
    let chunks: Vec<Vec<u8>> = (0..pipe.events.div_ceil(pipe.chunk))
        .map(|c| {
            let from = c * pipe.chunk + 1;
            let to = ((c + 1) * pipe.chunk).min(pipe.events);
            (from..=to)
                .map(|seq| token(seq, 0, pipe.size))
                .collect::<String>()
                .into_bytes()
        })
        .collect();
    let pb = bar(pipe.events, &format!("{} pipe", kind.name()));
    let t0 = mono_ns();
    let sent = publisher_runtime().spawn(async move {
        let mut upload = upload;
        for c in &chunks {
            upload.chunk(c).await?;
        }
        let answer = upload.finish().await?;
        anyhow::Ok((answer, mono_ns()))
    });
    let ((status, body), answered) = sent.await??;
    anyhow::ensure!(
        (200..300).contains(&status),
        "{} streaming publish answered {status}: {}",
        kind.name(),
        String::from_utf8_lossy(&body)
    );
    let expected = pipe.events + completes(kind);
    let all = subs
        .wait_total(
            expected,
            Duration::from_secs(10),
            Duration::from_secs(300),
            &pb,
        )
        .await;
    pb.finish_and_clear();
    let secs = (subs.last_delivery_ns().saturating_sub(t0)) as f64 / 1e9;
    let publish_secs = (answered - t0) as f64 / 1e9;
    let received = subs.total().min(expected).saturating_sub(completes(kind));
    let mut r = row("finite-pipe", kind);
    r.insert("events", pipe.events);
    r.insert("chunk_events", pipe.chunk);
    r.insert("size", pipe.size);
    r.insert("received", received);
    r.insert("all_delivered", all);
    r.insert("seconds", num(secs));
    r.insert("events_per_s", num(received as f64 / secs));
    r.insert(
        "answer_events_per_s",
        num(pipe.events as f64 / publish_secs),
    );
    let mut rows = Vec::new();
    subs.report(r, &mut rows);
    Ok(rows.remove(0))
}

async fn run_streams(server: &Arc<Server>, load: Load, concurrency: usize) -> anyhow::Result<Row> {
    let kind = server.kind;
    let tokens = (load.rate * load.secs).round().max(1.0) as u64;
    let run = format!("{:x}", now_us());
    let topic = move |s: usize| format!("ans-{run}-{s}");
    let mut uploads = Vec::with_capacity(load.streams);
    for s in 0..load.streams {
        uploads.push(producer(server, &topic(s)).await?);
    }
    let lat = Latency::new();
    let viewers = load.viewers;
    let subs = Subscribers::connect(
        server,
        load.streams * viewers,
        |i| topic(i / viewers),
        concurrency,
        Some(lat.clone()),
    )
    .await?;
    let ready = subs.ready() as u64;
    tokio::time::sleep(Duration::from_millis(500)).await;
    lat.take();
    let pb = bar(
        tokens * ready,
        &format!("{} {} streams", kind.name(), load.streams),
    );
    let written = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let cpu0 = server.cpu_seconds_with_redis();
    let period = Duration::from_secs_f64(1.0 / load.rate);
    let (base, base_us) = (
        Instant::now() + Duration::from_millis(100),
        now_us() + 100_000,
    );
    let mut tasks = Vec::with_capacity(load.streams);
    for (s, mut upload) in uploads.into_iter().enumerate() {
        // Stream s starts s/S of a period later than stream 0: the tokens are spread out.
        let phase = period.mul_f64(s as f64 / load.streams as f64);
        let (written, failed) = (written.clone(), failed.clone());
        let size = load.size;
        tasks.push(publisher_runtime().spawn(async move {
            for seq in 1..=tokens {
                let offset = phase + period.mul_f64((seq - 1) as f64);
                tokio::time::sleep_until((base + offset).into()).await;
                let t = token(seq, base_us + offset.as_micros() as u64, size);
                if upload.chunk(t.as_bytes()).await.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                written.fetch_add(1, Ordering::Relaxed);
            }
            match upload.finish().await {
                Ok((status, _)) if (200..300).contains(&status) => {}
                _ => {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let (shared, progress) = (subs.shared.clone(), pb.clone());
    let ticker = tokio::spawn(async move {
        loop {
            progress.set_position(shared.total.load(Ordering::Relaxed));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    for t in tasks {
        t.await?;
    }
    ticker.abort();
    let written = written.load(Ordering::Relaxed);
    let expected = (written + load.streams as u64 * completes(kind)) * viewers as u64;
    let all = subs
        .wait_total(
            expected,
            Duration::from_secs(10),
            Duration::from_secs(120),
            &pb,
        )
        .await;
    pb.finish_and_clear();
    let cpu = server.cpu_seconds_with_redis() - cpu0;
    // From the first token due to the last one received (or the end of the wait).
    let elapsed = Instant::now().saturating_duration_since(base).as_secs_f64();
    let received = subs
        .total()
        .saturating_sub(load.streams as u64 * completes(kind) * viewers as u64);
    let h = lat.take();
    let mut r = row("finite-streams", kind);
    r.insert("streams", load.streams);
    r.insert("rate", num(load.rate));
    r.insert("viewers", ready);
    r.insert("tokens", written);
    r.insert("producer_errors", failed.load(Ordering::Relaxed));
    r.insert("received", received);
    r.insert(
        "lost",
        (written * viewers as u64).saturating_sub(received.min(written * viewers as u64)),
    );
    r.insert("all_delivered", all);
    r.insert("p50_ms", num(ms(&h, 0.5)));
    r.insert("p99_ms", num(ms(&h, 0.99)));
    r.insert("max_ms", num(h.max() as f64 / 1000.0));
    r.insert(
        "server_cpu_us_per_token",
        num(cpu * 1e6 / written.max(1) as f64),
    );
    r.insert("seconds", num(elapsed));
    r.insert("server_cpu_pct", num(cpu / elapsed * 100.0));
    let mut rows = Vec::new();
    subs.report(r, &mut rows);
    Ok(rows.remove(0))
}
