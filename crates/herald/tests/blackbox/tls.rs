//! HTTPS and HTTP/2: real curl (HTTP/2 and HTTP/1.1 over TLS, h2c with prior knowledge) receives
//! published events; certificates made here with the openssl CLI; bad pairs stop startup naming
//! the file; garbage on the TLS port, streams past `--h2-max-streams` and a header flood are each
//! refused while other streams go on; SIGHUP swaps the certificate under open streams.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;

use crate::common::{PATIENCE, Server, refused};
use crate::pki::{Curl, Pki, curl, tls_args};

#[tokio::test]
async fn curl_receives_events_over_https_with_http2_and_http11() {
    let pki = Pki::new();
    let (cert, key) = pki.self_signed("localhost");
    let server = Server::start(&tls_args(&cert, &key)).await;
    assert!(server.url.starts_with("https://"), "{}", server.url);
    for (flag, status) in [("--http2", "HTTP/2 200"), ("--http1.1", "HTTP/1.1 200")] {
        let topic = format!("tls{}", &flag[6..].replace('.', ""));
        let url = format!("{}/events?topic={topic}", server.url);
        let mut stream = Curl::open(&url, &[flag, "--cacert", cert.to_str().unwrap()]);
        let line = stream.opened().await;
        assert!(line.starts_with(status), "{flag}: {line}");
        server
            .publish(json!({"topic": topic, "data": format!("over {flag}")}))
            .await;
        let data = stream.until(|l| l.starts_with("data:")).await;
        assert_eq!(data, format!("data: over {flag}"));
    }
    // Every other route works over HTTP/2 too.
    let (ok, body, err) = curl(&[
        "--http2",
        "--cacert",
        cert.to_str().unwrap(),
        "-w",
        "\n%{http_version}",
        &format!("{}/stats", server.url),
    ])
    .await;
    assert!(ok, "{err}");
    assert!(body.ends_with("\n2"), "{body}");
    assert!(body.contains("\"connections\""), "{body}");
}

#[tokio::test]
async fn curl_with_http2_prior_knowledge_is_served_on_the_plain_listener() {
    let server = Server::start(&[]).await;
    let url = format!("{}/events?topic=h2c", server.url);
    let mut stream = Curl::open(&url, &["--http2-prior-knowledge"]);
    let line = stream.opened().await;
    assert!(line.starts_with("HTTP/2 200"), "{line}");
    server
        .publish(json!({"topic": "h2c", "data": "plain h2"}))
        .await;
    assert_eq!(
        stream.until(|l| l.starts_with("data:")).await,
        "data: plain h2"
    );
    let (ok, body, err) = curl(&[
        "--http2-prior-knowledge",
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"topic":"h2c","data":"published over h2c"}"#,
        &format!("{}/publish", server.url),
    ])
    .await;
    assert!(ok && body.contains("\"id\""), "{body} {err}");
    assert_eq!(
        stream.until(|l| l.starts_with("data:")).await,
        "data: published over h2c"
    );
}

