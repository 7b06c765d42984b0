//! SSE clients that no one here wrote, run against the real binary: sseclient-py over requests,
//! httpx-sse, the npm `eventsource` package, JDK 17's `HttpClient` and curl. Each must hand over an
//! event within a second of its publish (a functional deadline for receiving, not a performance
//! figure). Their packages are installed by the test into `target/tmp/real-clients` (a venv from
//! `requirements.txt`, `npm ci` from `package-lock.json`), pinned by the files in `tests/clients/`.
//!
//! Reproduces issue 12 (defect 12): the lean stream path answered close-delimited (no chunked
//! framing), so urllib3-based clients sat on an event until 128/512 bytes or the close arrived; and
//! JDK's `HttpClient` (`Content-Length: 0`, `Upgrade: h2c`) never took the lean path.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::common::{PATIENCE, Server};

/// How long after its publish a client must have handed the event over.
const RECEIVE_WITHIN: Duration = Duration::from_secs(1);

fn sources() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// Installs the clients' packages once per test run (the tests of this file share it).
fn provisioned() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("real-clients");
        std::fs::create_dir_all(&dir).unwrap();
        let run = |cmd: &mut std::process::Command| {
            let status = cmd.status().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
            assert!(status.success(), "{cmd:?} failed: {status}");
        };
        let requirements = std::fs::read_to_string(sources().join("requirements.txt")).unwrap();
        let stamp = dir.join("venv/installed.txt");
        if std::fs::read_to_string(&stamp).ok().as_deref() != Some(requirements.as_str()) {
            run(std::process::Command::new("python3")
                .args(["-m", "venv"])
                .arg(dir.join("venv")));
            run(std::process::Command::new(dir.join("venv/bin/pip"))
                .args(["install", "-q", "-r"])
                .arg(sources().join("requirements.txt")));
            std::fs::write(&stamp, &requirements).unwrap();
        }
        let lock = std::fs::read_to_string(sources().join("package-lock.json")).unwrap();
        if std::fs::read_to_string(dir.join("package-lock.json"))
            .ok()
            .as_deref()
            != Some(lock.as_str())
            || !dir.join("node_modules/eventsource").exists()
        {
            for file in ["package.json", "package-lock.json"] {
                std::fs::copy(sources().join(file), dir.join(file)).unwrap();
            }
            run(std::process::Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&dir));
        }
        dir
    })
}

struct Client {
    _child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Client {
    fn start(program: impl AsRef<std::ffi::OsStr>, args: &[&str], cwd: &Path) -> Client {
        let mut child = Command::new(program)
            .args(args)
            .current_dir(cwd)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start the client");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Client {
            _child: child,
            lines,
        }
    }

    /// The next line the client printed, within `within`.
    async fn line_within(&mut self, within: Duration) -> Option<String> {
        tokio::time::timeout(within, self.lines.next_line())
            .await
            .ok()?
            .expect("read the client's output")
    }

    /// Skips lines until one starting with `prefix`; returns the rest of it (less a trailing CR).
    async fn expect(&mut self, prefix: &str, within: Duration) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let line = self
                .line_within(left)
                .await
                .unwrap_or_else(|| panic!("no `{prefix}` line within {within:?}"));
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.trim_end_matches('\r').to_string();
            }
        }
    }
}

/// Starts a hub and the client on `GET /events?user=u&topic=t`; checks the lines it prints on
/// opening (`opened`: prefix and rest, in order), waits until the hub counts the connection, then
/// publishes two events and expects the client to print each (a line `data` + the data) within a
/// second of its publish.
async fn receives_promptly(
    start: impl FnOnce(&str) -> Client,
    opened: &[(&str, &str)],
    data: &str,
) {
    let s = Server::start(&[]).await;
    let url = format!("{}/events?user=u&topic=t", s.url);
    let mut client = start(&url);
    for (prefix, rest) in opened {
        // Interpreters and the JVM start slowly on a loaded host: that is not what is measured.
        assert_eq!(&client.expect(prefix, PATIENCE * 6).await, rest, "{prefix}");
    }
    s.eventually("/users/u", |v| v["connections"] == 1).await;
    for payload in ["{\"hello\":1}", "second"] {
        s.publish(json!({"topic": "t", "data": payload})).await;
        let deadline = tokio::time::Instant::now() + RECEIVE_WITHIN;
        // httpx-sse also hands over the preamble (`retry:` alone) as an event with empty data.
        let received = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let line = client.expect(data, left).await;
            if !line.is_empty() {
                break line;
            }
        };
        assert_eq!(received, payload);
    }
}

fn python(script: &str) -> impl FnOnce(&str) -> Client {
    let dir = provisioned();
    let script = sources().join(script);
    move |url| {
        Client::start(
            dir.join("venv/bin/python"),
            &[script.to_str().unwrap(), url],
            dir,
        )
    }
}

#[tokio::test]
async fn sseclient_py_over_requests_gets_each_event_at_once() {
    receives_promptly(
        python("sseclient_requests.py"),
        &[("status:", "200")],
        "data:",
    )
    .await;
}

#[tokio::test]
async fn httpx_sse_gets_each_event_at_once() {
    receives_promptly(
        python("httpx_sse_client.py"),
        &[("status:", "200")],
        "data:",
    )
    .await;
}

#[tokio::test]
async fn npm_eventsource_gets_each_event_at_once() {
    let dir = provisioned();
    // Beside its node_modules, so `import 'eventsource'` resolves.
    let script = dir.join("eventsource_client.mjs");
    std::fs::copy(sources().join("eventsource_client.mjs"), &script).unwrap();
    let start = |url: &str| Client::start("node", &[script.to_str().unwrap(), url], dir);
    receives_promptly(start, &[("status:", "200")], "data:").await;
}

/// JDK 17's defaults (HTTP/2 offered as `Upgrade: h2c`, `Content-Length: 0`): the lean path is the
/// one that answers `connection: close` (hyper's keeps the connection).
#[tokio::test]
async fn jdk_http_client_takes_the_lean_path_and_gets_each_event_at_once() {
    let script = sources().join("JdkStream.java");
    let start = |url: &str| {
        Client::start(
            "java",
            &[script.to_str().unwrap(), url],
            &std::env::temp_dir(),
        )
    };
    receives_promptly(
        start,
        &[("status:", "200"), ("connection:", "close")],
        "data:",
    )
    .await;
}

/// curl shows the raw head: the README's pasted headers, chunked framing included.
#[tokio::test]
async fn curl_gets_each_event_at_once_from_a_chunked_body() {
    let start = |url: &str| Client::start("curl", &["-sSNi", url], &std::env::temp_dir());
    let head = [
        ("HTTP/1.1 ", "200 OK"),
        ("content-type: ", "text/event-stream"),
        ("cache-control: ", "no-cache"),
        ("x-accel-buffering: ", "no"),
        ("transfer-encoding: ", "chunked"),
        ("connection: ", "close"),
    ];
    receives_promptly(start, &head, "data: ").await;
}
