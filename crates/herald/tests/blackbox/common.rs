//! Shared helpers for black-box tests: start the real `herald` binary on port 0, publish over HTTP,
//! and read streams with the WHATWG SSE parser. Nothing here reaches into the server's insides.

use std::collections::VecDeque;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use herald_core::sse_parser::{Parser, SseEvent};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a test waits for something that should happen promptly before failing.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub struct Server {
    pub url: String,
    pub port: u16,
    child: Child,
    http: reqwest::Client,
    /// What herald logged to stderr, when started with [`Server::start_logged`].
    pub log: Arc<Mutex<String>>,
}

/// An HTTP client for the tests: HTTP/1.1 or HTTP/2 (by ALPN) and any certificate, since the
/// TLS tests make their own self-signed ones.
pub fn http_client() -> reqwest::Client {
    // reqwest uses the process's rustls provider (herald's: ring).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .expect("client")
}

impl Server {
    /// Starts `herald serve --listen 127.0.0.1:0` with `args` and waits until it listens.
    pub async fn start(args: &[&str]) -> Server {
        Self::start_with_env(args, &[]).await
    }

    pub async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::launch(Command::new(env!("CARGO_BIN_EXE_herald")), args, env, false).await
    }

    /// As [`Server::start`], keeping what herald logs (at info) in `log`.
    pub async fn start_logged(args: &[&str]) -> Server {
        Self::launch(Command::new(env!("CARGO_BIN_EXE_herald")), args, &[], true).await
    }

    /// Starts herald with its open-file limit lowered to `nofile` (through the shell's `ulimit`).
    pub async fn start_with_nofile(nofile: u32, args: &[&str]) -> Server {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_herald"));
        Self::launch(cmd, args, &[], false).await
    }

    async fn launch(mut cmd: Command, args: &[&str], env: &[(&str, &str)], logged: bool) -> Server {
        cmd.arg("serve");
        // Any free port, unless the test names one.
        if !args.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(args)
            .env("RUST_LOG", if logged { "info" } else { "warn" })
            .stdout(Stdio::piped())
            .stderr(if logged {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start herald");
        let log = Arc::new(Mutex::new(String::new()));
        if let Some(stderr) = child.stderr.take() {
            let log = log.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(PATIENCE, lines.next_line())
            .await
            .expect("herald did not start in time")
            .expect("read stdout")
            .expect("herald exited before listening");
        let url = line
            .strip_prefix("herald listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line}"))
            .to_string();
        let port = url.rsplit(':').next().unwrap().parse().unwrap();
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Server {
            url,
            port,
            child,
            http: http_client(),
            log,
        }
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// SIGKILLs herald and waits until it has exited, so what it held (the data directory's
    /// lock, its port) is free for the next start. Dropping a `Server` kills without waiting.
    pub async fn kill(mut self) {
        self.signal("KILL");
        self.wait_exit(Duration::from_secs(10)).await;
    }

    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        tokio::time::timeout(within, self.child.wait())
            .await
            .expect("herald did not exit in time")
            .expect("wait")
    }

    /// POSTs a JSON body to `path`; returns status and JSON answer.
    pub async fn post_json(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .expect("post");
        json_of(r).await
    }

    /// POSTs a form body to `path`.
    pub async fn post_form(&self, path: &str, form: &[(&str, &str)]) -> (StatusCode, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .form(form)
            .send()
            .await
            .expect("post");
        json_of(r).await
    }

    /// Publishes and expects 200; returns the event id.
    pub async fn publish(&self, body: Value) -> String {
        let (status, answer) = self.post_json("/publish", &body).await;
        assert_eq!(status, StatusCode::OK, "publish {body} answered {answer}");
        answer["id"].as_str().expect("id").to_string()
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("get");
        json_of(r).await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .delete(format!("{}{path}", self.url))
            .send()
            .await
            .expect("delete");
        json_of(r).await
    }

    /// Opens `GET /events?{query}` and expects a 200 stream.
    pub async fn subscribe(&self, query: &str) -> Sse {
        self.subscribe_with(query, &[]).await
    }

    pub async fn subscribe_with(&self, query: &str, headers: &[(&str, &str)]) -> Sse {
        let r = self.open_events(query, headers).await;
        assert_eq!(r.status(), StatusCode::OK, "subscribe {query}");
        Sse::new(r)
    }

    /// Sends `GET /events?{query}` and returns the raw response, whatever its status.
    pub async fn open_events(&self, query: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = self
            .http
            .get(format!("{}/events?{query}", self.url))
            .header("accept", "text/event-stream");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.expect("subscribe")
    }

    /// The first line of herald's log (a `start_logged` server) containing `needle`, waiting for
    /// it: stderr is read by another task, so a line written before an answer may come after it.
    pub async fn log_line(&self, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let found = self
                .log
                .lock()
                .unwrap()
                .lines()
                .find(|l| l.contains(needle))
                .map(str::to_string);
            if let Some(line) = found {
                return line;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "herald never logged '{needle}'; its log:\n{}",
                self.log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET /metrics` as text (expects 200).
    pub async fn metrics_text(&self) -> String {
        let r = self
            .http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .expect("get /metrics");
        assert_eq!(r.status(), StatusCode::OK, "/metrics");
        r.text().await.expect("metrics body")
    }

    /// The value of an unlabelled metric in `/metrics`, if it is there.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = self.metrics_text().await;
        let prefix = format!("{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.trim().parse().expect("a number"))
    }

    /// Polls `check` on `GET path` until it holds or PATIENCE runs out.
    pub async fn eventually(&self, path: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let (_, v) = self.get(path).await;
            if check(&v) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{path} never satisfied the check; last answer {v}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Runs `herald serve` with `args`, expecting it to refuse to start; returns its stderr.
pub async fn refused(args: &[&str]) -> String {
    let out = tokio::time::timeout(
        PATIENCE,
        Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("herald should exit")
    .unwrap();
    assert!(!out.status.success(), "herald started with {args:?}");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Asserts that `answer` is the error a client would see: this status and this `error` code.
#[track_caller]
pub fn expect_error(answer: (StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(
        (answer.0, answer.1["error"].as_str()),
        (status, Some(code)),
        "answer: {}",
        answer.1
    );
}

pub async fn json_of(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    let text = r.text().await.expect("body");
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"))
    };
    (status, value)
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// An open event stream read with the WHATWG parser.
pub struct Sse {
    pub headers: reqwest::header::HeaderMap,
    body: ByteStream,
    pub parser: Parser,
    ready: VecDeque<SseEvent>,
    /// Raw bytes received so far (for checks on the wire format).
    pub raw: Vec<u8>,
}

impl Sse {
    pub fn new(r: reqwest::Response) -> Sse {
        Sse {
            headers: r.headers().clone(),
            body: Box::pin(r.bytes_stream()),
            parser: Parser::default(),
            ready: VecDeque::new(),
            raw: Vec::new(),
        }
    }

    /// Reads more of the stream; false at its end.
    async fn fill(&mut self) -> bool {
        match self.body.next().await {
            Some(Ok(chunk)) => {
                self.raw.extend_from_slice(&chunk);
                let events = self.parser.feed(&chunk);
                self.ready.extend(events);
                true
            }
            _ => false,
        }
    }

    /// The next event, or `None` if the stream ends or nothing comes within `within`.
    pub async fn next_within(&mut self, within: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Some(e);
            }
            match tokio::time::timeout_at(deadline, self.fill()).await {
                Ok(true) => {}
                Ok(false) | Err(_) => return None,
            }
        }
    }

    /// The next event; fails the test if none comes promptly.
    pub async fn next(&mut self) -> SseEvent {
        self.next_within(PATIENCE)
            .await
            .expect("expected an event, the stream ended or stayed silent")
    }

    /// The data of the next `n` events.
    pub async fn next_data(&mut self, n: usize) -> Vec<String> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next().await.data);
        }
        out
    }

    /// Waits until the stream has delivered its preamble (retry and first comment).
    pub async fn opened(&mut self) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.parser.comments == 0 {
            assert!(
                tokio::time::timeout_at(deadline, self.fill())
                    .await
                    .unwrap_or(false),
                "the stream did not open"
            );
        }
    }

    /// True if the stream ends (EOF) within `within` without further events; events before the
    /// end are returned for inspection.
    pub async fn ends_within(&mut self, within: Duration) -> (bool, Vec<SseEvent>) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.fill()).await {
                Ok(true) => {}
                Ok(false) => return (true, self.ready.drain(..).collect()),
                Err(_) => return (false, self.ready.drain(..).collect()),
            }
        }
    }
}

/// A loopback port free at the time of asking, for a process that needs it on its command line.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something listens on `port` (a process started by a test), failing after
/// [`PATIENCE`].
pub fn wait_listening(port: u16, what: &str) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}
