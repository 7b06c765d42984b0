//! Starts and stops the servers under test (herald, nchan, the axum baseline, the ceiling, npm
//! `resumable-stream` with its Redis) as child processes, knows how each one is published to and
//! subscribed from, and reads the RSS and CPU time of all of a server's processes from /proc.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::redis_servers::{await_in_sync, cli, free_port, start_redis};

/// A server under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Herald,
    /// One herald node in cluster mode, with its own Redis.
    HeraldRedis,
    /// Three herald nodes sharing one Redis; subscribers and publishers spread over them.
    HeraldRedis3,
    /// One herald node with `--redis-replicas 1`: its Redis has a replica that must acknowledge
    /// every publish (`WAIT`).
    HeraldRedisR1,
    /// Three such nodes.
    HeraldRedis3R1,
    /// herald's Mercure endpoint (`--mercure`, open hub): `/.well-known/mercure`, form publishes.
    HeraldMercure,
    Nchan,
    Baseline,
    Ceiling,
    /// Vercel's npm `resumable-stream` on its own `redis-server`, behind a small Node server with
    /// herald's producer and viewer routes (`resumable-stream/server.mjs`); `finite` only.
    ResumableStream,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Herald => "herald",
            Kind::HeraldRedis => "herald-redis",
            Kind::HeraldRedis3 => "herald-redis3",
            Kind::HeraldRedisR1 => "herald-redis-r1",
            Kind::HeraldRedis3R1 => "herald-redis3-r1",
            Kind::HeraldMercure => "herald-mercure",
            Kind::Nchan => "nchan",
            Kind::Baseline => "baseline",
            Kind::Ceiling => "ceiling",
            Kind::ResumableStream => "resumable-stream",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<Kind> {
        Ok(match s {
            "herald" => Kind::Herald,
            "herald-redis" => Kind::HeraldRedis,
            "herald-redis3" => Kind::HeraldRedis3,
            "herald-redis-r1" => Kind::HeraldRedisR1,
            "herald-redis3-r1" => Kind::HeraldRedis3R1,
            "herald-mercure" => Kind::HeraldMercure,
            "nchan" => Kind::Nchan,
            "baseline" => Kind::Baseline,
            "ceiling" => Kind::Ceiling,
            "resumable-stream" => Kind::ResumableStream,
            _ => bail!(
                "unknown target {s} (herald, herald-redis, herald-redis3, herald-redis-r1, herald-redis3-r1, herald-mercure, nchan, baseline, ceiling, resumable-stream)"
            ),
        })
    }
}

/// Where the binaries are.
#[derive(Debug, Clone)]
pub struct Bins {
    pub herald: String,
    pub baseline: String,
    /// This program: it serves the ceiling with its hidden `ceiling` subcommand.
    pub me: PathBuf,
    /// The Node program of the `resumable-stream` target (its folder holds its node_modules).
    pub resumable: PathBuf,
}

impl Bins {
    pub fn new(herald: &str, baseline: Option<&str>) -> anyhow::Result<Bins> {
        let me = std::env::current_exe()?;
        let baseline = match baseline {
            Some(b) => b.to_string(),
            None => me
                .with_file_name("herald-bench-baseline")
                .to_string_lossy()
                .into_owned(),
        };
        Ok(Bins {
            herald: herald.to_string(),
            baseline,
            me,
            resumable: PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/resumable-stream/server.mjs"
            )),
        })
    }
}

pub struct Server {
    pub kind: Kind,
    pub addr: SocketAddr,
    /// Every node to connect to (the first is `addr`); one for all but a herald cluster.
    pub nodes: Vec<SocketAddr>,
    /// The other nodes of a herald cluster.
    others: Vec<Server>,
    /// The Redis of a herald cluster, and its port.
    redis: Option<(Child, u16)>,
    /// That Redis's replicas (killed when dropped).
    replicas: Vec<Child>,
    /// The server's main process (nginx: the master); its descendants count too.
    pub pid: u32,
    child: Option<Child>,
    /// nchan's scratch folder (config, pid file, logs); removed when dropped.
    nginx_dir: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at {} (pid {})",
            self.kind.name(),
            self.addr,
            self.pid
        )
    }
}

