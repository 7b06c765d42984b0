//! README's "Publishing from other languages", executed: each snippet (Python, Node.js, Java, Go,
//! PHP, with only their standard HTTP clients) is written to a file exactly as shown and run with
//! Debian's toolchain against the real binary started with a publish key; a subscriber must
//! receive its event. A missing toolchain fails the test (scripts/test installs them).

use std::process::Command;

use serde_json::{Value, json};

use crate::common::Server;

const KEY: &str = "language-snippets-key-0123456789";

/// The README section's code blocks, by fence language.
fn snippets() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let start = readme
        .find("\n## Publishing from other languages\n")
        .expect("the section");
    let section = &readme[start + 1..];
    let section = &section[..section[1..].find("\n## ").map_or(section.len(), |e| e + 1)];
    let mut out = Vec::new();
    let mut lines = section.lines();
    while let Some(line) = lines.next() {
        let Some(lang) = line.strip_prefix("```") else {
            continue;
        };
        let mut body = String::new();
        for l in lines.by_ref() {
            if l == "```" {
                break;
            }
            body.push_str(l);
            body.push('\n');
        }
        out.push((lang.to_string(), body));
    }
    out
}

#[tokio::test]
async fn each_language_snippet_publishes_with_its_standard_http_client() {
    let snippets = snippets();
    let langs: Vec<&str> = snippets.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(langs, ["python", "js", "java", "go", "php"]);
    let s = Server::start(&["--publish-key", KEY]).await;
    let mut sse = s.subscribe("topic=orders/*").await;
    sse.opened().await;
    let dir = tempfile::tempdir().unwrap();
    for (lang, code) in &snippets {
        let (file, program, args): (&str, &str, Vec<&str>) = match lang.as_str() {
            "python" => ("publish.py", "python3", vec!["publish.py"]),
            "js" => ("publish.mjs", "node", vec!["publish.mjs"]),
            "java" => ("Publish.java", "java", vec!["Publish.java"]),
            "go" => ("publish.go", "go", vec!["run", "publish.go"]),
            "php" => ("publish.php", "php", vec!["publish.php"]),
            other => panic!("no runner for {other}"),
        };
        std::fs::write(dir.path().join(file), code).unwrap();
        let out = tokio::task::spawn_blocking({
            let (dir, url) = (dir.path().to_path_buf(), s.url.clone());
            let (program, args) = (
                program.to_string(),
                args.clone()
                    .into_iter()
                    .map(String::from)
                    .collect::<Vec<_>>(),
            );
            move || {
                Command::new(&program)
                    .args(&args)
                    .current_dir(&dir)
                    .env("HERALD_URL", url)
                    .env("HERALD_PUBLISH_KEY", KEY)
                    .env("GOCACHE", dir.join("gocache"))
                    .env("GO111MODULE", "off")
                    .output()
                    .unwrap_or_else(|e| {
                        panic!("{program} must be installed (scripts/test installs it): {e}")
                    })
            }
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{lang} snippet failed: {}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        let answer: Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|_| panic!("{lang} printed the hub's JSON answer: {stdout}"));
        assert_eq!(answer["delivered"], 1, "{lang}: {answer}");
        let e = sse.next().await;
        assert_eq!(e.id.as_deref(), answer["id"].as_str(), "{lang}");
        assert_eq!(e.event_type, "status", "{lang}");
        let data: Value = serde_json::from_str(&e.data).unwrap();
        assert_eq!(data, json!({"status": "shipped"}), "{lang}");
    }
    // Without the key, the same publish is refused: the snippets' header is what let them in.
    let r = s
        .http()
        .post(format!("{}/publish", s.url))
        .json(&json!({"topic": "orders/42", "data": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
}
