//! A lean HTTP/1.1 client over one keep-alive TCP connection: enough for publishing (also with a
//! chunked body sent as it is produced) and for reading an SSE stream (chunked or not), with no
//! allocation per event on the read path.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    host: String,
}

/// Position of the end of the head (`\r\n\r\n`), if complete.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Conn> {
        Self::connect_from(addr, None, 16 * 1024).await
    }

    /// Connects from source address `from` (bound before connecting, port chosen by the kernel)
    /// with a read buffer of `buf` bytes to start with.
    pub async fn connect_from(
        addr: SocketAddr,
        from: Option<IpAddr>,
        buf: usize,
    ) -> anyhow::Result<Conn> {
        let stream = match from {
            None => TcpStream::connect(addr).await,
            Some(ip) => {
                let socket = TcpSocket::new_v4()?;
                // The port is picked at connect time, unique per 4-tuple: binding many sockets
                // to one address stays cheap and does not exhaust its ephemeral ports.
                nix::sys::socket::setsockopt(
                    &socket,
                    nix::sys::socket::sockopt::IpBindAddressNoPort,
                    &true,
                )?;
                socket.bind(SocketAddr::new(ip, 0))?;
                socket.connect(addr).await
            }
        }
        .with_context(|| format!("connect {addr} from {from:?}"))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(buf),
            host: addr.to_string(),
        })
    }

    async fn read_head(&mut self) -> anyhow::Result<(u16, String)> {
        loop {
            if let Some(end) = head_end(&self.buf) {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
                self.buf.drain(..end);
                let status = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .context("bad status line")?;
                return Ok((status, head));
            }
            self.fill().await?;
        }
    }

    /// Reads more bytes straight into the spare capacity of the buffer (no copy, and no
    /// allocation once the buffer has reached its working size).
    async fn fill(&mut self) -> anyhow::Result<()> {
        if self.buf.capacity() - self.buf.len() < 512 {
            self.buf.reserve(self.buf.capacity().max(1024));
        }
        let n = self.stream.read_buf(&mut self.buf).await?;
        if n == 0 {
            bail!("connection closed");
        }
        Ok(())
    }

    /// POSTs a JSON body and returns the status and body.
    pub async fn post_json(&mut self, path: &str, body: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
        self.post(path, "application/json", body).await
    }

    /// POSTs `body` and returns the status and the response body (Content-Length or chunked).
    pub async fn post(
        &mut self,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        let mut req = head.into_bytes();
        req.extend_from_slice(body);
        self.stream.write_all(&req).await?;
        self.read_response().await
    }

    /// GETs `path` and returns the status and body.
    pub async fn get(&mut self, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
        let head = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.host);
        self.stream.write_all(head.as_bytes()).await?;
        self.read_response().await
    }

    /// The status and body of the next response (Content-Length or chunked).
    async fn read_response(&mut self) -> anyhow::Result<(u16, Vec<u8>)> {
        let (status, head) = self.read_head().await?;
        if let Some(len) = header(&head, "content-length").and_then(|v| v.parse::<usize>().ok()) {
            while self.buf.len() < len {
                self.fill().await?;
            }
            let body = self.buf.drain(..len).collect();
            return Ok((status, body));
        }
        if !header(&head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            bail!("response with neither content-length nor chunked body");
        }
        let mut out = Vec::new();
        loop {
            let end = loop {
                if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break p;
                }
                self.fill().await?;
            };
            let size = std::str::from_utf8(&self.buf[..end])?;
            let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)?;
            self.buf.drain(..end + 2);
            while self.buf.len() < size + 2 {
                self.fill().await?;
            }
            out.extend_from_slice(&self.buf[..size]);
            self.buf.drain(..size + 2);
            if size == 0 {
                return Ok((status, out));
            }
        }
    }

    /// Sends the head of a POST whose body follows in chunks as it is produced (a streaming
    /// publish); the server sees the request at once.
    pub async fn upload(mut self, path: &str, content_type: &str) -> anyhow::Result<Upload> {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n",
            self.host
        );
        self.stream.write_all(head.as_bytes()).await?;
        Ok(Upload { conn: self })
    }

    /// Sends a GET for an event stream and returns a reader of its body.
    pub async fn stream(mut self, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<Stream> {
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n",
            self.host
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        self.stream.write_all(req.as_bytes()).await?;
        let (status, head) = self.read_head().await?;
        if status != 200 {
            bail!("stream answered {status}");
        }
        let chunked = header(&head, "transfer-encoding").is_some_and(|v| v.contains("chunked"));
        Ok(Stream {
            conn: self,
            chunked,
            chunk_left: 0,
        })
    }
}

/// A request body being sent chunk by chunk (`Transfer-Encoding: chunked`).
pub struct Upload {
    conn: Conn,
}

impl Upload {
    /// Sends `bytes` as one chunk, in one write.
    pub async fn chunk(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let mut frame = format!("{:x}\r\n", bytes.len()).into_bytes();
        frame.extend_from_slice(bytes);
        frame.extend_from_slice(b"\r\n");
        self.conn.stream.write_all(&frame).await?;
        Ok(())
    }

    /// Ends the body and reads the answer.
    pub async fn finish(mut self) -> anyhow::Result<(u16, Vec<u8>)> {
        self.conn.stream.write_all(b"0\r\n\r\n").await?;
        self.conn.read_response().await
    }
}

/// The body of an event stream, de-chunked, delivered in slices.
pub struct Stream {
    conn: Conn,
    chunked: bool,
    chunk_left: usize,
}

impl Stream {
    /// Calls `f` with the next piece of body bytes. Fails at the end of the stream.
    pub async fn next(&mut self, mut f: impl FnMut(&[u8])) -> anyhow::Result<()> {
        if !self.chunked {
            if self.conn.buf.is_empty() {
                self.conn.fill().await?;
            }
            f(&self.conn.buf);
            self.conn.buf.clear();
            return Ok(());
        }
        // Hand over every complete chunk already buffered in one call, then compact once.
        let mut pos = 0;
        loop {
            let buf = &self.conn.buf[pos..];
            if self.chunk_left > 0 {
                if buf.is_empty() {
                    break;
                }
                let n = self.chunk_left.min(buf.len());
                f(&buf[..n]);
                pos += n;
                self.chunk_left -= n;
                continue;
            }
            // A size line: optional CRLF left from the previous chunk, hex size, CRLF.
            let start = usize::from(buf.starts_with(b"\r\n")) * 2;
            let Some(p) = buf[start..].windows(2).position(|w| w == b"\r\n") else {
                break;
            };
            let size = std::str::from_utf8(&buf[start..start + p])?;
            let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)?;
            if size == 0 {
                bail!("stream ended");
            }
            pos += start + p + 2;
            self.chunk_left = size;
        }
        self.conn.buf.drain(..pos);
        if pos == 0 {
            // Nothing usable was buffered (or only part of a size line): read more.
            self.conn.fill().await?;
        }
        Ok(())
    }
}
