//! Writes BENCHMARKS.md and the SVG plots (latency percentiles against offered rate, memory per
//! idle connection) from the JSON lines of a `scripts/bench` run and its `key=value` meta file.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Context;
use serde_json::Value;

use crate::scenario::{Row, advantage, headline, table};

const TARGETS: [&str; 4] = ["herald", "nchan", "baseline", "ceiling"];
const COLORS: [&str; 4] = ["#d62728", "#1f77b4", "#2ca02c", "#7f7f7f"];

pub fn write(results: &str, meta: &str, out: &str, plots: &str) -> anyhow::Result<()> {
    let rows: Vec<Row> = std::fs::read_to_string(results)
        .with_context(|| format!("read {results}"))?
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| Row::from_json(&v))
        .collect();
    let meta_text = std::fs::read_to_string(meta).with_context(|| format!("read {meta}"))?;
    let mut meta: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in meta_text.lines() {
        if let Some((k, v)) = l.split_once('=') {
            meta.entry(k.trim().to_string())
                .or_default()
                .push(v.trim().to_string());
        }
    }
    let m = |k: &str| {
        meta.get(k)
            .and_then(|v| v.first())
            .cloned()
            .unwrap_or_default()
    };
    let by = |s: &str| -> Vec<Row> {
        rows.iter()
            .filter(|r| r.get("scenario").and_then(Value::as_str) == Some(s))
            .cloned()
            .collect()
    };
    let f = |rs: &[Row], target: &str, key: &str, pick: &dyn Fn(&Row) -> bool| -> Option<f64> {
        rs.iter()
            .find(|r| r.get("target").and_then(Value::as_str) == Some(target) && pick(r))
            .and_then(|r| r.get(key))
            .and_then(Value::as_f64)
    };
    let any = |_: &Row| true;
    let idle = by("idle");
    let fanout = by("fanout");
    let latency = by("latency");
    let unicast = by("unicast");
    let connect = by("connect");
    let idle_h1 = by("idle-h1");
    let idle_tls = by("idle-h1-tls");
    let idle_h2 = by("idle-h2");
    let fanout_h1 = by("fanout-h1");
    let fanout_h2 = by("fanout-h2");
    let headline_rate = m("headline_rate").parse::<f64>().unwrap_or(5.0);
    let at_rate = move |r: &Row| r.get("rate").and_then(Value::as_f64) == Some(headline_rate);

    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Written by `scripts/bench` ({}); rerun it rather than editing this file. herald, nchan, \
         a hand-written axum baseline and a ceiling are measured side by side in the same run, \
         each started and stopped by `herald-bench`, which talks to them only over loopback \
         HTTP/1.1 (the protocols rows: also HTTPS and HTTP/2, herald and nchan only).\n",
        m("date")
    );
    let _ = writeln!(md, "## Machine and versions\n");
    for (label, key) in [
        ("CPU", "cpu"),
        ("cores", "cores"),
        ("memory", "memory"),
        ("kernel", "kernel"),
        ("open-file limit", "nofile"),
        ("rustc", "rustc"),
        ("herald", "herald"),
        ("nchan", "nchan"),
        ("baseline", "baseline"),
        ("ceiling", "ceiling"),
        ("resumable-stream", "resumable_stream"),
        ("load before the run", "load_before"),
        ("load after the run", "load_after"),
        ("run time", "duration"),
    ] {
        if !m(key).is_empty() {
            let _ = writeln!(md, "- {label}: {}", m(key));
        }
    }
    for n in meta.get("note").into_iter().flatten() {
        let _ = writeln!(md, "- note: {n}");
    }
    let _ = writeln!(
        md,
        "\nServer and load generator share the same 2 cores, so every figure includes the \
         client's own cost; the ceiling row shows what this client and machine can do at best.\n"
    );

    // The summary: one line per figure the issue sets a target for.
    let _ = writeln!(md, "## Summary\n");
    let _ = writeln!(
        md,
        "Ratios are herald's advantage over each peer (> 1 means herald is better: more events/s \
         or fewer bytes / milliseconds), and herald's share of the ceiling.\n"
    );
    let _ = writeln!(
        md,
        "| figure | herald | nchan | baseline | ceiling | herald vs nchan | herald vs baseline | herald / ceiling | issue target |"
    );
    let _ = writeln!(md, "|:---|---:|---:|---:|---:|---:|---:|---:|:---|");
    let mut line = |label: &str,
                    rs: &[Row],
                    key: &str,
                    higher: bool,
                    pick: &dyn Fn(&Row) -> bool,
                    target: &str,
                    ceiling_ratio: bool| {
        let v: Vec<Option<f64>> = TARGETS.iter().map(|t| f(rs, t, key, pick)).collect();
        let fmt = |x: Option<f64>| x.map_or("–".to_string(), fmt_num);
        let ratio = |i: usize| match (v[0], v[i]) {
            (Some(h), Some(p)) if h > 0.0 && p > 0.0 => {
                format!("{:.2}×", advantage(h, p, higher))
            }
            _ => "–".into(),
        };
        let ceil = match (v[0], v[3]) {
            (Some(h), Some(c)) if ceiling_ratio && h > 0.0 && c > 0.0 => {
                format!("{:.0}%", advantage(h, c, higher) * 100.0)
            }
            _ => "–".into(),
        };
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {} | {} | {} | {ceil} | {target} |",
            fmt(v[0]),
            fmt(v[1]),
            fmt(v[2]),
            fmt(v[3]),
            ratio(1),
            ratio(2)
        );
    };
    let n_idle = f(&idle, "herald", "connections", &any).unwrap_or(0.0);
    line(
        &format!("RSS per idle connection, bytes ({n_idle} connections)"),
        &idle,
        "bytes_per_conn",
        false,
        &any,
        "≤ 1024",
        false,
    );
    line(
        "idle CPU with those connections, % of a core",
        &idle,
        "idle_cpu_pct",
        false,
        &any,
        "≤ 3",
        false,
    );
    line(
        "fan-out, delivered events/s",
        &fanout,
        "events_per_s",
        true,
        &any,
        "≥ 2× baseline, ≥ 85% of ceiling",
        true,
    );
    line(
        "fan-out, subscribers that got every message",
        &fanout,
        "complete_subs",
        true,
        &any,
        "all",
        false,
    );
    line(
        "fan-out, publish answer p99 during the burst, ms",
        &fanout,
        "pub_p99_ms",
        false,
        &any,
        "",
        false,
    );
    line(
        &format!("latency p50 at {headline_rate} msg/s, ms"),
        &latency,
        "p50_ms",
        false,
        &at_rate,
        "",
        true,
    );
    line(
        &format!("latency p99 at {headline_rate} msg/s, ms"),
        &latency,
        "p99_ms",
        false,
        &at_rate,
        "≤ 25",
        true,
    );
    line(
        &format!("latency max at {headline_rate} msg/s, ms"),
        &latency,
        "max_ms",
        false,
        &at_rate,
        "",
        true,
    );
    line(
        &format!(
            "publish answer p99 at {headline_rate} msg/s with fan-out running, ms ({} answers)",
            f(&latency, "herald", "published", &at_rate).map_or("–".into(), fmt_num)
        ),
        &latency,
        "pub_p99_ms",
        false,
        &at_rate,
        "≤ 2",
        false,
    );
    line(
        "unicast, delivered events/s",
        &unicast,
        "events_per_s",
        true,
        &any,
        "≥ 1.5× baseline",
        true,
    );
    line(
        "unicast, server CPU per message, µs",
        &unicast,
        "server_cpu_us_per_msg",
        false,
        &any,
        "≤ 12",
        false,
    );
    line(
        "connections opened per second",
        &connect,
        "connects_per_s",
        true,
        &any,
        "≥ 1.5× nchan",
        false,
    );
    line(
        "server CPU per connection opened, µs",
        &connect,
        "server_cpu_us_per_connect",
        false,
        &any,
        "",
        false,
    );
    line(
        "RSS per idle stream, plain HTTP/1.1, bytes (protocols)",
        &idle_h1,
        "bytes_per_stream",
        false,
        &any,
        "",
        false,
    );
    line(
        "RSS per idle stream, HTTP/1.1 over TLS, bytes",
        &idle_tls,
        "bytes_per_stream",
        false,
        &any,
        "≤ 4096",
        false,
    );
    line(
        "RSS per additional idle HTTP/2 stream on a shared TLS connection, bytes",
        &idle_h2,
        "bytes_per_extra_stream",
        false,
        &any,
        "≤ 1536",
        false,
    );
    line(
        "TLS connections set up per second (full handshake, request, response head)",
        &idle_tls,
        "connects_per_s",
        true,
        &any,
        "",
        false,
    );
    line(
        "fan-out to the plain HTTP/1.1 streams, delivered events/s",
        &fanout_h1,
        "events_per_s",
        true,
        &any,
        "",
        false,
    );
    line(
        "fan-out to the HTTP/2 streams (TLS, shared connections), delivered events/s",
        &fanout_h2,
        "events_per_s",
        true,
        &any,
        "",
        false,
    );
    let presence = by("presence");
    let webhook = by("webhook");
    let p = |key: &str| f(&presence, "herald-redis", key, &any);
    if let (Some(p50), Some(p99)) = (p("online_event_p50_ms"), p("online_event_p99_ms")) {
        let _ = writeln!(
            md,
            "\nPresence across nodes (two nodes, one Redis): a stream opened on node B shows on \
             node A as a `$presence/*` event after {} ms p50, {} ms p99, and in `GET /users/{{id}}` \
             after {} ms p50, {} ms p99; a closed one leaves A's `/users` after {} ms p50, {} ms \
             p99 (issue target: within 100 ms).",
            fmt_num(p50),
            fmt_num(p99),
            p("online_users_p50_ms").map_or("–".into(), fmt_num),
            p("online_users_p99_ms").map_or("–".into(), fmt_num),
            p("offline_users_p50_ms").map_or("–".into(), fmt_num),
            p("offline_users_p99_ms").map_or("–".into(), fmt_num),
        );
    }
    let w = |store: &str| {
        f(&webhook, "herald", "deliveries_per_s", &|r: &Row| {
            r.get("store").and_then(Value::as_str) == Some(store)
        })
    };
    if let (Some(memory), Some(durable)) = (w("memory"), w("durable")) {
        let _ = writeln!(
            md,
            "\nWebhook deliveries per second to a local receiver that answers at once: {} with \
             history in memory, {} with `--data-dir` (cursor synced after each delivery).",
            fmt_num(memory),
            fmt_num(durable)
        );
    }
    let _ = writeln!(md);
    for target in ["herald", "nchan"] {
        if let (Some(h2), Some(h1)) = (
            f(&fanout_h2, target, "events_per_s", &any),
            f(&fanout_h1, target, "events_per_s", &any),
        ) && h1 > 0.0
        {
            let _ = writeln!(
                md,
                "{target}: fan-out over HTTP/2 (TLS) runs at {:.2}× its plain HTTP/1.1 rate.",
                h2 / h1
            );
        }
    }
    let _ = writeln!(md);
    finite_summary(&mut md, &by("finite-pipe"), &by("finite-streams"));

    let _ = writeln!(md, "## Reading these figures\n");
    let floor = by("floor");
    let fl = |key: &str| f(&floor, "kernel", key, &any);
    let herald_p99 = f(&latency, "herald", "p99_ms", &at_rate);
    let subscribers = m("latency_subscribers").parse::<f64>().unwrap_or(10_000.0);
    if let (Some(sockets), Some(per_write), Some(p99), Some(writers)) = (
        fl("sockets"),
        fl("write_us_per_socket"),
        fl("p99_ms"),
        fl("writers"),
    ) {
        // One event's fan-out time grows linearly with the sockets written.
        let scaled = p99 * subscribers / sockets;
        let vs = herald_p99.map_or(String::new(), |h| {
            format!(
                " herald's p99 there is {} ms, {:.2}× that.",
                fmt_num(h),
                h / scaled
            )
        });
        let budget = 2.0 * 25_000.0 / subscribers;
        let below = if budget < per_write {
            ", less than one loopback `write` costs on this machine"
        } else {
            ""
        };
        let _ = writeln!(
            md,
            "- The kernel's own cost: with no server at all (`herald-bench floor`), writing one \
             {size}-byte event to each of {sockets} loopback sockets from {writers} threads, \
             while one thread reads them, took {per_write} µs of a writer's time per socket, and \
             the p99 arrival was {p99} ms: about {scaled} ms at {n} subscribers by linear \
             scaling.{vs} A p99 of 25 ms at {n} subscribers leaves {budget:.1} µs per delivered \
             event across both cores{below}.",
            n = fmt_num(subscribers),
            size = fl("size").unwrap_or(64.0),
            sockets = fmt_num(sockets),
            per_write = fmt_num(per_write),
            p99 = fmt_num(p99),
            scaled = fmt_num(scaled),
        );
    }
    if let Some(c) = f(&latency, "ceiling", "pub_p99_ms", &at_rate) {
        // Each rate has only rate × seconds answers, so the whole sweep is shown.
        let sweep = |target: &str| {
            latency
                .iter()
                .filter(|r| r.get("target").and_then(Value::as_str) == Some(target))
                .filter_map(|r| {
                    let rate = r.get("rate").and_then(Value::as_f64)?;
                    let p99 = r.get("pub_p99_ms").and_then(Value::as_f64)?;
                    Some(format!("{} ({}/s)", fmt_num(p99), fmt_num(rate)))
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            md,
            "- Publish answers while a fan-out runs: the ceiling, which only hands a frame to its \
             writer threads, answers with a p99 of {} ms in the same conditions. With the \
             server's writer threads, the client's readers and the publisher sharing 2 cores, a \
             woken thread waits milliseconds for a core whatever the server does; herald answers \
             before it wakes any writer. Publish answer p99 in ms at each rate of the sweep, \
             herald: {}; ceiling: {}.",
            fmt_num(c),
            sweep("herald"),
            sweep("ceiling")
        );
    }
    let _ = writeln!(
        md,
        "- nchan's publish request is answered only after its fan-out, so at 10k subscribers it \
           cannot publish more than a few messages per second; in the latency sweep the \
           messages it never got to are counted as `unsent`, and its latency includes the wait.\n\
         - The baseline listens with the 128-deep accept queue that std and tokio listeners \
           get (herald's is `--listen-backlog`, 65535 by default; nginx's is set to 65535); a \
           burst of more than 128 simultaneous connects would lose SYNs there and wait for the \
           1 s retransmit, so the scenarios open at most 100 streams at once (`--concurrency`).\n\
         - Memory is the RSS of all of a server's processes (nginx: master and 2 workers); \
           kernel socket buffers are not in it, for any target.\n"
    );
    let _ = writeln!(md, "## Plots\n");
    let _ = writeln!(
        md,
        "![publish→receive latency against offered rate](docs/bench-latency.svg)\n\n\
         ![server RSS per idle connection](docs/bench-memory.svg)\n"
    );
    let _ = writeln!(md, "## Commands\n");
    let _ = writeln!(md, "```sh");
    let _ = writeln!(
        md,
        "scripts/bench   # builds, installs nginx + nchan if missing, runs the lines below, writes this file\n\
         # each line runs as: target/release/herald-bench --herald <herald binary> ..."
    );
    for c in meta.get("command").into_iter().flatten() {
        let _ = writeln!(md, "{c}");
    }
    let _ = writeln!(md, "```\n");
    let _ = writeln!(md, "## Every figure\n");
    for (s, group, what) in [
        (
            "idle",
            None,
            "N idle streams; RSS summed over all of the server's processes (nginx: master and workers), measured 0.5 s after start and 2 s after the last stream opened; CPU over the window that follows.",
        ),
        (
            "connect",
            None,
            "streams opened (request sent, response head read) per second, with a bounded number connecting at once.",
        ),
        (
            "fanout",
            None,
            "N subscribers on one topic, M messages from concurrent publishers; events/s from the first publish to the last delivery; `complete_subs` counts subscribers that received exactly M events.",
        ),
        (
            "latency",
            Some("rate"),
            "N subscribers on one topic; messages published at a fixed rate by 8 connections, each carrying its scheduled send time, so a server that makes publishers wait shows it as latency. Publishing stops at the end of the window (`unsent` counts what a slow target never got to).",
        ),
        (
            "floor",
            None,
            "no server: what the kernel alone costs to write one event to each of N loopback sockets (writer threads) while one thread reads them; `p50_ms`/`p99_ms` are arrival times from the start of a round, `span` the time until the last socket was read.",
        ),
        (
            "unicast",
            None,
            "N subscribers each on its own topic; messages spread over them by concurrent publishers; `server_cpu_us_per_msg` is the server's CPU time (user + system) per message.",
        ),
        (
            "idle-h1",
            None,
            "protocols, herald and nchan each serving plain HTTP/1.1: N idle streams, RSS per stream, and streams opened per second.",
        ),
        (
            "idle-h1-tls",
            None,
            "protocols, HTTPS (herald: rustls; nchan: nginx with OpenSSL), one HTTP/1.1 stream per connection; `connects_per_s` is full TLS handshakes (the client never resumes) with request and response head.",
        ),
        (
            "idle-h2",
            None,
            "protocols, HTTPS with HTTP/2: `connections` connections each opened with one stream, then the rest of the N streams spread over them; RSS per connection with its first stream, and per additional stream.",
        ),
        (
            "fanout-h1",
            None,
            "protocols: M messages published to the N plain HTTP/1.1 streams of `idle-h1`; events/s from the first publish to the last delivery.",
        ),
        (
            "fanout-h2",
            None,
            "protocols: the same M messages to the N HTTP/2 streams of `idle-h2` (published over HTTP/2 on the same server).",
        ),
        (
            "finite-pipe",
            None,
            "finite: one streaming publish (`POST /publish?topic=pipe&complete=true`, `text/event-stream` body, `chunk_events` events per write) to one viewer; `events_per_s` from the first byte sent to the last event received, `answer_events_per_s` until the producer's answer. herald beside npm `resumable-stream` on Redis behind the same routes.",
        ),
        (
            "finite-streams",
            None,
            "finite: `streams` concurrent streaming publishes, each writing one token every 1/`rate` s for the run (each token carries its scheduled time, so a producer held back counts as latency), `viewers` viewers on each (`GET /events?topic=…`, connected before the first token); token latency percentiles over every viewer, and the server's CPU (its processes and its Redis, if any) per token published.",
        ),
        (
            "publish",
            None,
            "herald only (durable history, every answer means fsynced): `batch` events per request (one, or a JSON array).",
        ),
        (
            "resume",
            None,
            "herald only: one client resuming from before all retained events.",
        ),
        (
            "presence",
            None,
            "herald only, two nodes on one `redis-server` (`--presence-grace 0s`): one user at a time opens a stream on node B, then closes it; the delay from sending the request (from closing the socket) until node A shows the change, as the `herald.presence` event on a `$presence/*` stream held on A (`*_event_*`) and in A's `GET /users/{id}`, polled back to back on one connection in a second pass of as many users, so the polling does not weigh on the event figures (`*_users_*`).",
        ),
        (
            "webhook",
            None,
            "herald only: one `--webhook` (signed) to a receiver run by herald-bench that answers 200 at once and checks the ids arrive in order; events published in batches of 100; `deliveries_per_s` from the first publish to the last delivery (one delivery in flight at a time, as the hook's order requires); `durable`: `--data-dir`, where the hook's cursor is synced after each delivery.",
        ),
    ] {
        let rs = by(s);
        if rs.is_empty() {
            continue;
        }
        let _ = writeln!(md, "### {s}\n\n{what}\n");
        md.push_str(&table(&rs, group));
        let _ = writeln!(md);
    }
    let _ = writeln!(md, "## Targets\n");
    let _ = writeln!(
        md,
        "- **herald**: `target/release/herald serve`, defaults (history in memory, 15 s heartbeat).\n\
         - **nchan**: Debian's nginx with libnginx-mod-nchan, `worker_processes 2`, publisher \
           `POST /pub/{{topic}}` (its answer waits for the fan-out), EventSource subscriber \
           `GET /sub/{{topic}}`; config written by `herald-bench` (see `src/server.rs`).\n\
         - **baseline**: `herald-bench-baseline`, axum `Sse` with one `tokio::sync::broadcast` \
           (capacity 1024) per topic and `KeepAlive::default()`.\n\
         - **herald-redis**, **herald-redis3**: one and three herald nodes with `--redis` on one \
           `redis-server` (no persistence), subscribers and publishers spread over the nodes; \
           `events_per_s_per_node` and `redis_cmds_per_msg` (every Redis command in the run, \
           presence reports included, per published message) show how the cluster scales.\n\
         - **herald-redis-r1**, **herald-redis3-r1**: the same with one replica of that Redis \
           and `--redis-replicas 1`: every publish is answered after `WAIT` saw it replicated.\n\
         - **herald-mercure**: herald with `--mercure` (an open hub), subscribers on \
           `/.well-known/mercure?topic=…`, publishers sending Mercure form posts.\n\
         - **resumable-stream** (`finite` only): Vercel's npm `resumable-stream` (with the \
           `redis` client) on its own `redis-server` (no persistence), behind a small Node \
           server (`crates/herald-bench/resumable-stream/server.mjs`) with herald's routes: a \
           producer's `POST /publish?topic=S` body becomes `createNewResumableStream(S, …)`'s \
           source, a viewer's `GET /events?topic=S` is `resumeExistingStream(S)` piped out as \
           an event stream. Its CPU counts Node and Redis.\n\
         - **ceiling**: `herald-bench ceiling`, a process that answers the request head, keeps \
           the bare sockets per topic and writes each frame, encoded once, to every socket from \
           2 writer threads, batching whatever is pending into one write per socket; no \
           heartbeats, ids, history or queues.\n"
    );
    std::fs::write(out, md).with_context(|| format!("write {out}"))?;

    std::fs::create_dir_all(plots)?;
    std::fs::write(
        format!("{plots}/bench-latency.svg"),
        latency_svg(&latency, &m("latency_subscribers")),
    )?;
    std::fs::write(format!("{plots}/bench-memory.svg"), memory_svg(&idle))?;
    let _ = headline;
    Ok(())
}

/// The finite-stream figures, herald beside `resumable-stream` (and any other herald target).
fn finite_summary(md: &mut String, pipe: &[Row], streams: &[Row]) {
    if pipe.is_empty() && streams.is_empty() {
        return;
    }
    let mut targets: Vec<String> = Vec::new();
    for r in pipe.iter().chain(streams) {
        if let Some(t) = r.get("target").and_then(Value::as_str)
            && !targets.iter().any(|x| x == t)
        {
            targets.push(t.to_string());
        }
    }
    let get = |rs: &[Row], target: &str, key: &str| {
        rs.iter()
            .find(|r| r.get("target").and_then(Value::as_str) == Some(target))
            .and_then(|r| r.get(key))
            .and_then(Value::as_f64)
    };
    let first = |key: &str| {
        streams
            .first()
            .and_then(|r| r.get(key))
            .and_then(Value::as_f64)
            .map_or("–".into(), fmt_num)
    };
    let _ = writeln!(md, "## Finite streams (LLM answers)\n");
    let _ = writeln!(
        md,
        "`herald-bench finite`: herald's streaming publish beside npm `resumable-stream` on \
         Redis, driven with the same load through the same routes. `herald` keeps its history \
         in memory; `herald-redis` keeps it in a Redis stream, as `resumable-stream` keeps its \
         streams in Redis (server CPU counts that Redis for both). Streams: {} producers × {} \
         tokens/s, {} viewers in all. Ratios are herald's advantage (> 1: herald is better).\n",
        first("streams"),
        first("rate"),
        first("viewers"),
    );
    let peers: Vec<&String> = targets.iter().filter(|t| *t != "herald").collect();
    let _ = writeln!(
        md,
        "| figure | {} |{}",
        targets.join(" | "),
        peers
            .iter()
            .map(|p| format!(" herald vs {p} |"))
            .collect::<String>()
    );
    let _ = writeln!(
        md,
        "|:---|{}{}",
        "---:|".repeat(targets.len()),
        "---:|".repeat(peers.len())
    );
    for (label, rs, key, higher) in [
        (
            "events/s through one streaming publish (to its viewer)",
            pipe,
            "events_per_s",
            true,
        ),
        ("token latency p50, ms", streams, "p50_ms", false),
        ("token latency p99, ms", streams, "p99_ms", false),
        (
            "server CPU per token, µs",
            streams,
            "server_cpu_us_per_token",
            false,
        ),
        ("tokens lost (all viewers)", streams, "lost", false),
    ] {
        let cells: Vec<String> = targets
            .iter()
            .map(|t| get(rs, t, key).map_or("–".into(), fmt_num))
            .collect();
        let ratios: String = peers
            .iter()
            .map(|p| match (get(rs, "herald", key), get(rs, p, key)) {
                (Some(h), Some(v)) if h > 0.0 && v > 0.0 => {
                    format!(" {:.2}× |", advantage(h, v, higher))
                }
                _ => " – |".into(),
            })
            .collect();
        let _ = writeln!(md, "| {label} | {} |{ratios}", cells.join(" | "));
    }
    let _ = writeln!(md);
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 1_000_000.0 {
        format!("{:.2}M", v / 1e6)
    } else if v.abs() >= 10_000.0 {
        format!("{:.0}k", v / 1e3)
    } else if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;")
}

/// p50 (dashed) and p99 (solid) against offered rate, log-scaled latency.
fn latency_svg(rows: &[Row], subscribers: &str) -> String {
    let (w, h, l, r, t, b) = (760.0, 460.0, 70.0, 170.0, 50.0, 60.0);
    let pts = |target: &str, key: &str| -> Vec<(f64, f64)> {
        rows.iter()
            .filter(|x| x.get("target").and_then(Value::as_str) == Some(target))
            .filter_map(|x| Some((x.get("rate")?.as_f64()?, x.get(key)?.as_f64()?.max(0.01))))
            .collect()
    };
    let all: Vec<(f64, f64)> = TARGETS
        .iter()
        .flat_map(|t| [pts(t, "p50_ms"), pts(t, "p99_ms")])
        .flatten()
        .collect();
    let xmax = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let xmin = all.iter().map(|p| p.0).fold(f64::MAX, f64::min).min(xmax);
    let (xlo, xhi) = (xmin.log10() - 0.1, xmax.log10() + 0.1);
    let ymax = all.iter().map(|p| p.1).fold(1.0, f64::max);
    let ymin = all.iter().map(|p| p.1).fold(f64::MAX, f64::min).min(1.0);
    let (lo, hi) = (ymin.log10().floor(), ymax.log10().ceil());
    let x = |v: f64| l + (v.log10() - xlo) / (xhi - xlo) * (w - l - r);
    let y = |v: f64| h - b - (v.log10() - lo) / (hi - lo).max(1.0) * (h - t - b);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"25\" text-anchor=\"middle\" font-size=\"15\">publish→receive latency, {} subscribers on one topic (p99 solid, p50 dashed)</text>\n",
        w / 2.0,
        esc(subscribers)
    );
    let mut d = lo;
    while d <= hi {
        let v = 10f64.powf(d);
        let _ = writeln!(
            s,
            "<line x1=\"{l}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{} ms</text>",
            w - r,
            y(v),
            y(v),
            l - 6.0,
            y(v) + 4.0,
            fmt_num(v)
        );
        d += 1.0;
    }
    let mut rates: Vec<f64> = all.iter().map(|p| p.0).collect();
    rates.sort_by(f64::total_cmp);
    rates.dedup();
    for v in rates {
        let _ = writeln!(
            s,
            "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{t}\" y2=\"{}\" stroke=\"#eee\"/><text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            x(v),
            x(v),
            h - b,
            x(v),
            h - b + 16.0,
            fmt_num(v)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">offered publish rate, messages/s, log scale (each message goes to every subscriber)</text>\n\
         <line x1=\"{l}\" x2=\"{l}\" y1=\"{t}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{l}\" x2=\"{}\" y1=\"{}\" y2=\"{}\" stroke=\"black\"/>",
        (l + w - r) / 2.0,
        h - 20.0,
        h - b,
        w - r,
        h - b,
        h - b
    );
    for (i, target) in TARGETS.iter().enumerate() {
        for (key, dash) in [("p99_ms", ""), ("p50_ms", " stroke-dasharray=\"5,4\"")] {
            let p = pts(target, key);
            if p.is_empty() {
                continue;
            }
            let path: Vec<String> = p
                .iter()
                .map(|(a, v)| format!("{:.1},{:.1}", x(*a), y(*v)))
                .collect();
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{dash} points=\"{}\"/>",
                COLORS[i],
                path.join(" ")
            );
            for (a, v) in &p {
                let _ = writeln!(
                    s,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\"/>",
                    x(*a),
                    y(*v),
                    COLORS[i]
                );
            }
        }
        let ly = t + 20.0 + i as f64 * 20.0;
        let _ = writeln!(
            s,
            "<line x1=\"{}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{}\" stroke-width=\"3\"/><text x=\"{}\" y=\"{}\">{target}</text>",
            w - r + 15.0,
            w - r + 40.0,
            COLORS[i],
            w - r + 46.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Bytes of server RSS per idle connection, one bar per target.
fn memory_svg(rows: &[Row]) -> String {
    let (w, l, bar_h) = (760.0, 90.0, 34.0);
    let vals: Vec<(&str, f64, f64)> = TARGETS
        .iter()
        .filter_map(|t| {
            let r = rows
                .iter()
                .find(|x| x.get("target").and_then(Value::as_str) == Some(*t))?;
            Some((
                *t,
                r.get("bytes_per_conn")?.as_f64()?,
                r.get("connections")?.as_f64()?,
            ))
        })
        .collect();
    let h = 60.0 + vals.len() as f64 * (bar_h + 14.0);
    let max = vals.iter().map(|v| v.1).fold(1.0, f64::max);
    let n = vals.first().map_or(0.0, |v| v.2);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"13\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"25\" text-anchor=\"middle\" font-size=\"15\">server RSS per idle SSE connection at {} connections (all processes; lower is better)</text>\n",
        w / 2.0,
        n
    );
    for (i, (t, v, _)) in vals.iter().enumerate() {
        let y = 50.0 + i as f64 * (bar_h + 14.0);
        let bw = (v / max * (w - l - 150.0)).max(1.0);
        let ci = TARGETS.iter().position(|x| x == t).unwrap_or(0);
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{t}</text><rect x=\"{l}\" y=\"{y}\" width=\"{bw:.1}\" height=\"{bar_h}\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{}\">{} bytes ({:.1} KiB)</text>",
            l - 8.0,
            y + bar_h / 2.0 + 5.0,
            COLORS[ci],
            l + bw + 8.0,
            y + bar_h / 2.0 + 5.0,
            fmt_num(*v),
            v / 1024.0
        );
    }
    s.push_str("</svg>\n");
    s
}
