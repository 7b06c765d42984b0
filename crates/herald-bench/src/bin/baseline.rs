//! The hand-written baseline peer: what an app team writes for SSE with axum, one
//! `tokio::sync::broadcast` channel per topic, `Sse` with keep-alive. Routes shaped like herald's:
//! `GET /events?topic=T`, `POST /publish` `{"topic":T,"data":D}`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast;

#[derive(Default)]
struct Hub {
    topics: Mutex<HashMap<String, broadcast::Sender<Arc<str>>>>,
    next_id: AtomicU64,
}

impl Hub {
    fn sender(&self, topic: &str) -> broadcast::Sender<Arc<str>> {
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        topics
            .entry(topic.to_string())
            .or_insert_with(|| broadcast::channel(1024).0)
            .clone()
    }
}

#[derive(Deserialize)]
struct Subscribe {
    topic: String,
}

#[derive(Deserialize)]
struct Publish {
    topic: String,
    data: String,
}

async fn events(
    State(hub): State<Arc<Hub>>,
    Query(q): Query<Subscribe>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = hub.sender(&q.topic).subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(data) => return Some((Ok(Event::default().data(&*data)), rx)),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn publish(State(hub): State<Arc<Hub>>, Json(p): Json<Publish>) -> Json<Value> {
    let id = hub.next_id.fetch_add(1, Ordering::Relaxed) + 1;
    let delivered = hub.sender(&p.topic).send(p.data.into()).unwrap_or(0);
    Json(json!({"id": id.to_string(), "delivered": delivered}))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut listen = "127.0.0.1:8090".to_string();
    while let Some(a) = args.next() {
        if a == "--listen" {
            listen = args.next().unwrap_or(listen);
        }
    }
    let app = Router::new()
        .route("/events", get(events))
        .route("/publish", post(publish))
        .with_state(Arc::new(Hub::default()));
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("baseline listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
