//! What one idle plain HTTP/1.1 event stream holds on the heap, counted allocation by allocation.
//!
//! A counting global allocator (over mimalloc, the binary's allocator) keeps how many blocks of
//! each requested size are live. The server runs in this process as the binary runs it (a request
//! runtime of one thread, a streams runtime of one thread per core, `serve_split`); the clients
//! are blocking std sockets, which allocate nothing. After a warm-up, `STREAMS` more idle streams
//! (`GET /events?topic=idle`, the `herald-bench idle` request) are opened and the live blocks
//! before and after are compared: the difference divided by `STREAMS` is what a stream holds.
//! Then one more stream is opened with every allocation recorded with its backtrace, and those
//! still live once it is idle are printed: that names the owner of each block
//! (`cargo test -p herald --release --test idle_memory -- --nocapture`; docs/ARCHITECTURE.md
//! "Memory per idle stream" has the table). The test fails if a stream holds more than `BUDGET`.
//!
//! Only this test lives in this file: the allocator counts the whole process.
#![allow(
    unsafe_code,
    reason = "a global allocator is an unsafe trait; this one only counts and forwards to mimalloc"
)]

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::time::Duration;

/// Idle streams measured (after `WARM_UP` that open first).
const STREAMS: usize = 2000;
const WARM_UP: usize = 300;
/// Heap bytes (as requested, before the allocator's rounding) one idle stream may hold.
const BUDGET: f64 = 900.0;

/// Requested sizes counted exactly up to this; larger blocks are counted together.
const EXACT: usize = 4096;

struct Counting;

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicIsize = AtomicIsize::new(0);
static LIVE_BY_SIZE: [AtomicIsize; EXACT + 1] = [ZERO; EXACT + 1];
static LARGE_BYTES: AtomicIsize = AtomicIsize::new(0);
/// While set, allocations are recorded with their backtraces.
static PROBE: AtomicBool = AtomicBool::new(false);
static PROBED: Mutex<Vec<(usize, usize, String)>> = Mutex::new(Vec::new());

thread_local! {
    /// Inside the recorder: its own allocations are not recorded.
    static RECORDING: Cell<bool> = const { Cell::new(false) };
}

fn count(size: usize, delta: isize) {
    if size <= EXACT {
        LIVE_BY_SIZE[size].fetch_add(delta, Ordering::Relaxed);
    } else {
        LARGE_BYTES.fetch_add(delta * size as isize, Ordering::Relaxed);
    }
}

fn record(ptr: *mut u8, size: usize) {
    if !PROBE.load(Ordering::Relaxed) || RECORDING.with(Cell::get) {
        return;
    }
    RECORDING.with(|r| r.set(true));
    let trace = std::backtrace::Backtrace::force_capture().to_string();
    PROBED.lock().unwrap().push((ptr as usize, size, trace));
    RECORDING.with(|r| r.set(false));
}

fn forget(ptr: *mut u8) {
    if !PROBE.load(Ordering::Relaxed) || RECORDING.with(Cell::get) {
        return;
    }
    RECORDING.with(|r| r.set(true));
    PROBED
        .lock()
        .unwrap()
        .retain(|(p, _, _)| *p != ptr as usize);
    RECORDING.with(|r| r.set(false));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { mimalloc::MiMalloc.alloc(layout) };
        count(layout.size(), 1);
        record(ptr, layout.size());
        ptr
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) };
        count(layout.size(), 1);
        record(ptr, layout.size());
        ptr
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        forget(ptr);
        count(layout.size(), -1);
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        forget(ptr);
        count(layout.size(), -1);
        let new = unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) };
        count(new_size, 1);
        record(new, new_size);
        new
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Live blocks by requested size, and the bytes of larger ones.
fn snapshot() -> (Vec<isize>, isize) {
    let sizes = LIVE_BY_SIZE
        .iter()
        .map(|n| n.load(Ordering::Relaxed))
        .collect();
    (sizes, LARGE_BYTES.load(Ordering::Relaxed))
}

