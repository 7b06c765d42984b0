//! Real Redis processes for the bench and the chaos run, on free loopback ports: a `redis-server`
//! (a replica, if asked) once it listens, a replica once it is in sync, `redis-cli` for
//! questions. Both the bench's cluster targets and the chaos run start their Redis here.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// A loopback port free at the time of asking.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until something listens on `port`, for at most 30 s.
pub async fn wait_listening(port: u16, what: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("{what} on port {port} did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// `redis-cli -p port args…`, its output trimmed ("" if it could not run).
pub async fn cli(port: u16, args: &[&str]) -> String {
    match Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .await
    {
        Ok(out) => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        Err(_) => String::new(),
    }
}

/// A `redis-server` on `port` that keeps nothing on disk (its files, if any, in `dir`), a replica
/// of `replica_of` if given, with `extra` settings; returned once it listens. Killed when dropped.
pub async fn start_redis(
    port: u16,
    dir: Option<&Path>,
    replica_of: Option<u16>,
    extra: &[&str],
) -> anyhow::Result<Child> {
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .args(extra);
    if let Some(dir) = dir {
        cmd.args(["--dir", dir.to_str().context("dir")?]);
    }
    if let Some(p) = replica_of {
        cmd.args(["--replicaof", "127.0.0.1", &p.to_string()]);
    }
    let child = cmd
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("start redis-server (apt-get install redis-server)")?;
    wait_listening(port, "redis-server").await?;
    Ok(child)
}

/// Waits until the replica on `port` is in sync with its primary, for at most 30 s.
pub async fn await_in_sync(port: u16) -> anyhow::Result<()> {
    let started = Instant::now();
    while !cli(port, &["INFO", "replication"])
        .await
        .contains("master_link_status:up")
    {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the Redis replica on port {port} did not sync");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
