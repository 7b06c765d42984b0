//! The short chaos run of the test suite: about 60 s of faults from a fixed seed (node kills,
//! pauses, a Redis primary kill), through the same `herald-bench chaos` that `scripts/chaos` runs
//! for longer. It fails if any subscriber missed an acknowledged event or got one twice.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn sixty_seconds_of_chaos_lose_and_double_no_acknowledged_event() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_herald-bench"));
    let herald = bench.with_file_name("herald");
    assert!(
        herald.exists(),
        "{} is missing: build it first (cargo build -p herald)",
        herald.display()
    );
    let out = Command::new(&bench)
        .arg("--herald")
        .arg(&herald)
        .args(["chaos", "--seed", "3", "--seconds", "60"])
        .output()
        .expect("run herald-bench chaos");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the chaos run failed:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("verdict: PASS"), "{report}");
    // The fixed seed does kill the primary: the run went through a failover.
    assert!(
        report.contains("failover to :"),
        "seed 3 no longer fails the primary over:\n{report}"
    );
}
