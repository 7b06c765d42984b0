//! Runs the `job_stream` example (which `cargo test` builds into `target/debug/examples/`) and
//! checks over real HTTP and SSE that each job's chunks and its final event reach only the user who
//! started it, in order; and that the nested hub serves its dashboard and herald.js under `/push/`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use futures_util::StreamExt;
use herald_core::sse_parser::{Parser, SseEvent};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const PATIENCE: Duration = Duration::from_secs(20);

/// reqwest uses the process's rustls provider: herald's, ring.
fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn http_client() -> reqwest::Client {
    install_tls_provider();
    reqwest::Client::new()
}

fn example_binary() -> PathBuf {
    let herald = PathBuf::from(env!("CARGO_BIN_EXE_herald"));
    let path = herald
        .parent()
        .expect("the binary has a folder")
        .join("examples")
        .join(format!("job_stream{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: `cargo test` builds the examples; when selecting tests, run \
         `cargo build -p herald --example job_stream` first",
        path.display()
    );
    path
}

async fn start_example() -> (Child, String) {
    let mut child = Command::new(example_binary())
        .args(["--listen", "127.0.0.1:0", "--chunk-delay-ms", "20"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start the job_stream example");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("the example did not start in time")
        .expect("read its stdout")
        .expect("the example exited before listening");
    let url = line
        .strip_prefix("job_stream listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line}"))
        .to_string();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, url)
}

/// An open SSE stream read with the WHATWG parser.
struct Stream {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    parser: Parser,
    ready: std::collections::VecDeque<SseEvent>,
}

impl Stream {
    async fn open(url: &str) -> Stream {
        let response = http_client().get(url).send().await.expect("subscribe");
        assert_eq!(response.status(), 200, "subscribing to {url}");
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "{url}"
        );
        Stream {
            body: response.bytes_stream().boxed(),
            parser: Parser::default(),
            ready: Default::default(),
        }
    }

    async fn next(&mut self) -> SseEvent {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return event;
            }
            let chunk = tokio::time::timeout(PATIENCE, self.body.next())
                .await
                .expect("no event in time")
                .expect("the stream ended")
                .expect("read the stream");
            self.ready.extend(self.parser.feed(&chunk));
        }
    }

    /// Events up to and including the first `job.done`.
    async fn job(&mut self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        loop {
            let event = self.next().await;
            let done = event.event_type == "job.done";
            events.push(event);
            if done {
                return events;
            }
        }
    }
}

async fn start_job(http: &reqwest::Client, url: &str, body: Value) -> reqwest::Response {
    http.post(format!("{url}/jobs"))
        .json(&body)
        .send()
        .await
        .expect("POST /jobs")
}

fn check_job(events: &[SseEvent], job: u64, chunks: u64, below: u64, primes: u64) {
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let mut expected = vec!["job.chunk"; chunks as usize];
    expected.push("job.done");
    assert_eq!(types, expected, "job {job}: chunks then the final event");
    let mut ids: Vec<&str> = events
        .iter()
        .map(|e| e.id.as_deref().expect("every job event has an id"))
        .collect();
    ids.dedup();
    assert_eq!(ids.len(), events.len(), "job {job}: distinct ids");
    let data: Vec<Value> = events
        .iter()
        .map(|e| serde_json::from_str(&e.data).expect("JSON data"))
        .collect();
    let mut sum = 0;
    let mut next_from = 0;
    for (i, chunk) in data[..chunks as usize].iter().enumerate() {
        assert_eq!(chunk["job"], job);
        assert_eq!(chunk["seq"], i as u64 + 1, "job {job}: chunks in order");
        assert_eq!(chunk["from"], next_from, "job {job}: ranges are contiguous");
        next_from = chunk["to"].as_u64().expect("to");
        sum += chunk["primes"].as_u64().expect("primes");
    }
    assert_eq!(next_from, below);
    let done = &data[chunks as usize];
    assert_eq!(
        done,
        &json!({ "job": job, "chunks": chunks, "below": below, "primes": primes })
    );
    assert_eq!(sum, primes, "job {job}: the chunks add up to the result");
}

