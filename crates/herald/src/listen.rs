//! The accept loop: HTTP/1.1 connections served by hyper with a request-head read timeout
//! (slowloris) and a head size cap, the peer address for per-IP limits, and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
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
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
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
            let mut tcp = tcp;
            // A connection that opens with `GET /events` is written by the lean stream path;
            // everything else is hyper's, starting with the bytes already read.
            let prefix =
                match stream_conn::read_first(&mut tcp, settings.max_head, settings.header_timeout)
                    .await
                {
                    stream_conn::First::Stream(request) => {
                        // A task of its own, on the streams' runtime, holding none of this task's state.
                        streams.spawn(stream_conn::serve(tcp, peer, app, request));
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
