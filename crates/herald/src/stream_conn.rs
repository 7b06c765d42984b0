//! The lean path for event streams. A connection whose first request is `GET /events` (or a
//! Mercure subscribe, `GET /.well-known/mercure`) over
//! HTTP/1.1 (plain or inside TLS) goes through the same axum router, but its response is written
//! here, straight to the socket, so an open stream keeps no HTTP/1 connection state (hyper's
//! buffers): ~1 KiB a stream instead of ~13 KiB. Every other connection is handed to hyper
//! untouched. The body is framed as chunked (one chunk per gathered write, `0\r\n\r\n` at its end),
//! so clients that buffer a close-delimited body (urllib3, sseclient-py) hand each event over as
//! it arrives.
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

/// Frames gathered into one `writev` (plus the chunk's size line and end).
pub(crate) const MAX_BATCH: usize = 64;
/// Bytes of frames taken from the stream before they are written: a reader that stalls pins no
/// more than this here (its queue and replay are bounded by `--queue-bytes`).
const MAX_PENDING_BYTES: usize = 256 * 1024;

/// Bytes a client may send into an open stream (nothing is expected after its request head) before
/// the stream is ended: a peer that keeps sending costs a read per buffer, not a core.
const MAX_STRAY_BYTES: u32 = 64 * 1024;