/// The size mimalloc hands out for a request of `size` bytes (its small size classes: one word
/// apart up to 64 bytes, then four classes per doubling).
fn mimalloc_class(size: usize) -> usize {
    let words = size.div_ceil(8).max(1);
    if words <= 8 {
        return words * 8;
    }
    let mut base = 8;
    loop {
        for step in 1..=4 {
            let class = base + step * base / 4;
            if words <= class {
                return class * 8;
            }
        }
        base *= 2;
    }
}

fn open_stream(addr: std::net::SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).expect("connect");
    tcp.write_all(
        b"GET /events?topic=idle HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n",
    )
    .expect("send the request");
    tcp.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    // The head is written once the stream is registered; read until it is complete.
    let mut seen = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tcp.read(&mut buf).expect("read the response head");
        assert!(n > 0, "the server closed the stream");
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(seen.starts_with(b"HTTP/1.1 200 OK\r\n"));
    tcp
}

/// This process's resident memory, in bytes.
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn settle() {
    std::thread::sleep(Duration::from_millis(1500));
}

#[test]
fn an_idle_stream_holds_little_heap() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let config = herald::RawConfig::default().validate().expect("defaults");
    let api = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let streams = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let listener = api
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let node = api.block_on(herald::node_from(&config)).expect("node");
    let hub = node.hub.clone();
    api.spawn(herald::serve_split(
        listener,
        node,
        config,
        std::future::pending(),
        streams.handle().clone(),
    ));
    let mut clients = Vec::with_capacity(WARM_UP + STREAMS + 1);
    for _ in 0..WARM_UP {
        clients.push(open_stream(addr));
    }
    settle();
    let (before, large_before) = snapshot();
    let rss_before = rss();
    for _ in 0..STREAMS {
        clients.push(open_stream(addr));
    }
    settle();
    let (after, large_after) = snapshot();
    let rss_after = rss();
    assert_eq!(hub.stats().connections, WARM_UP + STREAMS);

    let mut rows = Vec::new();
    let (mut requested, mut rounded) = (0.0, 0.0);
    for size in 0..=EXACT {
        let per_stream = (after[size] - before[size]) as f64 / STREAMS as f64;
        if per_stream.abs() >= 0.05 {
            rows.push((size, per_stream));
            requested += per_stream * size as f64;
            rounded += per_stream * mimalloc_class(size) as f64;
        }
    }
    let large = (large_after - large_before) as f64 / STREAMS as f64;
    requested += large;
    rounded += large;
    println!("live blocks per idle stream ({STREAMS} streams after {WARM_UP}):");
    println!("{:>8} {:>8} {:>10}", "size", "blocks", "mimalloc");
    for (size, n) in &rows {
        println!("{size:>8} {n:>8.2} {:>10}", mimalloc_class(*size));
    }
    println!("{:>8} {large:>8.1} bytes (blocks over {EXACT} B)", "large");
    println!("per stream: {requested:.0} B requested, {rounded:.0} B in mimalloc's classes");
    println!(
        "resident memory of this process (server and its clients' sockets): {:.0} B per stream",
        (rss_after as f64 - rss_before as f64) / STREAMS as f64
    );

    // One more stream, each allocation recorded with its backtrace: who holds what.
    PROBE.store(true, Ordering::SeqCst);
    clients.push(open_stream(addr));
    settle();
    PROBE.store(false, Ordering::SeqCst);
    let probed = std::mem::take(&mut *PROBED.lock().unwrap());
    println!("blocks the last stream still holds, with their allocating frames:");
    for (_, size, trace) in &probed {
        let frames: Vec<&str> = trace
            .lines()
            .map(str::trim)
            .filter(|l| {
                !l.starts_with("at ")
                    && !l.contains("idle_memory::")
                    && !l.contains("alloc::")
                    && !l.contains("std::")
                    && !l.contains("core::")
            })
            .take(6)
            .collect();
        println!("{size:>6} B: {}", frames.join(" <- "));
    }

    assert!(
        requested <= BUDGET,
        "an idle stream holds {requested:.0} B of heap, more than {BUDGET} B"
    );
    drop(clients);
}
