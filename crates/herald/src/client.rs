//! `herald pub` and `herald sub`: small command-line clients of a running hub, over plain HTTP.
//! `sub` reconnects like a browser's `EventSource`, with its last event id, until interrupted.

use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use herald_core::sse_parser::{Parser, SseEvent};
use serde_json::{Value, json};

#[derive(Debug, clap::Args)]
pub struct PubArgs {
    /// Topic to publish to.
    pub topic: String,
    /// The message data.
    pub data: String,
    /// Event type.
    #[arg(long)]
    pub event: Option<String>,
    /// Also send to this user (repeatable).
    #[arg(long)]
    pub user: Vec<String>,
    /// Base URL of the hub.
    #[arg(long, env = "HERALD_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
}

#[derive(Debug, clap::Args)]
pub struct SubArgs {
    /// Topic selectors (`*` matches one segment, a last `**` one or more).
    pub selectors: Vec<String>,
    /// Subscribe as this user (receives the user's messages too).
    #[arg(long)]
    pub user: Option<String>,
    /// Resume after this event id.
    #[arg(long)]
    pub last_event_id: Option<String>,
    /// Base URL of the hub.
    #[arg(long, env = "HERALD_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
}

fn endpoint(base: &str, path: &str) -> String {
    format!("{}{path}", base.trim_end_matches('/'))
}

/// The server's error message from a JSON error body, or the raw text.
async fn server_error(response: reqwest::Response) -> anyhow::Error {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
        .unwrap_or(text);
    anyhow::anyhow!("hub answered {status}: {message}")
}

pub async fn publish(args: PubArgs) -> anyhow::Result<()> {
    let mut body = json!({ "topic": args.topic, "data": args.data });
    if let Some(e) = args.event {
        body["event"] = json!(e);
    }
    if !args.user.is_empty() {
        body["users"] = json!(args.user);
    }
    let response = reqwest::Client::new()
        .post(endpoint(&args.url, "/publish"))
        .json(&body)
        .send()
        .await
        .with_context(|| format!("cannot reach the hub at {}", args.url))?;
    if !response.status().is_success() {
        return Err(server_error(response).await);
    }
    println!("{}", response.text().await?);
    Ok(())
}

/// One line per event: id, type and data, tab-separated, with line breaks in data shown as `\n`.
pub fn format_event(event: &SseEvent) -> String {
    format!(
        "{}\t{}\t{}",
        event.id.as_deref().unwrap_or("-"),
        event.event_type,
        event.data.replace('\\', "\\\\").replace('\n', "\\n")
    )
}

pub async fn subscribe(args: SubArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let mut last_id = args.last_event_id.clone();
    let mut retry = Duration::from_secs(3);
    loop {
        let mut query: Vec<(&str, &str)> = args
            .selectors
            .iter()
            .map(|s| ("topic", s.as_str()))
            .collect();
        if let Some(u) = &args.user {
            query.push(("user", u));
        }
        let mut request = client
            .get(endpoint(&args.url, "/events"))
            .query(&query)
            .header("accept", "text/event-stream");
        if let Some(id) = &last_id {
            request = request.header("last-event-id", id);
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("cannot reach the hub: {e}; retrying in {retry:?}");
                tokio::time::sleep(retry).await;
                continue;
            }
        };
        match response.status().as_u16() {
            200 => {}
            204 => bail!("the hub refused this subscription (204 No Content): not reconnecting"),
            _ => return Err(server_error(response).await),
        }
        let mut parser = Parser::default();
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            for event in parser.feed(&chunk) {
                println!("{}", format_event(&event));
                if event.event_type == "herald.close" {
                    return Ok(());
                }
                last_id = event.id.clone();
            }
            if let Some(ms) = parser.retry_ms {
                retry = Duration::from_millis(ms);
            }
        }
        tracing::info!("stream ended; reconnecting in {retry:?}");
        tokio::time::sleep(retry).await;
    }
}
