//! Presence and webhooks, herald only. (a) Two nodes on one `redis-server`: a user's stream opens
//! on node B, and the time until node A shows it is measured two ways, as the `herald.presence`
//! event on a `$presence/*` stream held on A and as `online: true` in A's `GET /users/{id}`
//! (polled back to back, in a pass of its own so the polling does not slow the events timed in
//! the first); then the stream closes and the same for going offline (the grace is 0, so the
//! offline event follows at once). One user at a time, each a new one. (b) Webhook
//! deliveries per second: one hook to a receiver served by this process (answers 200 at once,
//! checks the order of ids), events published in batches, timed from the first publish to the
//! last delivery, with history in memory and on disk (where each delivery also syncs its cursor).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{Row, emit, num, row};
use crate::http::Conn;
use crate::server::{Bins, Kind, Server};

/// How long any one step may take before the run fails.
const PATIENCE: Duration = Duration::from_secs(20);

/// A presence event seen on node A: user, online, when it arrived.
type Seen = (String, bool, Instant);

/// Reads `herald.presence` events from a stream and sends each with its arrival time.
async fn watch(mut stream: crate::http::Stream, seen: mpsc::UnboundedSender<Seen>) {
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let mut lines = Vec::new();
        if stream
            .next(|bytes| {
                pending.extend_from_slice(bytes);
                while let Some(p) = pending.iter().position(|b| *b == b'\n') {
                    lines.push(pending.drain(..=p).collect::<Vec<u8>>());
                }
            })
            .await
            .is_err()
        {
            return;
        }
        let at = Instant::now();
        for line in lines {
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<Value>(data) else {
                continue;
            };
            if let (Some(user), Some(online)) = (v["user"].as_str(), v["online"].as_bool())
                && seen.send((user.to_string(), online, at)).is_err()
            {
                return;
            }
        }
    }
}

/// Waits for the presence event of `user` going `online`, skipping others.
async fn event(
    seen: &mut mpsc::UnboundedReceiver<Seen>,
    early: &mut HashMap<(String, bool), Instant>,
    user: &str,
    online: bool,
) -> anyhow::Result<Instant> {
    if let Some(at) = early.remove(&(user.to_string(), online)) {
        return Ok(at);
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (u, o, at) = tokio::time::timeout_at(deadline, seen.recv())
            .await
            .with_context(|| format!("no presence event for {user} online={online} on node A"))?
            .context("the $presence/* stream on node A ended")?;
        if u == user && o == online {
            return Ok(at);
        }
        early.insert((u, o), at);
    }
}

