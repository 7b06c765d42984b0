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

/// A `herald serve` started with exactly `args` and `env` (no `--listen` added), its stderr piped.
struct Started {
    child: tokio::process::Child,
    url: String,
    stderr: tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
}

async fn start_exactly(args: &[&str], env: &[(&str, &str)]) -> Started {
    let mut cmd = herald();
    cmd.arg("serve")
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = tokio::time::timeout(PATIENCE, stdout.next_line())
        .await
        .expect("herald did not start in time")
        .unwrap()
        .expect("herald exited before listening");
    let url = line
        .strip_prefix("herald listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line}"))
        .to_string();
    Started { child, url, stderr }
}

impl Started {
    /// The next stderr line containing `needle`.
    async fn log_line(&mut self, needle: &str) -> String {
        loop {
            let line = tokio::time::timeout(PATIENCE, self.stderr.next_line())
                .await
                .unwrap_or_else(|_| panic!("no log line with {needle:?} in time"))
                .unwrap()
                .unwrap_or_else(|| panic!("stderr ended before a line with {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    fn port(&self) -> u16 {
        self.url.rsplit(':').next().unwrap().parse().unwrap()
    }

    async fn healthz_on_loopback(&self) -> reqwest::StatusCode {
        reqwest::get(format!("http://127.0.0.1:{}/healthz", self.port()))
            .await
            .unwrap()
            .status()
    }
}

#[tokio::test]
async fn a_bare_port_listens_on_every_interface_and_warns_when_open() {
    for form in [":0", "0"] {
        let mut s = start_exactly(&["--listen", form], &[]).await;
        assert!(s.url.starts_with("http://0.0.0.0:"), "{form}: {}", s.url);
        assert_eq!(s.healthz_on_loopback().await, reqwest::StatusCode::OK);
        let warning = s.log_line("WARN").await;
        assert!(
            warning.contains("herald runs open on a non-loopback address"),
            "{warning}"
        );
        s.child.kill().await.unwrap();
    }
    // PORT is read only when nothing else names an address.
    let s = start_exactly(&[], &[("PORT", "0")]).await;
    assert!(s.url.starts_with("http://0.0.0.0:"), "{}", s.url);
    assert_eq!(s.healthz_on_loopback().await, reqwest::StatusCode::OK);
    let s = start_exactly(&[], &[("PORT", "0"), ("HERALD_LISTEN", "127.0.0.1:0")]).await;
    assert!(s.url.starts_with("http://127.0.0.1:"), "{}", s.url);
    let refused = herald()
        .args(["serve"])
        .env("PORT", "eighty")
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("invalid listen: 'eighty'"), "{stderr}");
}

#[tokio::test]
async fn boolean_env_vars_take_the_usual_spellings() {
    let secret = ["--jwt-secret", "0123456789abcdef0123"];
    for (value, open) in [("1", true), ("yes", true), ("0", false), ("no", false)] {
        let s = Server::start_with_env(&secret, &[("HERALD_ANONYMOUS", value)]).await;
        let status = s.open_events("topic=a", &[]).await.status();
        let expected = if open {
            reqwest::StatusCode::OK
        } else {
            reqwest::StatusCode::UNAUTHORIZED
        };
        assert_eq!(status, expected, "HERALD_ANONYMOUS={value}");
    }
    let s = Server::start(&[&secret[..], &["--anonymous"]].concat()).await;
    assert_eq!(
        s.open_events("topic=a", &[]).await.status(),
        reqwest::StatusCode::OK,
        "a bare --anonymous is on"
    );
    let s = Server::start(&[&secret[..], &["--anonymous=false"]].concat()).await;
    assert_eq!(
        s.open_events("topic=a", &[]).await.status(),
        reqwest::StatusCode::UNAUTHORIZED,
        "--anonymous=false is off"
    );
    let out = herald()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(secret)
        .env("HERALD_ANONYMOUS", "maybe")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid anonymous: 'maybe'"), "{stderr}");
}

#[tokio::test]
async fn json_logs_carry_level_target_message_and_fields() {
    let mut s = start_exactly(
        &["--listen", "127.0.0.1:0", "--log-format", "json"],
        &[("RUST_LOG", "info")],
    )
    .await;
    let line = s.log_line("herald started").await;
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(v["level"], "INFO", "{line}");
    assert_eq!(v["target"], "herald", "{line}");
    assert_eq!(v["fields"]["message"], "herald started", "{line}");
    assert_eq!(
        v["fields"]["addr"].as_str(),
        Some(s.url.trim_start_matches("http://")),
        "{line}"
    );
    assert!(v["timestamp"].is_string(), "{line}");

    // A configuration error is logged in the format the flags asked for.
    let out = herald()
        .args(["serve", "--log-format", "json", "--heartbeat", "15"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let v: serde_json::Value = serde_json::from_str(stderr.trim()).expect("a JSON log line");
    assert_eq!(v["level"], "ERROR", "{stderr}");
    assert!(
        v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("invalid heartbeat")),
        "{stderr}"
    );
    assert!(
        refused(&["--log-format", "xml"])
            .await
            .contains("invalid log-format: 'xml'")
    );
}

#[tokio::test]
async fn text_logs_have_no_colour_when_stderr_is_not_a_terminal() {
    let mut s = start_exactly(&["--listen", "127.0.0.1:0"], &[("RUST_LOG", "info")]).await;
    let line = s.log_line("herald started").await;
    assert!(line.contains("INFO"), "{line}");
    assert!(!line.contains('\u{1b}'), "ANSI codes in {line:?}");
}

#[tokio::test]
async fn serve_help_lists_every_setting_with_its_env_var() {
    let out = herald().args(["serve", "--help"]).output().await.unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for s in herald::settings::SETTINGS {
        assert!(
            help.contains(&format!("--{}", s.name)),
            "--{} in {help}",
            s.name
        );
        assert!(help.contains(&s.env()), "{} in {help}", s.env());
    }
    assert!(help.contains("[default: 15s]"), "{help}");
}
