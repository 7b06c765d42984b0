//! The accept loop: HTTP/1.1 connections served by hyper with a request-head read timeout
//! (slowloris) and a head size cap, the peer address for per-IP limits, and graceful shutdown.
//! It keeps a reserve of file descriptors: near the process's open-file limit a new connection
//! is answered `503 at_capacity` and closed instead of waiting unanswered in the backlog.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

use crate::stream_conn;

/// How connections are served.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionSettings {
    /// A client must send a whole request head within this (also bounds idle keep-alive).
    pub header_timeout: Duration,
    /// hyper's hard cap on a request head's bytes; the router answers 431 below it with JSON.
    pub max_head: usize,
    /// `TCP_USER_TIMEOUT`: how long unacknowledged bytes may stay before the kernel drops the peer.
    pub user_timeout: Duration,
}

/// Serves `app` on `listener` until `stop` completes, then lets open connections finish for at
/// most `grace` and drops the rest.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    settings: ConnectionSettings,
    stop: impl Future<Output = ()>,
    grace: Duration,
    streams: tokio::runtime::Handle,
) {
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .max_buf_size(settings.max_head.max(8192));
    tokio::pin!(stop);
    let open = Arc::new(AtomicUsize::new(0));
    let most = most_connections();
    let mut spare = Spare::open();
    loop {
        spare.refill();
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) if is_out_of_descriptors(&e) => {
                    // Give the spare descriptor back for one accept, refuse that connection
                    // cleanly, and take the spare again once it is closed.
                    tracing::warn!(error = %e, "out of file descriptors: refusing new connections");
                    spare.release();
                    match listener.accept().await {
                        Ok((tcp, _)) => drop(tokio::spawn(refuse(tcp))),
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        if open.load(Ordering::Relaxed) >= most {
            tracing::debug!(%peer, "at the connection limit: refusing");
            tokio::spawn(refuse(tcp));
            continue;
        }
        let held = Held::new(&open);
        let sock = socket2::SockRef::from(&tcp);
        if let Err(e) = sock
            .set_tcp_nodelay(true)
            .and_then(|()| sock.set_tcp_user_timeout(Some(settings.user_timeout)))
        {
            tracing::debug!(error = %e, "cannot set socket options");
        }
        let app = app.clone();
        let http = http.clone();
        let watcher = graceful.watcher();
        let streams = streams.clone();
        tokio::spawn(async move {
            let held = held;
            let mut tcp = tcp;
            // A connection that opens with `GET /events` is written by the lean stream path;
            // everything else is hyper's, starting with the bytes already read.
            let prefix =
                match stream_conn::read_first(&mut tcp, settings.max_head, settings.header_timeout)
                    .await
                {
                    stream_conn::First::Stream(request) => {
                        // A task of its own, on the streams' runtime, holding none of this task's state.
                        let serve = stream_conn::serve(tcp, peer, app, request);
                        streams.spawn(async move {
                            serve.await;
                            drop(held);
                        });
                        return;
                    }
                    stream_conn::First::Other(prefix) => prefix,
                    stream_conn::First::Gone => return,
                };
            let service =
                hyper::service::service_fn(move |mut request: axum::http::Request<Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
                    app.clone().oneshot(request)
                });
            let io = TokioIo::new(stream_conn::Prefixed::new(prefix, tcp));
            let connection = watcher.watch(http.serve_connection(io, service));
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(held);
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout = ?grace,
            "shutdown timeout reached; dropping the remaining connections"
        );
    }
}

/// Whether `addr` is reachable only from this machine.
pub(crate) fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// Descriptors kept free under the open-file limit for the store, Redis, logs and refusals.
fn descriptor_reserve(limit: usize) -> usize {
    (limit / 40).max(24)
}

/// Most connections served at once: the open-file limit less the reserve.
fn most_connections() -> usize {
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((1024, 1024));
    let soft = usize::try_from(soft).unwrap_or(usize::MAX);
    soft.saturating_sub(descriptor_reserve(soft)).max(1)
}

fn is_out_of_descriptors(e: &std::io::Error) -> bool {
    // EMFILE (24): this process; ENFILE (23): the whole system.
    matches!(e.raw_os_error(), Some(23 | 24))
}

/// One open connection, counted while it lives.
struct Held(Arc<AtomicUsize>);

impl Held {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Held(open.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A descriptor held back so that one more connection can be accepted (and refused) when the
/// process has run out.
struct Spare(Option<std::fs::File>);

impl Spare {
    fn open() -> Self {
        Spare(std::fs::File::open("/dev/null").ok())
    }
    fn refill(&mut self) {
        if self.0.is_none() {
            self.0 = std::fs::File::open("/dev/null").ok();
        }
    }
    fn release(&mut self) {
        self.0 = None;
    }
}

const REFUSAL_BODY: &str = r#"{"error":"at_capacity","message":"the hub holds as many connections as it may; retry later"}"#;

/// Answers `503 at_capacity` and closes, without reading the request through hyper. The request
/// is drained briefly so that closing does not reset the connection before the answer is read.
async fn refuse(mut tcp: TcpStream) {
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{REFUSAL_BODY}",
        REFUSAL_BODY.len()
    );
    let drain = async {
        let _ = tcp.write_all(answer.as_bytes()).await;
        let _ = tcp.shutdown().await;
        let mut scratch = [0u8; 1024];
        while matches!(tcp.read(&mut scratch).await, Ok(n) if n > 0) {}
    };
    let _ = tokio::time::timeout(Duration::from_millis(100), drain).await;
}
