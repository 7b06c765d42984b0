//! The `herald` command: `serve` runs the hub; `pub` and `sub` are small clients of a running hub.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use herald::client::{PubArgs, SubArgs};
use herald::config::LogFormat;
use herald::settings::LOG_FORMAT;
use herald::{Config, ConfigError, RawConfig};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(name = "herald", version, about = "A Server-Sent Events push hub")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the hub.
    Serve(Box<RawConfig>),
    /// Publish one message to a running hub.
    Pub(PubArgs),
    /// Subscribe to a running hub and print each event on one line: id, type, data.
    Sub(SubArgs),
    /// Verify a data dir's event rows (checksums and layout) while no herald runs on it; with
    /// --repair, mark damaged rows lost so readers skip them with a `herald.gap`. Exits 1 while
    /// damage remains.
    Check(CheckArgs),
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// The folder given to `serve --data-dir`.
    #[arg(long)]
    data_dir: std::path::PathBuf,
    /// Replace each damaged row by a lost-marker (and let redb repair the file's own structure).
    #[arg(long)]
    repair: bool,
}

// mimalloc instead of glibc malloc: with glibc, the per-stream frame queues that grow and shrink
// on every burst were returned to the kernel and faulted back in (page faults were ~5% of a
// fan-out); measured side by side, fan-out went from 2.2M to 2.7M events/s (mean of 5 runs each)
// and idle RSS from 1914 to 1829 bytes per stream.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Debug builds only, for black-box tests of a wall clock stepped backwards (release builds
    // never read it): shifts the engine's clock by this many milliseconds.
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("HERALD_TEST_CLOCK_OFFSET_MS")
        .ok()
        .and_then(|v| v.parse::<i64>().ok())
    {
        herald_core::clock::shift_for_tests(ms);
    }
    // rustls (HTTPS, rediss://, the https:// clients) needs one process-wide crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The configuration is read before logging starts, since it says how to log; a bad one is
    // reported in the format the flags and env vars asked for, else as text.
    let (command, format) = match cli.command {
        Command::Serve(raw) => {
            let format = raw.get(&LOG_FORMAT).unwrap_or(LogFormat::Text);
            match raw.load() {
                Ok(config) => {
                    let format = config.log_format;
                    (Run::Serve(Box::new(config)), format)
                }
                Err(e) => (Run::Refuse(e), format),
            }
        }
        Command::Pub(args) => (Run::Pub(args), LogFormat::Text),
        Command::Sub(args) => (Run::Sub(args), LogFormat::Text),
        Command::Check(args) => {
            start_logging(LogFormat::Text);
            return check(&args);
        }
    };
    start_logging(format);
    // Two runtimes: one thread for requests, the committer and timers, and one per core for
    // writing event streams, so a busy fan-out never queues a publish behind thousands of writes.
    let runtimes = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("herald-api")
        .enable_all()
        .build()
        .and_then(|api| {
            let streams = tokio::runtime::Builder::new_multi_thread()
                .thread_name("herald-stream")
                .enable_all()
                .build()?;
            Ok((api, streams))
        });
    let (api, streams) = match runtimes {
        Ok(pair) => pair,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = api.block_on(async {
        match command {
            Run::Serve(config) => serve(*config, streams.handle().clone()).await,
            Run::Refuse(e) => Err(anyhow::Error::new(e).context("configuration")),
            Run::Pub(args) => herald::client::publish(args).await,
            Run::Sub(args) => herald::client::subscribe(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `herald check`: prints what it found; exit status 1 while damaged rows remain.
fn check(args: &CheckArgs) -> ExitCode {
    let report = match herald_core::DurableHistory::check(&args.data_dir, args.repair) {
        Ok(report) => report,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let ids = |ids: &[u64]| ids.iter().map(u64::to_string).collect::<Vec<_>>().join(" ");
    println!("{} rows checked", report.rows);
    if !report.damaged.is_empty() {
        println!(
            "damaged: {} (ids {})",
            report.damaged.len(),
            ids(&report.damaged)
        );
    }
    if !report.lost.is_empty() {
        println!("marked lost by a repair: {}", report.lost.len());
    }
    if report.repaired > 0 {
        println!(
            "repaired: {} rows marked lost (readers get a herald.gap there)",
            report.repaired
        );
    }
    if report.damaged.len() as u64 > report.repaired {
        println!("run again with --repair to mark them lost");
        return ExitCode::FAILURE;
    }
    println!("ok");
    ExitCode::SUCCESS
}

/// What `main` runs, once the configuration is read.
enum Run {
    Serve(Box<Config>),
    Refuse(ConfigError),
    Pub(PubArgs),
    Sub(SubArgs),
}

/// Logs to stderr at `RUST_LOG`'s level (default `info`): text, coloured only when stderr is a
/// terminal, or one JSON object per line.
fn start_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().init(),
    }
}

async fn serve(config: Config, streams: tokio::runtime::Handle) -> anyhow::Result<()> {
    if let Ok(limit) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::debug!(limit, "open-file limit");
    }
    // Open the store before listening: a bad data dir stops startup with its own message.
    let node = herald::node_from(&config).await?;
    let listener = bind(config.listen, config.listen_backlog)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    // Tests and scripts read this line to learn the port when listening on port 0.
    let scheme = if config.tls.is_some() || config.acme.is_some() {
        "https"
    } else {
        "http"
    };
    println!("herald listening on {scheme}://{addr}");
    tracing::info!(
        %addr,
        data_dir = ?config.data_dir,
        history = config.retention.max_events,
        max_connections = config.max_connections,
        "herald started"
    );
    herald::serve_split(listener, node, config, shutdown_signal(), streams).await?;
    tracing::info!("herald stopped");
    Ok(())
}

/// A listening socket with a backlog of `backlog` (std's and tokio's `bind` use 128, so a burst
/// of thousands of connecting clients overflowed it and waited for SYN retries).
fn bind(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std's `bind` does on Unix: a restart may listen again while old connections linger.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Completes on the first SIGTERM or Ctrl-C; a second one exits at once.
async fn shutdown_signal() {
    wait_for_signal().await;
    tokio::spawn(async {
        wait_for_signal().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
