//! `protocols` (herald only): memory per idle stream by how the stream arrives — plain HTTP/1.1,
//! HTTP/1.1 over TLS, and HTTP/2 over TLS with many streams sharing each connection (the cost of
//! a connection with its first stream, and of each further stream) — and how many streams per
//! second are set up over each (TLS: handshake, request, response head). The certificate is a
//! self-signed ECDSA P-256 one made with the openssl CLI; memory is the server's RSS difference.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use futures_util::StreamExt;
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{Ctx, Row, num, row};
use crate::server::{Kind, Server};

/// What keeps a stream open on the client side.
type Held = Box<dyn std::any::Any + Send>;

pub async fn protocols(
    ctx: &Ctx,
    n: usize,
    conns: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Row>> {
    let pki = Pki::make()?;
    let tls_args: Vec<String> = [
        "--tls-cert",
        pki.cert.to_str().context("path")?,
        "--tls-key",
        pki.key.to_str().context("path")?,
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(ctx.herald_args.iter().cloned())
    .collect();
    let mut rows = Vec::new();

    // HTTP/1.1, plain and over TLS: one connection per stream.
    for tls in [false, true] {
        let args = if tls { &tls_args } else { &ctx.herald_args };
        let server = Server::start(Kind::Herald, &ctx.bins, args).await?;
        let connector = tls
            .then(|| client_config(&pki.cert, b"http/1.1"))
            .transpose()?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = server.rss();
        let start = Instant::now();
        let held = open_many(n, concurrency, |_| {
            let connector = connector.clone();
            let addr = server.addr;
            async move {
                let tcp = TcpStream::connect(addr).await?;
                Ok(match connector {
                    None => Box::new(open_h1(tcp).await?) as Held,
                    Some(c) => {
                        let tls = c.connect(localhost(), tcp).await.context("TLS handshake")?;
                        Box::new(open_h1(tls).await.context("GET /events over TLS")?)
                    }
                })
            }
        })
        .await?;
        let elapsed = start.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = server.rss();
        let mut r = row(if tls { "idle-h1-tls" } else { "idle-h1" }, Kind::Herald);
        r.insert("streams", held.len());
        r.insert(
            "bytes_per_stream",
            num((after as f64 - before as f64) / held.len().max(1) as f64),
        );
        r.insert(
            "connects_per_s",
            num(held.len() as f64 / elapsed.as_secs_f64()),
        );
        super::emit(&r);
        rows.push(r);
        drop(held);
        server.stop().await;
    }

    // HTTP/2 over TLS: `conns` connections with one stream each, then n streams in all.
    let per_conn = (n / conns.max(1)).max(2);
    let server = Server::start(Kind::Herald, &ctx.bins, &tls_args).await?;
    let connector = client_config(&pki.cert, b"h2")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.rss();
    let mut connections = Vec::with_capacity(conns);
    let mut held: Vec<Held> = Vec::new();
    for _ in 0..conns {
        let tcp = TcpStream::connect(server.addr).await?;
        let tls = connector.connect(localhost(), tcp).await?;
        let (send, connection) = h2::client::handshake(tls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        held.push(Box::new(open_h2(send.clone()).await?));
        connections.push(send);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let first = server.rss();
    let start = Instant::now();
    let more = open_many(conns * (per_conn - 1), concurrency, |i| {
        let send = connections[i % conns].clone();
        async move { Ok(Box::new(open_h2(send).await?) as Held) }
    })
    .await?;
    let elapsed = start.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = server.rss();
    let mut r = row("idle-h2", Kind::Herald);
    r.insert("connections", conns);
    r.insert("streams", held.len() + more.len());
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
    drop((held, more, connections));
    server.stop().await;
    Ok(rows)
}

/// Opens `n` streams, `concurrency` at a time; fails on the first that fails.
async fn open_many<F, Fut>(n: usize, concurrency: usize, open: F) -> anyhow::Result<Vec<Held>>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<Held>>,
{
    let results: Vec<anyhow::Result<Held>> = futures_util::stream::iter(0..n)
        .map(open)
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    results.into_iter().collect()
}

/// Sends `GET /events` over HTTP/1.1 and reads the response head.
async fn open_h1<S: AsyncRead + AsyncWrite + Unpin>(mut io: S) -> anyhow::Result<S> {
    io.write_all(
        b"GET /events?topic=idle HTTP/1.1\r\nhost: localhost\r\naccept: text/event-stream\r\n\r\n",
    )
    .await?;
    // TLS may hold encrypted bytes until flushed.
    io.flush().await?;
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            bail!("the server closed the stream");
        }
        head.extend_from_slice(&chunk[..n]);
    }
    ensure!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    Ok(io)
}

/// Opens one more `GET /events` stream on an HTTP/2 connection.
async fn open_h2(send: h2::client::SendRequest<Bytes>) -> anyhow::Result<h2::RecvStream> {
    let mut send = send.ready().await?;
    let request = http::Request::get("https://localhost/events?topic=idle")
        .header("accept", "text/event-stream")
        .body(())?;
    let (response, _) = send.send_request(request, true)?;
    let response = response.await?;
    ensure!(response.status() == 200, "status {}", response.status());
    Ok(response.into_body())
}

fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").expect("a valid name")
}

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
