//! Redis Sentinel failover with real processes: a primary, a replica and a sentinel started here
//! on free ports, herald nodes reaching them with `redis+sentinel://`. Acknowledged events survive
//! a failover (with `--redis-replicas 1`), or their loss is announced (`herald.gap`, with 0);
//! presence and closing a user work on the new primary; bad configurations fail clearly.

use std::collections::{BTreeMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{PATIENCE, Server, Sse, expect_error, http_client};

/// How long a failover may take on a loaded machine (sentinel notices within a second, then elects).
const FAILOVER_PATIENCE: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `redis-cli -p port args…`, its output trimmed ("" if it failed).
pub(crate) fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli must be installed (scripts/test installs redis-tools)");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A primary, one replica and one sentinel (quorum 1, down after 1 s), stopped when dropped.
pub(crate) struct Sentinels {
    pub(crate) primary: u16,
    pub(crate) replica: u16,
    pub(crate) sentinel: u16,
    children: Vec<(u16, Child)>,
    dir: tempfile::TempDir,
}

impl Sentinels {
    pub(crate) fn start() -> Sentinels {
        let dir = tempfile::tempdir().unwrap();
        let (primary, replica, sentinel) = (free_port(), free_port(), free_port());
        let mut set = Sentinels {
            primary,
            replica,
            sentinel,
            children: Vec::new(),
            dir,
        };
        set.start_redis(primary, None);
        set.start_redis(replica, Some(primary));
        // The replica is in sync before the sentinel watches.
        let deadline = Instant::now() + PATIENCE;
        while !cli(replica, &["INFO", "replication"]).contains("master_link_status:up") {
            assert!(Instant::now() < deadline, "the replica did not sync");
            std::thread::sleep(Duration::from_millis(50));
        }
        let conf = set.dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {sentinel}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor mymaster 127.0.0.1 {primary} 1\n\
                 sentinel down-after-milliseconds mymaster 1000\n\
                 sentinel failover-timeout mymaster 10000\n\
                 sentinel parallel-syncs mymaster 1\n",
                dir = set.dir.path().display()
            ),
        )
        .unwrap();
        let child = Command::new("redis-sentinel")
            .arg(&conf)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-sentinel must be installed (scripts/test installs it)");
        set.children.push((sentinel, child));
        wait_listening(sentinel, "redis-sentinel");
        // The sentinel has found the replica (from the primary's INFO).
        let deadline = Instant::now() + PATIENCE;
        while !cli(sentinel, &["SENTINEL", "REPLICAS", "mymaster"]).contains(&replica.to_string()) {
            assert!(
                Instant::now() < deadline,
                "the sentinel did not find the replica"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        set
    }

    fn start_redis(&mut self, port: u16, replica_of: Option<u16>) {
        let dir = self.dir.path().join(port.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no", "--dir", dir.to_str().unwrap()]);
        if let Some(p) = replica_of {
            cmd.args(["--replicaof", "127.0.0.1", &p.to_string()]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        self.children.push((port, child));
        wait_listening(port, "redis-server");
    }

    pub(crate) fn url(&self) -> String {
        format!("redis+sentinel://127.0.0.1:{}/mymaster", self.sentinel)
    }

    /// The port the sentinel names as the primary.
    pub(crate) fn named_primary(&self) -> Option<u16> {
        cli(
            self.sentinel,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"],
        )
        .lines()
        .nth(1)
        .and_then(|p| p.trim().parse().ok())
    }

    /// Waits until the sentinel names `port` as the primary and `port` says it is one.
    pub(crate) async fn await_primary(&self, port: u16) {
        let deadline = Instant::now() + FAILOVER_PATIENCE;
        loop {
            if self.named_primary() == Some(port) && cli(port, &["ROLE"]).starts_with("master") {
                return;
            }
            assert!(Instant::now() < deadline, "no failover to {port}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the redis-server on `port` (SIGKILL).
    pub(crate) fn kill(&mut self, port: u16) {
        if let Some(i) = self.children.iter().position(|(p, _)| *p == port) {
            let (_, mut child) = self.children.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn sentinel_node(set: &Sentinels, extra: &[&str]) -> Server {
    let url = set.url();
    let mut args = vec!["--redis", url.as_str(), "--heartbeat", "1s"];
    args.extend_from_slice(extra);
    Server::start(&args).await
}

/// Publishes `m0…m{n-1}` one after another, each with its idempotency key, retrying a refusal
/// with the same key until it is acknowledged. Returns (data → acknowledged id, refusals).
fn publish_with_retries(
    url: String,
    n: usize,
    pause: Duration,
    acked: Arc<Mutex<Vec<(String, String)>>>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let http = http_client();
        let mut refused = 0;
        for i in 0..n {
            let body = json!({"topic": "burst", "data": format!("m{i}"), "idempotencyKey": format!("k{i}")});
            let deadline = Instant::now() + FAILOVER_PATIENCE;
            loop {
                let answer = http
                    .post(format!("{url}/publish"))
                    .json(&body)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                match answer {
                    Ok(r) if r.status() == StatusCode::OK => {
                        let v: Value = r.json().await.unwrap();
                        acked
                            .lock()
                            .unwrap()
                            .push((format!("m{i}"), v["id"].as_str().unwrap().to_string()));
                        break;
                    }
                    Ok(r) => {
                        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
                        assert!(r.headers().contains_key("retry-after"));
                        refused += 1;
                    }
                    Err(_) => refused += 1,
                }
                assert!(Instant::now() < deadline, "m{i} was never acknowledged");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(pause).await;
        }
        refused
    })
}

/// What a subscriber that resumes with `Last-Event-ID` saw: `(id, data)` in order, and gaps.
#[derive(Default)]
struct Seen {
    events: Vec<(String, String)>,
    gaps: usize,
}

/// Reads `topic=burst` on `node` until `done` holds for what was seen, reconnecting with the last
/// id whenever the stream ends.
async fn resume_until(node: &Server, first: Sse, done: impl Fn(&Seen) -> bool) -> Seen {
    let mut seen = Seen::default();
    let mut sse = first;
    let mut last: Option<String> = None;
    let deadline = Instant::now() + FAILOVER_PATIENCE * 2;
    while !done(&seen) {
        assert!(
            Instant::now() < deadline,
            "the subscriber did not get everything"
        );
        match sse.next_within(Duration::from_secs(2)).await {
            Some(e) if e.event_type == "herald.gap" => seen.gaps += 1,
            Some(e) if e.event_type == "message" => {
                if let Some(id) = e.id.clone() {
                    last = Some(id.clone());
                    seen.events.push((id, e.data));
                }
            }
            Some(_) => {}
            None => {
                // Ended or quiet: resume from the last id (a quiet stream is reopened harmlessly).
                let headers: Vec<(&str, &str)> = last
                    .as_deref()
                    .map(|l| vec![("last-event-id", l)])
                    .unwrap_or_default();
                let r = node.open_events("topic=burst", &headers).await;
                if r.status() == StatusCode::OK {
                    sse = Sse::new(r);
                } else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    seen
}

#[tokio::test]
async fn a_sentinel_failover_during_a_burst_loses_no_acknowledged_event_with_one_replica() {
    let set = Sentinels::start();
    let a = sentinel_node(&set, &["--redis-replicas", "1"]).await;
    let b = sentinel_node(&set, &["--redis-replicas", "1"]).await;
    let mut sub = b.subscribe("topic=burst").await;
    sub.opened().await;
    const N: usize = 60;
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let publisher =
        publish_with_retries(a.url.clone(), N, Duration::from_millis(30), acked.clone());
    // A third in, the sentinel hands the primary to the replica.
    let deadline = Instant::now() + PATIENCE * 3;
    while acked.lock().unwrap().len() < N / 3 {
        assert!(Instant::now() < deadline, "publishing did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        cli(set.sentinel, &["SENTINEL", "FAILOVER", "mymaster"]),
        "OK"
    );
    set.await_primary(set.replica).await;
    publisher.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), N);
    let want: BTreeMap<String, String> = acked.iter().cloned().collect();
    let seen = resume_until(&b, sub, |s| {
        let ids: HashSet<&String> = s.events.iter().map(|(id, _)| id).collect();
        want.values().all(|id| ids.contains(id))
    })
    .await;
    // In order, once each, and each payload under its acknowledged id only.
    let ids: Vec<u128> = seen
        .events
        .iter()
        .map(|(id, _)| id.parse().unwrap())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "in order, no duplicates: {:?}",
        seen.events
    );
    for (data, id) in &seen
        .events
        .iter()
        .map(|(i, d)| (d.clone(), i.clone()))
        .collect::<Vec<_>>()
    {
        assert_eq!(
            want.get(data),
            Some(id),
            "{data} arrived under an id never acknowledged"
        );
    }
    assert_eq!(seen.gaps, 0, "nothing acknowledged was lost");
    // The new primary took writes (its replica, the old primary, acknowledges them).
    let (status, _) = a
        .post_json("/publish", &json!({"topic": "burst", "data": "after"}))
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn killing_the_primary_without_replicas_loses_nothing_silently() {
    let mut set = Sentinels::start();
    let a = sentinel_node(&set, &[]).await;
    let mut sub = a.subscribe("topic=burst").await;
    sub.opened().await;
    const N: usize = 60;
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let publisher =
        publish_with_retries(a.url.clone(), N, Duration::from_millis(20), acked.clone());
    let deadline = Instant::now() + PATIENCE * 3;
    while acked.lock().unwrap().len() < N / 3 {
        assert!(Instant::now() < deadline, "publishing did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let old = set.primary;
    set.kill(old);
    set.await_primary(set.replica).await;
    publisher.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    let last_acked = acked.last().unwrap().1.clone();
    let seen = resume_until(&a, sub, |s| {
        s.events.iter().any(|(id, _)| *id == last_acked)
    })
    .await;
    let ids: HashSet<&String> = seen.events.iter().map(|(id, _)| id).collect();
    let missing: Vec<&(String, String)> =
        acked.iter().filter(|(_, id)| !ids.contains(id)).collect();
    assert!(
        missing.is_empty() || seen.gaps > 0,
        "acknowledged events missing without a herald.gap: {missing:?}"
    );
}

#[tokio::test]
async fn presence_and_closing_a_user_work_across_a_failover() {
    let set = Sentinels::start();
    let a = sentinel_node(&set, &[]).await;
    let b = sentinel_node(&set, &[]).await;
    let mut on_b = b.subscribe("user=ada").await;
    on_b.opened().await;
    a.eventually("/users/ada", |v| v["connections"] == 1).await;
    assert_eq!(
        cli(set.sentinel, &["SENTINEL", "FAILOVER", "mymaster"]),
        "OK"
    );
    set.await_primary(set.replica).await;
    // Presence comes from the new primary, where every node reports again.
    a.eventually("/stats", |v| v["connections"] == 1).await;
    a.eventually("/users/ada", |v| v["connections"] == 1).await;
    // Closing on one node reaches the other through the new primary's control channel; retried
    // while b's subscription moves over (a close sent before it listens is not replayed).
    let deadline = Instant::now() + FAILOVER_PATIENCE;
    loop {
        let (status, _) = a.delete("/users/ada/connections").await;
        if status == StatusCode::OK {
            let (ended, events) = on_b.ends_within(Duration::from_secs(2)).await;
            if ended {
                assert!(
                    events.iter().any(|e| e.event_type == "herald.close"),
                    "{events:?}"
                );
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "ada's stream on b was never closed"
        );
    }
    a.eventually("/users/ada", |v| v["online"] == false).await;
}

#[tokio::test]
async fn bad_sentinel_configurations_fail_clearly() {
    // No sentinel listening: startup fails naming the addresses.
    let port = free_port();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", "127.0.0.1:0", "--redis"])
        .arg(format!("redis+sentinel://127.0.0.1:{port}/mymaster"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no sentinel answered") && err.contains(&port.to_string()),
        "{err}"
    );
    // A URL without a master name is a configuration error.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--redis", "redis+sentinel://127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no master name"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let set = Sentinels::start();
    // A master the sentinels do not know.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", "127.0.0.1:0", "--redis"])
        .arg(format!(
            "redis+sentinel://127.0.0.1:{}/nosuchmaster",
            set.sentinel
        ))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("know no master named 'nosuchmaster'"), "{err}");
    // More replicas than there are: every publish is refused, not acknowledged.
    let a = sentinel_node(
        &set,
        &["--redis-replicas", "2", "--redis-wait-timeout", "200ms"],
    )
    .await;
    let answer = a
        .post_json(
            "/publish",
            &json!({"topic": "t", "data": "x", "idempotencyKey": "r1"}),
        )
        .await;
    expect_error(answer, StatusCode::SERVICE_UNAVAILABLE, "not_replicated");
    // With one replica it goes through, and the retried key is answered as the same event.
    let b = sentinel_node(&set, &["--redis-replicas", "1"]).await;
    let (status, first) = b
        .post_json(
            "/publish",
            &json!({"topic": "t", "data": "x", "idempotencyKey": "r1"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let (_, again) = b
        .post_json(
            "/publish",
            &json!({"topic": "t", "data": "x", "idempotencyKey": "r1"}),
        )
        .await;
    assert_eq!(
        (again["id"].clone(), again["duplicate"].clone()),
        (first["id"].clone(), json!(true))
    );
    // --redis-replicas needs --redis.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--redis-replicas", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("redis-replicas"));
}

/// A `redis-server` on `port` that saves only when told (`SAVE`) and loads that snapshot when
/// restarted: a restart after writes since looks to a node like a replica promoted without the old
/// primary's last writes (a stream that ends before what it fanned out).
fn bare_redis(port: u16, dir: &std::path::Path) -> Bare {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no", "--dir", dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (scripts/test installs it)");
    wait_listening(port, "redis-server");
    Bare(child)
}

/// A redis-server killed when dropped (also when the test fails).
struct Bare(Child);

impl Drop for Bare {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_stream_that_went_back_is_announced_with_a_gap_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let redis = bare_redis(port, dir.path());
    let url = format!("redis://127.0.0.1:{port}/0");
    let a = Server::start(&["--redis", &url, "--heartbeat", "1s"]).await;
    let mut sub = a.subscribe("topic=back").await;
    sub.opened().await;
    for i in 0..3 {
        a.publish(json!({"topic": "back", "data": format!("old{i}")}))
            .await;
        if i == 0 {
            // What the replica had: a snapshot holding old0 only.
            assert_eq!(cli(port, &["SAVE"]), "OK");
        }
    }
    let mut old_ids = HashSet::new();
    for want in ["old0", "old1", "old2"] {
        let e = sub.next().await;
        assert_eq!(e.data, want);
        old_ids.insert((e.id.unwrap(), e.data));
    }
    // The Redis the node finds next holds old0 but not old1 and old2, which it fanned out.
    drop(redis);
    let _redis = bare_redis(port, dir.path());
    let deadline = Instant::now() + PATIENCE * 3;
    let after = loop {
        let (status, v) = a
            .post_json("/publish", &json!({"topic": "back", "data": "new"}))
            .await;
        if status == StatusCode::OK {
            break v;
        }
        assert!(Instant::now() < deadline, "publishing did not come back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The stream hears of the gap, replays what the new stream still holds (ids it already has,
    // which a client drops), then goes on with what the new stream adds.
    let gap = sub.next().await;
    assert_eq!(gap.event_type, "herald.gap", "{gap:?}");
    loop {
        let next = sub.next().await;
        if next.data == "new" {
            assert_eq!(next.id.as_deref(), after["id"].as_str());
            break;
        }
        assert!(
            old_ids.contains(&(next.id.clone().unwrap(), next.data.clone())),
            "only events the stream already had come again: {next:?}"
        );
    }
    assert_eq!(a.metric("herald_history_rewinds_total").await, Some(1.0));
    a.eventually("/stats", |v| v["rewinds"] == 1).await;
}