#[tokio::test]
async fn bad_certificates_stop_startup_naming_the_file_and_the_problem() {
    let pki = Pki::new();
    let (cert_a, _) = pki.self_signed("a");
    let (_, key_b) = pki.self_signed("b");
    let err = refused(&tls_args(&cert_a, &key_b)).await;
    assert!(
        err.contains("does not match") && err.contains("a.crt") && err.contains("b.key"),
        "{err}"
    );
    let garbage = pki.path("garbage.pem");
    std::fs::write(&garbage, "this is not a certificate\n").unwrap();
    let (_, key_a) = pki.self_signed("a2");
    let err = refused(&tls_args(&garbage, &key_a)).await;
    assert!(
        err.contains("garbage.pem") && err.contains("no PEM certificate"),
        "{err}"
    );
    let broken = pki.path("broken.pem");
    std::fs::write(
        &broken,
        "-----BEGIN CERTIFICATE-----\n!!not base64!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let err = refused(&tls_args(&broken, &key_a)).await;
    assert!(
        err.contains("broken.pem") && err.contains("not valid PEM"),
        "{err}"
    );
    let (cert_a2, _) = (pki.path("a2.crt"), ());
    let err = refused(&tls_args(&cert_a2, &garbage)).await;
    assert!(
        err.contains("garbage.pem") && err.contains("no PEM private key"),
        "{err}"
    );
    let missing = pki.path("missing.key");
    let err = refused(&tls_args(&cert_a2, &missing)).await;
    assert!(
        err.contains("missing.key") && err.contains("cannot read"),
        "{err}"
    );
    let (old, key) = pki.expired("old");
    let err = refused(&tls_args(&old, &key)).await;
    assert!(
        err.contains("old-expired.crt") && err.contains("expired"),
        "{err}"
    );
    let err = refused(&["--tls-cert", cert_a.to_str().unwrap()]).await;
    assert!(err.contains("--tls-key"), "{err}");
}

#[tokio::test]
async fn garbage_instead_of_a_client_hello_is_refused_and_disturbs_nothing() {
    let pki = Pki::new();
    let (cert, key) = pki.self_signed("localhost");
    let server = Server::start(&tls_args(&cert, &key)).await;
    let mut open = server.subscribe("topic=calm").await;
    open.opened().await;
    let addr = format!("127.0.0.1:{}", server.port);

    // Plain HTTP on the HTTPS port: told so, in plain HTTP.
    let mut tcp = TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(b"GET /events?topic=calm HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_end(&mut tcp).await;
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("\"https_required\""),
        "{answer}"
    );
    // Binary garbage, and garbage that starts like a TLS record: the connection is closed.
    for garbage in [
        &b"\x00\x01\x02garbage\xff\xfe"[..],
        &b"\x16\x03\x01\x00\x05hello, not a ClientHello at all"[..],
    ] {
        let mut tcp = TcpStream::connect(&addr).await.unwrap();
        tcp.write_all(garbage).await.unwrap();
        let answer = read_to_end(&mut tcp).await;
        assert!(
            !answer.contains("HTTP/"),
            "garbage got an HTTP answer: {answer}"
        );
    }
    // The open stream and new connections are fine.
    server
        .publish(json!({"topic": "calm", "data": "still here"}))
        .await;
    assert_eq!(open.next().await.data, "still here");
    let (status, _) = server.get("/stats").await;
    assert_eq!(status, reqwest::StatusCode::OK);
}

/// Reads until the peer closes (or PATIENCE runs out, failing the test).
async fn read_to_end(tcp: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "herald kept the connection open");
    String::from_utf8_lossy(&out).into()
}

/// A raw HTTP/2 client speaking frames by hand, so that it can break the rules a real client keeps.
mod h2 {
    use super::*;

    pub const DATA: u8 = 0;
    pub const HEADERS: u8 = 1;
    pub const RST_STREAM: u8 = 3;
    pub const SETTINGS: u8 = 4;
    pub const PING: u8 = 6;
    pub const GOAWAY: u8 = 7;
    pub const CONTINUATION: u8 = 9;
    pub const END_STREAM: u8 = 1;
    pub const END_HEADERS: u8 = 4;
    pub const ACK: u8 = 1;

    pub struct Frame {
        pub kind: u8,
        pub flags: u8,
        pub stream: u32,
        pub payload: Vec<u8>,
    }

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap();
        let mut out = len.to_be_bytes()[1..].to_vec();
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// A header block of literal fields (HPACK, no indexing, no Huffman).
    pub fn request_block(path: &str) -> Vec<u8> {
        let mut block = Vec::new();
        for (name, value) in [
            (":method", "GET"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "localhost"),
        ] {
            block.push(0);
            block.push(u8::try_from(name.len()).unwrap());
            block.extend_from_slice(name.as_bytes());
            block.push(u8::try_from(value.len()).unwrap());
            block.extend_from_slice(value.as_bytes());
        }
        block
    }

