//! A lean HTTP/1.1 client over one keep-alive TCP connection: enough for publishing and for
//! reading an SSE stream (chunked or not), with no allocation per event on the read path.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(16 * 1024),
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

    async fn fill(&mut self) -> anyhow::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed");
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// POSTs a JSON body and returns the status and body (responses carry Content-Length).
    pub async fn post_json(&mut self, path: &str, body: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        let mut req = head.into_bytes();
        req.extend_from_slice(body);
        self.stream.write_all(&req).await?;
        let (status, head) = self.read_head().await?;
        let len: usize = header(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .context("no content-length")?;
        while self.buf.len() < len {
            self.fill().await?;
        }
        let body = self.buf.drain(..len).collect();
        Ok((status, body))
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
        loop {
            if self.chunk_left > 0 {
                if self.conn.buf.is_empty() {
                    self.conn.fill().await?;
                }
                let n = self.chunk_left.min(self.conn.buf.len());
                f(&self.conn.buf[..n]);
                self.conn.buf.drain(..n);
                self.chunk_left -= n;
                if self.chunk_left == 0 {
                    // The CRLF after the chunk data is consumed with the next size line.
                }
                return Ok(());
            }
            // A size line: optional CRLF left from the previous chunk, hex size, CRLF.
            let line_end = loop {
                let start = usize::from(self.conn.buf.starts_with(b"\r\n")) * 2;
                if let Some(p) = self.conn.buf[start..].windows(2).position(|w| w == b"\r\n") {
                    break (start, start + p);
                }
                self.conn.fill().await?;
            };
            let size = std::str::from_utf8(&self.conn.buf[line_end.0..line_end.1])?;
            let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)?;
            self.conn.buf.drain(..line_end.1 + 2);
            if size == 0 {
                bail!("stream ended");
            }
            self.chunk_left = size;
        }
    }
}
