//! The chaos run: a Redis primary, one replica and three sentinels; herald nodes with
//! `--redis-replicas 1` behind nginx; subscribers that resume with `Last-Event-ID` and publishers
//! that retry with idempotency keys, all through nginx. For the given time it kills and restarts
//! nodes (SIGKILL), kills the Redis primary (a failover), and pauses nodes (SIGSTOP/SIGCONT), at
//! random from a printed seed. The rule it checks: every acknowledged event reaches every
//! subscriber once (after de-duplication by id), and no payload arrives under two ids.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::{Child, Command};

use crate::http::Conn;
use crate::redis_servers::{await_in_sync, cli, free_port, start_redis, wait_listening};

/// A small deterministic generator (splitmix64): the same seed, the same faults.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub herald: String,
    pub seed: u64,
    pub duration: Duration,
    pub nodes: usize,
    pub subscribers: usize,
    pub publishers: usize,
}

fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

/// Every process of the run, stopped when dropped.
struct World {
    dir: tempfile::TempDir,
    herald: String,
    /// Redis servers by port (`None` while killed).
    redis: BTreeMap<u16, Option<Child>>,
    sentinels: Vec<(u16, Child)>,
    nodes: Vec<(u16, Option<Child>)>,
    nginx: Option<Child>,
    nginx_port: u16,
}

