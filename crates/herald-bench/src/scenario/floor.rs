//! `floor`: what this kernel alone costs to deliver one small event to each of N loopback
//! sockets, with no server in between: writer threads `write` one frame to their share of N
//! connected sockets while one thread drains the other ends with epoll. No server can go below it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use hdrhistogram::Histogram;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};

use super::clients::check_fd_budget;
use super::{Row, emit, num};

pub fn floor(n: usize, writers: usize, rounds: usize, size: usize) -> anyhow::Result<Row> {
    // Both ends of every connection live in this process.
    check_fd_budget(2 * n)?;
    let writers = writers.max(1);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let (mut ends, mut readers) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let epoll = Epoll::new(EpollCreateFlags::empty())?;
    for i in 0..n {
        let reader = TcpStream::connect(addr)?;
        let (end, _) = listener.accept()?;
        for s in [&reader, &end] {
            s.set_nodelay(true)?;
        }
        reader.set_nonblocking(true)?;
        epoll.add(&reader, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))?;
        ends.push(end);
        readers.push(reader);
    }
    let frame = {
        let mut f = b"data: ".to_vec();
        f.resize(size.max(8) + 6, b'x');
        f.extend_from_slice(b"\n\n");
        f
    };
    // Time from the start of a round until each socket's event was read, in µs.
    let mut arrival = Histogram::<u64>::new(3)?;
    let mut span = Histogram::<u64>::new(3)?;
    let mut write_ns = 0u128;
    let per = n.div_ceil(writers);
    let mut events = vec![EpollEvent::empty(); 1024];
    let mut buf = [0u8; 4096];
    for _ in 0..rounds {
        let start = Instant::now();
        let mut last = 0u64;
        let written = std::thread::scope(|scope| {
            let handles: Vec<_> = ends
                .chunks(per)
                .map(|share| {
                    let frame = &frame;
                    scope.spawn(move || -> std::io::Result<u128> {
                        let t = Instant::now();
                        for mut end in share {
                            end.write_all(frame)?;
                        }
                        Ok(t.elapsed().as_nanos())
                    })
                })
                .collect();
            let mut got = 0;
            while got < n {
                let ready = epoll.wait(&mut events, 2000u16)?;
                anyhow::ensure!(ready > 0, "floor: events stopped arriving ({got} of {n})");
                for e in &events[..ready] {
                    let mut r = &readers[e.data() as usize];
                    let read = r.read(&mut buf)?;
                    anyhow::ensure!(read > 0, "floor: a socket closed");
                    got += 1;
                    last = start.elapsed().as_micros() as u64;
                    arrival.record(last.max(1))?;
                }
            }
            let mut total = 0;
            for h in handles {
                total += h.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
            }
            anyhow::Ok(total)
        })?;
        write_ns += written;
        span.record(last.max(1))?;
    }
    let q = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let mut r = Row::default();
    r.insert("scenario", "floor");
    r.insert("target", "kernel");
    r.insert("sockets", n);
    r.insert("writers", writers);
    r.insert("rounds", rounds);
    r.insert("size", size);
    r.insert(
        "write_us_per_socket",
        num(write_ns as f64 / 1000.0 / (n * rounds) as f64),
    );
    r.insert("p50_ms", num(q(&arrival, 0.5)));
    r.insert("p99_ms", num(q(&arrival, 0.99)));
    r.insert("span_p50_ms", num(q(&span, 0.5)));
    r.insert("span_max_ms", num(span.max() as f64 / 1000.0));
    emit(&r);
    Ok(r)
}