/// Polls `GET /users/{user}` on `a` back to back until `online` is `want`; returns when it was.
async fn until_users(a: SocketAddr, user: String, want: bool) -> anyhow::Result<Instant> {
    let mut conn = Conn::connect(a).await?;
    let path = format!("/users/{user}");
    let started = Instant::now();
    loop {
        let (status, body) = conn.get(&path).await?;
        if status != 200 {
            bail!(
                "GET {path} answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        let v: Value = serde_json::from_slice(&body)?;
        if v["online"].as_bool() == Some(want) {
            return Ok(Instant::now());
        }
        if started.elapsed() > PATIENCE {
            bail!("node A never showed {user} online={want}");
        }
    }
}

fn ms(h: &Histogram<u64>, q: f64) -> Value {
    num(h.value_at_quantile(q) as f64 / 1000.0)
}

/// (a): `samples` users, one after the other, each connecting on B and leaving.
pub async fn visibility(
    bins: &Bins,
    herald_args: &[String],
    samples: usize,
) -> anyhow::Result<Row> {
    let mut args = vec!["--presence-grace".to_string(), "0s".into()];
    args.extend_from_slice(herald_args);
    let cluster = Server::start_cluster(Kind::HeraldRedis, bins, &args, 2, 0).await?;
    let (a, b) = (cluster.nodes[0], cluster.nodes[1]);
    let result =
        async {
            let (tx, mut seen) = mpsc::unbounded_channel();
            let stream = Conn::connect(a)
                .await?
                .stream("/events?topic=$presence/*", &[])
                .await?;
            let watcher = tokio::spawn(watch(stream, tx));
            // Let both nodes see each other before the first sample.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut early = HashMap::new();
            let hist = || Histogram::<u64>::new(3);
            let (mut on_event, mut on_users, mut off_event, mut off_users) =
                (hist()?, hist()?, hist()?, hist()?);
            // Two passes, so that polling `/users` on A does not slow what the event pass times:
            // first the events alone, then `/users` (the event still awaited, to keep samples apart).
            for polling in [false, true] {
                for i in 0..samples {
                    let user = format!(
                        "bench-presence-{}-{i}",
                        if polling { "users" } else { "event" }
                    );
                    let conn = Conn::connect(b).await?;
                    let poll = polling.then(|| tokio::spawn(until_users(a, user.clone(), true)));
                    let opened = Instant::now();
                    let stream = conn
                        .stream(&format!("/events?topic=bench/presence&user={user}"), &[])
                        .await?;
                    let at = event(&mut seen, &mut early, &user, true).await?;
                    match poll {
                        Some(poll) => on_users
                            .record(poll.await??.duration_since(opened).as_micros() as u64)?,
                        None => on_event.record(at.duration_since(opened).as_micros() as u64)?,
                    }

                    let poll = polling.then(|| tokio::spawn(until_users(a, user.clone(), false)));
                    let closed = Instant::now();
                    drop(stream);
                    let at = event(&mut seen, &mut early, &user, false).await?;
                    match poll {
                        Some(poll) => off_users
                            .record(poll.await??.duration_since(closed).as_micros() as u64)?,
                        None => off_event.record(at.duration_since(closed).as_micros() as u64)?,
                    }
                }
            }
            watcher.abort();
            let mut r = row("presence", Kind::HeraldRedis);
            r.insert("nodes", 2);
            r.insert("samples", samples);
            r.insert("online_event_p50_ms", ms(&on_event, 0.5));
            r.insert("online_event_p99_ms", ms(&on_event, 0.99));
            r.insert("online_users_p50_ms", ms(&on_users, 0.5));
            r.insert("online_users_p99_ms", ms(&on_users, 0.99));
            r.insert("offline_event_p50_ms", ms(&off_event, 0.5));
            r.insert("offline_event_p99_ms", ms(&off_event, 0.99));
            r.insert("offline_users_p50_ms", ms(&off_users, 0.5));
            r.insert("offline_users_p99_ms", ms(&off_users, 0.99));
            r.insert(
                "max_ms",
                num([&on_event, &on_users, &off_event, &off_users]
                    .iter()
                    .map(|h| h.max())
                    .max()
                    .unwrap_or(0) as f64
                    / 1000.0),
            );
            anyhow::Ok(r)
        }
        .await;
    cluster.stop().await;
    let r = result?;
    emit(&r);
    Ok(r)
}

/// What the receiver has seen.
#[derive(Default)]
struct Received {
    deliveries: u64,
    last_id: u64,
    in_order: bool,
    /// When the `want`-th delivery arrived.
    done: Option<Instant>,
    want: u64,
}

async fn receive(
    axum::extract::State(got): axum::extract::State<Arc<std::sync::Mutex<Received>>>,
    body: axum::body::Bytes,
) -> axum::http::StatusCode {
    let id = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["id"].as_str().and_then(|s| s.parse::<u64>().ok()));
    let mut got = got.lock().expect("receiver lock");
    got.deliveries += 1;
    match id {
        Some(id) if id > got.last_id => got.last_id = id,
        _ => got.in_order = false,
    }
    if got.deliveries == got.want {
        got.done = Some(Instant::now());
    }
    axum::http::StatusCode::OK
}

/// (b): `events` events to one hook, history in memory or on disk.
pub async fn webhooks(
    bins: &Bins,
    herald_args: &[String],
    events: u64,
    durable: bool,
) -> anyhow::Result<Row> {
    let got = Arc::new(std::sync::Mutex::new(Received {
        in_order: true,
        want: events,
        ..Received::default()
    }));
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let receiver = tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir()?;
    let mut args = vec![
        "--webhook".to_string(),
        url,
        "--webhook-secret".into(),
        "herald-bench-webhook-secret".into(),
        "--webhook-topics".into(),
        "bench/hook".into(),
        "--history".into(),
        (events + 1000).to_string(),
    ];
    if durable {
        args.push("--data-dir".into());
        args.push(dir.path().join("data").to_string_lossy().into_owned());
    }
    args.extend_from_slice(herald_args);
    let herald = Server::start(Kind::Herald, bins, &args).await?;
    let result = async {
        // The deliverer starts from what is published after it does.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut conn = Conn::connect(herald.addr).await?;
        let one = json!({"topic": "bench/hook", "data": "x".repeat(64)});
        let started = Instant::now();
        let mut left = events;
        while left > 0 {
            let n = left.min(100);
            let batch = serde_json::to_vec(&vec![one.clone(); n as usize])?;
            let (status, answer) = conn.post_json("/publish", &batch).await?;
            anyhow::ensure!(
                status == 200,
                "publish answered {status}: {}",
                String::from_utf8_lossy(&answer)
            );
            left -= n;
        }
        let published = started.elapsed();
        // However slow the machine, deliveries must keep coming.
        let (mut seen, mut moved) = (0, Instant::now());
        let done = loop {
            let (done, deliveries) = {
                let g = got.lock().expect("receiver lock");
                (g.done, g.deliveries)
            };
            if let Some(done) = done {
                break done;
            }
            if deliveries > seen {
                (seen, moved) = (deliveries, Instant::now());
            } else if moved.elapsed() > PATIENCE {
                bail!("the receiver got {deliveries} of {events} deliveries, then none for {PATIENCE:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // Anything more would be a duplicate.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let g = got.lock().expect("receiver lock");
        let seconds = done.duration_since(started).as_secs_f64();
        let mut r = row("webhook", Kind::Herald);
        r.insert("store", if durable { "durable" } else { "memory" });
        r.insert("events", events);
        r.insert("received", g.deliveries);
        r.insert("in_order", g.in_order);
        r.insert("publish_s", num(published.as_secs_f64()));
        r.insert("seconds", num(seconds));
        r.insert("deliveries_per_s", num(events as f64 / seconds));
        anyhow::Ok(r)
    }
    .await;
    herald.stop().await;
    receiver.abort();
    let r = result?;
    emit(&r);
    Ok(r)
}