impl World {
    async fn start(opts: &Options) -> anyhow::Result<World> {
        let mut world = World {
            dir: tempfile::tempdir()?,
            herald: opts.herald.clone(),
            redis: BTreeMap::new(),
            sentinels: Vec::new(),
            nodes: Vec::new(),
            nginx: None,
            nginx_port: free_port()?,
        };
        let (primary, replica) = (free_port()?, free_port()?);
        world.start_redis(primary, None).await?;
        world.start_redis(replica, Some(primary)).await?;
        await_in_sync(replica).await?;
        for _ in 0..3 {
            let port = free_port()?;
            let conf = world.dir.path().join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                     sentinel monitor mymaster 127.0.0.1 {primary} 2\n\
                     sentinel down-after-milliseconds mymaster 2000\n\
                     sentinel failover-timeout mymaster 6000\n\
                     sentinel parallel-syncs mymaster 1\n",
                    dir = world.dir.path().display()
                ),
            )?;
            let child = Command::new("redis-sentinel")
                .arg(&conf)
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("start redis-sentinel (apt-get install redis-sentinel)")?;
            world.sentinels.push((port, child));
            wait_listening(port, "redis-sentinel").await?;
        }
        for _ in 0..opts.nodes {
            let port = free_port()?;
            world.nodes.push((port, None));
        }
        for i in 0..opts.nodes {
            world.start_node(i).await?;
        }
        world.start_nginx().await?;
        Ok(world)
    }

    async fn start_redis(&mut self, port: u16, replica_of: Option<u16>) -> anyhow::Result<()> {
        let dir = self.dir.path().join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir)?;
        let child = start_redis(port, Some(&dir), replica_of, &[]).await?;
        self.redis.insert(port, Some(child));
        Ok(())
    }

    fn sentinel_url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|(p, _)| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+sentinel://{}/mymaster", hosts.join(","))
    }

    async fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let port = self.nodes[i].0;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node-{i}.log")))?;
        let child = Command::new(&self.herald)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--redis", &self.sentinel_url()])
            .args(["--redis-replicas", "1", "--redis-wait-timeout", "1s"])
            .args(["--heartbeat", "1s", "--trusted-proxy", "127.0.0.1"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", self.herald))?;
        self.nodes[i].1 = Some(child);
        wait_listening(port, "herald").await
    }

    async fn start_nginx(&mut self) -> anyhow::Result<()> {
        let d = self.dir.path().display();
        let servers: String = self
            .nodes
            .iter()
            .map(|(p, _)| format!("    server 127.0.0.1:{p} max_fails=0;\n"))
            .collect();
        let conf = self.dir.path().join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\n\
                 error_log {d}/nginx-error.log crit;\nevents {{ worker_connections 1024; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
                 proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
                 uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
                 upstream herald {{\n{servers}    keepalive 16;\n  }}\n\
                 server {{\n    listen 127.0.0.1:{port};\n\
                 proxy_http_version 1.1;\n    proxy_set_header Connection \"\";\n\
                 proxy_connect_timeout 1s;\n\
                 location /events {{ proxy_pass http://herald; proxy_buffering off; \
                 proxy_read_timeout 1h; }}\n\
                 location / {{ proxy_pass http://herald; proxy_read_timeout 5s; }}\n  }}\n}}\n",
                port = self.nginx_port
            ),
        )?;
        let child = Command::new("nginx")
            .args(["-c", conf.to_str().context("conf")?, "-p", &format!("{d}/")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(false)
            .spawn()
            .context("start nginx (apt-get install nginx)")?;
        self.nginx = Some(child);
        wait_listening(self.nginx_port, "nginx").await
    }

    /// The port the sentinels name as the primary (the first one that answers).
    async fn named_primary(&self) -> Option<u16> {
        for (port, _) in &self.sentinels {
            let out = cli(*port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"]).await;
            if let Some(p) = out.lines().nth(1).and_then(|p| p.trim().parse().ok()) {
                return Some(p);
            }
        }
        None
    }

    fn node_pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].1.as_ref().and_then(Child::id)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for (_, node) in &self.nodes {
            if let Some(pid) = node.as_ref().and_then(Child::id) {
                signal(pid, "CONT");
            }
        }
        if let Some(pid) = self.nginx.as_ref().and_then(Child::id) {
            // SIGTERM: the master stops its workers (SIGKILL would orphan them).
            signal(pid, "TERM");
            let pid_file = self.dir.path().join("nginx.pid");
            let started = Instant::now();
            while pid_file.exists() && started.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// What the publishers did.
#[derive(Debug, Default)]
struct Published {
    attempts: AtomicU64,
    refused: AtomicU64,
    /// payload → acknowledged id.
    acked: Mutex<HashMap<String, u128>>,
    /// When each acknowledgement came.
    ack_times: Mutex<Vec<Instant>>,
}

/// What one subscriber saw, de-duplicated by id.
#[derive(Debug, Default)]
struct Seen {
    ids: Vec<(u128, String)>,
    last: Option<u128>,
    repeated_ids: u64,
    gaps: u64,
    reconnects: u64,
}

/// One event of a stream: (type, id, data).
fn parse_events(buf: &mut Vec<u8>, out: &mut Vec<(String, Option<String>, String)>) {
    while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
        let block: Vec<u8> = buf.drain(..end + 2).collect();
        let text = String::from_utf8_lossy(&block);
        let (mut kind, mut id, mut data) = ("message".to_string(), None, Vec::new());
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                kind = v.trim_start().to_string();
            } else if let Some(v) = line.strip_prefix("id:") {
                id = Some(v.trim_start().to_string());
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
            }
        }
        if !data.is_empty() {
            out.push((kind, id, data.join("\n")));
        }
    }
}

async fn subscriber(addr: std::net::SocketAddr, seen: Arc<Mutex<Seen>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let last = seen.lock().unwrap().last.map(|l| l.to_string());
        let headers: Vec<(&str, &str)> = last
            .as_deref()
            .map(|l| vec![("Last-Event-ID", l)])
            .unwrap_or_default();
        let stream = match Conn::connect(addr).await {
            Ok(conn) => conn.stream("/events?topic=chaos", &headers).await,
            Err(e) => Err(e),
        };
        let Ok(mut stream) = stream else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut buf = Vec::new();
        let mut events = Vec::new();
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            // A paused node sends nothing, not even heartbeats (1 s): resume elsewhere.
            let read = tokio::time::timeout(
                Duration::from_secs(4),
                stream.next(|b| buf.extend_from_slice(b)),
            )
            .await;
            if !matches!(read, Ok(Ok(()))) {
                break;
            }
            parse_events(&mut buf, &mut events);
            let mut s = seen.lock().unwrap();
            for (kind, id, data) in events.drain(..) {
                match kind.as_str() {
                    "herald.gap" => s.gaps += 1,
                    "message" => {
                        let Some(id) = id.and_then(|i| i.parse::<u128>().ok()) else {
                            continue;
                        };
                        if s.last.is_some_and(|l| id <= l) {
                            s.repeated_ids += 1;
                        } else {
                            s.last = Some(id);
                            s.ids.push((id, data));
                        }
                    }
                    _ => {}
                }
            }
        }
        seen.lock().unwrap().reconnects += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn publisher(
    addr: std::net::SocketAddr,
    p: usize,
    published: Arc<Published>,
    stop: Arc<AtomicBool>,
) {
    let mut i = 0u64;
    let mut conn: Option<Conn> = None;
    while !stop.load(Ordering::Relaxed) {
        let data = format!("p{p}-{i}");
        let body = format!(r#"{{"topic":"chaos","data":"{data}","idempotencyKey":"{data}"}}"#);
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            published.attempts.fetch_add(1, Ordering::Relaxed);
            if conn.is_none() {
                conn = Conn::connect(addr).await.ok();
            }
            let answer = match conn.as_mut() {
                Some(c) => {
                    tokio::time::timeout(
                        Duration::from_secs(10),
                        c.post_json("/publish", body.as_bytes()),
                    )
                    .await
                }
                None => Ok(Err(anyhow::anyhow!("no connection"))),
            };
            match answer {
                Ok(Ok((200, reply))) => {
                    let id = serde_json::from_slice::<serde_json::Value>(&reply)
                        .ok()
                        .and_then(|v| v["id"].as_str().and_then(|s| s.parse::<u128>().ok()));
                    if let Some(id) = id {
                        published.acked.lock().unwrap().insert(data.clone(), id);
                        published.ack_times.lock().unwrap().push(Instant::now());
                        break;
                    }
                    published.refused.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Ok(_)) => {
                    published.refused.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    published.refused.fetch_add(1, Ordering::Relaxed);
                    conn = None;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Prints a line of the fault log as it happens and keeps it for the report.
fn say(log: &mut Vec<String>, line: String) {
    crate::note(&line);
    log.push(line);
}

/// Counts of what the fault loop did.
#[derive(Debug, Default)]
struct Faults {
    node_kills: u64,
    pauses: u64,
    failovers: u64,
    failovers_skipped: u64,
}

async fn faults(world: &mut World, rng: &mut Rng, until: Instant, log: &mut Vec<String>) -> Faults {
    let mut f = Faults::default();
    let started = Instant::now();
    while Instant::now() < until {
        tokio::time::sleep(rng.millis(2_000, 6_000)).await;
        if Instant::now() >= until {
            break;
        }
        let at = started.elapsed().as_secs_f64();
        let pick = rng.below(10);
        // Every run fails the primary over at least once: past half-time, the next fault is one.
        let half = until.saturating_duration_since(started) / 2;
        let pick = if f.failovers == 0 && started.elapsed() > half {
            9
        } else {
            pick
        };
        match pick {
            0..=3 => {
                let i = rng.below(world.nodes.len() as u64) as usize;
                if let Some(mut child) = world.nodes[i].1.take() {
                    let _ = child.kill().await;
                    let _ = child.wait().await;
                }
                let down = rng.millis(500, 3_000);
                say(
                    log,
                    format!("{at:7.1}s SIGKILL node {i}, restart after {down:?}"),
                );
                tokio::time::sleep(down).await;
                if let Err(e) = world.start_node(i).await {
                    say(log, format!("{at:7.1}s node {i} did not restart: {e}"));
                }
                f.node_kills += 1;
            }
            4..=6 => {
                let i = rng.below(world.nodes.len() as u64) as usize;
                let pause = rng.millis(1_000, 4_000);
                if let Some(pid) = world.node_pid(i) {
                    say(log, format!("{at:7.1}s SIGSTOP node {i} for {pause:?}"));
                    signal(pid, "STOP");
                    tokio::time::sleep(pause).await;
                    signal(pid, "CONT");
                    f.pauses += 1;
                }
            }
            _ => {
                let Some(primary) = world.named_primary().await else {
                    f.failovers_skipped += 1;
                    continue;
                };
                // Only one machine at a time: the replica must be in sync first.
                let replica = world.redis.keys().copied().find(|p| *p != primary);
                let Some(replica) = replica else { continue };
                if !cli(replica, &["INFO", "replication"])
                    .await
                    .contains("master_link_status:up")
                {
                    say(
                        log,
                        format!("{at:7.1}s skip a failover: the replica is not in sync"),
                    );
                    f.failovers_skipped += 1;
                    continue;
                }
                say(
                    log,
                    format!("{at:7.1}s SIGKILL the Redis primary (:{primary})"),
                );
                if let Some(Some(mut child)) = world.redis.insert(primary, None) {
                    let _ = child.kill().await;
                    let _ = child.wait().await;
                }
                let t = Instant::now();
                loop {
                    if world.named_primary().await == Some(replica)
                        && cli(replica, &["ROLE"]).await.starts_with("master")
                    {
                        break;
                    }
                    if t.elapsed() > Duration::from_secs(60) {
                        say(log, format!("{at:7.1}s no failover within 60 s"));
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                say(
                    log,
                    format!(
                        "{:7.1}s failover to :{replica} after {:.1}s; the old primary returns as its replica",
                        started.elapsed().as_secs_f64(),
                        t.elapsed().as_secs_f64()
                    ),
                );
                if let Err(e) = world.start_redis(primary, Some(replica)).await {
                    say(log, format!("restarting :{primary} failed: {e}"));
                }
                f.failovers += 1;
            }
        }
    }
    f
}

/// The outcome of a run; `ok()` holds when nothing acknowledged was lost or doubled.
#[derive(Debug)]
pub struct Report {
    pub text: String,
    pub ok: bool,
}

pub async fn run(opts: Options) -> anyhow::Result<Report> {
    crate::note(&format!(
        "chaos: seed {} for {:?}",
        opts.seed, opts.duration
    ));
    let mut rng = Rng(opts.seed);
    let mut world = World::start(&opts).await?;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", world.nginx_port).parse()?;
    let stop_subs = Arc::new(AtomicBool::new(false));
    let stop_pubs = Arc::new(AtomicBool::new(false));
    let published = Arc::new(Published::default());
    let mut seen = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..opts.subscribers {
        let s = Arc::new(Mutex::new(Seen::default()));
        seen.push(s.clone());
        tasks.push(tokio::spawn(subscriber(addr, s, stop_subs.clone())));
    }
    // Subscribers are open before the first publish.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut pubs = Vec::new();
    for p in 0..opts.publishers {
        pubs.push(tokio::spawn(publisher(
            addr,
            p,
            published.clone(),
            stop_pubs.clone(),
        )));
    }
    let started = Instant::now();
    let mut log = Vec::new();
    let f = faults(&mut world, &mut rng, started + opts.duration, &mut log).await;
    let ran = started.elapsed();
    stop_pubs.store(true, Ordering::Relaxed);
    for p in pubs {
        let _ = p.await;
    }
    // Every subscriber gets everything acknowledged, or the drain times out.
    let acked: HashMap<String, u128> = published.acked.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let done = seen.iter().all(|s| {
            let s = s.lock().unwrap();
            let ids: HashSet<u128> = s.ids.iter().map(|(i, _)| *i).collect();
            acked.values().all(|id| ids.contains(id))
        });
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop_subs.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let mut times = published.ack_times.lock().unwrap().clone();
    times.sort();
    let mut longest = Duration::ZERO;
    let mut prev = started;
    for t in times.iter().chain(std::iter::once(&(started + ran))) {
        longest = longest.max(t.saturating_duration_since(prev));
        prev = prev.max(*t);
    }
    let mut text = String::new();
    use std::fmt::Write;
    let _ = writeln!(
        text,
        "seed {} · {:.0} s of faults · {} herald nodes behind nginx · Redis primary + 1 replica + 3 sentinels · --redis-replicas 1\n",
        opts.seed,
        ran.as_secs_f64(),
        opts.nodes
    );
    let _ = writeln!(
        text,
        "publishes: {} attempted, {} acknowledged, {} refused or failed (then retried with the same idempotency key)",
        published.attempts.load(Ordering::Relaxed),
        acked.len(),
        published.refused.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        text,
        "faults: {} node SIGKILLs (each restarted), {} SIGSTOP/SIGCONT pauses, {} Redis primary kills (failovers), {} failovers skipped (replica not in sync)",
        f.node_kills, f.pauses, f.failovers, f.failovers_skipped
    );
    let _ = writeln!(
        text,
        "longest time without an acknowledged publish: {:.1} s\n",
        longest.as_secs_f64()
    );
    let _ = writeln!(
        text,
        "| subscriber | events | acknowledged missing | delivered twice (after de-dup by id) | ids repeated (de-duplicated) | herald.gap | reconnects |"
    );
    let _ = writeln!(text, "|---|---|---|---|---|---|---|");
    let mut ok = !acked.is_empty();
    for (n, s) in seen.iter().enumerate() {
        let s = s.lock().unwrap();
        let ids: HashSet<u128> = s.ids.iter().map(|(i, _)| *i).collect();
        let missing = acked.values().filter(|id| !ids.contains(id)).count();
        let mut payloads: HashMap<&str, usize> = HashMap::new();
        for (_, d) in &s.ids {
            *payloads.entry(d.as_str()).or_default() += 1;
        }
        let twice: usize = payloads.values().map(|n| n - 1).sum();
        ok &= missing == 0 && twice == 0;
        let _ = writeln!(
            text,
            "| {n} | {} | {missing} | {twice} | {} | {} | {} |",
            s.ids.len(),
            s.repeated_ids,
            s.gaps,
            s.reconnects
        );
    }
    let _ = writeln!(text, "\nfault log:\n```");
    for line in &log {
        let _ = writeln!(text, "{line}");
    }
    let _ = writeln!(text, "```");
    let _ = writeln!(text, "\nverdict: {}", if ok { "PASS" } else { "FAIL" });
    drop(world);
    Ok(Report { text, ok })
}
