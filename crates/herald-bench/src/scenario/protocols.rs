//! `protocols` (herald and nchan, each with TLS and HTTP/2 on): memory per idle stream by how the
//! stream arrives — plain HTTP/1.1, HTTP/1.1 over TLS, and HTTP/2 over TLS with many streams
//! sharing each connection (the cost of a connection with its first stream, and of each further
//! stream) — how many streams per second are set up over each (TLS: a full handshake, no
//! resumption, then request and response head), and fan-out to all of the plain HTTP/1.1 streams
//! and to all of the HTTP/2 streams. The certificate is a self-signed ECDSA P-256 one made with
//! the openssl CLI; memory is the server's RSS difference (all its processes).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use futures_util::StreamExt;
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

use super::clients::payload;
use super::{Ctx, Row, num, row};
use crate::http::Conn;
use crate::server::{Kind, Server, Tls};
use crate::sse::Counter;

/// What the fan-out publishes.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub messages: u64,
    pub size: usize,
    pub publishers: usize,
}

pub async fn protocols(
    ctx: &Ctx,
    n: usize,
    conns: usize,
    load: Load,
    concurrency: usize,
) -> anyhow::Result<Vec<Row>> {
    let pki = Pki::make()?;
    let tls = Tls {
        cert: pki.cert.clone(),
        key: pki.key.clone(),
    };
    let mut rows = Vec::new();
    for &kind in &ctx.targets {
        if !matches!(kind, Kind::Herald | Kind::Nchan) {
            crate::note(&format!("protocols: {} has no TLS, skipped", kind.name()));
            continue;
        }
        // HTTP/1.1, plain and over TLS: one connection per stream.
        for secure in [false, true] {
            let server =
                Server::start_with(kind, &ctx.bins, &ctx.herald_args, secure.then_some(&tls))
                    .await?;
            let connector = secure
                .then(|| client_config(&pki.cert, b"http/1.1"))
                .transpose()?;
            let topic = "h1";
            let path = server.sub_path(topic);
            tokio::time::sleep(Duration::from_millis(500)).await;
            let before = server.rss();
            let start = Instant::now();
            let events = Arc::new(AtomicU64::new(0));
            let streams = open_many(n, concurrency, |_| {
                let (connector, path, events) = (connector.clone(), path.clone(), events.clone());
                let addr = server.addr;
                async move {
                    let tcp = TcpStream::connect(addr).await?;
                    Ok(match connector {
                        None => read_h1(open_h1(tcp, &path).await?, events),
                        Some(c) => {
                            let tls = c.connect(localhost(), tcp).await.context("TLS handshake")?;
                            read_h1(open_h1(tls, &path).await.context("GET over TLS")?, events)
                        }
                    })
                }
            })
            .await?;
            let elapsed = start.elapsed();
            tokio::time::sleep(Duration::from_secs(2)).await;
            let after = server.rss();
            let mut r = row(if secure { "idle-h1-tls" } else { "idle-h1" }, kind);
            r.insert("streams", streams.len());
            r.insert(
                "bytes_per_stream",
                num((after as f64 - before as f64) / streams.len().max(1) as f64),
            );
            r.insert(
                "connects_per_s",
                num(streams.len() as f64 / elapsed.as_secs_f64()),
            );
            super::emit(&r);
            rows.push(r);
            if !secure {
                let mut publishers = Vec::new();
                for _ in 0..load.publishers.max(1) {
                    publishers.push(Publisher::H1(Conn::connect(server.addr).await?));
                }
                let r = fanout("fanout-h1", &server, topic, publishers, &events, n, load).await?;
                super::emit(&r);
                rows.push(r);
            }
            drop(streams);
            server.stop().await;
        }

        // HTTP/2 over TLS: `conns` connections with one stream each, then n streams in all.
        let per_conn = (n / conns.max(1)).max(2);
        let server = Server::start_with(kind, &ctx.bins, &ctx.herald_args, Some(&tls)).await?;
        let connector = client_config(&pki.cert, b"h2")?;
        let topic = "h2";
        let uri = format!("https://localhost{}", server.sub_path(topic));
        let events = Arc::new(AtomicU64::new(0));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = server.rss();
        let mut connections = Vec::with_capacity(conns);
        let mut streams: Vec<Reader> = Vec::new();
        for _ in 0..conns {
            let send = h2_connect(&connector, &server).await?;
            streams.push(read_h2(open_h2(send.clone(), &uri).await?, events.clone()));
            connections.push(send);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let first = server.rss();
        let start = Instant::now();
        let more = open_many(conns * (per_conn - 1), concurrency, |i| {
            let (send, uri, events) = (connections[i % conns].clone(), uri.clone(), events.clone());
            async move { Ok(read_h2(open_h2(send, &uri).await?, events)) }
        })
        .await?;
        let elapsed = start.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = server.rss();
        let mut r = row("idle-h2", kind);
        r.insert("connections", conns);
        r.insert("streams", streams.len() + more.len());
        r.insert(
            "bytes_per_conn_with_first_stream",
            num((first as f64 - before as f64) / conns.max(1) as f64),
        );
        r.insert(
            "bytes_per_extra_stream",
            num((after as f64 - first as f64) / more.len().max(1) as f64),
        );
        r.insert(
            "streams_per_s",
            num(more.len() as f64 / elapsed.as_secs_f64()),
        );
        super::emit(&r);
        rows.push(r);
        let subscribers = streams.len() + more.len();
        let publish = h2_connect(&connector, &server).await?;
        let publishers = (0..load.publishers.max(1))
            .map(|_| Publisher::H2(publish.clone()))
            .collect();
        let mut r = fanout(
            "fanout-h2",
            &server,
            topic,
            publishers,
            &events,
            subscribers,
            load,
        )
        .await?;
        r.insert("connections", conns);
        super::emit(&r);
        rows.push(r);
        drop((streams, more, connections, publish));
        server.stop().await;
    }
    Ok(rows)
}

/// A stream being read on a task of its own, counting events; ended when dropped.
struct Reader(JoinHandle<()>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Opens `n` streams, `concurrency` at a time; fails on the first that fails.
async fn open_many<F, Fut>(n: usize, concurrency: usize, open: F) -> anyhow::Result<Vec<Reader>>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<Reader>>,
{
    let results: Vec<anyhow::Result<Reader>> = futures_util::stream::iter(0..n)
        .map(open)
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    results.into_iter().collect()
}

/// Sends `GET path` for an event stream over HTTP/1.1 and reads the response head; returns the
/// connection and the body bytes read with the head.
async fn open_h1<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    path: &str,
) -> anyhow::Result<(S, Vec<u8>)> {
    io.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: localhost\r\naccept: text/event-stream\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    // TLS may hold encrypted bytes until flushed.
    io.flush().await?;
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    let end = loop {
        if let Some(p) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            bail!("the server closed the stream");
        }
        head.extend_from_slice(&chunk[..n]);
    };
    ensure!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    Ok((io, head.split_off(end)))
}

