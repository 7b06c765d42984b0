//! Streams that end on purpose (`--max-stream-age`, `?maxAge=`): ends spread by jitter, quiet
//! (no `herald.close`), resumed with `Last-Event-ID` without loss or repeats, clamped to the hub's
//! limit, counted, and, behind a real nginx, moving streams onto a node that joins a cluster.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use crate::cluster::Redis;
use crate::common::{PATIENCE, Server, Sse, expect_error};

/// What one native-style client saw: every event's data in order, and how long each of its
/// streams lived before the hub ended it.
struct Followed {
    data: Vec<String>,
    lifetimes: Vec<Duration>,
    closes: usize,
}

/// Follows `topic` as an `EventSource` does: on each end of the stream, waits `retry` and
/// reconnects with the last id it saw, until the event with data `end` arrives.
async fn follow(url: String, topic: &str, retry: Duration) -> Followed {
    let http = crate::common::http_client();
    let mut seen = Followed {
        data: Vec::new(),
        lifetimes: Vec::new(),
        closes: 0,
    };
    let mut last_id: Option<String> = None;
    loop {
        let mut req = http.get(format!("{url}/events?topic={topic}"));
        if let Some(id) = &last_id {
            req = req.header("last-event-id", id);
        }
        let response = req.send().await.expect("subscribe");
        assert_eq!(response.status(), StatusCode::OK);
        let mut sse = Sse::new(response);
        sse.opened().await;
        let opened = Instant::now();
        loop {
            match sse.next_within(PATIENCE).await {
                Some(e) if e.event_type == "herald.close" => seen.closes += 1,
                Some(e) => {
                    if e.id.is_some() {
                        last_id = e.id.clone();
                    }
                    if e.data == "end" {
                        return seen;
                    }
                    seen.data.push(e.data);
                }
                None => {
                    seen.lifetimes.push(opened.elapsed());
                    break;
                }
            }
        }
        tokio::time::sleep(retry).await;
    }
}

#[tokio::test]
async fn streams_end_spread_over_the_jitter_window_and_resume_without_loss() {
    let s = Server::start(&[
        "--max-stream-age",
        "2s",
        "--max-stream-age-jitter",
        "0.5",
        "--retry",
        "100ms",
    ])
    .await;
    let clients: Vec<_> = (0..50)
        .map(|_| tokio::spawn(follow(s.url.clone(), "age", Duration::from_millis(100))))
        .collect();
    s.eventually("/stats", |v| v["connections"] == 50).await;
    // Publish across several ages of every stream, so each reconnects more than once.
    let sent: Vec<String> = (0..90).map(|i| format!("e{i}")).collect();
    for d in &sent {
        s.publish(json!({"topic": "age", "data": d})).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.publish(json!({"topic": "age", "data": "end"})).await;
    let mut first_ends = Vec::new();
    for c in clients {
        let seen = c.await.expect("client");
        // Every event once, in order, across every planned end and reconnect.
        assert_eq!(seen.data, sent);
        assert_eq!(
            seen.closes, 0,
            "an aged stream must end without herald.close"
        );
        assert!(
            !seen.lifetimes.is_empty(),
            "a stream outlived 4.5 s with a 2 s max age"
        );
        for life in &seen.lifetimes {
            // The client starts its clock after the hub registered the stream, so a lifetime
            // is a little shorter than the hub's age; the upper end allows for a loaded host.
            assert!(
                *life >= Duration::from_millis(900) && *life < Duration::from_secs(4),
                "a stream lived {life:?}; the window is 1 s to 2 s"
            );
        }
        first_ends.push(seen.lifetimes[0]);
    }
    let (min, max) = (
        first_ends.iter().min().unwrap(),
        first_ends.iter().max().unwrap(),
    );
    // 50 uniform draws over a 1 s window: not all at once.
    assert!(
        *max - *min > Duration::from_millis(300),
        "streams ended too close together: {min:?}..{max:?}"
    );
    let (_, stats) = s.get("/stats").await;
    assert!(stats["endedByAge"].as_u64().unwrap() >= 50, "{stats}");
    let aged = s
        .metric("herald_streams_ended_by_age_total")
        .await
        .expect("herald_streams_ended_by_age_total in /metrics");
    assert!(aged >= 50.0, "{aged}");
}

#[tokio::test]
async fn max_age_asks_for_less_and_is_clamped_to_the_hub_limit() {
    let s = Server::start(&["--max-stream-age", "3s", "--max-stream-age-jitter", "0"]).await;
    let mut short = s.subscribe("topic=a&maxAge=1s").await;
    let mut long = s.subscribe("topic=a&maxAge=1h").await;
    let mut plain = s.subscribe("topic=a").await;
    for sse in [&mut short, &mut long, &mut plain] {
        sse.opened().await;
    }
    let opened = Instant::now();
    let (ended, _) = short.ends_within(PATIENCE).await;
    assert!(ended, "a stream asking for maxAge=1s did not end");
    let short_life = opened.elapsed();
    assert!(short_life < Duration::from_secs(3), "{short_life:?}");
    // The others are still open: the hub's 3 s limit is two seconds away.
    s.publish(json!({"topic": "a", "data": "still here"})).await;
    assert_eq!(long.next().await.data, "still here");
    assert_eq!(plain.next().await.data, "still here");
    // maxAge=1h is clamped to the hub's 3 s: both end together.
    for sse in [&mut long, &mut plain] {
        let (ended, events) = sse.ends_within(PATIENCE).await;
        assert!(ended && events.is_empty(), "{events:?}");
    }
    let life = opened.elapsed();
    assert!(
        life >= Duration::from_millis(2900) && life < PATIENCE,
        "{life:?}"
    );
}

#[tokio::test]
async fn without_a_hub_limit_the_clients_own_max_age_holds() {
    let s = Server::start(&[]).await;
    let mut sse = s.subscribe("topic=a&maxAge=1s").await;
    sse.opened().await;
    let (ended, events) = sse.ends_within(PATIENCE).await;
    assert!(ended && events.is_empty(), "{events:?}");
    // Streams that ask for nothing live on.
    let mut plain = s.subscribe("topic=a").await;
    plain.opened().await;
    let (ended, _) = plain.ends_within(Duration::from_millis(1500)).await;
    assert!(!ended);
}

#[tokio::test]
async fn a_malformed_or_too_short_max_age_is_refused_naming_the_parameter() {
    let s = Server::start(&["--max-stream-age", "10m"]).await;
    for bad in ["soon", "10", "500ms", "-1s", ""] {
        let r = s.open_events(&format!("topic=a&maxAge={bad}"), &[]).await;
        let answer = crate::common::json_of(r).await;
        assert!(
            answer.1["message"]
                .as_str()
                .unwrap_or("")
                .contains("'maxAge'"),
            "{answer:?}"
        );
        expect_error(answer, StatusCode::BAD_REQUEST, "invalid_max_age");
    }
}

#[tokio::test]
async fn bad_max_stream_age_settings_stop_startup() {
    for (flag, value, says) in [
        ("--max-stream-age", "500ms", "at least 1s"),
        ("--max-stream-age", "ten", "max-stream-age"),
        ("--max-stream-age-jitter", "1.5", "from 0 to 0.9"),
        ("--max-stream-age-jitter", "-0.1", "from 0 to 0.9"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                &format!("{flag}={value}"),
            ])
            .output()
            .expect("run herald");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value} started");
        assert!(stderr.contains(says), "{flag} {value}: {stderr}");
    }
}

