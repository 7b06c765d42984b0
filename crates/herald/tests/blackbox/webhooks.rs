//! Webhooks against the real binary and a real HTTP receiver started here: signed deliveries in
//! event order through receiver failures; a SIGKILL and a restart with the same data dir lose
//! nothing (duplicates only for the delivery in flight, counted); a cursor file in the format
//! before the slot one is taken up, neither losing nor repeating a delivery; events that fell out
//! of history before delivery arrive as one `herald.gap` delivery, and with retention rules only
//! events the hook could receive count; `[[webhook]]` tables of the config file, each with its own
//! secret and topics, beside a `--webhook` flag.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::common::{PATIENCE, Server, refused};

const SECRET: &str = "webhook-secret-for-the-tests";

/// A receiver: answers the first `fail_first` requests with 500, the rest with 200 after `delay`.
#[derive(Default)]
struct Receiver {
    /// Every request: (Herald-Signature, body, answered 2xx).
    got: Mutex<Vec<(String, String, bool)>>,
    fail_first: usize,
    delay: Duration,
}

impl Receiver {
    async fn start(fail_first: usize, delay: Duration) -> (Arc<Receiver>, String) {
        let receiver = Arc::new(Receiver {
            fail_first,
            delay,
            ..Receiver::default()
        });
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (receiver, url)
    }

