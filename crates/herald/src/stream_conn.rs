//! The lean path for event streams. A connection whose first request is `GET /events` over
//! HTTP/1.1 (plain or inside TLS) goes through the same axum router, but its response is written
//! here, straight to the socket, so an open stream keeps no HTTP/1 connection state (hyper's
//! buffers) and no chunked framing: ~1 KiB a stream instead of ~13 KiB. Every other connection is
//! handed to hyper untouched.
//!
//! Written by hand because hyper cannot release a connection's buffers while a response is
//! streaming, and memory per idle stream is what decides how many connections a node holds.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Version};
use bytes::{Bytes, BytesMut};
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tower::ServiceExt;

/// Frames gathered into one `writev`.
const MAX_BATCH: usize = 64;
/// Bytes of frames taken from the stream before they are written: a reader that stalls pins no
/// more than this here (its queue and replay are bounded by `--queue-bytes`).
const MAX_PENDING_BYTES: usize = 256 * 1024;

/// What reading the first request head found.
pub(crate) enum First {
    /// A `GET /events` request: served here.
    Stream(Box<Request<Body>>),
    /// Anything else: these bytes, then the rest of the socket, go to hyper.
    Other(Bytes),
    /// The peer closed, timed out or sent more than `max_head` bytes without ending the head.
    Gone,
}

/// Reads until the first request head is complete and decides which path serves it.
pub(crate) async fn read_first<I: AsyncRead + Unpin>(
    tcp: &mut I,
    max_head: usize,
    timeout: Duration,
) -> First {
    let mut buf = BytesMut::with_capacity(1024);
    let read = async {
        loop {
            match tcp.read_buf(&mut buf).await {
                Ok(0) => return false,
                Err(e) => {
                    tracing::debug!(error = %e, "reading the first request failed");
                    return false;
                }
                Ok(_) => {}
            }
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.len() >= max_head {
                return true;
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(true) => {}
        // Let hyper answer an oversized head (431) itself.
        _ if buf.len() >= max_head => return First::Other(buf.freeze()),
        Ok(false) => return First::Gone,
        Err(_) => {
            tracing::debug!(?timeout, "no whole request head in time");
            return First::Gone;
        }
    }
    match stream_request(&buf) {
        Some(request) => First::Stream(Box::new(request)),
        None => First::Other(buf.freeze()),
    }
}

/// The request, if `head` is exactly one bodiless HTTP/1.1 `GET /events` and nothing after it.
fn stream_request(head: &[u8]) -> Option<Request<Body>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(len) = parsed.parse(head).ok()? else {
        return None;
    };
    if len != head.len() || parsed.method != Some("GET") || parsed.version != Some(1) {
        return None;
    }
    let path = parsed.path?;
    if path != "/events" && !path.starts_with("/events?") {
        return None;
    }
    let mut request = Request::builder()
        .method(Method::GET)
        .uri(path)
        .version(Version::HTTP_11);
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        // A body or a protocol switch is not for this path.
        if name == "content-length"
            || name == "transfer-encoding"
            || name == "upgrade"
            || name == "expect"
        {
            return None;
        }
        request = request.header(name, HeaderValue::from_bytes(h.value).ok()?);
    }
    request.body(Body::empty()).ok()
}

/// Serves one stream request through `app` and writes the response to `tcp` (a socket, or TLS
/// over one), then closes it.
pub(crate) async fn serve<I: AsyncRead + AsyncWrite + Unpin>(
    tcp: I,
    peer: SocketAddr,
    app: Router,
    request: Box<Request<Body>>,
) {
    // Boxed: the request and the router's future are large, and the task must not keep their
    // size while it streams.
    let response = Box::pin(respond(peer, app, request)).await;
    let (parts, body) = response.into_parts();
    let head = response_head(parts.status, &parts.headers, body.size_hint().exact());
    // Nothing of the request or the response head stays with an open stream.
    drop(parts);
    Writer {
        tcp,
        body,
        pending: vec![Bytes::from(head)],
        done: false,
        flushed: true,
    }
    .await;
}

async fn respond(
    peer: SocketAddr,
    app: Router,
    request: Box<Request<Body>>,
) -> axum::response::Response {
    let mut request = *request;
    request.extensions_mut().insert(ConnectInfo(peer));
    let Ok(response) = app.oneshot(request).await;
    response
}

/// Writes a response body to the socket: gathers every frame that is ready into one `writev`,
/// and while idle watches the socket so a peer that leaves ends the stream at once. A hand-written
/// future so that an open stream costs only these few fields.
struct Writer<I> {
    tcp: I,
    body: Body,
    /// Frames not yet (fully) written, in order.
    pending: Vec<Bytes>,
    /// The body has ended: flush what is pending, then close.
    done: bool,
    /// Nothing written since the last flush (TLS keeps encrypted bytes until flushed).
    flushed: bool,
}

