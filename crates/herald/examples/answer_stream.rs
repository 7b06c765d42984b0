//! A streamed answer that survives a page reload: the demo of finite streams (issue 16). The app
//! nests the hub at `/push`; `POST /answers` starts a fake token producer, which pipes its answer
//! into the hub as an LLM backend pipes a provider's response: one streaming publish
//! (`POST /push/publish?topic=answers/{n}&complete=true`, a `text/event-stream` body written token
//! by token). The page follows the answer with herald.js `stream()`; reloaded mid-answer, it shows
//! what it had rendered and gets the rest, once; at `herald.complete` it stops for good. Its Stop
//! button is `POST /push/cancel`, which answers the producer's publish at once, so it stops.
//! Run: `cargo run -p herald --example answer_stream -- --listen 127.0.0.1:3000`, open the address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use herald::Hub;
use serde_json::json;
use tokio::sync::mpsc;

/// The answer every question gets, one token per word (a real app would pipe a model's output).
const ANSWER: &str = "Sunlight is made of every colour. On its way through the air it meets \
    molecules far smaller than its wavelength, and these scatter short waves much more than \
    long ones: blue light is scattered about five times as much as red. So wherever you look \
    in the sky, away from the sun, scattered blue light comes to your eye, and the sky looks \
    blue. At sunset the light crosses far more air, the blue is scattered away before it \
    reaches you, and the reds and oranges are left.";

/// The app's state: where its own hub takes publishes, a client, and an answer counter.
#[derive(Clone, Debug)]
struct App {
    publish_url: String,
    client: reqwest::Client,
    next: Arc<AtomicU64>,
    token_delay: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut listen: SocketAddr = "127.0.0.1:3000".parse()?;
    let mut token_delay = Duration::from_millis(150);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{arg} needs a value"))
        };
        match arg.as_str() {
            "--listen" => listen = value()?.parse()?,
            "--token-delay-ms" => token_delay = Duration::from_millis(value()?.parse()?),
            other => {
                anyhow::bail!("unknown argument {other}; use --listen ADDR, --token-delay-ms N")
            }
        }
    }

    let hub = Hub::builder().history_len(10_000).build()?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    // reqwest speaks TLS through the process's rustls provider (unused here: plain HTTP).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let state = App {
        publish_url: format!("http://{addr}/push/publish"),
        client: reqwest::Client::builder().build()?,
        next: Arc::new(AtomicU64::new(1)),
        token_delay,
    };
    let app = Router::new()
        .route("/", get(page))
        .route("/answers", post(start_answer))
        .with_state(state)
        .nest("/push", herald::router(hub.clone()));
    println!("answer_stream listening on http://{addr}");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = tokio::signal::ctrl_c().await;
            hub.shutdown();
        })
        .await?;
    Ok(())
}

/// `POST /answers`: starts a producer on a new topic and answers at once with the topic.
async fn start_answer(State(app): State<App>) -> Response {
    let n = app.next.fetch_add(1, Ordering::Relaxed);
    let topic = format!("answers/{n}");
    let tokens = ANSWER.split_inclusive(' ').count();
    tokio::spawn(produce(app, topic.clone()));
    (
        StatusCode::ACCEPTED,
        Json(json!({ "topic": topic, "tokens": tokens })),
    )
        .into_response()
}

/// The fake model: writes one `token` event per word into a streaming publish, a token every
/// `token_delay`, and stops as soon as the hub answers early (a cancel on the topic).
async fn produce(app: App, topic: String) {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    let publish = app
        .client
        .post(&app.publish_url)
        .query(&[("topic", topic.as_str()), ("complete", "true")])
        .header("Content-Type", "text/event-stream")
        .body(reqwest::Body::wrap_stream(body))
        .send();
    tokio::pin!(publish);
    let mut answer = None;
    for word in ANSWER.split_inclusive(' ') {
        tokio::select! {
            r = &mut publish => {
                answer = Some(r);
                break;
            }
            _ = tokio::time::sleep(app.token_delay) => {}
        }
        let event = format!("event: token\ndata: {}\n\n", json!(word));
        if tx.send(Ok(Bytes::from(event))).await.is_err() {
            break;
        }
    }
    // The end of the body: the hub appends herald.complete and answers.
    drop(tx);
    let answer = match answer {
        Some(a) => a,
        None => publish.await,
    };
    match answer {
        Ok(r) => match r.text().await {
            Ok(text) => tracing::info!(%topic, "the hub answered the producer: {text}"),
            Err(e) => tracing::warn!(%topic, "reading the hub's answer: {e}"),
        },
        Err(e) => tracing::error!(%topic, "the streaming publish failed: {e}"),
    }
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>answer_stream · herald example</title>
<style>
  body { font: 15px/1.5 system-ui, sans-serif; max-width: 42rem; margin: 2rem auto; padding: 0 1rem; }
  #answer { background: #f4f5fb; padding: 1rem; border-radius: 8px; min-height: 8rem; white-space: pre-wrap; }
</style>
<h1>Why is the sky blue?</h1>
<p>Ask, then reload the page while the answer streams: it carries on where it was, and stops at the
end. State: <b id="state">idle</b></p>
<button id="start">Ask</button>
<button id="stop" disabled>Stop</button>
<p id="answer"></p>
<script type="module">
  import { stream, StreamEnded } from '/push/herald.js';
  const hub = new URL('/push', location.href).href;
  const $ = (id) => document.getElementById(id);
  const state = (s) => ($('state').textContent = s);
  // What this tab rendered, per answer; herald.js keeps the id of the last event it gave out
  // in the same sessionStorage, so a reload asks only for what comes after it.
  const textKey = (topic) => `answer_stream text ${topic}`;

  let following = null;

  async function follow(topic) {
    if (following) following.return(); // a new question: stop following the previous answer
    $('answer').textContent = sessionStorage.getItem(textKey(topic)) || '';
    const answer = stream(hub, topic);
    following = answer;
    state('streaming');
    $('stop').disabled = false;
    $('stop').onclick = () => answer.cancel('stop button').catch((e) => state(`stop failed: ${e.message}`));
    let end = 'complete';
    try {
      for await (const ev of answer) {
        if (following !== answer) break;
        if (ev.type !== 'token') continue;
        $('answer').textContent += JSON.parse(ev.data);
        sessionStorage.setItem(textKey(topic), $('answer').textContent);
      }
    } catch (e) {
      end = e instanceof StreamEnded ? e.reason : `error: ${e.message}`;
    }
    if (following !== answer) return;
    state(end);
    $('stop').disabled = true;
  }

  $('start').onclick = async () => {
    const r = await fetch('/answers', { method: 'POST' });
    const { topic } = await r.json();
    sessionStorage.setItem('answer_stream topic', topic);
    follow(topic);
  };
  const current = sessionStorage.getItem('answer_stream topic');
  if (current) follow(current);
</script>
"#;
