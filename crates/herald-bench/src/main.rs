//! herald-bench: drives herald and its peers (nchan, an axum baseline, a ceiling, npm
//! `resumable-stream`) over the network and reports one JSON line per run plus a readable table.
//! Never part of the test suite.

mod ceiling;
mod chaos;
mod http;
mod redis_servers;
mod report;
mod scenario;
mod server;
mod sse;

use std::io::Write;

use clap::{Parser, Subcommand};

use scenario::{Ctx, Row, emit, num, row};
use server::{Bins, Kind};

#[derive(Debug, Parser)]
#[command(
    name = "herald-bench",
    about = "Load generator for herald and its peers"
)]
struct Cli {
    /// The herald binary to start.
    #[arg(long, default_value = "target/release/herald", global = true)]
    herald: String,
    /// The baseline binary [default: herald-bench-baseline beside this program].
    #[arg(long, global = true)]
    baseline: Option<String>,
    /// Targets, run one after the other in this order: herald, herald-mercure (its Mercure
    /// endpoint), herald-redis, herald-redis3, nchan, baseline, ceiling, resumable-stream (`finite`
    /// only) [default: herald,nchan,baseline,ceiling; for `finite`: herald,resumable-stream].
    #[arg(long, value_delimiter = ',', global = true)]
    targets: Option<Vec<String>>,
    /// Extra flag for `herald serve` (repeatable), e.g. --herald-arg=--heartbeat=15s.
    #[arg(long = "herald-arg", global = true, allow_hyphen_values = true)]
    herald_args: Vec<String>,
    /// Streams being opened at once (kept under the 128-deep accept queue that tokio and std
    /// listeners get, so that the figure is not dominated by 1 s SYN retransmits).
    #[arg(long, default_value_t = 100, global = true)]
    concurrency: usize,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// N idle streams: server RSS per connection (all its processes) and idle CPU.
    Idle {
        #[arg(long, short, default_value_t = 15_000)]
        n: usize,
        /// Seconds over which idle CPU is measured (covers a 15 s heartbeat when >= 15).
        #[arg(long, default_value_t = 16)]
        cpu_secs: u64,
    },
    /// herald and nchan with TLS and HTTP/2: memory per idle stream over plain HTTP/1.1,
    /// HTTP/1.1 over TLS and HTTP/2 over TLS (`conns` connections sharing N streams), streams set
    /// up per second on each, and fan-out of M messages to the N HTTP/1.1 and the N HTTP/2 streams.
    Protocols {
        #[arg(long, short, default_value_t = 10_000)]
        n: usize,
        /// HTTP/2 connections the N streams share.
        #[arg(long, default_value_t = 100)]
        conns: usize,
        #[arg(long, short, default_value_t = 20)]
        messages: u64,
        #[arg(long, short, default_value_t = 64)]
        size: usize,
        /// Concurrent publishers (HTTP/1.1 connections, or requests on one HTTP/2 connection).
        #[arg(long, default_value_t = 4)]
        publishers: usize,
    },
    /// Finite streams (LLM answers) fed by streaming publishes, herald beside npm
    /// `resumable-stream` on Redis: events/s through one streaming publish (`finite-pipe`), and
    /// S streams of R tokens/s with V viewers each: token latency and server CPU per token
    /// (`finite-streams`).
    Finite {
        /// Events piped through the one streaming publish.
        #[arg(long, default_value_t = 100_000)]
        pipe_events: u64,
        /// Events per write of that publish.
        #[arg(long, default_value_t = 64)]
        pipe_chunk: u64,
        /// Concurrent streaming publishes.
        #[arg(long, default_value_t = 1000)]
        streams: usize,
        /// Tokens per second of each stream.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        /// Seconds each stream lasts.
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        /// Viewers per stream.
        #[arg(long, default_value_t = 2)]
        viewers: usize,
        /// Bytes of each token's data.
        #[arg(long, short, default_value_t = 32)]
        size: usize,
    },
    /// Streams opened per second until N are open.
    Connect {
        #[arg(long, short, default_value_t = 10_000)]
        n: usize,
    },
    /// N subscribers on one topic, M messages of S bytes: delivered events/s, completeness.
    Fanout {
        #[arg(long, short, default_value_t = 10_000)]
        n: usize,
        #[arg(long, short, default_value_t = 100)]
        messages: u64,
        #[arg(long, short, default_value_t = 64)]
        size: usize,
        /// Concurrent publisher connections (order is checked only with 1).
        #[arg(long, default_value_t = 4)]
        publishers: usize,
    },
    /// N subscribers on one topic, publishes at fixed rates: publish→receive percentiles.
    Latency {
        #[arg(long, short, default_value_t = 10_000)]
        n: usize,
        /// Offered publish rates (messages/s), one measurement each.
        #[arg(long, value_delimiter = ',', default_value = "5")]
        rates: Vec<f64>,
        /// Seconds of publishing per rate.
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        #[arg(long, short, default_value_t = 64)]
        size: usize,
        /// Concurrent publisher connections.
        #[arg(long, default_value_t = 8)]
        publishers: usize,
    },
    /// N subscribers each on its own topic, M messages spread over them: events/s.
    Unicast {
        #[arg(long, short, default_value_t = 10_000)]
        n: usize,
        #[arg(long, short, default_value_t = 50_000)]
        messages: u64,
        #[arg(long, short, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 32)]
        publishers: usize,
    },
    /// herald only: publish throughput with `--batch` events per request, per number of publishers.
    Publish {
        #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
        publishers: Vec<usize>,
        #[arg(long, default_value_t = 20_000)]
        events: u64,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Use in-memory history instead of --data-dir.
        #[arg(long)]
        memory: bool,
        /// Events per request (a JSON array when more than one).
        #[arg(long, default_value_t = 1)]
        batch: u64,
    },
    /// herald only: replay speed, one client resuming from before `events` retained events.
    Resume {
        #[arg(long, default_value_t = 100_000)]
        events: u64,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long)]
        memory: bool,
    },
    /// herald only: (a) two nodes on one Redis, a stream opening (then closing) on node B and the
    /// delay until node A shows it, as a `$presence/*` event and in `GET /users/{id}`, p50/p99;
    /// (b) webhook deliveries per second to a receiver run here (history in memory, then durable).
    Presence {
        /// Users connecting on B, one after the other.
        #[arg(long, default_value_t = 300)]
        samples: usize,
        /// Events delivered to the webhook, per store.
        #[arg(long, default_value_t = 5_000)]
        deliveries: u64,
    },
    /// No server: what the kernel alone costs to write one event to each of N loopback sockets
    /// while this process reads them (the floor under every target's latency at N subscribers).
    Floor {
        /// Connections; both ends are in this process, so 2N must fit under its open-file limit.
        #[arg(long, short, default_value_t = 9_000)]
        n: usize,
        /// Threads writing (one per core is the most a server can use).
        #[arg(long, default_value_t = 2)]
        writers: usize,
        #[arg(long, default_value_t = 20)]
        rounds: usize,
        #[arg(long, short, default_value_t = 64)]
        size: usize,
    },
    /// Writes BENCHMARKS.md and the plots from the JSON lines of a run.
    Report {
        /// JSON lines written by the scenarios.
        #[arg(long)]
        results: String,
        /// `key=value` lines about the machine and the run (see scripts/bench).
        #[arg(long)]
        meta: String,
        #[arg(long, default_value = "BENCHMARKS.md")]
        out: String,
        /// Folder for the SVG plots.
        #[arg(long, default_value = "docs")]
        plots: String,
    },
    /// The chaos run (scripts/chaos): Redis primary + replica + 3 sentinels, herald nodes with
    /// --redis-replicas 1 behind nginx, resuming subscribers and retrying publishers, random
    /// node kills, pauses and primary kills. Prints a report; exits 1 if an acknowledged event
    /// was missed or doubled.
    Chaos {
        /// Seed of the faults [default: from the clock, printed].
        #[arg(long)]
        seed: Option<u64>,
        /// Seconds of faults.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 4)]
        subscribers: usize,
        #[arg(long, default_value_t = 2)]
        publishers: usize,
        /// Also write the report (Markdown) here.
        #[arg(long)]
        out: Option<String>,
    },
    /// Serves the ceiling target (started by the harness itself).
    #[command(hide = true)]
    Ceiling {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        #[arg(long, default_value_t = 2)]
        writers: usize,
    },
}