#[tokio::test]
async fn the_job_stream_example_pushes_each_users_job_output_in_order() {
    let (_child, url) = start_example().await;
    let http = http_client();

    // Subscribe first, then start the jobs: the hub delivers what is published after subscribing.
    let mut ann = Stream::open(&format!("{url}/push/events?user=ann")).await;
    let mut bob = Stream::open(&format!("{url}/push/events?user=bob")).await;
    let a = start_job(
        &http,
        &url,
        json!({ "user": "ann", "below": 100000, "chunks": 8 }),
    )
    .await;
    assert_eq!(a.status(), 202);
    let a: Value = a.json().await.expect("job answer");
    let b = start_job(
        &http,
        &url,
        json!({ "user": "bob", "below": 1000, "chunks": 3 }),
    )
    .await;
    assert_eq!(b.status(), 202);
    let b: Value = b.json().await.expect("job answer");
    let (job_a, job_b) = (a["job"].as_u64().unwrap(), b["job"].as_u64().unwrap());
    assert_ne!(job_a, job_b);

    // There are 9592 primes below 100000 and 168 below 1000; each user sees only their own job.
    let (events_a, events_b) = tokio::join!(ann.job(), bob.job());
    check_job(&events_a, job_a, 8, 100_000, 9592);
    check_job(&events_b, job_b, 3, 1000, 168);

    // The app's own validation, and the nested hub's presence and stats, over the same origin.
    let bad = start_job(&http, &url, json!({ "user": "a/b" })).await;
    assert_eq!(bad.status(), 400);
    let users: Value = http
        .get(format!("{url}/push/users"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(users["count"], 2, "{users}");
    let stats: Value = http
        .get(format!("{url}/push/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // Each job: its chunks, job.done and herald.complete on its topic.
    assert_eq!(stats["published"], 8 + 2 + 3 + 2, "{stats}");
    // A finished job's topic ends in herald.complete: a reconnect after it is answered 204.
    let mut topic = Stream::open(&format!("{url}/push/events?topic=jobs/{job_b}&since=all")).await;
    let mut last = topic.next().await;
    while last.event_type != "herald.complete" {
        last = topic.next().await;
    }
    let again = http
        .get(format!("{url}/push/events?topic=jobs/{job_b}"))
        .header("last-event-id", last.id.unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 204);
}

#[tokio::test]
async fn a_cancel_on_the_jobs_topic_stops_the_job() {
    let (_child, url) = start_example().await;
    let http = http_client();
    let answer = start_job(
        &http,
        &url,
        json!({ "user": "cat", "below": 1000000, "chunks": 1000 }),
    )
    .await;
    let job = answer.json::<Value>().await.unwrap()["job"]
        .as_u64()
        .unwrap();
    let mut topic = Stream::open(&format!("{url}/push/events?topic=jobs/{job}&since=all")).await;
    assert_eq!(topic.next().await.event_type, "job.chunk");
    let cancel = http
        .post(format!("{url}/push/cancel?topic=jobs/{job}"))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 200);
    let mut event = topic.next().await;
    while event.event_type == "job.chunk" {
        event = topic.next().await;
    }
    assert_eq!(event.event_type, "herald.cancel");
    let end = topic.next().await;
    assert_eq!(
        (end.event_type.as_str(), end.data.as_str()),
        ("herald.complete", r#"{"reason":"cancelled"}"#)
    );
}

#[tokio::test]
async fn the_nested_hub_serves_its_dashboard_and_client() {
    let (_child, url) = start_example().await;
    install_tls_provider();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let get = |path: &str| http.get(format!("{url}{path}")).send();

    // `/push` redirects to `/push/index.html` so the dashboard's relative links stay under the nest.
    let r = get("/push?user=ann").await.unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(r.headers()["location"], "/push/index.html?user=ann");
    let r = get("/push/index.html?user=ann").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    let html = r.text().await.unwrap();
    assert!(html.contains(r#"<script type="module" src="app.js">"#));
    let r = get("/push/herald.js").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    assert!(r.text().await.unwrap().contains("export { connect"));
    // The app's own page uses herald.js from the nested hub.
    let page = get("/").await.unwrap().text().await.unwrap();
    assert!(page.contains("import { connect } from '/push/herald.js'"));
}