fn read_h1<S: AsyncRead + Unpin + Send + 'static>(
    (mut io, rest): (S, Vec<u8>),
    events: Arc<AtomicU64>,
) -> Reader {
    Reader(tokio::spawn(async move {
        let mut counter = Counter::default();
        counter.feed(&rest);
        let mut seen = counter.events;
        events.fetch_add(seen, Ordering::Relaxed);
        let mut buf = vec![0u8; 2048];
        while let Ok(n) = io.read(&mut buf).await {
            if n == 0 {
                break;
            }
            counter.feed(&buf[..n]);
            events.fetch_add(counter.events - seen, Ordering::Relaxed);
            seen = counter.events;
        }
    }))
}

/// The receive windows a browser advertises (Chromium's): 6 MiB per stream, 15 MiB per
/// connection. They matter beyond flow control: the h2 crate closes a connection (GOAWAY
/// `ENHANCE_YOUR_CALM`, "too_many_data_frames") once the small DATA frames received but not yet
/// read by their streams pass a budget of half the connection window. With the 64 KiB default
/// that is about 250 one-event frames across all of a connection's streams — a burst of fan-out
/// to 100 streams that the reader tasks have not caught up with yet — and every stream of the
/// connection would silently end mid-run.
const H2_STREAM_WINDOW: u32 = 6 * 1024 * 1024;
const H2_CONNECTION_WINDOW: u32 = 15 * 1024 * 1024;

async fn h2_connect(
    connector: &TlsConnector,
    server: &Server,
) -> anyhow::Result<h2::client::SendRequest<Bytes>> {
    let tcp = TcpStream::connect(server.addr).await?;
    let tls = connector.connect(localhost(), tcp).await?;
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .handshake(tls)
        .await?;
    tokio::spawn(async move {
        // A connection that ends for a protocol reason (not a socket closed at teardown) takes
        // all its streams with it: say so, as the run's figures are then incomplete.
        if let Err(e) = connection.await
            && !e.is_io()
        {
            crate::note(&format!("protocols: HTTP/2 connection ended: {e}"));
        }
    });
    Ok(send)
}

