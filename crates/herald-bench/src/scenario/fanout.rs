//! `fanout`: N subscribers on one topic, M messages of S bytes from one publisher; delivered
//! events/s from the first publish to the last delivery, and whether every subscriber got every
//! message. `unicast`: N subscribers each on its own topic, M messages spread over them by P
//! concurrent publishers; delivered events/s.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;

use super::clients::{Subscribers, bar, mono_ns, ms, now_us, payload, publisher_runtime};
use super::{Ctx, Row, num, row};
use crate::http::Conn;
use crate::server::Server;

fn ok(status: u16) -> bool {
    (200..300).contains(&status)
}

pub async fn fanout(
    ctx: &Ctx,
    n: usize,
    m: u64,
    size: usize,
    publishers: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &kind in &ctx.targets {
        let server = Arc::new(Server::start(kind, &ctx.bins, &ctx.herald_args).await?);
        let subs = Subscribers::connect(&server, n, |_| "fan".into(), concurrency, None).await?;
        let ready = subs.ready();
        tokio::time::sleep(Duration::from_secs(1)).await;
        subs.reset_counts();
        let pb = bar(ready as u64 * m, &format!("{} fanout", kind.name()));
        let issued = Arc::new(AtomicU64::new(0));
        let t0 = mono_ns();
        let mut tasks = Vec::new();
        let redis_before = server.redis_commands().await;
        for p in 0..publishers {
            let (issued, server) = (issued.clone(), server.clone());
            tasks.push(publisher_runtime().spawn(async move {
                let mut conn = Conn::connect(server.node(p)).await?;
                let mut answers = Histogram::<u64>::new(3)?;
                loop {
                    let seq = issued.fetch_add(1, Ordering::Relaxed) + 1;
                    if seq > m {
                        return anyhow::Ok(answers);
                    }
                    let (path, ctype, body) =
                        server.publish_request("fan", &payload(seq, now_us(), size));
                    let t = mono_ns();
                    let (status, answer) = conn.post(&path, ctype, &body).await?;
                    anyhow::ensure!(
                        ok(status),
                        "{} publish answered {status}: {}",
                        server.kind.name(),
                        String::from_utf8_lossy(&answer)
                    );
                    answers.record(((mono_ns() - t) / 1000).max(1))?;
                }
            }));
        }
        let mut answers = Histogram::<u64>::new(3)?;
        for t in tasks {
            answers.add(t.await??)?;
        }
        let published = answers.len();
        let publish_s = (mono_ns() - t0) as f64 / 1e9;
        let expected = ready as u64 * published;
        let all = subs
            .wait_total(
                expected,
                Duration::from_secs(10),
                Duration::from_secs(180),
                &pb,
            )
            .await;
        pb.finish_and_clear();
        let received = subs.total();
        let elapsed = subs.last_delivery_ns().saturating_sub(t0) as f64 / 1e9;
        let complete = subs.complete(|_| published);
        let mut r = row("fanout", kind);
        r.insert("subscribers", ready);
        r.insert("messages", published);
        r.insert("size", size);
        r.insert("publishers", publishers);
        r.insert("expected", expected);
        r.insert("received", received);
        r.insert("complete_subs", complete);
        r.insert("all_delivered", all && complete == ready);
        // Order is only defined with one publisher.
        if publishers == 1 {
            r.insert(
                "out_of_order",
                subs.shared.out_of_order.load(Ordering::Relaxed),
            );
        }
        r.insert("seconds", num(elapsed));
        r.insert("events_per_s", num(received as f64 / elapsed));
        r.insert("publishes_per_s", num(published as f64 / publish_s));
        cluster_figures(
            &mut r,
            &server,
            redis_before,
            published,
            received as f64 / elapsed,
        )
        .await;
        r.insert("pub_p50_ms", num(ms(&answers, 0.5)));
        r.insert("pub_p99_ms", num(ms(&answers, 0.99)));
        subs.report(r, &mut rows);
        if let Ok(server) = Arc::try_unwrap(server) {
            subs.close_after(server).await;
        }
    }
    Ok(rows)
}