    /// The accepted deliveries' bodies, in arrival order.
    fn accepted(&self) -> Vec<Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, ok)| *ok)
            .map(|(_, body, _)| serde_json::from_str(body).unwrap())
            .collect()
    }

    /// Waits until a delivery was attempted (accepted or refused).
    async fn until_attempted(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.got.lock().unwrap().is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no delivery attempt"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn until_accepted(&self, n: usize, within: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let got = self.accepted();
            if got.len() >= n {
                return got;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the receiver got {} of {n} deliveries: {got:?}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn receive(State(r): State<Arc<Receiver>>, headers: HeaderMap, body: String) -> StatusCode {
    let signature = headers
        .get("herald-signature")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let n = r.got.lock().unwrap().len();
    let ok = n >= r.fail_first;
    if ok {
        tokio::time::sleep(r.delay).await;
    }
    r.got.lock().unwrap().push((signature, body, ok));
    if ok {
        StatusCode::OK
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    }
}

/// Checks `t=<secs>,v1=<hex>` against the body with the tests' secret, as a receiver would.
fn verify(signature: &str, body: &str) -> bool {
    verify_with(SECRET, signature, body)
}

/// Checks `t=<secs>,v1=<hex>` against the body with `secret`.
fn verify_with(secret: &str, signature: &str, body: &str) -> bool {
    let Some((t, v1)) = signature
        .strip_prefix("t=")
        .and_then(|rest| rest.split_once(",v1="))
    else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    expected == v1
}

async fn publish_n(s: &Server, topic: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(
            s.publish(json!({"topic": topic, "data": format!("m{i}")}))
                .await,
        );
    }
    ids
}

#[tokio::test]
async fn deliveries_are_signed_and_in_order_through_receiver_failures() {
    let (receiver, url) = Receiver::start(2, Duration::ZERO).await;
    let s = Server::start(&[
        "--webhook",
        &url,
        "--webhook-secret",
        SECRET,
        "--webhook-topics",
        "news/**",
    ])
    .await;
    // Let the deliverer start (it delivers what is published from its start on).
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.publish(json!({"topic": "other", "data": "not for the hook"}))
        .await;
    let ids = publish_n(&s, "news/eu", 5).await;
    let got = receiver.until_accepted(5, PATIENCE).await;
    let got_ids: Vec<&str> = got.iter().map(|b| b["id"].as_str().unwrap()).collect();
    assert_eq!(got_ids, ids, "every event, in order, once accepted");
    assert_eq!(got[0]["topics"], json!(["news/eu"]));
    assert_eq!(got[0]["event"], "message");
    assert_eq!(got[0]["data"], "m0");
    assert!(got[0]["publishedAt"].as_u64().unwrap() > 1_600_000_000_000);
    let all = receiver.got.lock().unwrap().clone();
    assert_eq!(
        all.iter().filter(|(_, _, ok)| !ok).count(),
        2,
        "two refusals"
    );
    // The refused attempts were the first event, retried.
    assert!(all[..3].iter().all(|(_, body, _)| body.contains(&ids[0])));
    for (signature, body, _) in &all {
        assert!(verify(signature, body), "{signature} over {body}");
        assert!(
            !verify(signature, &body.replace("m", "M")),
            "a changed body fails"
        );
    }
    let text = s.metrics_text().await;
    let value = |name: &str| {
        let prefix = format!("{name}{{hook=\"{url}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.trim().parse::<f64>().unwrap())
    };
    assert_eq!(value("herald_webhook_failures_total"), Some(2.0), "{text}");
    assert_eq!(
        value("herald_webhook_deliveries_total"),
        Some(5.0),
        "{text}"
    );
    assert_eq!(value("herald_webhook_lag_seconds"), Some(0.0), "{text}");
}

/// `herald serve` arguments for one hook on `jobs` with its cursor in `data`.
fn durable_hook<'a>(data: &'a str, url: &'a str) -> [&'a str; 6] {
    [
        "--data-dir",
        data,
        "--webhook",
        url,
        "--webhook-topics",
        "jobs",
    ]
}

#[tokio::test]
async fn a_sigkill_and_a_restart_with_the_data_dir_lose_nothing() {
    let (receiver, url) = Receiver::start(0, Duration::from_millis(30)).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let args = durable_hook(data, &url);
    let s = Server::start(&args).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids = publish_n(&s, "jobs", 40).await;
    // Kill herald while most deliveries are still pending.
    receiver.until_accepted(5, PATIENCE).await;
    s.kill().await;
    let before = receiver.accepted().len();
    assert!(before < ids.len(), "deliveries were pending at the kill");

    let _s = Server::start(&args).await;
    let deadline = tokio::time::Instant::now() + PATIENCE * 3;
    loop {
        let got = receiver.accepted();
        let mut distinct: Vec<String> = got
            .iter()
            .map(|b| b["id"].as_str().unwrap().to_string())
            .collect();
        distinct.dedup();
        if distinct == ids {
            let duplicates = got.len() - ids.len();
            println!("deliveries: {}, duplicates: {duplicates}", got.len());
            assert!(
                duplicates <= 1,
                "only the delivery in flight at the kill may come twice: {duplicates}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "delivered {distinct:?}, want {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The one cursor file in a data dir.
fn cursor_file(dir: &std::path::Path) -> std::path::PathBuf {
    let found: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            name.starts_with("webhook-") && name.ends_with(".cursor")
        })
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].clone()
}

/// The ids of the accepted deliveries, once there are `n` and a moment has passed without more.
async fn exactly(receiver: &Receiver, n: usize) -> Vec<String> {
    receiver.until_accepted(n, PATIENCE).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    receiver
        .accepted()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

/// Starts herald with `args`, publishes `n` events on `jobs`, waits until `receiver` has them
/// all, kills herald; returns their ids.
async fn delivered_then_killed(receiver: &Receiver, args: &[&str], n: usize) -> Vec<String> {
    let s = Server::start(args).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids = publish_n(&s, "jobs", n).await;
    assert_eq!(exactly(receiver, n).await, ids);
    s.kill().await;
    ids
}

#[tokio::test]
async fn a_cursor_file_of_the_previous_format_is_taken_up_without_loss_or_repeat() {
    let (receiver, url) = Receiver::start(0, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let args = durable_hook(data, &url);
    let ids = delivered_then_killed(&receiver, &args, 6).await;
    let path = cursor_file(dir.path());
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        8192,
        "the slot format"
    );

    // What herald wrote before the slot format: the last delivered id as the file's text. Here
    // the third, as if the last three had been delivered after that herald stopped.
    std::fs::write(&path, &ids[2]).unwrap();
    let s = Server::start(&args).await;
    let more = publish_n(&s, "jobs", 2).await;
    let want: Vec<String> = [&ids[..], &ids[3..], &more[..]].concat();
    assert_eq!(
        exactly(&receiver, want.len()).await,
        want,
        "on from the old file's id"
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 8192, "rewritten");
    s.kill().await;

    // The rewritten file is read back as well: nothing again, only what is new.
    let s = Server::start(&args).await;
    let last = publish_n(&s, "jobs", 1).await;
    let want: Vec<String> = [&want[..], &last[..]].concat();
    assert_eq!(exactly(&receiver, want.len()).await, want);
    s.kill().await;
}

/// Review finding: a cursor file that could not be read was taken for a missing one, so the hook
/// went on from "now" and skipped what it had not delivered. It now delivers again from the
/// oldest event history keeps: repeats, never losses.
#[tokio::test]
async fn a_cursor_that_cannot_be_read_repeats_rather_than_loses() {
    let (receiver, url) = Receiver::start(0, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let args = durable_hook(data, &url);
    let ids = delivered_then_killed(&receiver, &args, 4).await;
    // Both slots damaged (a disk or a stray write would): no cursor can be read.
    std::fs::write(cursor_file(dir.path()), vec![0xa5; 8192]).unwrap();
    let s = Server::start(&args).await;
    let more = publish_n(&s, "jobs", 1).await;
    let want: Vec<String> = [&ids[..], &ids[..], &more[..]].concat();
    assert_eq!(
        exactly(&receiver, want.len()).await,
        want,
        "again from the oldest"
    );
    s.kill().await;
}

#[tokio::test]
async fn events_that_fell_out_of_history_arrive_as_one_gap() {
    // The receiver refuses for a while: meanwhile more is published than history keeps.
    let (receiver, url) = Receiver::start(6, Duration::ZERO).await;
    let s = Server::start(&["--history", "5", "--webhook", &url, "--webhook-topics", "t"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The first event is in the deliverer's hands (refused, retried) before the others come.
    let mut ids = publish_n(&s, "t", 1).await;
    receiver.until_attempted(PATIENCE).await;
    ids.extend(publish_n(&s, "t", 19).await);
    let deadline = tokio::time::Instant::now() + PATIENCE * 3;
    let got = loop {
        let got = receiver.accepted();
        if got.last().is_some_and(|b| b["id"] == json!(ids[19])) {
            break got;
        }
        assert!(tokio::time::Instant::now() < deadline, "{got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The first event (retried until accepted), one gap from it to the oldest event history
    // still holds, then those five.
    assert_eq!(got[0]["id"], json!(ids[0]), "{got:?}");
    assert_eq!(got[1]["event"], "herald.gap", "{got:?}");
    assert_eq!(got[1]["id"], Value::Null);
    let gap: Value = serde_json::from_str(got[1]["data"].as_str().unwrap()).unwrap();
    assert_eq!(gap["lastEventId"], json!(ids[0]), "{gap}");
    assert_eq!(gap["oldest"], json!(ids[15]), "{gap}");
    let rest: Vec<&str> = got[2..].iter().map(|b| b["id"].as_str().unwrap()).collect();
    assert_eq!(
        rest,
        ids[15..].iter().map(String::as_str).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn in_a_cluster_one_node_delivers_each_hook_and_another_takes_over() {
    let redis = crate::cluster::Redis::start();
    let (receiver, url) = Receiver::start(0, Duration::ZERO).await;
    let redis_url = redis.url();
    let args = [
        "--redis",
        redis_url.as_str(),
        "--webhook",
        &url,
        "--webhook-topics",
        "t",
    ];
    let a = Server::start(&args).await;
    let b = Server::start(&args).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut ids = publish_n(&a, "t", 10).await;
    ids.extend(publish_n(&b, "t", 10).await);
    let got = receiver.until_accepted(20, PATIENCE).await;
    let got_ids: Vec<&str> = got.iter().map(|b| b["id"].as_str().unwrap()).collect();
    assert_eq!(
        got_ids, ids,
        "each event once, in order, though both nodes have the hook"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.accepted().len(), 20, "no second deliverer");

    // The holder may be either node: kill A, publish on B. Delivery goes on from the kept
    // cursor (after A's lease expires, if A held it).
    a.signal("KILL");
    drop(a);
    ids.extend(publish_n(&b, "t", 5).await);
    let got = receiver.until_accepted(25, PATIENCE * 3).await;
    let mut distinct: Vec<&str> = got.iter().map(|b| b["id"].as_str().unwrap()).collect();
    distinct.dedup();
    assert_eq!(distinct, ids);
    println!("duplicates after the kill: {}", got.len() - ids.len());
    assert!(
        got.len() - ids.len() <= 1,
        "only the delivery in flight may repeat"
    );
}

#[tokio::test]
async fn webhook_tables_each_with_its_secret_and_topics_beside_the_flag() {
    let (orders, orders_url) = Receiver::start(0, Duration::ZERO).await;
    let (news, news_url) = Receiver::start(0, Duration::ZERO).await;
    let (flag, flag_url) = Receiver::start(0, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("herald.toml");
    std::fs::write(
        &file,
        format!(
            "presence-grace = \"0s\"\n\
             [[webhook]]\nurl = \"{orders_url}\"\nsecret = \"orders-secret\"\ntopics = [\"orders/**\", \"$presence/*\"]\n\
             [[webhook]]\nurl = \"{news_url}\"\nsecret = \"news-secret\"\ntopics = [\"news/**\"]\n"
        ),
    )
    .unwrap();
    // The flag's hook takes --webhook-secret and --webhook-topics; the tables keep their own.
    let s = Server::start(&[
        "--config",
        file.to_str().unwrap(),
        "--webhook",
        &flag_url,
        "--webhook-secret",
        SECRET,
        "--webhook-topics",
        "misc",
    ])
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let order = s.publish(json!({"topic": "orders/42", "data": "o"})).await;
    let story = s.publish(json!({"topic": "news/eu", "data": "n"})).await;
    let other = s.publish(json!({"topic": "misc", "data": "m"})).await;
    let mut alice = s.subscribe("topic=app&user=alice").await;
    alice.opened().await;

    let got = orders.until_accepted(2, PATIENCE).await;
    assert_eq!(got[0]["id"], json!(order), "{got:?}");
    assert_eq!(got[1]["event"], "herald.presence", "{got:?}");
    assert_eq!(got[1]["topics"], json!(["$presence/alice"]), "{got:?}");
    let got = news.until_accepted(1, PATIENCE).await;
    assert_eq!(got[0]["id"], json!(story), "{got:?}");
    let got = flag.until_accepted(1, PATIENCE).await;
    assert_eq!(got[0]["id"], json!(other), "{got:?}");

    // Nothing else reached any of them, and each delivery is signed with its own hook's secret.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (receiver, secret, wrong, n) in [
        (&orders, "orders-secret", "news-secret", 2),
        (&news, "news-secret", "orders-secret", 1),
        (&flag, SECRET, "orders-secret", 1),
    ] {
        let all = receiver.got.lock().unwrap().clone();
        assert_eq!(all.len(), n, "{all:?}");
        for (signature, body, _) in &all {
            assert!(
                verify_with(secret, signature, body),
                "{signature} over {body}"
            );
            assert!(
                !verify_with(wrong, signature, body),
                "another hook's secret fails"
            );
        }
    }
}

#[tokio::test]
async fn a_bad_webhook_table_stops_startup_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("herald.toml");
    let stderr = async |toml: &str| {
        std::fs::write(&file, toml).unwrap();
        refused(&["--config", file.to_str().unwrap()]).await
    };
    let err = stderr("[[webhook]]\nurl = \"http://a.example/\"\ntopics = [\"a/**/b\"]\n").await;
    assert!(
        err.contains("invalid webhook: [[webhook]] 1: 'topics': 'a/**/b'"),
        "{err}"
    );
    // A table is named by its place in the file's `webhook` list, URLs counted too.
    let err = stderr("webhook = [\"http://c.example/\", { url = \"ftp://d.example/\" }]\n").await;
    assert!(
        err.contains("[[webhook]] 2: 'ftp://d.example/' is not an http(s) URL"),
        "{err}"
    );
    let err = stderr("[[webhook]]\nsecret = \"s\"\n").await;
    assert!(err.contains("[[webhook]] 1: 'url' is missing"), "{err}");
    let err = stderr("webhook-secret = \"s\"\n[[webhook]]\nurl = \"http://a.example/\"\n").await;
    assert!(
        err.contains("invalid webhook-secret: applies to --webhook URLs"),
        "{err}"
    );
}

/// With retention rules a hook reads history with its topics' interest, as a stream: events of
/// other topics that another log dropped while it was behind are no `herald.gap` of the hook's.
#[tokio::test]
async fn other_topics_dropped_by_retention_rules_are_no_gap_of_a_hook() {
    let (receiver, url) = Receiver::start(4, Duration::ZERO).await;
    let s = Server::start(&[
        "--history",
        "3",
        "--retention",
        "hooked/**:events=100",
        "--webhook",
        &url,
        "--webhook-topics",
        "hooked/**",
    ])
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The first event is in the deliverer's hands (refused, retried) before the others come.
    let mut ids = publish_n(&s, "hooked/a", 1).await;
    receiver.until_attempted(PATIENCE).await;
    // The default log keeps 3: seven of these are dropped while the hook is behind.
    publish_n(&s, "news", 10).await;
    ids.extend(publish_n(&s, "hooked/a", 1).await);
    let got = receiver.until_accepted(2, PATIENCE * 3).await;
    assert!(
        got.iter().all(|b| b["event"] != "herald.gap"),
        "no gap: {got:?}"
    );
    let got_ids: Vec<&str> = got.iter().map(|b| b["id"].as_str().unwrap()).collect();
    assert_eq!(got_ids, ids);
}
