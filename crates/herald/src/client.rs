//! `herald pub` and `herald sub`: small command-line clients of a running hub, over HTTP or HTTPS
//! (a private CA with `--ca`, or no verification with `--insecure`), with a token or publish key.
//! `sub` reconnects like a browser's `EventSource`, with its last event id, until interrupted; it
//! prints what the hub sends with every control character escaped, so a stream cannot drive the
//! terminal.

use std::path::PathBuf;
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
    /// Trust this PEM CA certificate (or self-signed certificate) for an https:// hub.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Accept any certificate from an https:// hub (testing only).
    #[arg(long, conflicts_with = "ca")]
    pub insecure: bool,
    #[command(flatten)]
    pub credentials: Credentials,
}

/// What the client authenticates with, sent as `Authorization: Bearer`. When both are given (e.g.
/// both variables are set), `pub` sends the key and `sub` the token: a hub takes publish keys for
/// publishing only.
#[derive(Debug, clap::Args)]
pub struct Credentials {
    /// A publish key of the hub (`--publish-key`).
    #[arg(long, env = "HERALD_PUBLISH_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// A JWT for the hub (`--jwt-secret` / `--jwt-public-key`).
    #[arg(long, env = "HERALD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl Credentials {
    fn publisher(&self) -> Option<&str> {
        self.key.as_deref().or(self.token.as_deref())
    }

    fn subscriber(&self) -> Option<&str> {
        self.token.as_deref().or(self.key.as_deref())
    }
}

fn with_bearer(request: reqwest::RequestBuilder, secret: Option<&str>) -> reqwest::RequestBuilder {
    match secret {
        Some(secret) => request.bearer_auth(secret),
        None => request,
    }
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
    /// Trust this PEM CA certificate (or self-signed certificate) for an https:// hub.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Accept any certificate from an https:// hub (testing only).
    #[arg(long, conflicts_with = "ca")]
    pub insecure: bool,
    #[command(flatten)]
    pub credentials: Credentials,
}

/// An HTTP client trusting what `ca` and `insecure` say (the system's roots otherwise).
fn http_client(ca: Option<&PathBuf>, insecure: bool) -> anyhow::Result<reqwest::Client> {
    // reqwest uses the process's rustls provider: ring, as the server does.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder();
    if let Some(path) = ca {
        let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .ok()
            .filter(|c| !c.is_empty())
            .with_context(|| format!("{} holds no PEM certificate", path.display()))?;
        builder = builder.tls_certs_only(certs);
    }
    if insecure {
        builder = builder.danger_accept_invalid_certs(true);
    }
    builder.build().context("cannot set up the HTTP client")
}

fn endpoint(base: &str, path: &str) -> String {
    format!("{}{path}", base.trim_end_matches('/'))
}

/// The hub's refusal: its status and its error body as sent (escaped like event data).
async fn server_error(response: reqwest::Response) -> anyhow::Error {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    anyhow::anyhow!("hub answered {status}: {}", escape(text.trim_end()))
}

pub async fn publish(args: PubArgs) -> anyhow::Result<()> {
    let mut body = json!({ "topic": args.topic, "data": args.data });
    if let Some(e) = args.event {
        body["event"] = json!(e);
    }
    if !args.user.is_empty() {
        body["users"] = json!(args.user);
    }
    let request = http_client(args.ca.as_ref(), args.insecure)?
        .post(endpoint(&args.url, "/publish"))
        .json(&body);
    let response = with_bearer(request, args.credentials.publisher())
        .send()
        .await
        .with_context(|| format!("cannot reach the hub at {}", args.url))?;
    if !response.status().is_success() {
        return Err(server_error(response).await);
    }
    println!("{}", response.text().await?);
    Ok(())
}

/// One line per event: id, type and data, tab-separated, each escaped (see [`escape`]).
pub fn format_event(event: &SseEvent) -> String {
    format!(
        "{}\t{}\t{}",
        escape(event.id.as_deref().unwrap_or("-")),
        escape(&event.event_type),
        escape(&event.data)
    )
}

/// `\` as `\\`, line feed, carriage return and tab as `\n`, `\r`, `\t`, and every other control
/// character (ESC, BEL, DEL, the C1 range ...) as `\u{..}`: what the hub sends is printed, never
/// obeyed by the terminal.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

pub async fn subscribe(args: SubArgs) -> anyhow::Result<()> {
    let client = http_client(args.ca.as_ref(), args.insecure)?;
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
        let mut request = with_bearer(
            client
                .get(endpoint(&args.url, "/events"))
                .query(&query)
                .header("accept", "text/event-stream"),
            args.credentials.subscriber(),
        );
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
                    return closed(&event, last_id.as_deref());
                }
                // A control event (herald.gap) has no id of its own: keep the last one, as a
                // browser does, so the next reconnect still resumes.
                if event.id.is_some() {
                    last_id = event.id;
                }
            }
            if let Some(ms) = parser.retry_ms {
                retry = Duration::from_millis(ms);
            }
        }
        tracing::info!("stream ended; reconnecting in {retry:?}");
        tokio::time::sleep(retry).await;
    }
}

/// How `herald sub` ends on `herald.close`: an expired token is an error (exit 1) that says how
/// to go on; any other reason is the operator's decision (exit 0).
fn closed(event: &SseEvent, last_id: Option<&str>) -> anyhow::Result<()> {
    let reason = serde_json::from_str::<Value>(&event.data)
        .ok()
        .and_then(|v| v.get("reason").and_then(Value::as_str).map(str::to_string));
    if reason.as_deref() == Some("token_expired") {
        let resume = last_id.map_or(String::new(), |id| {
            format!(" with --last-event-id {}", escape(id))
        });
        bail!(
            "token_expired: the hub ended the stream because the token expired; run again with a fresh token{resume}"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reproduces issue 12's terminal escape injection: `herald sub` printed ESC, BEL, CR and the
    /// rest of an event's data and type raw.
    #[test]
    fn control_characters_are_printed_escaped() {
        let event = SseEvent {
            id: Some("7".into()),
            event_type: "x\u{1b}]0;pwned\u{7}".into(),
            data: "\u{1b}[2J\ra\tb\\n\u{9b}31m\u{7f}é\n".into(),
        };
        let line = format_event(&event);
        assert_eq!(
            line,
            "7\tx\\u{1b}]0;pwned\\u{7}\t\\u{1b}[2J\\ra\\tb\\\\n\\u{9b}31m\\u{7f}é\\n"
        );
        assert!(!line.chars().any(|c| c.is_control() && c != '\t'));
        assert_eq!(line.matches('\t').count(), 2, "only the two separators");
    }

    proptest::proptest! {
        /// Whatever an event holds, its printed line has no control character but its two tab
        /// separators (also the `sse_stream` fuzz target).
        #[test]
        fn printed_lines_hold_no_control_characters(
            id in proptest::option::of(".*"),
            event_type in ".*",
            data in ".*",
        ) {
            let line = format_event(&SseEvent { id, event_type, data });
            proptest::prop_assert_eq!(line.matches('\t').count(), 2);
            proptest::prop_assert!(!line.chars().any(|c| c.is_control() && c != '\t'));
        }
    }
}
