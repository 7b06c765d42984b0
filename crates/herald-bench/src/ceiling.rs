//! The ceiling: the least a server can do to push SSE, run as `herald-bench ceiling` in its own
//! process. It answers the request head, keeps the bare sockets per topic, and writes each
//! published frame, encoded once, to every socket (pending frames batched into one write).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

use anyhow::Context;

type Frame = (Arc<str>, Arc<[u8]>);

struct Shard {
    subs: Mutex<HashMap<Arc<str>, Vec<TcpStream>>>,
    tx: Mutex<Sender<Frame>>,
}

/// Serves until killed.
pub fn run(listen: &str, writers: usize) -> anyhow::Result<()> {
    let listener = bind(listen).with_context(|| format!("bind {listen}"))?;
    println!("ceiling listening on http://{}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let mut shards = Vec::new();
    for _ in 0..writers.max(1) {
        let (tx, rx) = channel();
        let shard = Arc::new(Shard {
            subs: Mutex::new(HashMap::new()),
            tx: Mutex::new(tx),
        });
        let s = shard.clone();
        std::thread::spawn(move || writer(&s, rx));
        shards.push(shard);
    }
    let shards: Arc<[Arc<Shard>]> = shards.into();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let (shards, next) = (shards.clone(), next.clone());
        // A short-lived thread per connection reads its request head, so that a client that
        // connects early and sends late (a publisher) holds up nobody.
        let _ = std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || serve(stream, &shards, &next));
    }
    Ok(())
}

fn serve(mut stream: TcpStream, shards: &[Arc<Shard>], next: &std::sync::atomic::AtomicUsize) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::with_capacity(1024);
    let Some(end) = read_head(&mut stream, &mut buf) else {
        return;
    };
    if !buf.starts_with(b"GET ") {
        publisher(stream, buf, shards);
        return;
    }
    let head = String::from_utf8_lossy(&buf[..end]);
    let path = head.split(' ').nth(1).unwrap_or("/");
    let topic = topic_of(path);
    let answer =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\r\n";
    if stream.write_all(answer).is_err() {
        return;
    }
    let shard = &shards[next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % shards.len()];
    let mut subs = shard.subs.lock().unwrap_or_else(|e| e.into_inner());
    subs.entry(topic.into()).or_default().push(stream);
}

/// A listener with a deep accept queue (std's is 128), so connection bursts are not dropped.
fn bind(listen: &str) -> anyhow::Result<TcpListener> {
    use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let addr: std::net::SocketAddrV4 = listen.parse()?;
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::setsockopt(&fd, socket::sockopt::ReuseAddr, &true)?;
    socket::bind(fd.as_raw_fd(), &SockaddrIn::from(addr))?;
    socket::listen(&fd, Backlog::new(4096)?)?;
    Ok(TcpListener::from(fd))
}

fn topic_of(path: &str) -> &str {
    if let Some(t) = path
        .strip_prefix("/sub/")
        .or_else(|| path.strip_prefix("/pub/"))
    {
        return t;
    }
    path.split_once("topic=")
        .map(|(_, t)| t.split('&').next().unwrap_or(""))
        .unwrap_or("")
}

/// Reads until the end of a request head; returns its length (bytes after it stay in `buf`).
fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(p + 4);
        }
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Serves publish requests on one keep-alive connection: the body is the event's data.
fn publisher(mut stream: TcpStream, mut buf: Vec<u8>, shards: &[Arc<Shard>]) {
    let txs: Vec<Sender<Frame>> = shards
        .iter()
        .map(|s| s.tx.lock().unwrap_or_else(|e| e.into_inner()).clone())
        .collect();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let Some(end) = read_head(&mut stream, &mut buf) else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buf.len() < end + len {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let path = head.split(' ').nth(1).unwrap_or("/");
        let topic: Arc<str> = topic_of(path).into();
        let mut frame = Vec::with_capacity(len + 8);
        frame.extend_from_slice(b"data: ");
        frame.extend_from_slice(&buf[end..end + len]);
        frame.extend_from_slice(b"\n\n");
        let frame: Arc<[u8]> = frame.into();
        for tx in &txs {
            let _ = tx.send((topic.clone(), frame.clone()));
        }
        buf.drain(..end + len);
        let answer =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        if stream.write_all(answer).is_err() {
            return;
        }
    }
}

/// Writes frames to this shard's sockets: everything pending for a topic goes in one write.
fn writer(shard: &Shard, rx: Receiver<Frame>) {
    let mut order: Vec<Arc<str>> = Vec::new();
    let mut pending: HashMap<Arc<str>, Vec<u8>> = HashMap::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some((topic, frame)) = next {
            let buf = pending.entry(topic.clone()).or_insert_with(|| {
                order.push(topic);
                Vec::new()
            });
            buf.extend_from_slice(&frame);
            next = if order.len() < 4096 {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        let mut subs = shard.subs.lock().unwrap_or_else(|e| e.into_inner());
        for topic in order.drain(..) {
            let Some(bytes) = pending.remove(&topic) else {
                continue;
            };
            if let Some(list) = subs.get_mut(&topic) {
                list.retain_mut(|s| s.write_all(&bytes).is_ok());
            }
        }
    }
}