pub async fn unicast(
    ctx: &Ctx,
    n: usize,
    m: u64,
    size: usize,
    publishers: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &kind in &ctx.targets {
        let server = Arc::new(Server::start(kind, &ctx.bins, &ctx.herald_args).await?);
        let subs = Subscribers::connect(&server, n, |i| format!("u{i}"), concurrency, None).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        subs.reset_counts();
        let pb = bar(m, &format!("{} unicast", kind.name()));
        let issued = Arc::new(AtomicU64::new(0));
        let cpu_before = server.cpu_seconds();
        let t0 = mono_ns();
        let mut tasks = Vec::new();
        let redis_before = server.redis_commands().await;
        for p in 0..publishers {
            let (issued, server) = (issued.clone(), server.clone());
            tasks.push(tokio::spawn(async move {
                let mut conn = Conn::connect(server.node(p)).await?;
                let mut answers = Histogram::<u64>::new(3)?;
                loop {
                    let j = issued.fetch_add(1, Ordering::Relaxed);
                    if j >= m {
                        return anyhow::Ok(answers);
                    }
                    let topic = format!("u{}", j % n as u64);
                    let data = payload(j / n as u64 + 1, now_us(), size);
                    let (path, ctype, body) = server.publish_request(&topic, &data);
                    let t = mono_ns();
                    let (status, answer) = conn.post(&path, ctype, &body).await?;
                    anyhow::ensure!(
                        ok(status),
                        "publish answered {status}: {}",
                        String::from_utf8_lossy(&answer)
                    );
                    answers.record(((mono_ns() - t) / 1000).max(1))?;
                }
            }));
        }
        let progress = async {
            loop {
                pb.set_position(subs.total());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let publishing = async {
            let mut answers = Histogram::<u64>::new(3)?;
            for t in tasks {
                answers.add(t.await??)?;
            }
            anyhow::Ok(answers)
        };
        let answers = tokio::select! {
            r = publishing => r?,
            _ = progress => unreachable!("the progress loop never ends"),
        };
        let publish_s = (mono_ns() - t0) as f64 / 1e9;
        let all = subs
            .wait_total(m, Duration::from_secs(10), Duration::from_secs(120), &pb)
            .await;
        pb.finish_and_clear();
        // Server CPU (user + system, every process of it) per message: from before the first
        // publish until every message was delivered (or the wait gave up).
        let cpu = server.cpu_seconds() - cpu_before;
        let received = subs.total();
        let elapsed = subs.last_delivery_ns().saturating_sub(t0) as f64 / 1e9;
        let per = m / n as u64;
        let extra = (m % n as u64) as usize;
        let complete = subs.complete(|i| per + u64::from(i < extra));
        let mut r = row("unicast", kind);
        r.insert("subscribers", subs.ready());
        r.insert("messages", m);
        r.insert("size", size);
        r.insert("publishers", publishers);
        r.insert("received", received);
        r.insert("all_delivered", all && complete == n);
        r.insert("seconds", num(elapsed));
        r.insert("events_per_s", num(received as f64 / elapsed));
        r.insert("publishes_per_s", num(m as f64 / publish_s));
        r.insert("pub_p99_ms", num(ms(&answers, 0.99)));
        r.insert("server_cpu_us_per_msg", num(cpu * 1e6 / m.max(1) as f64));
        cluster_figures(&mut r, &server, redis_before, m, received as f64 / elapsed).await;
        subs.report(r, &mut rows);
        if let Ok(server) = Arc::try_unwrap(server) {
            subs.close_after(server).await;
        }
    }
    Ok(rows)
}

/// For a herald cluster: nodes, delivered events/s per node, and Redis commands per published
/// message (what decides how a cluster scales on real machines).
async fn cluster_figures(
    r: &mut Row,
    server: &Server,
    redis_before: Option<u64>,
    published: u64,
    rate: f64,
) {
    let Some(before) = redis_before else { return };
    let nodes = server.nodes.len();
    r.insert("nodes", nodes);
    r.insert("events_per_s_per_node", num(rate / nodes as f64));
    if let Some(after) = server.redis_commands().await {
        // The INFO call itself counts once.
        let commands = after.saturating_sub(before + 1);
        r.insert(
            "redis_cmds_per_msg",
            num(commands as f64 / published.max(1) as f64),
        );
    }
}