    /// Connects with prior knowledge (h2c) and sends the preface and empty SETTINGS.
    pub async fn connect(port: u16) -> TcpStream {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        tcp.write_all(&hello).await.unwrap();
        tcp
    }

    /// The next frame (acknowledging the server's SETTINGS and PINGs on the way), or `None` at
    /// the end.
    pub async fn read_frame(tcp: &mut TcpStream) -> Option<Frame> {
        loop {
            let mut head = [0u8; 9];
            tokio::time::timeout(PATIENCE, tcp.read_exact(&mut head))
                .await
                .expect("herald sent no frame in time")
                .ok()?;
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            tcp.read_exact(&mut payload).await.ok()?;
            let f = Frame {
                kind: head[3],
                flags: head[4],
                stream: u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff,
                payload,
            };
            if f.kind == SETTINGS && f.flags & ACK == 0 {
                tcp.write_all(&frame(SETTINGS, ACK, 0, &[])).await.ok()?;
                continue;
            }
            if f.kind == PING && f.flags & ACK == 0 {
                tcp.write_all(&frame(PING, ACK, 0, &f.payload)).await.ok()?;
                continue;
            }
            return Some(f);
        }
    }
}

#[tokio::test]
async fn streams_past_h2_max_streams_are_refused_and_the_connection_stays() {
    let server = Server::start(&["--h2-max-streams", "2"]).await;
    let mut tcp = h2::connect(server.port).await;
    let block = h2::request_block("/events?topic=many");
    for stream in [1, 3, 5] {
        tcp.write_all(&h2::frame(
            h2::HEADERS,
            h2::END_STREAM | h2::END_HEADERS,
            stream,
            &block,
        ))
        .await
        .unwrap();
    }
    let (mut answered, mut refused) = (Vec::new(), Vec::new());
    while answered.len() + refused.len() < 3 {
        let f = h2::read_frame(&mut tcp).await.expect("connection open");
        match f.kind {
            h2::HEADERS => answered.push(f.stream),
            // REFUSED_STREAM: the client may retry it once others end.
            h2::RST_STREAM if f.payload == 7u32.to_be_bytes() => refused.push(f.stream),
            h2::GOAWAY => panic!("the whole connection was closed"),
            _ => {}
        }
    }
    answered.sort_unstable();
    assert_eq!((answered, refused), (vec![1, 3], vec![5]));
    server
        .publish(json!({"topic": "many", "data": "to both"}))
        .await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let f = h2::read_frame(&mut tcp).await.expect("connection open");
        if f.kind == h2::DATA && String::from_utf8_lossy(&f.payload).contains("data: to both") {
            got.push(f.stream);
        }
    }
    got.sort_unstable();
    assert_eq!(got, vec![1, 3]);
}

/// Issue 21: over HTTP/2 a stream that reaches its maximum age ends (END_STREAM), while the
/// connection and its other streams go on.
#[tokio::test]
async fn over_http2_an_aged_stream_ends_and_the_connection_stays() {
    let server = Server::start(&[]).await;
    let mut tcp = h2::connect(server.port).await;
    for (stream, path) in [(1, "/events?topic=age&maxAge=1s"), (3, "/events?topic=age")] {
        tcp.write_all(&h2::frame(
            h2::HEADERS,
            h2::END_STREAM | h2::END_HEADERS,
            stream,
            &h2::request_block(path),
        ))
        .await
        .unwrap();
    }
    // Stream 1 ends by its age: a frame with END_STREAM, and no GOAWAY or reset.
    loop {
        let f = h2::read_frame(&mut tcp).await.expect("connection open");
        assert_ne!(f.kind, h2::GOAWAY, "the whole connection was closed");
        assert_ne!(f.kind, h2::RST_STREAM, "a stream was reset, not ended");
        if f.stream == 1 && f.flags & h2::END_STREAM != 0 {
            break;
        }
        assert!(
            !(f.stream == 3 && f.flags & h2::END_STREAM != 0),
            "the stream without an age ended"
        );
    }
    // The same connection still carries stream 3.
    server
        .publish(json!({"topic": "age", "data": "after the end"}))
        .await;
    loop {
        let f = h2::read_frame(&mut tcp).await.expect("connection open");
        assert_ne!(f.kind, h2::GOAWAY);
        if f.kind == h2::DATA && String::from_utf8_lossy(&f.payload).contains("after the end") {
            assert_eq!(f.stream, 3);
            break;
        }
    }
}