/// A real nginx in front of the nodes, with its own prefix, config and pid file.
struct Nginx {
    dir: tempfile::TempDir,
    port: u16,
}

impl Nginx {
    fn start(upstreams: &[u16]) -> Nginx {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let nginx = Nginx {
            dir: tempfile::tempdir().unwrap(),
            port,
        };
        nginx.configure(upstreams);
        nginx.run(&[]);
        nginx
    }

    fn command(&self, extra: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new("nginx");
        c.arg("-p")
            .arg(self.dir.path())
            .arg("-c")
            .arg(self.dir.path().join("nginx.conf"))
            .args(extra);
        c
    }

    /// Writes the config: round robin over `upstreams`, streaming without buffering.
    fn configure(&self, upstreams: &[u16]) {
        let servers: String = upstreams
            .iter()
            .map(|p| format!("server 127.0.0.1:{p};"))
            .collect();
        let conf = format!(
            "worker_processes 1;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n access_log off;\n upstream herald {{ {servers} keepalive 16; }}\n\
             server {{ listen 127.0.0.1:{port};\n location / {{ proxy_pass http://herald;\n\
             proxy_http_version 1.1; proxy_set_header Connection \"\";\n\
             proxy_buffering off; proxy_read_timeout 1h; }} }}\n}}\n",
            dir = self.dir.path().display(),
            port = self.port,
        );
        std::fs::write(self.dir.path().join("nginx.conf"), conf).unwrap();
    }

    /// Points nginx at `upstreams` (`nginx -s reload`: open connections stay where they are).
    fn reload(&self, upstreams: &[u16]) {
        self.configure(upstreams);
        self.run(&["-s", "reload"]);
    }

    fn run(&self, extra: &[&str]) {
        let out = self
            .command(extra)
            .output()
            .expect("nginx must be installed (scripts/test installs it)");
        assert!(
            out.status.success(),
            "nginx {extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.command(&["-s", "stop"]).output();
    }
}

/// This node's own open streams (`herald_connections` in its `/metrics`; `/stats` is cluster-wide).
async fn local_streams(node: &Server) -> u64 {
    node.metric("herald_connections").await.unwrap_or(0.0) as u64
}

#[tokio::test]
async fn after_a_node_joins_aged_streams_move_onto_it() {
    let redis = Redis::start();
    let args = [
        "--redis",
        &redis.url(),
        "--max-stream-age",
        "2s",
        "--max-stream-age-jitter",
        "0.5",
        "--retry",
        "100ms",
    ];
    let a = Server::start(&args).await;
    let b = Server::start(&args).await;
    let nginx = Nginx::start(&[a.port, b.port]);
    let url = format!("http://127.0.0.1:{}", nginx.port);
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..30)
        .map(|_| {
            let (url, stop) = (url.clone(), stop.clone());
            tokio::spawn(async move {
                let http = crate::common::http_client();
                while !stop.load(Ordering::Relaxed) {
                    let Ok(r) = http.get(format!("{url}/events?topic=t")).send().await else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    let mut sse = Sse::new(r);
                    // Read until the hub ends the stream (or the test stops).
                    let _ = sse.ends_within(Duration::from_secs(5)).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        })
        .collect();
    let deadline = Instant::now() + PATIENCE;
    while local_streams(&a).await + local_streams(&b).await < 25 {
        assert!(Instant::now() < deadline, "the streams did not open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A third node joins, and the load balancer learns of it.
    let c = Server::start(&args).await;
    nginx.reload(&[a.port, b.port, c.port]);
    // Within a few ages, streams that ended reconnected through the new round robin.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut on_c = 0;
    while Instant::now() < deadline {
        on_c = local_streams(&c).await;
        if on_c >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    assert!(on_c >= 5, "only {on_c} of 30 streams moved to the new node");
    for client in clients {
        client.abort();
    }
}
