//! `idle`: N open streams; the server's RSS (all its processes) before and after, per
//! connection, and its CPU while they sit idle with heartbeats running. `connect`: how many
//! streams per second are opened (request sent, response head read) until N are open.

use std::time::Duration;

use super::clients::Subscribers;
use super::{Ctx, Row, num, row};
use crate::server::Server;

pub async fn idle(
    ctx: &Ctx,
    n: usize,
    cpu_secs: u64,
    concurrency: usize,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &kind in &ctx.targets {
        let server = Server::start(kind, &ctx.bins, &ctx.herald_args).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = server.rss();
        let subs = Subscribers::connect(&server, n, |_| "idle".into(), concurrency, None).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = server.rss();
        let c0 = server.cpu_seconds();
        tokio::time::sleep(Duration::from_secs(cpu_secs)).await;
        let cpu = (server.cpu_seconds() - c0) / cpu_secs as f64 * 100.0;
        let ready = subs.ready();
        let mut r = row("idle", kind);
        r.insert("connections", ready);
        r.insert("failed", subs.failed());
        r.insert(
            "dropped",
            subs.shared
                .dropped
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        r.insert("processes", server.processes());
        r.insert("rss_before_mib", num(before as f64 / 1048576.0));
        r.insert("rss_after_mib", num(after as f64 / 1048576.0));
        r.insert(
            "bytes_per_conn",
            num((after as f64 - before as f64) / ready.max(1) as f64),
        );
        r.insert("idle_cpu_pct", num(cpu));
        r.insert("cpu_window_s", cpu_secs);
        r.insert(
            "connects_per_s",
            num(ready as f64 / subs.connect_elapsed.as_secs_f64()),
        );
        subs.report(r, &mut rows);
        subs.close_after(server).await;
    }
    Ok(rows)
}

pub async fn connect(ctx: &Ctx, n: usize, concurrency: usize) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &kind in &ctx.targets {
        let server = Server::start(kind, &ctx.bins, &ctx.herald_args).await?;
        let c0 = server.cpu_seconds();
        let subs = Subscribers::connect(&server, n, |i| format!("c{}", i % 100), concurrency, None)
            .await?;
        let cpu = server.cpu_seconds() - c0;
        let ready = subs.ready();
        let mut r = row("connect", kind);
        // The rate is bounded by the load generator on this machine's two cores; the server's
        // own CPU per stream opened (accept, request, response head, registration) is not.
        r.insert(
            "server_cpu_us_per_connect",
            num(cpu * 1e6 / ready.max(1) as f64),
        );
        r.insert("connections", ready);
        r.insert("failed", subs.failed());
        r.insert("concurrency", concurrency);
        r.insert("seconds", num(subs.connect_elapsed.as_secs_f64()));
        r.insert(
            "connects_per_s",
            num(ready as f64 / subs.connect_elapsed.as_secs_f64()),
        );
        subs.report(r, &mut rows);
        subs.close_after(server).await;
    }
    Ok(rows)
}