/// A certificate and key (PEM) a target serves HTTPS and HTTP/2 with.
#[derive(Debug, Clone)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Server {
    /// Starts `kind` on a free loopback port. `herald_args` go to `herald serve` only.
    pub async fn start(kind: Kind, bins: &Bins, herald_args: &[String]) -> anyhow::Result<Server> {
        Self::start_with(kind, bins, herald_args, None).await
    }

    /// As [`Server::start`], serving HTTPS with HTTP/2 when `tls` is given (herald and nchan).
    pub async fn start_with(
        kind: Kind,
        bins: &Bins,
        herald_args: &[String],
        tls: Option<&Tls>,
    ) -> anyhow::Result<Server> {
        if let Some(tls) = tls {
            return match kind {
                Kind::Herald => {
                    let mut args = herald_args.to_vec();
                    for (flag, path) in [("--tls-cert", &tls.cert), ("--tls-key", &tls.key)] {
                        args.push(flag.into());
                        args.push(path.to_string_lossy().into_owned());
                    }
                    Box::pin(Self::start_with(kind, bins, &args, None)).await
                }
                Kind::Nchan => Self::start_nchan(Some(tls)).await,
                _ => bail!("{} has no TLS", kind.name()),
            };
        }
        match kind {
            Kind::Herald | Kind::HeraldMercure => {
                let mut args = vec!["serve".to_string(), "--listen".into(), "127.0.0.1:0".into()];
                if kind == Kind::HeraldMercure {
                    args.push("--mercure".into());
                }
                args.extend_from_slice(herald_args);
                Self::spawn(kind, &bins.herald, &args).await
            }
            Kind::Baseline => {
                let args = ["--listen".to_string(), "127.0.0.1:0".into()];
                Self::spawn(kind, &bins.baseline, &args).await
            }
            Kind::Ceiling => {
                let args = [
                    "ceiling".to_string(),
                    "--listen".into(),
                    "127.0.0.1:0".into(),
                ];
                Self::spawn(kind, &bins.me.to_string_lossy(), &args).await
            }
            Kind::Nchan => Self::start_nchan(None).await,
            Kind::ResumableStream => Self::start_resumable(bins).await,
            Kind::HeraldRedis | Kind::HeraldRedis3 | Kind::HeraldRedisR1 | Kind::HeraldRedis3R1 => {
                let nodes = if matches!(kind, Kind::HeraldRedis3 | Kind::HeraldRedis3R1) {
                    3
                } else {
                    1
                };
                let replicas =
                    usize::from(matches!(kind, Kind::HeraldRedisR1 | Kind::HeraldRedis3R1));
                Self::start_cluster(kind, bins, herald_args, nodes, replicas).await
            }
        }
    }

    /// A Redis on a free port and `nodes` herald nodes sharing it; with `replicas`, that many
    /// Redis replicas and `--redis-replicas N` on every node.
    pub async fn start_cluster(
        kind: Kind,
        bins: &Bins,
        herald_args: &[String],
        nodes: usize,
        replicas: usize,
    ) -> anyhow::Result<Server> {
        let port = free_port()?;
        let redis = start_redis(port, None, None, &["--maxclients", "1000"]).await?;
        let mut replica_children = Vec::new();
        for _ in 0..replicas {
            let replica_port = free_port()?;
            let child =
                start_redis(replica_port, None, Some(port), &["--maxclients", "1000"]).await?;
            replica_children.push(child);
            await_in_sync(replica_port).await?;
        }
        let mut args = vec![
            "serve".to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--redis".into(),
            format!("redis://127.0.0.1:{port}/0"),
            "--redis-replicas".into(),
            replicas.to_string(),
        ];
        args.extend_from_slice(herald_args);
        let mut servers = Vec::with_capacity(nodes);
        for _ in 0..nodes {
            servers.push(Self::spawn(kind, &bins.herald, &args).await?);
        }
        let mut first = servers.remove(0);
        first.nodes = std::iter::once(first.addr)
            .chain(servers.iter().map(|s| s.addr))
            .collect();
        first.others = servers;
        first.redis = Some((redis, port));
        first.replicas = replica_children;
        Ok(first)
    }

    /// A `redis-server` on a free port and the Node server of `resumable-stream` using it.
    async fn start_resumable(bins: &Bins) -> anyhow::Result<Server> {
        let dir = bins
            .resumable
            .parent()
            .context("the resumable-stream program has no folder")?;
        if !dir.join("node_modules/resumable-stream").exists() {
            bail!(
                "{}/node_modules is missing: npm ci --prefix {}",
                dir.display(),
                dir.display()
            );
        }
        let port = free_port()?;
        let redis = start_redis(port, None, None, &["--maxclients", "1000"]).await?;
        let args = [
            bins.resumable.to_string_lossy().into_owned(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--redis".into(),
            format!("redis://127.0.0.1:{port}"),
        ];
        let mut server = Self::spawn(Kind::ResumableStream, "node", &args).await?;
        server.redis = Some((redis, port));
        Ok(server)
    }

    /// The node the `i`-th connection goes to.
    pub fn node(&self, i: usize) -> SocketAddr {
        self.nodes[i % self.nodes.len()]
    }

    /// Commands Redis has executed so far (a herald cluster only).
    pub async fn redis_commands(&self) -> Option<u64> {
        let (_, port) = self.redis.as_ref()?;
        let text = cli(*port, &["INFO", "commandstats"]).await;
        if text.is_empty() {
            return None;
        }
        Some(
            text.lines()
                .filter_map(|l| l.split("calls=").nth(1))
                .filter_map(|v| v.split(',').next()?.parse::<u64>().ok())
                .sum(),
        )
    }

    /// Starts a program that prints `... listening on http://ADDR` (or `https://`) as its first
    /// stdout line.
    async fn spawn(kind: Kind, bin: &str, args: &[String]) -> anyhow::Result<Server> {
        let mut child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {bin}"))?;
        let pid = child.id().context("no pid")?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .with_context(|| format!("{bin} did not say where it listens"))??
            .with_context(|| format!("{bin} exited"))?;
        let Some((_, url)) = line
            .split_once("listening on http://")
            .or_else(|| line.split_once("listening on https://"))
        else {
            bail!("unexpected first line from {bin}: {line}");
        };
        let addr = url.trim().parse()?;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Server {
            kind,
            addr,
            nodes: vec![addr],
            others: Vec::new(),
            redis: None,
            replicas: Vec::new(),
            pid,
            child: Some(child),
            nginx_dir: None,
        })
    }

    async fn start_nchan(tls: Option<&Tls>) -> anyhow::Result<Server> {
        let module = Path::new("/usr/lib/nginx/modules/ngx_nchan_module.so");
        if !module.exists() {
            bail!("nchan is not installed (apt-get install nginx libnginx-mod-nchan)");
        }
        let dir = tempfile::Builder::new()
            .prefix("herald-bench-nchan")
            .tempdir()?;
        std::fs::create_dir_all(dir.path().join("logs"))?;
        std::fs::create_dir_all(dir.path().join("tmp"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let conf = nchan_conf(dir.path(), port, tls);
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let out = Command::new("nginx")
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(format!("{}/", dir.path().display()))
            .output()
            .await
            .context("run nginx")?;
        if !out.status.success() {
            bail!("nginx failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let started = Instant::now();
        let pid = loop {
            if let Ok(p) = std::fs::read_to_string(dir.path().join("nginx.pid"))
                && let Ok(p) = p.trim().parse::<u32>()
                && tokio::net::TcpStream::connect(addr).await.is_ok()
            {
                break p;
            }
            if started.elapsed() > Duration::from_secs(10) {
                bail!("nginx did not come up");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // Let both workers start before memory is measured.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(Server {
            kind: Kind::Nchan,
            addr,
            nodes: vec![addr],
            others: Vec::new(),
            redis: None,
            replicas: Vec::new(),
            pid,
            child: None,
            nginx_dir: Some(dir),
        })
    }

    /// The path a subscriber GETs for `topic`.
    pub fn sub_path(&self, topic: &str) -> String {
        match self.kind {
            Kind::Herald
            | Kind::HeraldRedis
            | Kind::HeraldRedis3
            | Kind::HeraldRedisR1
            | Kind::HeraldRedis3R1
            | Kind::Baseline
            | Kind::ResumableStream => {
                format!("/events?topic={topic}")
            }
            Kind::HeraldMercure => format!("/.well-known/mercure?topic={topic}"),
            Kind::Nchan | Kind::Ceiling => format!("/sub/{topic}"),
        }
    }

    /// Path, content type and body of a request publishing `data` (plain ASCII, no quotes or
    /// backslashes) to `topic`.
    pub fn publish_request(&self, topic: &str, data: &str) -> (String, &'static str, Vec<u8>) {
        match self.kind {
            Kind::Herald
            | Kind::HeraldRedis
            | Kind::HeraldRedis3
            | Kind::HeraldRedisR1
            | Kind::HeraldRedis3R1
            | Kind::Baseline => (
                "/publish".into(),
                "application/json",
                format!(r#"{{"topic":"{topic}","data":"{data}"}}"#).into_bytes(),
            ),
            Kind::HeraldMercure => (
                "/.well-known/mercure".into(),
                "application/x-www-form-urlencoded",
                format!("topic={topic}&data={}", data.replace(' ', "+")).into_bytes(),
            ),
            Kind::Nchan | Kind::Ceiling => (
                format!("/pub/{topic}"),
                "text/plain",
                data.as_bytes().to_vec(),
            ),
            // A whole (already finished) stream of one event.
            Kind::ResumableStream => (
                format!("/publish?topic={topic}"),
                "text/event-stream",
                format!("data: {data}\n\n").into_bytes(),
            ),
        }
    }

    /// RSS in bytes of the server's process and all its descendants (every node of a cluster).
    pub fn rss(&self) -> u64 {
        tree(self.pid)
            .iter()
            .map(|p| status_kb(*p, "VmRSS:").unwrap_or(0) * 1024)
            .sum::<u64>()
            + self.others.iter().map(Server::rss).sum::<u64>()
    }

    /// The number of processes counted by `rss`.
    pub fn processes(&self) -> usize {
        tree(self.pid).len()
    }

    /// User + system CPU seconds used so far by the server's processes.
    pub fn cpu_seconds(&self) -> f64 {
        let ticks: u64 = tree(self.pid).iter().filter_map(|p| stat_cpu(*p)).sum();
        ticks as f64 / 100.0
    }

    /// As `cpu_seconds`, plus the CPU of the Redis the target uses (its cluster's, or the one
    /// behind `resumable-stream`), which is not among its descendants.
    pub fn cpu_seconds_with_redis(&self) -> f64 {
        let redis = self
            .redis
            .as_ref()
            .and_then(|(child, _)| child.id())
            .and_then(stat_cpu)
            .unwrap_or(0);
        let others: f64 = self.others.iter().map(Server::cpu_seconds).sum();
        self.cpu_seconds() + others + redis as f64 / 100.0
    }

    /// Stops the server and waits until its processes are gone.
    pub async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
        for other in std::mem::take(&mut self.others) {
            Box::pin(other.stop()).await;
        }
        if let Some((mut redis, _)) = self.redis.take() {
            let _ = redis.kill().await;
        }
        if self.nginx_dir.is_some() {
            let pids = tree(self.pid);
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.pid.to_string())
                .status()
                .await;
            let started = Instant::now();
            while pids
                .iter()
                .any(|p| Path::new(&format!("/proc/{p}")).exists())
                && started.elapsed() < Duration::from_secs(10)
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            for p in pids {
                if Path::new(&format!("/proc/{p}")).exists() {
                    let _ = Command::new("kill")
                        .arg("-KILL")
                        .arg(p.to_string())
                        .status()
                        .await;
                }
            }
            self.nginx_dir = None;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.nginx_dir.is_some() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(self.pid.to_string())
                .status();
        }
    }
}

/// The nchan configuration: the shared template's settings, on `port`, files under `dir`; with
/// `tls`, HTTPS and HTTP/2 on that port (no session cache, like every full handshake measured).
fn nchan_conf(dir: &Path, port: u16, tls: Option<&Tls>) -> String {
    let dir = dir.display();
    let (ssl, certificate) = match tls {
        None => ("", String::new()),
        Some(t) => (
            " ssl http2",
            format!(
                "ssl_certificate {};\n    ssl_certificate_key {};\n    ssl_protocols TLSv1.2 TLSv1.3;\n    http2_max_concurrent_streams 256;",
                t.cert.display(),
                t.key.display()
            ),
        ),
    };
    format!(
        r#"# written by herald-bench
load_module /usr/lib/nginx/modules/ngx_nchan_module.so;
daemon on;
master_process on;
user root;
worker_processes 2;
worker_rlimit_nofile 20000;
pid {dir}/nginx.pid;
error_log {dir}/logs/error.log warn;
events {{
  worker_connections 20000;
  multi_accept on;
}}
http {{
  access_log off;
  client_body_temp_path {dir}/tmp/body;
  proxy_temp_path {dir}/tmp/proxy;
  fastcgi_temp_path {dir}/tmp/fastcgi;
  uwsgi_temp_path {dir}/tmp/uwsgi;
  scgi_temp_path {dir}/tmp/scgi;
  nchan_shared_memory_size 256M;
  keepalive_timeout 65;
  keepalive_requests 100000000;
  client_max_body_size 1m;
  client_body_buffer_size 64k;
  server {{
    listen 127.0.0.1:{port}{ssl} reuseport backlog=65535;
    {certificate}
    location ~ ^/pub/([\w\-\.]+)$ {{
      nchan_publisher;
      nchan_channel_id $1;
      nchan_message_buffer_length 100;
      nchan_message_timeout 10m;
    }}
    location ~ ^/sub/([\w\-\.]+)$ {{
      nchan_subscriber;
      nchan_channel_id $1;
      nchan_subscriber_first_message newest;
      nchan_eventsource_ping_interval 30;
      nchan_eventsource_ping_comment "ping";
    }}
  }}
}}
"#
    )
}

/// `pid` and all its descendants.
fn tree(pid: u32) -> Vec<u32> {
    let mut parent: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(pp) = stat_fields(p).and_then(|f| f.get(1).and_then(|s| s.parse().ok())) {
                parent.entry(pp).or_default().push(p);
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        if let Some(kids) = parent.get(&out[i]) {
            out.extend(kids);
        }
        i += 1;
    }
    out.retain(|p| Path::new(&format!("/proc/{p}")).exists());
    out
}

/// The fields of /proc/PID/stat after the command name: state, ppid, ...
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// utime + stime in clock ticks.
fn stat_cpu(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
