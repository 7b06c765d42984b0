//! A tiny run of the harness against herald, the baseline and the ceiling (a few connections),
//! of the TLS and HTTP/2 scenario against herald, of presence across two nodes and webhooks, and
//! of the finite-stream scenario against herald and npm `resumable-stream`:
//! every subscriber gets every message, latency rows come out, and the report is written.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bench() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_herald-bench"))
}

/// herald's binary from the same build (cargo test --workspace builds it for herald's tests).
fn herald() -> PathBuf {
    let p = bench().with_file_name("herald");
    assert!(
        p.exists(),
        "{} is missing: build it first (cargo build -p herald)",
        p.display()
    );
    p
}

fn run(args: &[&str]) -> Vec<serde_json::Value> {
    run_on("herald,baseline,ceiling", args)
}

/// Runs `herald-bench --targets TARGETS ARGS…` and returns its JSON rows.
fn run_on(targets: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(bench())
        .arg("--herald")
        .arg(herald())
        .args(["--targets", targets])
        .args(args)
        .output()
        .expect("run herald-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "herald-bench {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// Writes `rows` as a results file and runs `herald-bench report` on them; returns the folder
/// (BENCHMARKS.md and the plots are in it) and the report's text.
fn report<'a>(
    rows: impl IntoIterator<Item = &'a serde_json::Value>,
    command: &str,
) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let results = dir.path().join("results.jsonl");
    let lines: Vec<String> = rows.into_iter().map(|r| r.to_string()).collect();
    std::fs::write(&results, lines.join("\n")).expect("write results");
    let meta = dir.path().join("meta.txt");
    std::fs::write(&meta, format!("date=now\ncommand=herald-bench {command}\n"))
        .expect("write meta");
    let out = dir.path().join("BENCHMARKS.md");
    let status = Command::new(bench())
        .arg("report")
        .arg("--results")
        .arg(&results)
        .arg("--meta")
        .arg(&meta)
        .arg("--out")
        .arg(&out)
        .arg("--plots")
        .arg(dir.path())
        .status()
        .expect("run report");
    assert!(status.success());
    let md = std::fs::read_to_string(&out).expect("report written");
    (dir, md)
}

#[test]
fn fanout_and_latency_deliver_everything() {
    let rows = run(&["fanout", "-n", "20", "--messages", "5", "--publishers", "2"]);
    assert_eq!(rows.len(), 3, "{rows:?}");
    for r in &rows {
        assert_eq!(r["subscribers"], 20, "{r}");
        assert_eq!(r["received"], 100, "{r}");
        assert_eq!(r["complete_subs"], 20, "{r}");
        assert_eq!(r["all_delivered"], true, "{r}");
    }
    let lat = run(&["latency", "-n", "10", "--rates", "20", "--secs", "0.5"]);
    assert_eq!(lat.len(), 3, "{lat:?}");
    for r in &lat {
        assert_eq!(r["lost"], 0, "{r}");
        assert!(r["p99_ms"].as_f64().is_some_and(|v| v > 0.0), "{r}");
    }

    // No server: every one of the sockets is read in every round.
    let floor = Command::new(bench())
        .args(["floor", "-n", "50", "--rounds", "3"])
        .output()
        .expect("run floor");
    assert!(floor.status.success(), "{floor:?}");
    let floor: Vec<serde_json::Value> = String::from_utf8_lossy(&floor.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("json row"))
        .collect();
    assert_eq!(floor.len(), 1, "{floor:?}");
    assert_eq!(floor[0]["sockets"], 50, "{}", floor[0]);
    assert!(
        floor[0]["write_us_per_socket"]
            .as_f64()
            .is_some_and(|v| v > 0.0)
    );

    // TLS and HTTP/2 (herald only here: nchan is not installed by the test suite).
    let protocols = Command::new(bench())
        .arg("--herald")
        .arg(herald())
        .args([
            "--targets",
            "herald",
            "protocols",
            "-n",
            "30",
            "--conns",
            "3",
        ])
        .args(["--messages", "4"])
        .output()
        .expect("run protocols");
    assert!(
        protocols.status.success(),
        "{}",
        String::from_utf8_lossy(&protocols.stderr)
    );
    let protocols: Vec<serde_json::Value> = String::from_utf8_lossy(&protocols.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("json row"))
        .collect();
    let scenarios: Vec<&str> = protocols
        .iter()
        .map(|r| r["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(
        scenarios,
        [
            "idle-h1",
            "fanout-h1",
            "idle-h1-tls",
            "idle-h2",
            "fanout-h2"
        ],
        "{protocols:?}"
    );
    for r in &protocols {
        match r["scenario"].as_str().unwrap() {
            "fanout-h1" | "fanout-h2" => {
                assert_eq!(r["subscribers"], 30, "{r}");
                assert_eq!(r["received"], 120, "{r}");
                assert_eq!(r["all_delivered"], true, "{r}");
            }
            "idle-h2" => assert_eq!(r["streams"], 30, "{r}"),
            _ => {
                assert_eq!(r["streams"], 30, "{r}");
                assert!(r["connects_per_s"].as_f64().is_some_and(|v| v > 0.0), "{r}");
            }
        }
    }

    let (dir, md) = report(
        rows.iter().chain(&lat).chain(&floor).chain(&protocols),
        "fanout",
    );
    assert!(md.contains("| fan-out, delivered events/s |"), "{md}");
    assert!(md.contains("The kernel's own cost"), "{md}");
    assert!(md.contains("### idle-h2"), "{md}");
    assert!(
        md.contains(
            "| fan-out to the HTTP/2 streams (TLS, shared connections), delivered events/s | "
        ),
        "{md}"
    );
    assert!(Path::new(&dir.path().join("bench-latency.svg")).exists());
}

#[test]
fn unicast_and_batched_publish_count_everything() {
    let rows = run(&[
        "unicast",
        "-n",
        "10",
        "--messages",
        "30",
        "--publishers",
        "3",
    ]);
    assert_eq!(rows.len(), 3, "{rows:?}");
    for r in &rows {
        assert_eq!(r["received"], 30, "{r}");
        assert_eq!(r["all_delivered"], true, "{r}");
        assert!(r["server_cpu_us_per_msg"].as_f64().is_some(), "{r}");
    }
    // `publish` is herald-only and ignores --targets.
    let rows = run(&[
        "publish",
        "--publishers",
        "2",
        "--batch",
        "5",
        "--events",
        "20",
    ]);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["events"], 20, "{}", rows[0]);
    assert_eq!(rows[0]["batch"], 5, "{}", rows[0]);
}

#[test]
fn presence_and_webhooks_measure_every_sample() {
    // Two herald nodes on a redis-server it starts, then a hook to its own receiver.
    let rows = run(&["presence", "--samples", "5", "--deliveries", "50"]);
    assert_eq!(rows.len(), 3, "{rows:?}");
    let p = &rows[0];
    assert_eq!(p["scenario"], "presence", "{p}");
    assert_eq!(
        (p["nodes"].as_u64(), p["samples"].as_u64()),
        (Some(2), Some(5)),
        "{p}"
    );
    for key in [
        "online_event_p50_ms",
        "online_event_p99_ms",
        "online_users_p50_ms",
        "online_users_p99_ms",
        "offline_event_p50_ms",
        "offline_event_p99_ms",
        "offline_users_p50_ms",
        "offline_users_p99_ms",
    ] {
        assert!(p[key].as_f64().is_some_and(|v| v >= 0.0), "{key}: {p}");
    }
    let stores: Vec<&str> = rows[1..]
        .iter()
        .map(|r| r["store"].as_str().unwrap())
        .collect();
    assert_eq!(stores, ["memory", "durable"]);
    for r in &rows[1..] {
        assert_eq!(r["scenario"], "webhook", "{r}");
        assert_eq!(r["received"], 50, "every event once: {r}");
        assert_eq!(r["in_order"], true, "{r}");
        assert!(
            r["deliveries_per_s"].as_f64().is_some_and(|v| v > 0.0),
            "{r}"
        );
    }

    let (_dir, md) = report(&rows, "presence");
    assert!(
        md.contains("Presence across nodes (two nodes, one Redis)"),
        "{md}"
    );
    assert!(md.contains("Webhook deliveries per second"), "{md}");
    assert!(
        md.contains("### presence") && md.contains("### webhook"),
        "{md}"
    );
}

/// The finite-stream scenario against herald and npm `resumable-stream` on a real redis-server
/// (its node_modules come from `npm ci --prefix crates/herald-bench/resumable-stream`, which
/// scripts/test runs at setup): every token reaches every viewer on both, and the report
/// describes them side by side.
#[test]
fn finite_streams_reach_every_viewer_on_herald_and_resumable_stream() {
    let rows = run_on(
        "herald,resumable-stream",
        &[
            "finite",
            "--pipe-events",
            "300",
            "--pipe-chunk",
            "16",
            "--streams",
            "6",
            "--rate",
            "20",
            "--secs",
            "1",
            "--viewers",
            "2",
        ],
    );
    let seen: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["scenario"].as_str().unwrap(),
                r["target"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("finite-pipe", "herald"),
            ("finite-streams", "herald"),
            ("finite-pipe", "resumable-stream"),
            ("finite-streams", "resumable-stream"),
        ],
        "{rows:?}"
    );
    for r in &rows {
        assert_eq!(r["all_delivered"], true, "{r}");
        if r["scenario"] == "finite-pipe" {
            assert_eq!(r["received"], 300, "{r}");
            assert!(r["events_per_s"].as_f64().is_some_and(|v| v > 0.0), "{r}");
        } else {
            assert_eq!(r["viewers"], 12, "{r}");
            assert_eq!(r["tokens"], 6 * 20, "{r}");
            assert_eq!(r["received"], 6 * 20 * 2, "{r}");
            assert_eq!(r["lost"], 0, "{r}");
            assert_eq!(r["producer_errors"], 0, "{r}");
            assert!(r["p99_ms"].as_f64().is_some_and(|v| v > 0.0), "{r}");
            assert!(r["server_cpu_us_per_token"].as_f64().is_some(), "{r}");
        }
    }

    let (_dir, md) = report(&rows, "finite");
    assert!(md.contains("## Finite streams (LLM answers)"), "{md}");
    assert!(
        md.contains("| figure | herald | resumable-stream | herald vs resumable-stream |"),
        "{md}"
    );
    assert!(md.contains("### finite-streams"), "{md}");
    assert!(md.contains("**resumable-stream**"), "{md}");
}
