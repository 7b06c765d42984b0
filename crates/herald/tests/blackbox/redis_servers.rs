//! Real Redis processes for the black-box tests, on free loopback ports, killed when dropped: a
//! standalone `redis-server` ([`Redis`]), and a primary with one replica watched by a sentinel
//! ([`Sentinels`]). Every test that needs Redis starts it here, the same way; a missing package
//! fails the test (scripts/test installs redis-server, redis-sentinel and redis-tools).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{PATIENCE, Server, free_port, wait_listening};

/// How long a failover may take on a loaded machine (sentinel notices within a second, then elects).
pub(crate) const FAILOVER_PATIENCE: Duration = Duration::from_secs(60);

/// `redis-cli -p port args…`, its output trimmed ("" if it failed).
pub(crate) fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli must be installed (scripts/test installs redis-tools)");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A herald node on the Redis at `url` (`redis://…` or `redis+sentinel://…`), heartbeats every
/// second, with `extra` arguments.
pub(crate) async fn node(url: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--redis", url, "--heartbeat", "1s"];
    args.extend_from_slice(extra);
    Server::start(&args).await
}

/// What a `redis-server` keeps across a restart.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Keeps {
    /// An append-only file fsynced on every write: an acknowledged write survives a kill.
    EveryWrite,
    /// Only what a `SAVE` wrote: a restart goes back to it.
    Snapshot,
}

/// `redis-server` on `port` with its files in `dir` (a replica of `replica_of`, if given), once it
/// listens.
fn redis_server(port: u16, dir: &Path, keeps: Keeps, replica_of: Option<u16>) -> Child {
    let mut cmd = Command::new("redis-server");
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
    ]);
    match keeps {
        Keeps::EveryWrite => cmd.args(["--appendonly", "yes", "--appendfsync", "always"]),
        Keeps::Snapshot => cmd.args(["--appendonly", "no"]),
    };
    cmd.args(["--dir", dir.to_str().unwrap()]);
    if let Some(p) = replica_of {
        cmd.args(["--replicaof", "127.0.0.1", &p.to_string()]);
    }
    let child = cmd
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (scripts/test installs it)");
    wait_listening(port, "redis-server");
    child
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// One `redis-server` on a free port, which can be killed and restarted on the same port and files.
pub(crate) struct Redis {
    child: Option<Child>,
    pub(crate) port: u16,
    keeps: Keeps,
    dir: tempfile::TempDir,
}

impl Redis {
    /// A Redis that keeps every acknowledged write across a kill.
    pub(crate) fn start() -> Redis {
        Redis::keeping(Keeps::EveryWrite)
    }

    pub(crate) fn keeping(keeps: Keeps) -> Redis {
        let mut redis = Redis {
            child: None,
            port: free_port(),
            keeps,
            dir: tempfile::tempdir().unwrap(),
        };
        redis.restart();
        redis
    }

    /// Starts it again (after [`Redis::kill`]) with what it kept.
    pub(crate) fn restart(&mut self) {
        self.kill();
        self.child = Some(redis_server(self.port, self.dir.path(), self.keeps, None));
    }

    /// SIGKILL.
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop(&mut c);
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
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
        let dir: PathBuf = self.dir.path().join(port.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let child = redis_server(port, &dir, Keeps::Snapshot, replica_of);
        self.children.push((port, child));
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

    /// Asks the sentinel to hand the primary to the replica (`SENTINEL FAILOVER`), asking again
    /// while it answers that no replica is fit yet (its view of the replica lags on a loaded
    /// machine), and waits until the replica is the primary.
    pub(crate) async fn fail_over(&self) {
        let deadline = Instant::now() + FAILOVER_PATIENCE;
        loop {
            let answer = cli(self.sentinel, &["SENTINEL", "FAILOVER", "mymaster"]);
            if answer == "OK" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinel refused to fail over: {answer}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.await_primary(self.replica).await;
    }

    /// Kills the redis-server on `port` (SIGKILL).
    pub(crate) fn kill(&mut self, port: u16) {
        if let Some(i) = self.children.iter().position(|(p, _)| *p == port) {
            let (_, mut child) = self.children.remove(i);
            stop(&mut child);
        }
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            stop(child);
        }
    }
}
