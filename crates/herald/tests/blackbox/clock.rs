//! A wall clock stepped backwards before a restart (issue 12, "not yet tried"), without root: the
//! debug build's `HERALD_TEST_CLOCK_OFFSET_MS` shifts the engine's clock of the second run. With
//! `--data-dir` ids continue past the last stored one whatever the clock says; in memory the new
//! run's ids start from the (earlier) clock, and a client resuming with an id of the earlier run
//! is told of a gap rather than silently skipping this run's events.

use serde_json::{Value, json};

use crate::common::{PATIENCE, Server};

/// One hour back.
const STEPPED_BACK: (&str, &str) = ("HERALD_TEST_CLOCK_OFFSET_MS", "-3600000");

fn id(s: &str) -> u64 {
    s.parse().expect("event ids are decimal")
}

#[tokio::test]
async fn clock_stepped_back_before_a_durable_restart_ids_continue() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let data_dir = data_dir.to_str().unwrap();
    let mut s = Server::start(&["--data-dir", data_dir]).await;
    let a = s.publish(json!({"topic": "c", "data": "a"})).await;
    let b = s.publish(json!({"topic": "c", "data": "b"})).await;
    s.signal("TERM");
    s.wait_exit(PATIENCE).await;

    let s = Server::start_with_env(&["--data-dir", data_dir], &[STEPPED_BACK]).await;
    let c = s.publish(json!({"topic": "c", "data": "c"})).await;
    assert_eq!(id(&c), id(&b) + 1, "ids continue from the stored counter");
    let mut sse = s.subscribe_with("topic=c", &[("last-event-id", &a)]).await;
    let first = sse.next().await;
    let second = sse.next().await;
    assert_eq!(
        [
            (first.event_type.as_str(), first.data.as_str()),
            (second.event_type.as_str(), second.data.as_str())
        ],
        [("message", "b"), ("message", "c")],
        "no gap and nothing reissued across the restart"
    );

    // The shift is real: a fresh store under the same clock starts an hour below the first run.
    let fresh = tempfile::tempdir().unwrap();
    let fresh_dir = fresh.path().join("data");
    let s = Server::start_with_env(
        &["--data-dir", fresh_dir.to_str().unwrap()],
        &[STEPPED_BACK],
    )
    .await;
    let f = s.publish(json!({"topic": "c", "data": "f"})).await;
    assert!(
        id(&f) + 3_000_000_000 < id(&a),
        "a fresh store's ids follow the stepped clock: {f} vs {a}"
    );
}

#[tokio::test]
async fn clock_stepped_back_before_an_in_memory_restart_resumes_with_a_gap() {
    let s = Server::start(&[]).await;
    let a = s.publish(json!({"topic": "c", "data": "a"})).await;
    let b = s.publish(json!({"topic": "c", "data": "b"})).await;
    drop(s);

    let s = Server::start_with_env(&[], &[STEPPED_BACK]).await;
    let c = s.publish(json!({"topic": "c", "data": "c"})).await;
    // Documented (SECURITY.md): an in-memory hub starts its ids from the clock, so after a step
    // back of an hour they start below the earlier run's.
    assert!(
        id(&c) + 3_000_000_000 < id(&a),
        "in memory, ids start from the stepped clock: {c} vs {a}"
    );
    let mut sse = s.subscribe_with("topic=c", &[("last-event-id", &b)]).await;
    let gap = sse.next().await;
    assert_eq!(gap.event_type, "herald.gap", "{gap:?}");
    let info: Value = serde_json::from_str(&gap.data).unwrap();
    assert_eq!(info, json!({"lastEventId": b, "oldest": c}));
    assert_eq!(sse.next_data(1).await, ["c"]);
}