#[tokio::test]
async fn a_header_flood_is_cut_off_and_disturbs_nothing() {
    let server = Server::start(&[]).await;
    let mut calm = server.subscribe("topic=calm").await;
    calm.opened().await;
    // An endless header block: HEADERS without END_HEADERS, then CONTINUATION frames of 16 KiB.
    let mut tcp = h2::connect(server.port).await;
    tcp.write_all(&h2::frame(h2::HEADERS, 0, 1, &h2::request_block("/events")))
        .await
        .unwrap();
    let chunk = h2::frame(h2::CONTINUATION, 0, 1, &[0u8; 16 * 1024]);
    let (reader, mut writer) = tcp.into_split();
    let flood = tokio::spawn(async move {
        let mut sent = 0usize;
        // 64 MiB at most: herald must stop it far earlier.
        while sent < 64 << 20 {
            if writer.write_all(&chunk).await.is_err() {
                return sent;
            }
            sent += chunk.len();
        }
        sent
    });
    let mut tcp = reader;
    // What herald answers: a GOAWAY, or a 431 for the stream, then the connection ends.
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(PATIENCE, tcp.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => panic!("herald neither answered nor closed a 64 MiB header flood"),
        }
    }
    let sent = flood.await.unwrap();
    assert!(
        sent < 64 << 20,
        "herald read the whole flood ({sent} bytes)"
    );
    let goaway = frames(&seen).any(|(kind, _)| kind == h2::GOAWAY);
    assert!(goaway, "no GOAWAY among {} bytes", seen.len());
    // The other stream and new requests are undisturbed.
    server
        .publish(json!({"topic": "calm", "data": "unharmed"}))
        .await;
    assert_eq!(calm.next().await.data, "unharmed");
    let (status, _) = server.get("/stats").await;
    assert_eq!(status, reqwest::StatusCode::OK);
}

/// (type, stream) of each whole frame in `bytes`.
fn frames(bytes: &[u8]) -> impl Iterator<Item = (u8, u32)> + '_ {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.len() < 9 {
            return None;
        }
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let kind = rest[3];
        let stream = u32::from_be_bytes(rest[5..9].try_into().unwrap()) & 0x7fff_ffff;
        rest = &rest[(9 + len).min(rest.len())..];
        Some((kind, stream))
    })
}

