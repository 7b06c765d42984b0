//! README's nginx snippet, checked with the installed nginx: `nginx -t` accepts it as written (only
//! the upstream's port and the listen address changed), and an event stream and a publish go
//! through it to the real binary. A missing nginx fails the test (scripts/test installs it).

use std::process::{Child, Command, Stdio};

use serde_json::json;

use crate::common::{PATIENCE, Server, Sse, free_port, wait_listening};

fn snippet() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let start = readme.find("\n## Behind nginx\n").expect("the section");
    let section = &readme[start..];
    let block = &section[section.find("```nginx\n").expect("an nginx block") + 9..];
    block[..block.find("\n```").unwrap()].to_string()
}

struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers before exiting (SIGKILL would orphan them).
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_readme_nginx_snippet_passes_nginx_t_and_proxies_streams() {
    let hub = Server::start(&["--trusted-proxy", "127.0.0.1"]).await;
    let port = free_port();
    let snippet = snippet();
    for needed in [
        "upstream herald",
        "keepalive",
        "proxy_buffering off",
        "proxy_http_version 1.1",
    ] {
        assert!(snippet.contains(needed), "the snippet has {needed}");
    }
    let server_line = "server 127.0.0.1:8080;";
    let listen_line = "listen 80;";
    assert!(snippet.contains(server_line) && snippet.contains(listen_line));
    let config = snippet
        .replace(server_line, &format!("server 127.0.0.1:{};", hub.port))
        .replace(listen_line, &format!("listen 127.0.0.1:{port};"));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let conf = dir.path().join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "user root;\nworker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nevents {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{config}\n}}\n"
        ),
    )
    .unwrap();
    let prefix = format!("{d}/");
    let check = Command::new("nginx")
        .args(["-t", "-c", conf.to_str().unwrap(), "-p", &prefix])
        .output()
        .expect("nginx must be installed (scripts/test installs it)");
    assert!(
        check.status.success(),
        "nginx -t refuses the README snippet: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let _nginx = Nginx(
        Command::new("nginx")
            .args(["-c", conf.to_str().unwrap(), "-p", &prefix])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(port, "nginx");
    let proxy = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{proxy}/events?topic=via/nginx&user=ann"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    let mut sse = Sse::new(r);
    sse.opened().await;
    for i in 0..3 {
        let r = http
            .post(format!("{proxy}/publish"))
            .json(&json!({"topic": "via/nginx", "data": format!("m{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::OK);
        // Each event arrives on its own, before the next publish: nothing is buffered.
        let e = tokio::time::timeout(PATIENCE, sse.next()).await.unwrap();
        assert_eq!(e.data, format!("m{i}"));
    }
    let (_, user) = hub.get("/users/ann").await;
    assert_eq!(
        user["online"], true,
        "the stream through nginx counts in presence"
    );
}
