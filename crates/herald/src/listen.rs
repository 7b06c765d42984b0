//! The accept loop: which protocol serves each connection, the request-head read timeout
//! (slowloris) and head size cap, the peer address for per-IP limits, and graceful shutdown.
//!
//! Plain listener: a first request `GET /events` over HTTP/1.1 goes to the lean stream path, a
//! connection that opens with the HTTP/2 preface (h2c with prior knowledge) to hyper's HTTP/2,
//! anything else to hyper's HTTP/1.1. TLS listener: the handshake first (ALPN picks `h2` or
//! `http/1.1`), then the same choice inside TLS, where a lean stream over TLS 1.3 is handed from
//! rustls to `sealed.rs`. Every HTTP/2 stream is a task on the streams'
//! runtime, so one connection carries many streams and a stalled one holds up no other.
//!
//! It keeps a reserve of file descriptors: near the process's open-file limit a new connection
//! is answered `503 at_capacity` and closed instead of waiting unanswered in the backlog.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::acme::ALPN_ACME;
use crate::error_code::ErrorCode;
use crate::sealed::{self, Sealing};
use crate::stream_conn;
use crate::tls::ALPN_H2;

/// What a client sends first on an HTTP/2 connection with prior knowledge (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\n";
/// The first byte of every TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// How connections are served.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionSettings {
    /// A client must send a whole request head (or finish the TLS handshake) within this (also
    /// bounds idle keep-alive).
    pub header_timeout: Duration,
    /// hyper's hard cap on a request head's bytes; the router answers 431 below it with JSON.
    pub max_head: usize,
    /// `TCP_USER_TIMEOUT`: how long unacknowledged bytes may stay before the kernel drops the peer.
    pub user_timeout: Duration,
    /// Most concurrent streams on one HTTP/2 connection; the client's next ones are refused
    /// (`REFUSED_STREAM`), the connection stays.
    pub h2_max_streams: u32,
    /// `--mercure`: a Mercure subscribe (`GET /.well-known/mercure`) takes the lean path too.
    pub mercure: bool,
}

/// Spawns hyper's HTTP/2 stream tasks on the streams' runtime.
#[derive(Debug, Clone)]
struct StreamsExecutor(tokio::runtime::Handle);

impl<F> hyper::rt::Executor<F> for StreamsExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        self.0.spawn(future);
    }
}

type Http1 = hyper::server::conn::http1::Builder;
type Http2 = hyper::server::conn::http2::Builder<StreamsExecutor>;

/// Serves `app` on `listener` (over TLS with `tls`) until `stop` completes, then lets open
/// connections finish for at most `grace` (HTTP/2 ones get a GOAWAY) and drops the rest.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    settings: ConnectionSettings,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: impl Future<Output = ()>,
    grace: Duration,
    streams: tokio::runtime::Handle,
) {
    let graceful = GracefulShutdown::new();
    let mut h1 = Http1::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .max_buf_size(settings.max_head.max(8192));
    let mut h2 = Http2::new(StreamsExecutor(streams.clone()));
    // hyper's guards against HTTP/2 abuse, set explicitly: a header block (CONTINUATION frames
    // included) past `max_head` is refused; streams reset by the client before herald accepted
    // them (rapid reset) and streams herald had to reset for errors are capped, past which the
    // connection gets GOAWAY; a flood of PINGs or SETTINGS is answered with at most one pending
    // reply each, so it costs no memory.
    h2.timer(TokioTimer::new())
        .max_concurrent_streams(settings.h2_max_streams)
        .max_header_list_size(u32::try_from(settings.max_head).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(Some(256))
        // Flow control per stream: a client that stops reading one stream stops only that
        // stream's writes (its queue then falls back to catching up from history).
        .initial_stream_window_size(256 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .max_send_buf_size(64 * 1024);
    let acceptor = tls.map(TlsAcceptor::from);
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
        // Per accepted socket: Linux copies both options from a listener to the sockets it
        // accepts (getsockopt shows them), but a TCP_USER_TIMEOUT inherited that way did not end
        // a vanished peer's stream (control::vanished_connections_leave_presence_within_a_few_heartbeats).
        let sock = socket2::SockRef::from(&tcp);
        if let Err(e) = sock
            .set_tcp_nodelay(true)
            .and_then(|()| sock.set_tcp_user_timeout(Some(settings.user_timeout)))
        {
            tracing::debug!(error = %e, "cannot set socket options");
        }
        let connection = Connection {
            app: app.clone(),
            peer,
            settings,
            h1: h1.clone(),
            h2: h2.clone(),
            watcher: graceful.watcher(),
            streams: streams.clone(),
            held,
        };
        match &acceptor {
            None => tokio::spawn(connection.plain(tcp)),
            Some(acceptor) => tokio::spawn(connection.secure(acceptor.clone(), tcp)),
        };
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

/// One accepted connection and what serving it needs.
struct Connection {
    app: Router,
    peer: SocketAddr,
    settings: ConnectionSettings,
    h1: Http1,
    h2: Http2,
    watcher: Watcher,
    streams: tokio::runtime::Handle,
    /// Counts this connection against the descriptor limit until it ends.
    held: Held,
}

impl Connection {
    async fn plain(self, tcp: TcpStream) {
        if let Some((connection, tcp, request)) = self.after_handshake(tcp).await {
            connection.stream(tcp, request);
        }
    }

    async fn secure(self, acceptor: TlsAcceptor, tcp: TcpStream) {
        let peer = self.peer;
        // A client speaking plain HTTP to the HTTPS port gets told so, in plain HTTP.
        let mut first = [0u8; 1];
        match tokio::time::timeout(self.settings.header_timeout, tcp.peek(&mut first)).await {
            Ok(Ok(1)) if first[0] == TLS_HANDSHAKE => {}
            Ok(Ok(1)) => return refuse_plaintext(tcp, first[0]).await,
            _ => return,
        }
        let handshake = acceptor.accept(tcp);
        let tls = match tokio::time::timeout(self.settings.header_timeout, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, %peer, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        };
        match tls.get_ref().1.alpn_protocol() {
            Some(ALPN_H2) => return self.http2(tls).await,
            // An ACME server validating TLS-ALPN-01: the handshake was the whole answer.
            Some(ALPN_ACME) => return,
            _ => {}
        }
        let Some((connection, tls, request)) = self.after_handshake(tls).await else {
            return;
        };
        // An event stream over TLS 1.3 keeps only its sending key, not rustls' connection.
        match sealed::seal(tls, connection.settings.header_timeout).await {
            Sealing::Sealed(sealed) => connection.stream(sealed, request),
            Sealing::Kept(tls) => connection.stream(tls, request),
            Sealing::Failed => {}
        }
    }

    /// Reads the first request head and picks the path: HTTP/2 (h2c) and HTTP/1.1 are served
    /// here; a lean stream's request is handed back with the connection, for [`Self::stream`].
    async fn after_handshake<I>(self, mut io: I) -> Option<(Self, I, Box<Request<Body>>)>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let first = stream_conn::read_first(
            &mut io,
            self.settings.max_head,
            self.settings.header_timeout,
            self.settings.mercure,
        )
        .await;
        match first {
            stream_conn::First::Stream(request) => return Some((self, io, request)),
            // Boxed: hyper's connection state is large and a connection that becomes a lean
            // stream never needs it, so the task that reads the first head stays small.
            stream_conn::First::Other(prefix) if prefix.starts_with(H2_PREFACE) => {
                Box::pin(self.http2(stream_conn::Prefixed::new(prefix, io))).await;
            }
            stream_conn::First::Other(prefix) => {
                Box::pin(self.http1(stream_conn::Prefixed::new(prefix, io))).await;
            }
            stream_conn::First::Gone => {}
        }
        None
    }

    /// Serves a lean stream on a task of its own, on the streams' runtime, holding none of this
    /// task's state but the connection's count, given back when the stream ends.
    fn stream<I>(self, io: I, request: Box<Request<Body>>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let serve = stream_conn::serve(io, self.peer, self.app, request, self.held);
        self.streams.spawn(serve);
    }

    async fn http1<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = self.peer;
        let service = service(self.app, peer);
        let connection = self
            .watcher
            .watch(self.h1.serve_connection(TokioIo::new(io), service));
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, %peer, "connection ended with an error");
        }
    }

    async fn http2<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = self.peer;
        let service = service(self.app, peer);
        let connection = self
            .watcher
            .watch(self.h2.serve_connection(TokioIo::new(io), service));
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, %peer, "HTTP/2 connection ended with an error");
        }
    }
}