/// Bytes read at a time from a peer that sends into an open stream.
const STRAY_READ: usize = 8 * 1024;

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
    mercure: bool,
) -> First {
    let mut buf = BytesMut::with_capacity(1024);
    let read = async {
        // Where the search for the head's end resumes: each byte is scanned once however the
        // head is dripped (a rescan from the start after every read is quadratic).
        let mut scanned = 0;
        loop {
            match tcp.read_buf(&mut buf).await {
                Ok(0) => return false,
                Err(e) => {
                    tracing::debug!(error = %e, "reading the first request failed");
                    return false;
                }
                Ok(_) => {}
            }
            if head_ends(&buf, &mut scanned) || buf.len() >= max_head {
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
    match stream_request(&buf, mercure) {
        Some(request) => First::Stream(Box::new(request)),
        None => First::Other(buf.freeze()),
    }
}

/// Whether `buf` holds a blank line (`\r\n\r\n`), searching only from `*scanned` on (less the 3
/// bytes a terminator may straddle), and remembering how far it looked.
pub(crate) fn head_ends(buf: &[u8], scanned: &mut usize) -> bool {
    let from = scanned.saturating_sub(3);
    *scanned = buf.len();
    buf[from..].windows(4).any(|w| w == b"\r\n\r\n")
}

/// Whether a `GET` of this path (with its query) opens an event stream: herald's `/events`, or,
/// with `mercure` (`--mercure`), the Mercure hub's subscribe (`/.well-known/mercure`; its
/// subscriptions API below it is not). Without `--mercure` that path is hyper's like any other.
fn is_stream_path(path: &str, mercure: bool) -> bool {
    let paths: &[&str] = if mercure {
        &["/events", crate::mercure::PATH]
    } else {
        &["/events"]
    };
    paths.iter().any(|p| {
        path.strip_prefix(p)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('?'))
    })
}

/// The request, if `head` is exactly one bodiless HTTP/1.1 `GET` of an event stream (see
/// [`is_stream_path`]; `mercure`: whether `--mercure` is on) and nothing after it.
pub(crate) fn stream_request(head: &[u8], mercure: bool) -> Option<Request<Body>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(len) = parsed.parse(head).ok()? else {
        return None;
    };
    if len != head.len() || parsed.method != Some("GET") || parsed.version != Some(1) {
        return None;
    }
    let path = parsed.path?;
    if !is_stream_path(path, mercure) {
        return None;
    }
    let mut request = Request::builder()
        .method(Method::GET)
        .uri(path)
        .version(Version::HTTP_11);
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        // A body or a protocol switch is not for this path; but JDK's HttpClient sends
        // `Content-Length: 0` and offers `Upgrade: h2c` on every GET: an empty body is no body,
        // and an offered upgrade may be declined by not taking it (RFC 9110 §7.8).
        let empty_body = name == "content-length" && h.value.trim_ascii() == b"0";
        let h2c_offer = name == "upgrade" && h.value.trim_ascii().eq_ignore_ascii_case(b"h2c");
        if empty_body || h2c_offer || name == "http2-settings" {
            continue;
        }
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
/// over one), then closes it; `guard` is dropped when the stream ends. A hand-written future, not
/// an `async fn`: an open stream's task is sized by it, and an `async fn` keeps its arguments
/// beside its state (the task was 640 bytes, it is 256).
pub(crate) fn serve<I, G>(
    tcp: I,
    peer: SocketAddr,
    app: Router,
    request: Box<Request<Body>>,
    guard: G,
) -> impl std::future::Future<Output = ()>
where
    I: AsyncRead + AsyncWrite + Unpin,
    G: Unpin,
{
    Lean {
        // Boxed: the request and the router's future are large, and freed once answered.
        phase: Phase::Responding {
            tcp: Some(tcp),
            response: Box::pin(respond(peer, app, request)),
        },
        _guard: guard,
    }
}

/// A stream connection: first the router's answer, then the writer.
struct Lean<I, F, G> {
    phase: Phase<I, F>,
    _guard: G,
}

enum Phase<I, F> {
    Responding {
        tcp: Option<I>,
        response: Pin<Box<F>>,
    },
    Writing(Writer<I>),
}

impl<I, F, G> std::future::Future for Lean<I, F, G>
where
    I: AsyncRead + AsyncWrite + Unpin,
    F: std::future::Future<Output = axum::response::Response>,
    G: Unpin,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // Unpin: the router's future is boxed.
        let this = self.get_mut();
        if let Phase::Responding { tcp, response } = &mut this.phase {
            let Poll::Ready(response) = response.as_mut().poll(cx) else {
                return Poll::Pending;
            };
            let Some(tcp) = tcp.take() else {
                return Poll::Ready(());
            };
            let (parts, body) = response.into_parts();
            let length = body.size_hint().exact();
            let head = response_head(parts.status, &parts.headers, length);
            // Nothing of the request or the response head stays with an open stream.
            drop(parts);
            this.phase = Phase::Writing(Writer {
                tcp,
                body,
                pending: vec![Bytes::from(head)],
                done: false,
                chunked: length.is_none(),
                stray: 0,
                flushed: true,
            });
        }
        match &mut this.phase {
            Phase::Writing(writer) => Pin::new(writer).poll(cx),
            Phase::Responding { .. } => Poll::Ready(()),
        }
    }
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
    /// The body is unsized and written as chunks.
    chunked: bool,
    /// Bytes the peer sent into the open stream (read and dropped), up to `MAX_STRAY_BYTES`.
    stray: u32,
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
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> std::future::Future for Writer<I> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            let start = this.pending.len();
            let mut gathered = 0;
            let mut ended = false;
            while !this.done
                && this.pending.len() < MAX_BATCH
                && this.pending.iter().map(Bytes::len).sum::<usize>() < MAX_PENDING_BYTES
            {
                match Pin::new(&mut this.body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        // An empty chunk would end the body: skip empty frames.
                        if let Ok(data) = frame.into_data()
                            && !data.is_empty()
                        {
                            gathered += data.len();
                            this.pending.push(data);
                        }
                    }
                    Poll::Ready(None) => {
                        this.done = true;
                        ended = true;
                    }
                    // A failed body is cut short, never ended as if complete.
                    Poll::Ready(Some(Err(_))) => this.done = true,
                    Poll::Pending => break,
                }
            }
            if this.chunked {
                if gathered > 0 {
                    this.pending
                        .insert(start, Bytes::from(format!("{gathered:x}\r\n")));
                    this.pending.push(Bytes::from_static(b"\r\n"));
                }
                if ended {
                    this.pending.push(Bytes::from_static(b"0\r\n\r\n"));
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
                // Idle: the frame list's storage goes back (an idle stream keeps none), and
                // readable bytes here mean the peer closed (or sent bytes to ignore, read in
                // large buffers and only up to `MAX_STRAY_BYTES`).
                if this.pending.capacity() > 0 {
                    this.pending = Vec::new();
                }
                let mut scratch = [0u8; STRAY_READ];
                let mut scratch = ReadBuf::new(&mut scratch);
                match Pin::new(&mut this.tcp).poll_read(cx, &mut scratch) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(())) if !scratch.filled().is_empty() => {
                        let n = scratch.filled().len() as u32;
                        this.stray = this.stray.saturating_add(n);
                        if this.stray > MAX_STRAY_BYTES {
                            return Poll::Ready(());
                        }
                        continue;
                    }
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
    match length {
        Some(n) => head.extend_from_slice(format!("content-length: {n}\r\n").as_bytes()),
        None => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    head.extend_from_slice(b"date: ");
    head.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    head.extend_from_slice(b"\r\n");
    // One response per connection: the stream's end is the connection's.
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

/// What the lean path promises for any head (used by the proptest and the `stream_head` fuzz
/// target): the incremental scan agrees with a full one however the head is dripped, and only a
/// plain `GET` of a stream is taken.
#[doc(hidden)]
pub fn check_stream_head(head: &[u8], step: usize) {
    let mut scanned = 0;
    let mut found = false;
    let mut end = 0;
    while end < head.len() {
        end = (end + step.max(1)).min(head.len());
        found |= head_ends(&head[..end], &mut scanned);
    }
    assert_eq!(found, head.windows(4).any(|w| w == b"\r\n\r\n"));
    for mercure in [false, true] {
        if let Some(request) = stream_request(head, mercure) {
            assert_eq!(request.method(), Method::GET);
            let path = request.uri().path();
            assert!(
                path == "/events" || (mercure && path == "/.well-known/mercure"),
                "{path}"
            );
            assert!(!request.headers().contains_key("transfer-encoding"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_get_of_a_stream_takes_the_lean_path() {
        let ok = b"GET /events?topic=a HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n";
        let r = stream_request(ok, true).expect("lean");
        assert_eq!(r.uri(), "/events?topic=a");
        assert_eq!(r.headers()["accept"], "text/event-stream");
        let mercure = b"GET /.well-known/mercure?topic=a HTTP/1.1\r\nHost: x\r\n\r\n";
        let r = stream_request(mercure, true).expect("a Mercure subscribe is lean too");
        assert_eq!(r.uri(), "/.well-known/mercure?topic=a");
        assert!(
            stream_request(mercure, false).is_none(),
            "without --mercure the Mercure path is hyper's"
        );
        assert!(stream_request(ok, false).is_some());
        for other in [
            &b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"[..],
            b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /.well-known/mercure/subscriptions HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /.well-known/mercurex HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /.well-known/mercure HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            b"GET /eventsx HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /events HTTP/1.0\r\nHost: x\r\n\r\n",
            b"GET /events HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
            b"GET /events HTTP/1.1\r\nHost: x\r\n\r\nGET /stats HTTP/1.1\r\n\r\n",
            b"GET /events HTTP/1.1\r\nHost: x\r\n",
        ] {
            assert!(
                stream_request(other, true).is_none(),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }

    /// Reproduces issue 12 (defect 12): JDK 17's HttpClient sends `Content-Length: 0` and offers
    /// `Upgrade: h2c` on every GET, so Java clients never got the lean path.
    #[test]
    fn jdk_http_client_heads_take_the_lean_path() {
        let jdk = b"GET /events?topic=a HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\n\
            Content-Length: 0\r\nHost: x\r\nHTTP2-Settings: AAEAAEAAAAIAAAABAAMAAABkAAQBAAAAAAUAAEAA\r\n\
            Upgrade: h2c\r\nUser-Agent: Java-http-client/17.0.15\r\nAccept: text/event-stream\r\n\r\n";
        let r = stream_request(jdk, true).expect("lean");
        assert!(
            !r.headers().contains_key("upgrade") && !r.headers().contains_key("content-length")
        );
        for other in [
            &b"GET /events HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"[..],
            b"GET /events HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
            b"GET /events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(stream_request(other, true).is_none());
        }
    }

    /// Reproduces issue 12 (weak spot): the head's end was searched from the start after every
    /// read, quadratic in a dripped head. Every byte is now looked at about once.
    #[test]
    fn the_head_end_is_found_across_reads_without_rescanning() {
        let head = b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n";
        for split in 1..head.len() {
            let mut scanned = 0;
            let mut found = false;
            for end in (split..=head.len()).step_by(split) {
                found |= head_ends(&head[..end], &mut scanned);
            }
            found |= head_ends(head, &mut scanned);
            assert!(found, "split {split}");
        }
        let mut scanned = 0;
        assert!(!head_ends(b"GET / HTTP/1.1\r\n\r", &mut scanned));
        assert_eq!(scanned, 17);
        assert!(head_ends(b"GET / HTTP/1.1\r\n\r\n", &mut scanned));
    }

    proptest::proptest! {
        /// The property `fuzz/fuzz_targets/stream_head.rs` fuzzes, run in every `cargo test`:
        /// dripped in any pieces, the incremental scan finds the head's end exactly when a full
        /// scan does, and the lean path takes only a plain `GET /events`, never panicking.
        #[test]
        fn dripped_heads_are_scanned_once_and_parsed_safely(
            head in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            step in 1usize..40,
        ) {
            check_stream_head(&head, step);
        }
    }

    /// Reproduces issue 12 (defect 12): the lean path's unsized body was close-delimited
    /// (`connection: close`, no framing), which urllib3 buffers; it is now chunked.
    #[test]
    fn unsized_heads_are_chunked_and_sized_ones_keep_their_length() {
        let mut h = HeaderMap::new();
        h.insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        let head = String::from_utf8(response_head(axum::http::StatusCode::OK, &h, None)).unwrap();
        assert!(head.starts_with(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\ndate: "
        ));
        assert!(head.ends_with("connection: close\r\n\r\n"));
        assert_eq!(head.matches("transfer-encoding").count(), 1);
        assert!(!head.contains("content-length"));
        let head = String::from_utf8(response_head(
            axum::http::StatusCode::UNAUTHORIZED,
            &h,
            Some(12),
        ))
        .unwrap();
        assert!(
            head.starts_with("HTTP/1.1 401 Unauthorized\r\n")
                && head.contains("content-length: 12\r\n")
                && !head.contains("transfer-encoding")
        );
    }

    /// The body as written on the wire: each gathered write is one chunk, and the end is `0\r\n\r\n`.
    #[tokio::test]
    async fn the_body_is_written_as_chunks_and_ended() {
        use tokio::io::AsyncReadExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let frames = futures_util::stream::iter([
            Ok::<_, std::convert::Infallible>(Bytes::from_static(b"retry: 1\n")),
            Ok(Bytes::new()),
            Ok(Bytes::from_static(b"data: x\n\n")),
        ]);
        Writer {
            tcp: server,
            body: Body::from_stream(frames),
            pending: Vec::new(),
            done: false,
            chunked: true,
            stray: 0,
            flushed: true,
        }
        .await;
        let mut wire = Vec::new();
        client.read_to_end(&mut wire).await.unwrap();
        let wire = String::from_utf8(wire).unwrap();
        assert!(wire.ends_with("\r\n0\r\n\r\n"), "{wire:?}");
        // De-chunk and compare with the frames.
        let mut rest = wire.as_str();
        let mut body = String::new();
        loop {
            let (size, after) = rest.split_once("\r\n").unwrap();
            let size = usize::from_str_radix(size, 16).unwrap();
            if size == 0 {
                assert_eq!(after, "\r\n");
                break;
            }
            body.push_str(&after[..size]);
            rest = after[size..].strip_prefix("\r\n").unwrap();
        }
        assert_eq!(body, "retry: 1\ndata: x\n\n");
    }

    /// Reproduces issue 12 (weak spot): bytes sent into an open stream were read 64 at a time,
    /// forever. They are read in large buffers, and a peer that keeps sending is dropped.
    #[tokio::test]
    async fn a_peer_that_keeps_sending_into_a_stream_is_dropped() {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let idle = futures_util::stream::pending::<Result<Bytes, std::convert::Infallible>>();
        let writer = tokio::spawn(Writer {
            tcp: server,
            body: Body::from_stream(idle),
            pending: Vec::new(),
            done: false,
            chunked: true,
            stray: 0,
            flushed: true,
        });
        let junk = vec![b'x'; 1024];
        // The writer ends once more than MAX_STRAY_BYTES came; the client's writes then fail.
        for _ in 0..(MAX_STRAY_BYTES as usize / junk.len() + 64) {
            if client.write_all(&junk).await.is_err() {
                break;
            }
        }
        tokio::time::timeout(std::time::Duration::from_secs(10), writer)
            .await
            .expect("the stream was not ended")
            .unwrap();
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
        let guard = std::sync::Arc::new(());
        let task = super::serve(tcp, "127.0.0.1:1".parse().unwrap(), app, request, guard);
        // With tokio's task header and trailer, 128 bytes fit a 256-byte task (tasks are
        // 128-byte aligned); the `async fn` it replaced made a 640-byte one.
        assert!(
            std::mem::size_of_val(&task) <= 128,
            "serve future: {}",
            std::mem::size_of_val(&task)
        );
        let stream = hub
            .subscribe(herald_core::SubscribeRequest::default())
            .unwrap();
        assert!(
            std::mem::size_of_val(&stream) <= 104,
            "EventStream: {}",
            std::mem::size_of_val(&stream)
        );
    }
}