impl<I> Writer<I> {
    /// Drops the first `n` written bytes from `pending`.
    fn advance(&mut self, mut n: usize) {
        let whole = self.pending.iter().take_while(|b| {
            let fits = n >= b.len();
            if fits {
                n -= b.len();
            }
            fits
        });
        let whole = whole.count();
        self.pending.drain(..whole);
        if n > 0 {
            let rest = self.pending[0].slice(n..);
            self.pending[0] = rest;
        }
        if self.pending.is_empty() && self.pending.capacity() > 4 {
            self.pending = Vec::new();
        }
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> std::future::Future for Writer<I> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            while !this.done
                && this.pending.len() < MAX_BATCH
                && this.pending.iter().map(Bytes::len).sum::<usize>() < MAX_PENDING_BYTES
            {
                match Pin::new(&mut this.body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data() {
                            this.pending.push(data);
                        }
                    }
                    Poll::Ready(_) => this.done = true,
                    Poll::Pending => break,
                }
            }
            if this.pending.is_empty() {
                if !this.flushed {
                    match Pin::new(&mut this.tcp).poll_flush(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(_)) => return Poll::Ready(()),
                        Poll::Ready(Ok(())) => this.flushed = true,
                    }
                }
                if this.done {
                    // TLS sends its close_notify here, so the client sees a clean end.
                    return Pin::new(&mut this.tcp).poll_shutdown(cx).map(|_| ());
                }
                // Idle: readable bytes here mean the peer closed (or sent bytes to ignore).
                let mut scratch = [0u8; 64];
                let mut scratch = ReadBuf::new(&mut scratch);
                match Pin::new(&mut this.tcp).poll_read(cx, &mut scratch) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(())) if !scratch.filled().is_empty() => continue,
                    Poll::Ready(_) => return Poll::Ready(()),
                }
            }
            let mut slices = [IoSlice::new(&[]); MAX_BATCH];
            let n = this.pending.len().min(MAX_BATCH);
            for (slot, frame) in slices.iter_mut().zip(&this.pending) {
                *slot = IoSlice::new(frame);
            }
            match Pin::new(&mut this.tcp).poll_write_vectored(cx, &slices[..n]) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(written)) => {
                    this.flushed = false;
                    this.advance(written);
                }
            }
        }
    }
}

fn response_head(
    status: axum::http::StatusCode,
    headers: &HeaderMap,
    length: Option<u64>,
) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        if name == "connection" || name == "transfer-encoding" || name == "content-length" {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"date: ");
    head.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    head.extend_from_slice(b"\r\n");
    if let Some(n) = length {
        head.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
    }
    // The body ends when the connection does: no chunked framing on every event.
    head.extend_from_slice(b"connection: close\r\n\r\n");
    head
}

/// The bytes read while deciding, then the socket: what hyper serves for every other connection.
pub(crate) struct Prefixed<I> {
    prefix: Bytes,
    inner: I,
}

impl<I> Prefixed<I> {
    pub(crate) fn new(prefix: Bytes, inner: I) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_get_events_takes_the_lean_path() {
        let ok = b"GET /events?topic=a HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n";
        let r = stream_request(ok).expect("lean");
        assert_eq!(r.uri(), "/events?topic=a");
        assert_eq!(r.headers()["accept"], "text/event-stream");
        for other in [
            &b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"[..],
            b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /eventsx HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /events HTTP/1.0\r\nHost: x\r\n\r\n",
            b"GET /events HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
            b"GET /events HTTP/1.1\r\nHost: x\r\n\r\nGET /stats HTTP/1.1\r\n\r\n",
            b"GET /events HTTP/1.1\r\nHost: x\r\n",
        ] {
            assert!(
                stream_request(other).is_none(),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }

    #[test]
    fn heads_are_close_delimited_unless_sized() {
        let mut h = HeaderMap::new();
        h.insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        let head = String::from_utf8(response_head(axum::http::StatusCode::OK, &h, None)).unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"));
        assert!(head.ends_with("connection: close\r\n\r\n"));
        assert!(!head.contains("transfer-encoding") && !head.contains("content-length"));
        let head = String::from_utf8(response_head(
            axum::http::StatusCode::UNAUTHORIZED,
            &h,
            Some(12),
        ))
        .unwrap();
        assert!(
            head.starts_with("HTTP/1.1 401 Unauthorized\r\n")
                && head.contains("content-length: 12\r\n")
        );
    }
}
/// What an open stream costs is mostly these sizes; they are checked so a change that makes
/// every connection heavier is noticed (BENCHMARKS.md has the measured bytes per connection).
#[cfg(test)]
mod size {
    #[tokio::test]
    async fn per_stream_state_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let hub = herald_core::Hub::builder().build().unwrap();
        let app = crate::router(hub.clone());
        let request = Box::new(axum::http::Request::new(axum::body::Body::empty()));
        let task = super::serve(tcp, "127.0.0.1:1".parse().unwrap(), app, request);
        assert!(
            std::mem::size_of_val(&task) <= 384,
            "serve future: {}",
            std::mem::size_of_val(&task)
        );
        let stream = hub
            .subscribe(herald_core::SubscribeRequest::default())
            .unwrap();
        assert!(
            std::mem::size_of_val(&stream) <= 192,
            "EventStream: {}",
            std::mem::size_of_val(&stream)
        );
    }
}
