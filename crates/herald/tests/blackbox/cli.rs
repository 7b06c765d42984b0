//! The command line: configuration from flags, env and TOML (and refusals of bad ones), and the
//! `herald pub` / `herald sub` clients against a running hub.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::common::{PATIENCE, Server};

fn herald() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_herald"));
    c.env("RUST_LOG", "warn").kill_on_drop(true);
    c
}

/// Runs `herald serve` with `args` expecting it to refuse to start; returns its stderr.
async fn refused(args: &[&str]) -> String {
    let out = tokio::time::timeout(
        PATIENCE,
        herald()
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .output(),
    )
    .await
    .expect("herald should exit")
    .unwrap();
    assert!(!out.status.success(), "herald started with {args:?}");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[tokio::test]
async fn bad_settings_stop_startup_with_a_message_naming_them() {
    assert!(refused(&["--heartbeat", "15"]).await.contains("heartbeat"));
    assert!(refused(&["--retry", "fast"]).await.contains("retry"));
    assert!(
        refused(&["--shutdown-timeout=-1s"])
            .await
            .contains("shutdown-timeout")
    );
    assert!(refused(&["--history", "many"]).await.contains("history"));
    assert!(
        refused(&["--cors-origin", "example.com"])
            .await
            .contains("cors-origin")
    );
    let missing = refused(&["--config", "/nonexistent/herald.toml"]).await;
    assert!(missing.contains("/nonexistent/herald.toml"), "{missing}");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "heartbeat = \"1s\"\nunknown-key = 1\n").unwrap();
    assert!(
        refused(&["--config", bad.to_str().unwrap()])
            .await
            .contains("unknown-key")
    );
    std::fs::write(&bad, "retry = \"soon\"\n").unwrap();
    assert!(
        refused(&["--config", bad.to_str().unwrap()])
            .await
            .contains("retry")
    );
}

#[tokio::test]
async fn settings_come_from_file_env_and_flags_in_that_order() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("herald.toml");
    std::fs::write(&file, "retry = \"1234ms\"\nhistory = 3\n").unwrap();
    let s = Server::start(&["--config", file.to_str().unwrap()]).await;
    let mut sse = s.subscribe("").await;
    sse.opened().await;
    assert_eq!(sse.parser.retry_ms, Some(1234), "retry from the file");

    let s = Server::start_with_env(
        &["--config", file.to_str().unwrap()],
        &[("HERALD_RETRY", "2s")],
    )
    .await;
    let mut sse = s.subscribe("").await;
    sse.opened().await;
    assert_eq!(sse.parser.retry_ms, Some(2000), "env wins over the file");

    let s = Server::start_with_env(
        &["--config", file.to_str().unwrap(), "--retry", "750ms"],
        &[("HERALD_RETRY", "2s")],
    )
    .await;
    let mut sse = s.subscribe("").await;
    sse.opened().await;
    assert_eq!(
        sse.parser.retry_ms,
        Some(750),
        "the flag wins over env and file"
    );
}

#[tokio::test]
async fn pub_and_sub_clients_work_against_a_running_hub() {
    let s = Server::start(&[]).await;
    let mut sub = herald()
        .args(["sub", "chat/*", "--user", "u1", "--url", &s.url])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(sub.stdout.take().unwrap()).lines();
    s.eventually("/users/u1", |v| v["online"] == true).await;

    let out = herald()
        .args([
            "pub",
            "chat/room1",
            "hello\nworld",
            "--event",
            "greet",
            "--url",
            &s.url,
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["delivered"], 1);
    let id = answer["id"].as_str().unwrap();
    let line = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(line, format!("{id}\tgreet\thello\\nworld"));

    let out = herald()
        .args(["pub", "chat/*", "bad topic", "--url", &s.url])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("topic 'chat/*'"));

    s.delete("/users/u1/connections?reason=bye").await;
    let line = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(line.contains("herald.close"), "{line}");
    let status = tokio::time::timeout(Duration::from_secs(5), sub.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "sub stops on herald.close");
}

/// Reproduces issue 12 (defect 11 and misleading errors): `--max-topics` above 65,535 started (and
/// then stored rows it could not read back); `--data-dir` naming a file said "File exists"; a
/// private key given to `--jwt-public-key` started and then refused every token.
#[tokio::test]
async fn settings_the_hub_cannot_honour_are_refused_at_startup_by_name() {
    let too_many = refused(&["--max-topics", "70000"]).await;
    assert!(
        too_many.contains("max-topics") && too_many.contains("65535"),
        "{too_many}"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let not_dir = refused(&["--data-dir", file.to_str().unwrap()]).await;
    assert!(not_dir.contains("is a file, not a folder"), "{not_dir}");
    let keys = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys");
    for private in ["rsa.pem", "ec.pem", "ed.pem"] {
        let path = keys.join(private);
        let err = refused(&["--jwt-public-key", path.to_str().unwrap()]).await;
        assert!(err.contains("holds a private key"), "{private}: {err}");
    }
}