/// Opens one more event stream on an HTTP/2 connection.
async fn open_h2(
    send: h2::client::SendRequest<Bytes>,
    uri: &str,
) -> anyhow::Result<h2::RecvStream> {
    let mut send = send.ready().await?;
    let request = http::Request::get(uri)
        .header("accept", "text/event-stream")
        .body(())?;
    let (response, _) = send.send_request(request, true)?;
    let response = response.await?;
    ensure!(response.status() == 200, "status {}", response.status());
    Ok(response.into_body())
}

fn read_h2(mut body: h2::RecvStream, events: Arc<AtomicU64>) -> Reader {
    Reader(tokio::spawn(async move {
        let mut counter = Counter::default();
        while let Some(Ok(data)) = body.data().await {
            let _ = body.flow_control().release_capacity(data.len());
            let seen = counter.events;
            counter.feed(&data);
            events.fetch_add(counter.events - seen, Ordering::Relaxed);
        }
    }))
}

/// A connection messages are published over.
enum Publisher {
    H1(Conn),
    H2(h2::client::SendRequest<Bytes>),
}

impl Publisher {
    async fn publish(&mut self, server: &Server, topic: &str, data: &str) -> anyhow::Result<()> {
        let (path, ctype, body) = server.publish_request(topic, data);
        let status = match self {
            Publisher::H1(conn) => conn.post(&path, ctype, &body).await?.0,
            Publisher::H2(send) => {
                let mut send = send.clone().ready().await?;
                let request = http::Request::post(format!("https://localhost{path}"))
                    .header("content-type", ctype)
                    .body(())?;
                let (response, mut out) = send.send_request(request, false)?;
                out.send_data(Bytes::from(body), true)?;
                let response = response.await?;
                let status = response.status().as_u16();
                let mut answer = response.into_body();
                while let Some(chunk) = answer.data().await {
                    let chunk = chunk?;
                    let _ = answer.flow_control().release_capacity(chunk.len());
                }
                status
            }
        };
        ensure!((200..300).contains(&status), "publish answered {status}");
        Ok(())
    }
}

/// Publishes `load.messages` messages to `topic` from the publishers at once and waits until every
/// one of `subscribers` streams has them all: delivered events/s from the first publish to the
/// last delivery.
async fn fanout(
    scenario: &str,
    server: &Server,
    topic: &str,
    publishers: Vec<Publisher>,
    events: &AtomicU64,
    subscribers: usize,
    load: Load,
) -> anyhow::Result<Row> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = events.load(Ordering::Relaxed);
    let expected = subscribers as u64 * load.messages;
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = publishers
        .into_iter()
        .map(|mut p| {
            let issued = issued.clone();
            async move {
                loop {
                    let seq = issued.fetch_add(1, Ordering::Relaxed) + 1;
                    if seq > load.messages {
                        return anyhow::Ok(());
                    }
                    p.publish(server, topic, &payload(seq, 0, load.size))
                        .await?;
                }
            }
        })
        .collect();
    futures_util::future::try_join_all(tasks).await?;
    let mut last = (events.load(Ordering::Relaxed), Instant::now());
    loop {
        let got = events.load(Ordering::Relaxed) - base;
        if got >= expected {
            break;
        }
        // Give up once nothing arrived for 10 s.
        if got != last.0 {
            last = (got, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(10) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed();
    let got = events.load(Ordering::Relaxed) - base;
    let mut r = row(scenario, server.kind);
    r.insert("subscribers", subscribers);
    r.insert("messages", load.messages);
    r.insert("size", load.size);
    r.insert("received", got);
    r.insert("all_delivered", got == expected);
    r.insert("seconds", num(elapsed.as_secs_f64()));
    r.insert("events_per_s", num(got as f64 / elapsed.as_secs_f64()));
    Ok(r)
}

fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").expect("a valid name")
}

/// A client that trusts `cert`, offers only `alpn`, and never resumes: every connection is a
/// full handshake.
fn client_config(cert: &Path, alpn: &[u8]) -> anyhow::Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(cert)? {
        roots.add(c?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// A self-signed certificate for localhost, in a folder removed when dropped.
struct Pki {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn make() -> anyhow::Result<Pki> {
        let dir = tempfile::tempdir()?;
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let status = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost",
                "-addext",
                "basicConstraints=critical,CA:FALSE",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(std::process::Stdio::null())
            .status()
            .context("the openssl CLI is needed")?;
        ensure!(status.success(), "openssl could not make a certificate");
        Ok(Pki {
            _dir: dir,
            cert,
            key,
        })
    }
}