#[tokio::test]
async fn sighup_swaps_the_certificate_under_open_streams_and_refuses_a_bad_pair() {
    let pki = Pki::new();
    let (cert_a, key_a) = pki.self_signed("first");
    let (cert, key) = (pki.path("live.crt"), pki.path("live.key"));
    std::fs::copy(&cert_a, &cert).unwrap();
    std::fs::copy(&key_a, &key).unwrap();
    let server = Server::start_logged(&tls_args(&cert, &key)).await;
    let stats = format!("{}/stats", server.url);
    let trusts = |ca: &Path| {
        let ca = ca.to_str().unwrap().to_string();
        let stats = stats.clone();
        async move { curl(&["--cacert", &ca, "-o", "/dev/null", &stats]).await.0 }
    };
    assert!(trusts(&cert_a).await);
    let mut old = Curl::open(
        &format!("{}/events?topic=reload", server.url),
        &["--http2", "--cacert", cert_a.to_str().unwrap()],
    );
    old.opened().await;

    let (cert_b, key_b) = pki.self_signed("second");
    std::fs::copy(&cert_b, &cert).unwrap();
    std::fs::copy(&key_b, &key).unwrap();
    server.signal("HUP");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !trusts(&cert_b).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "new connections never got the new certificate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !trusts(&cert_a).await,
        "the old certificate is still served"
    );
    server
        .publish(json!({"topic": "reload", "data": "after reload"}))
        .await;
    assert_eq!(
        old.until(|l| l.starts_with("data:")).await,
        "data: after reload"
    );

    // A key that does not match: refused with a log line, the second pair stays.
    let (_, key_c) = pki.self_signed("third");
    std::fs::copy(&key_c, &key).unwrap();
    server.signal("HUP");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !server
        .log
        .lock()
        .unwrap()
        .contains("refused the new TLS certificate")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no log line for the bad pair: {}",
            server.log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        server.log.lock().unwrap().contains("does not match"),
        "{}",
        server.log.lock().unwrap()
    );
    assert!(trusts(&cert_b).await, "the good pair was dropped");
    server
        .publish(json!({"topic": "reload", "data": "still"}))
        .await;
    assert_eq!(old.until(|l| l.starts_with("data:")).await, "data: still");
}

#[tokio::test]
async fn herald_sub_and_pub_speak_https_with_a_private_ca_or_insecure() {
    let pki = Pki::new();
    let (cert, key) = pki.self_signed("localhost");
    let server = Server::start(&tls_args(&cert, &key)).await;
    let mut sub = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([
            "sub",
            "cli",
            "--url",
            &server.url,
            "--ca",
            cert.to_str().unwrap(),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(sub.stdout.take().unwrap()).lines();
    server.eventually("/stats", |v| v["connections"] == 1).await;
    let publish = |args: Vec<String>| async move {
        Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("pub")
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .await
            .unwrap()
    };
    let out = publish(vec![
        "cli".into(),
        "over https".into(),
        "--url".into(),
        server.url.clone(),
        "--insecure".into(),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("sub printed the event")
        .unwrap()
        .unwrap();
    assert!(line.ends_with("\tmessage\tover https"), "{line}");
    // Without --ca or --insecure the self-signed certificate is not trusted.
    let out = publish(vec![
        "cli".into(),
        "x".into(),
        "--url".into(),
        server.url.clone(),
    ])
    .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach the hub"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn shutdown_sends_goaway_and_ends_http2_streams_without_herald_close() {
    let mut server = Server::start(&[]).await;
    let mut tcp = h2::connect(server.port).await;
    tcp.write_all(&h2::frame(
        h2::HEADERS,
        h2::END_STREAM | h2::END_HEADERS,
        1,
        &h2::request_block("/events?topic=bye"),
    ))
    .await
    .unwrap();
    loop {
        let f = h2::read_frame(&mut tcp).await.expect("connection open");
        if f.kind == h2::HEADERS && f.stream == 1 {
            break;
        }
    }
    server.signal("TERM");
    let (mut goaway, mut ended, mut body) = (false, false, Vec::new());
    while let Some(f) = h2::read_frame(&mut tcp).await {
        match f.kind {
            h2::GOAWAY => goaway = true,
            h2::DATA if f.stream == 1 => {
                body.extend_from_slice(&f.payload);
                ended |= f.flags & h2::END_STREAM != 0;
            }
            h2::HEADERS if f.stream == 1 => ended |= f.flags & h2::END_STREAM != 0,
            _ => {}
        }
    }
    let body = String::from_utf8_lossy(&body);
    assert!(goaway, "no GOAWAY");
    assert!(ended, "the stream did not end cleanly: {body}");
    assert!(!body.contains("herald.close"), "{body}");
    assert!(server.wait_exit(PATIENCE).await.success());
}