fn store(memory: bool) -> &'static str {
    if memory { "memory" } else { "durable" }
}

/// A line of progress on stderr (stdout holds only results).
pub fn note(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.scenario {
        Scenario::Ceiling { listen, writers } => ceiling::run(listen, *writers),
        Scenario::Floor {
            n,
            writers,
            rounds,
            size,
        } => {
            let r = scenario::floor::floor(*n, *writers, *rounds, *size)?;
            println!("\nfloor: no server, one {size}-byte event to each of {n} loopback sockets\n");
            print!("{}", scenario::table(&[r], None));
            Ok(())
        }
        Scenario::Report {
            results,
            meta,
            out,
            plots,
        } => report::write(results, meta, out, plots),
        Scenario::Chaos {
            seed,
            seconds,
            nodes,
            subscribers,
            publishers,
            out,
        } => {
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
            let options = chaos::Options {
                herald: cli.herald.clone(),
                seed,
                duration: std::time::Duration::from_secs(*seconds),
                nodes: *nodes,
                subscribers: *subscribers,
                publishers: *publishers,
            };
            let report = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(chaos::run(options))?;
            println!("{}", report.text);
            if let Some(out) = out {
                std::fs::write(out, &report.text)?;
            }
            if !report.ok {
                std::process::exit(1);
            }
            Ok(())
        }
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(run(cli)),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let finite = matches!(cli.scenario, Scenario::Finite { .. });
    let default_targets = if finite {
        "herald,resumable-stream"
    } else {
        "herald,nchan,baseline,ceiling"
    };
    let names: Vec<String> = match &cli.targets {
        Some(t) => t.clone(),
        None => default_targets.split(',').map(String::from).collect(),
    };
    let targets = names
        .iter()
        .map(|t| Kind::parse(t))
        .collect::<anyhow::Result<Vec<Kind>>>()?;
    for &t in &targets {
        // herald's own HTTP interface (its Mercure endpoint has no streaming publish).
        let herald = t.name().starts_with("herald") && t != Kind::HeraldMercure;
        if finite && !herald && t != Kind::ResumableStream {
            anyhow::bail!(
                "finite runs herald targets and resumable-stream, not {}",
                t.name()
            );
        }
        if !finite && t == Kind::ResumableStream {
            anyhow::bail!("resumable-stream is a target of the finite scenario only");
        }
    }
    let ctx = Ctx {
        bins: Bins::new(&cli.herald, cli.baseline.as_deref())?,
        targets,
        herald_args: cli.herald_args.clone(),
    };
    let c = cli.concurrency;
    let (title, rows, group): (String, Vec<Row>, Option<&str>) = match cli.scenario {
        Scenario::Idle { n, cpu_secs } => (
            format!("idle: {n} streams, RSS of all server processes, CPU over {cpu_secs} s"),
            scenario::idle::idle(&ctx, n, cpu_secs, c).await?,
            None,
        ),
        Scenario::Protocols {
            n,
            conns,
            messages,
            size,
            publishers,
        } => {
            let load = scenario::protocols::Load {
                messages,
                size,
                publishers,
            };
            let rows = scenario::protocols::protocols(&ctx, n, conns, load, c).await?;
            println!(
                "\nprotocols: {n} streams over HTTP/1.1, HTTP/1.1+TLS, HTTP/2+TLS ({conns} connections); fan-out of {messages} x {size} bytes\n"
            );
            let mut scenarios: Vec<String> = Vec::new();
            for r in &rows {
                let s = r.get("scenario").and_then(|v| v.as_str()).unwrap_or("");
                if !scenarios.iter().any(|x| x == s) {
                    scenarios.push(s.to_string());
                }
            }
            for s in scenarios {
                let group: Vec<Row> = rows
                    .iter()
                    .filter(|r| r.get("scenario").and_then(|v| v.as_str()) == Some(s.as_str()))
                    .cloned()
                    .collect();
                println!("{s}\n");
                println!("{}", scenario::table(&group, None));
            }
            return Ok(());
        }
        Scenario::Finite {
            pipe_events,
            pipe_chunk,
            streams,
            rate,
            secs,
            viewers,
            size,
        } => {
            let pipe = scenario::finite::Pipe {
                events: pipe_events,
                chunk: pipe_chunk.max(1),
                size,
            };
            let load = scenario::finite::Load {
                streams,
                rate,
                secs,
                viewers,
                size,
            };
            let rows = scenario::finite::finite(&ctx, pipe, load, c).await?;
            for (s, what) in [
                (
                    "finite-pipe",
                    format!(
                        "finite-pipe: {pipe_events} events through one streaming publish, {pipe_chunk} per write, to one viewer"
                    ),
                ),
                (
                    "finite-streams",
                    format!(
                        "finite-streams: {streams} streaming publishes x {rate} tokens/s for {secs} s, {viewers} viewers each"
                    ),
                ),
            ] {
                let group: Vec<Row> = rows
                    .iter()
                    .filter(|r| r.get("scenario").and_then(|v| v.as_str()) == Some(s))
                    .cloned()
                    .collect();
                println!("\n{what}\n");
                print!("{}", scenario::table(&group, None));
            }
            return Ok(());
        }
        Scenario::Connect { n } => (
            format!("connect: {n} streams, {c} connecting at once"),
            scenario::idle::connect(&ctx, n, c).await?,
            None,
        ),
        Scenario::Fanout {
            n,
            messages,
            size,
            publishers,
        } => (
            format!(
                "fanout: {n} subscribers x {messages} messages x {size} bytes, {publishers} publishers"
            ),
            scenario::fanout::fanout(&ctx, n, messages, size, publishers, c).await?,
            None,
        ),
        Scenario::Latency {
            n,
            rates,
            secs,
            size,
            publishers,
        } => (
            format!("latency: {n} subscribers, {secs} s per rate, {size}-byte messages"),
            scenario::latency::latency(&ctx, n, &rates, secs, size, publishers, c).await?,
            Some("rate"),
        ),
        Scenario::Unicast {
            n,
            messages,
            size,
            publishers,
        } => (
            format!(
                "unicast: {n} subscribers on own topics, {messages} messages, {publishers} publishers"
            ),
            scenario::fanout::unicast(&ctx, n, messages, size, publishers, c).await?,
            None,
        ),
        Scenario::Publish {
            publishers,
            events,
            size,
            memory,
            batch,
        } => {
            let mut rows = Vec::new();
            for p in publishers {
                let r =
                    scenario::durable::publish(&ctx.bins, !memory, p, events, size, batch).await?;
                let rate = r.events as f64 / r.elapsed.as_secs_f64();
                let q = |q: f64| r.latency.value_at_quantile(q) as f64 / 1000.0;
                let mut row = row("publish", Kind::Herald);
                row.insert("store", store(memory));
                row.insert("publishers", r.publishers);
                row.insert("events", r.events);
                row.insert("size", size);
                row.insert("batch", batch);
                row.insert("events_per_s", num(rate));
                row.insert("p50_ms", num(q(0.5)));
                row.insert("p99_ms", num(q(0.99)));
                emit(&row);
                rows.push(row);
            }
            (
                format!(
                    "publish ({} history, {size}-byte data, {batch} event(s) per request)",
                    store(memory)
                ),
                rows,
                None,
            )
        }
        Scenario::Resume {
            events,
            size,
            memory,
        } => {
            let r = scenario::durable::resume(&ctx.bins, !memory, events, size).await?;
            let rate = r.events as f64 / r.elapsed.as_secs_f64();
            let mut row = row("resume", Kind::Herald);
            row.insert("store", store(memory));
            row.insert("events", r.events);
            row.insert("size", size);
            row.insert("seconds", num(r.elapsed.as_secs_f64()));
            row.insert("events_per_s", num(rate));
            emit(&row);
            (
                format!("resume ({} history)", store(memory)),
                vec![row],
                None,
            )
        }
        Scenario::Presence {
            samples,
            deliveries,
        } => {
            let visible =
                scenario::presence::visibility(&ctx.bins, &ctx.herald_args, samples).await?;
            println!(
                "\npresence: a stream opens, then closes, on node B; delay until node A shows it ({samples} users, 2 nodes, one Redis)\n"
            );
            println!("{}", scenario::table(&[visible], None));
            let mut rows = Vec::new();
            for durable in [false, true] {
                rows.push(
                    scenario::presence::webhooks(&ctx.bins, &ctx.herald_args, deliveries, durable)
                        .await?,
                );
            }
            (
                format!("webhook: {deliveries} events to one hook, receiver answering 200 at once"),
                rows,
                None,
            )
        }
        Scenario::Report { .. }
        | Scenario::Ceiling { .. }
        | Scenario::Floor { .. }
        | Scenario::Chaos { .. } => {
            unreachable!("handled in main")
        }
    };
    println!("\n{title}\n");
    print!("{}", scenario::table(&rows, group));
    Ok(())
}
