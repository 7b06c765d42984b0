//! Embedding herald in an axum app: the hub is nested at `/push`, and the app's own `POST /jobs`
//! starts a long job whose output is pushed to the user who asked, chunk by chunk, then `job.done`.
//! Each job is also a finite stream on its topic `jobs/{id}`: it ends with `herald.complete`, and
//! a `herald.cancel` there (`POST /push/cancel?topic=jobs/{id}`, the page's Stop button) stops the
//! job, which then completes with `{"reason":"cancelled"}`.
//! Run: `cargo run -p herald --example job_stream -- --listen 127.0.0.1:3000`, open the address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use herald::{EventType, Hub, Message, Targets, Topic, UserId};
use serde::Deserialize;
use serde_json::json;

/// The app's state: its hub handle (cheap to clone) and a job counter.
#[derive(Clone, Debug)]
struct App {
    hub: Hub,
    next_job: Arc<AtomicU64>,
    chunk_delay: Duration,
}

/// `POST /jobs` body. A real app takes the user from its session; this one trusts the body.
#[derive(Debug, Deserialize)]
struct JobRequest {
    user: String,
    /// Count the primes below this number...
    #[serde(default = "default_limit")]
    below: u64,
    /// ...in this many chunks, each pushed when it is done.
    #[serde(default = "default_chunks")]
    chunks: u64,
}

fn default_limit() -> u64 {
    100_000
}

fn default_chunks() -> u64 {
    10
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let mut listen: SocketAddr = "127.0.0.1:3000".parse()?;
    let mut chunk_delay = Duration::from_millis(300);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{arg} needs a value"))
        };
        match arg.as_str() {
            "--listen" => listen = value()?.parse()?,
            "--chunk-delay-ms" => chunk_delay = Duration::from_millis(value()?.parse()?),
            other => {
                anyhow::bail!("unknown argument {other}; use --listen ADDR, --chunk-delay-ms N")
            }
        }
    }

    // One hub for the whole app: its HTTP interface is nested below, and handlers publish to it.
    let hub = Hub::builder().history_len(1000).build()?;
    let state = App {
        hub: hub.clone(),
        next_job: Arc::new(AtomicU64::new(1)),
        chunk_delay,
    };
    let app = Router::new()
        .route("/", get(page))
        .route("/jobs", post(start_job))
        .with_state(state)
        .nest("/push", herald::router(hub.clone()));

    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("job_stream listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = tokio::signal::ctrl_c().await;
            // End the open streams so the server can stop; clients reconnect with their last id.
            hub.shutdown();
        })
        .await?;
    Ok(())
}

/// Starts a job for `user` and answers at once; the output arrives over `/push/events?user=..`.
async fn start_job(State(app): State<App>, Json(request): Json<JobRequest>) -> Response {
    let user = match UserId::new(&request.user) {
        Ok(user) => user,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({ "error": "invalid_user", "message": format!("user id {e}") })),
            )
                .into_response();
        }
    };
    if request.chunks == 0 || request.chunks > 1000 || request.below > 50_000_000 {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({
                "error": "invalid_job",
                "message": "chunks must be 1 to 1000 and below at most 50000000",
            })),
        )
            .into_response();
    }
    let job = app.next_job.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(run_job(app, job, user, request.below, request.chunks));
    (StatusCode::ACCEPTED, Json(json!({ "job": job }))).into_response()
}

/// The long job: counts primes below `below`, one range per chunk, pushing each result to `user`
/// and to the job's topic as a `job.chunk` event, then a `job.done` event with the total and
/// `herald.complete` on the topic. A `herald.cancel` on the topic stops it between two chunks.
async fn run_job(app: App, job: u64, user: UserId, below: u64, chunks: u64) {
    let chunk_type = EventType::new("job.chunk").expect("a valid event type");
    let done_type = EventType::new("job.done").expect("a valid event type");
    let topic = Topic::new(&format!("jobs/{job}")).expect("a valid topic");
    let targets = Targets {
        topics: vec![topic.clone()],
        users: vec![user.clone()],
        broadcast: false,
    };
    let mut cancel = app.hub.watch_cancel(vec![topic.clone()]);
    let step = below.div_ceil(chunks);
    let mut total = 0;
    for seq in 1..=chunks {
        let from = (seq - 1) * step;
        let to = (seq * step).min(below);
        // The work itself runs off the async threads, as any blocking job should.
        let count =
            tokio::task::spawn_blocking(move || (from..to).filter(|&n| is_prime(n)).count())
                .await
                .expect("the prime counter does not panic");
        total += count;
        let data = json!({ "job": job, "seq": seq, "from": from, "to": to, "primes": count });
        let message = Message::to_targets(targets.clone())
            .event(chunk_type.clone())
            .data(data.to_string());
        if let Err(e) = app.hub.publish(message).await {
            tracing::error!(job, seq, "cannot publish a chunk: {e}");
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(app.chunk_delay) => {}
            _ = cancel.cancelled() => {
                let end = Message::to_topic(topic)
                    .event(EventType::complete())
                    .data(json!({ "reason": "cancelled" }).to_string());
                if let Err(e) = app.hub.publish(end).await {
                    tracing::error!(job, "cannot complete the cancelled job: {e}");
                }
                return;
            }
        }
    }
    let done = json!({ "job": job, "chunks": chunks, "below": below, "primes": total });
    // The result and the end of the job's stream, as one batch: all or nothing.
    let messages = vec![
        Message::to_targets(targets)
            .event(done_type)
            .data(done.to_string()),
        Message::to_topic(topic)
            .event(EventType::complete())
            .data("{}"),
    ];
    if let Err(e) = app.hub.publish_batch(messages).await {
        tracing::error!(job, "cannot publish the result: {e}");
    }
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// A page that uses herald.js (served by the nested hub) to watch its user's jobs.
async fn page() -> Html<&'static str> {
    Html(PAGE)
}

const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>job_stream · herald example</title>
<style>
  body { font: 15px/1.5 system-ui, sans-serif; max-width: 42rem; margin: 2rem auto; padding: 0 1rem; }
  pre { background: #f4f5fb; padding: 1rem; border-radius: 8px; min-height: 8rem; white-space: pre-wrap; }
</style>
<h1>Prime counter</h1>
<p>Starts a job on the server and shows its output as herald pushes it. State: <b id="state">…</b></p>
<button id="start">Count primes below 1,000,000</button>
<button id="stop">Stop the last job</button>
<pre id="out"></pre>
<script type="module">
  import { connect } from '/push/herald.js';
  const user = 'demo-' + Math.random().toString(36).slice(2, 8);
  const out = document.getElementById('out');
  const h = connect('/push', { user });
  h.on('state', (s) => (document.getElementById('state').textContent = s));
  h.on('job.chunk', (e) => {
    const c = JSON.parse(e.data);
    out.textContent += `job ${c.job} chunk ${c.seq}: ${c.primes} primes in [${c.from}, ${c.to})\n`;
  });
  h.on('job.done', (e) => {
    const d = JSON.parse(e.data);
    out.textContent += `job ${d.job} done: ${d.primes} primes below ${d.below}\n`;
  });
  let last = null;
  document.getElementById('start').onclick = async () => {
    const r = await fetch('/jobs', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ user, below: 1000000, chunks: 10 }),
    });
    last = (await r.json()).job;
  };
  // A herald.cancel on the job's topic stops it on the server (the job watches its topic).
  document.getElementById('stop').onclick = () =>
    last && fetch(`/push/cancel?topic=jobs/${last}`, { method: 'POST' });
</script>
"#;
