//! `latency`: N subscribers on one topic; publishes at a fixed offered rate, each carrying its
//! scheduled send time (so a publisher that falls behind shows as latency, not as a lower rate);
//! publish→receive and publish-answer percentiles for each rate of a sweep.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, mpsc};

use super::clients::{Latency, Subscribers, bar, ms, now_us, payload, publisher_runtime};
use super::{Ctx, Row, num, row};
use crate::http::Conn;
use crate::server::Server;

#[allow(clippy::too_many_arguments)]
pub async fn latency(
    ctx: &Ctx,
    n: usize,
    rates: &[f64],
    secs: f64,
    size: usize,
    publishers: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &kind in &ctx.targets {
        let server = Arc::new(Server::start(kind, &ctx.bins, &ctx.herald_args).await?);
        let lat = Latency::new();
        let subs =
            Subscribers::connect(&server, n, |_| "lat".into(), concurrency, Some(lat.clone()))
                .await?;
        let ready = subs.ready();
        tokio::time::sleep(Duration::from_secs(1)).await;
        for &rate in rates {
            subs.reset_counts();
            lat.take();
            let answers = Latency::new();
            let count = (rate * secs).round().max(1.0) as u64;
            let (tx, rx) = mpsc::unbounded_channel::<(u64, u64)>();
            let rx = Arc::new(Mutex::new(rx));
            let published = Arc::new(AtomicU64::new(0));
            let failed = Arc::new(AtomicU64::new(0));
            let unsent = Arc::new(AtomicU64::new(0));
            // Messages still queued when the window ends are not sent (a target that cannot
            // keep up would otherwise make the run last as long as its backlog).
            let deadline = Instant::now() + Duration::from_secs_f64(secs + 1.0);
            let mut tasks = Vec::new();
            for p in 0..publishers {
                let (rx, server, answers) = (rx.clone(), server.clone(), answers.clone());
                let (published, failed) = (published.clone(), failed.clone());
                let unsent = unsent.clone();
                tasks.push(publisher_runtime().spawn(async move {
                    let mut conn = Conn::connect(server.addr).await?;
                    loop {
                        let Some((seq, ts)) = rx.lock().await.recv().await else {
                            return anyhow::Ok(());
                        };
                        if Instant::now() > deadline {
                            unsent.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let (path, ctype, body) =
                            server.publish_request("lat", &payload(seq, ts, size));
                        let t = Instant::now();
                        let (status, _) = conn.post(&path, ctype, &body).await?;
                        answers.record(p, t.elapsed().as_micros() as u64);
                        if (200..300).contains(&status) {
                            published.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
            let pb = bar(
                count * ready as u64,
                &format!("{} latency {rate}/s", kind.name()),
            );
            // The schedule: message k is due at start + k/rate; its payload carries that time.
            // A thread of its own keeps it with `thread::sleep` (tens of µs late at most; a tokio
            // interval fires up to a millisecond late, which would show as latency).
            let (shared, bar) = (subs.shared.clone(), pb.clone());
            let (base_inst, base_us) = (Instant::now(), now_us());
            tokio::task::spawn_blocking(move || {
                let period = Duration::from_secs_f64(1.0 / rate);
                for seq in 1..=count {
                    let offset = period.mul_f64((seq - 1) as f64);
                    let due = base_inst + offset;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let _ = tx.send((seq, base_us + offset.as_micros() as u64));
                    bar.set_position(shared.total.load(Ordering::Relaxed));
                }
            })
            .await?;
            for t in tasks {
                t.await??;
            }
            let pub_elapsed = base_inst.elapsed().as_secs_f64();
            let published = published.load(Ordering::Relaxed);
            let expected = published * ready as u64;
            let all = subs
                .wait_total(
                    expected,
                    Duration::from_secs(5),
                    Duration::from_secs(60),
                    &pb,
                )
                .await;
            pb.finish_and_clear();
            let achieved = published as f64 / pub_elapsed;
            let h = lat.take();
            let a = answers.take();
            let received = subs.total();
            let mut r = row("latency", kind);
            r.insert("subscribers", ready);
            r.insert("rate", num(rate));
            r.insert("events_offered_per_s", num(rate * ready as f64));
            r.insert("published", published);
            r.insert("publish_errors", failed.load(Ordering::Relaxed));
            r.insert("unsent", unsent.load(Ordering::Relaxed));
            r.insert("achieved_rate", num(achieved));
            r.insert("received", received);
            r.insert("lost", expected.saturating_sub(received));
            r.insert("all_delivered", all);
            r.insert("p50_ms", num(ms(&h, 0.5)));
            r.insert("p99_ms", num(ms(&h, 0.99)));
            r.insert("p999_ms", num(ms(&h, 0.999)));
            r.insert("max_ms", num(h.max() as f64 / 1000.0));
            r.insert("pub_p50_ms", num(ms(&a, 0.5)));
            r.insert("pub_p99_ms", num(ms(&a, 0.99)));
            r.insert("pub_max_ms", num(a.max() as f64 / 1000.0));
            subs.report(r, &mut rows);
        }
        if let Ok(server) = Arc::try_unwrap(server) {
            subs.close_after(server).await;
        }
    }
    Ok(rows)
}
