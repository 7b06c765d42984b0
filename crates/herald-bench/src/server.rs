//! Starts and stops the servers under test as child processes.

use std::net::SocketAddr;
use std::process::Stdio;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub struct Herald {
    pub addr: SocketAddr,
    /// Killed when dropped.
    _child: Child,
}

impl Herald {
    /// Starts `herald serve` on a free port with `args`.
    pub async fn start(bin: &str, args: &[String]) -> anyhow::Result<Herald> {
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {bin}"))?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let line = lines.next_line().await?.context("herald exited")?;
        let Some(url) = line.strip_prefix("herald listening on http://") else {
            bail!("unexpected first line: {line}");
        };
        let addr = url.parse()?;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Herald {
            addr,
            _child: child,
        })
    }
}
