//! herald-bench: drives herald (and peers) over the network and reports one JSON line per run
//! plus a readable table. Never part of the test suite.

mod http;
mod scenario;
mod server;
mod sse;

use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "herald-bench",
    about = "Load generator for herald and its peers"
)]
struct Cli {
    /// The herald binary to start.
    #[arg(long, default_value = "target/release/herald", global = true)]
    herald: String,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Publish throughput with 1 event per request, for each number of concurrent publishers.
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
    },
    /// Replay speed: one client resuming from before `events` retained events.
    Resume {
        #[arg(long, default_value_t = 100_000)]
        events: u64,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long)]
        memory: bool,
    },
}

fn store(memory: bool) -> &'static str {
    if memory { "memory" } else { "durable" }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.scenario {
        Scenario::Publish {
            publishers,
            events,
            size,
            memory,
        } => {
            let mut rows = Vec::new();
            for p in publishers {
                let r = scenario::durable::publish(&cli.herald, !memory, p, events, size).await?;
                let rate = r.events as f64 / r.elapsed.as_secs_f64();
                let q = |q: f64| r.latency.value_at_quantile(q) as f64 / 1000.0;
                println!(
                    "{}",
                    json!({
                        "scenario": "publish", "target": "herald", "store": store(memory),
                        "publishers": r.publishers, "events": r.events, "size": size,
                        "events_per_s": rate.round(), "p50_ms": q(0.5), "p99_ms": q(0.99),
                    })
                );
                rows.push(format!(
                    "| {:>10} | {:>8} | {:>12.0} | {:>8.2} | {:>8.2} |",
                    r.publishers,
                    r.events,
                    rate,
                    q(0.5),
                    q(0.99)
                ));
            }
            println!(
                "\npublish ({} history, {size}-byte data, one event per request)",
                store(memory)
            );
            println!("| publishers |   events |     events/s |  p50 ms  |  p99 ms  |");
            println!("|-----------:|---------:|-------------:|---------:|---------:|");
            rows.iter().for_each(|r| println!("{r}"));
        }
        Scenario::Resume {
            events,
            size,
            memory,
        } => {
            let r = scenario::durable::resume(&cli.herald, !memory, events, size).await?;
            let rate = r.events as f64 / r.elapsed.as_secs_f64();
            println!(
                "{}",
                json!({
                    "scenario": "resume", "target": "herald", "store": store(memory),
                    "events": r.events, "size": size, "seconds": r.elapsed.as_secs_f64(),
                    "events_per_s": rate.round(),
                })
            );
            println!(
                "\nresume ({} history): {} events replayed in {:.3} s = {:.0} events/s",
                store(memory),
                r.events,
                r.elapsed.as_secs_f64(),
                rate
            );
        }
    }
    Ok(())
}
