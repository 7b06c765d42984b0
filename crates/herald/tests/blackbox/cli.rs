//! The command line: configuration from flags, env and TOML (and refusals of bad ones), and the
//! `herald pub` / `herald sub` clients against a running hub.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::common::{PATIENCE, Server, refused};

fn herald() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_herald"));
    c.env("RUST_LOG", "warn").kill_on_drop(true);
    c
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

/// Reads `herald sub`'s next stdout line, failing the test if none comes in time.
async fn next_line(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> String {
    tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("a line from herald sub in time")
        .unwrap()
        .expect("herald sub ended early")
}

#[tokio::test]
async fn cli_pub_and_sub_authenticate_with_a_key_or_a_token_and_show_refusals() {
    use crate::auth::{KEY, SECRET, token};
    use serde_json::json;
    let s = Server::start(&["--jwt-secret", SECRET, "--publish-key", KEY]).await;
    let reader = token(json!({"sub": "ann", "herald": {"subscribe": ["chat/*"]}}));
    let writer = token(json!({"sub": "pat", "herald": {"publish": ["chat/**"]}}));

    // No credentials: the hub's error body is shown.
    let out = herald()
        .args(["pub", "chat/a", "x", "--url", &s.url])
        .env_remove("HERALD_PUBLISH_KEY")
        .env_remove("HERALD_TOKEN")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("401 Unauthorized") && err.contains(r#""error":"unauthorized""#),
        "{err}"
    );

    // sub with a token from the environment.
    let mut sub = herald()
        .args(["sub", "chat/*", "--url", &s.url])
        .env("HERALD_TOKEN", &reader)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(sub.stdout.take().unwrap()).lines();
    let online = || async {
        let r = s
            .http()
            .get(format!("{}/users/ann", s.url))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        r.json::<serde_json::Value>().await.unwrap()["online"] == true
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !online().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sub never connected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // pub with --key, with HERALD_PUBLISH_KEY, and with --token.
    let published = [
        herald()
            .args(["pub", "chat/a", "by key", "--key", KEY, "--url", &s.url])
            .output()
            .await
            .unwrap(),
        herald()
            .args(["pub", "chat/a", "by env key", "--url", &s.url])
            .env("HERALD_PUBLISH_KEY", KEY)
            .output()
            .await
            .unwrap(),
        herald()
            .args([
                "pub", "chat/b", "by token", "--token", &writer, "--url", &s.url,
            ])
            .output()
            .await
            .unwrap(),
    ];
    let mut ids = Vec::new();
    for out in &published {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(answer["delivered"], 1);
        ids.push(answer["id"].as_str().unwrap().to_string());
    }
    assert_eq!(
        next_line(&mut lines).await,
        format!("{}\tmessage\tby key", ids[0])
    );
    assert_eq!(
        next_line(&mut lines).await,
        format!("{}\tmessage\tby env key", ids[1])
    );
    assert_eq!(
        next_line(&mut lines).await,
        format!("{}\tmessage\tby token", ids[2])
    );
    drop(sub);

    // A token's missing right: the hub's refusal, and a non-zero exit.
    let out = herald()
        .args(["pub", "news/x", "y", "--token", &writer, "--url", &s.url])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("403 Forbidden") && err.contains("forbidden_topic"),
        "{err}"
    );
    let out = tokio::time::timeout(
        PATIENCE,
        herald()
            .args(["sub", "news/*", "--token", &reader, "--url", &s.url])
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("forbidden_selector"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn cli_sub_reports_token_expired_and_exits_non_zero() {
    use crate::auth::{SECRET, token};
    use serde_json::json;
    let s = Server::start(&["--jwt-secret", SECRET, "--jwt-leeway", "0s"]).await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 2;
    let short = token(json!({"sub": "ann", "exp": exp, "herald": {"subscribe": ["a"]}}));
    let out = tokio::time::timeout(
        PATIENCE,
        herald()
            .args(["sub", "a", "--token", &short, "--url", &s.url])
            .output(),
    )
    .await
    .expect("sub ends when its token expires")
    .unwrap();
    assert!(!out.status.success(), "exit status {:?}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("herald.close"), "{stdout}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("token_expired") && err.contains("fresh token"),
        "{err}"
    );
}

/// Starts `herald serve` on a given port (for a restart on the same address).
async fn serve_on(port: u16, args: &[&str]) -> tokio::process::Child {
    let mut child = herald()
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .expect("herald listening");
    assert!(first.starts_with("herald listening on"), "{first}");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}

/// Reproduces issue 12 item 10: after a `herald.gap` (which has no `id:`), `herald sub` forgot
/// its last id, so its next reconnect was live and an event published meanwhile was lost. A
/// browser keeps the id: the reconnect must send it again, and the hub then replays.
#[tokio::test]
async fn cli_sub_keeps_its_last_id_across_a_gap() {
    let mut s = Server::start(&["--retry", "2s"]).await;
    let port = s.port;
    let mut sub = herald()
        .args([
            "sub",
            "t",
            "--last-event-id",
            "not-an-id-of-this-hub",
            "--url",
            &s.url,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(sub.stdout.take().unwrap()).lines();
    let gap = next_line(&mut lines).await;
    assert!(gap.starts_with("-\therald.gap\t"), "{gap}");
    // The hub goes away (no herald.close: the sub reconnects) and comes back empty on the same
    // port; an event is published there before the sub's retry delay is over.
    s.signal("TERM");
    s.wait_exit(PATIENCE).await;
    let mut again = serve_on(port, &["--retry", "2s"]).await;
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/publish"))
        .json(&serde_json::json!({"topic": "t", "data": "while away"}))
        .send()
        .await
        .unwrap();
    let id = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Resuming with the kept id, the hub answers with a gap again and replays what it has.
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(next_line(&mut lines).await);
    }
    assert!(got[0].starts_with("-\therald.gap\t"), "{got:?}");
    assert_eq!(got[1], format!("{id}\tmessage\twhile away"));
    let _ = sub.kill().await;
    let _ = again.kill().await;
}

/// Reproduces issue 12's terminal escape injection end to end: an event's control characters
/// reached the terminal raw.
#[tokio::test]
async fn cli_sub_escapes_control_characters() {
    let s = Server::start(&[]).await;
    let mut sub = herald()
        .args(["sub", "t", "--url", &s.url])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = sub.stdout.take().unwrap();
    s.eventually("/stats", |v| v["connections"] == 1).await;
    let id = s
        .publish(serde_json::json!({"topic": "t", "data": "\u{1b}]0;owned\u{7}\u{1b}[2J\rok\tx"}))
        .await;
    let mut bytes = Vec::new();
    let want = format!("{id}\tmessage\t\\u{{1b}}]0;owned\\u{{7}}\\u{{1b}}[2J\\nok\\tx\n");
    let read = async {
        let mut buf = [0u8; 256];
        while !bytes.ends_with(b"\n") {
            let n = tokio::io::AsyncReadExt::read(&mut out, &mut buf)
                .await
                .unwrap();
            assert!(n > 0, "sub ended");
            bytes.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(PATIENCE, read).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&bytes), want);
    assert!(!bytes.contains(&0x1b) && !bytes.contains(&b'\r') && !bytes.contains(&7));
    let _ = sub.kill().await;
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
        // The shared client installs the rustls provider reqwest needs (`rustls-no-provider`).
        crate::common::http_client()
            .get(format!("http://127.0.0.1:{}/healthz", self.port()))
            .send()
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