/// The router as a hyper service, each request carrying the peer's address.
fn service(
    app: Router,
    peer: SocketAddr,
) -> impl hyper::service::Service<
    axum::http::Request<Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<axum::response::Response, std::convert::Infallible>>
             + Send
             + 'static,
> + Clone {
    hyper::service::service_fn(move |mut request: axum::http::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        // Boxed: hyper keeps each HTTP/2 stream's task as one allocation sized for the larger of
        // this future and the response body; boxed, the router's future is freed once it has
        // answered, and an open event stream keeps only the body.
        Box::pin(app.clone().oneshot(request))
    })
}

/// Answers a plaintext HTTP request on the TLS port with a 400 naming the problem; any other
/// non-TLS bytes just close the connection.
async fn refuse_plaintext(mut tcp: TcpStream, first: u8) {
    if !first.is_ascii_uppercase() {
        return;
    }
    let code = ErrorCode::HttpsRequired;
    let body = serde_json::json!({"error": code.as_str(), "message": code.message()}).to_string();
    let response = format!(
        "HTTP/1.1 {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        code.status(),
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut scratch = [0u8; 4096];
        // Take what the client sent so closing does not reset the answer away.
        let _ = tcp.try_read(&mut scratch);
        let _ = tcp.write_all(response.as_bytes()).await;
        let _ = tcp.shutdown().await;
    })
    .await;
}

/// A connection's `TCP_USER_TIMEOUT`. A peer that vanishes without a reset leaves heartbeat bytes
/// unacknowledged: the kernel drops the connection once they stay so for two heartbeat intervals,
/// and the stream leaves presence. Never under a second, so a tiny `--heartbeat` (10ms) does not
/// drop healthy peers whose acknowledgements a loaded host delays (TCP's own minimum
/// retransmission timeout is 200 ms).
pub(crate) fn user_timeout(heartbeat: Duration) -> Duration {
    (heartbeat * 2).max(Duration::from_secs(1))
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
#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 12 (not yet tried): `--heartbeat 10ms` gave a 20 ms `TCP_USER_TIMEOUT`, shorter than
    /// one retransmission; the timeout now has a floor of a second.
    #[test]
    fn the_user_timeout_is_two_heartbeats_but_never_under_a_second() {
        assert_eq!(
            user_timeout(Duration::from_millis(10)),
            Duration::from_secs(1)
        );
        assert_eq!(
            user_timeout(Duration::from_millis(300)),
            Duration::from_secs(1)
        );
        assert_eq!(
            user_timeout(Duration::from_secs(15)),
            Duration::from_secs(30)
        );
    }
}
