//! herald: a Server-Sent Events push hub. This crate is the server around `herald-core`: the HTTP
//! interface ([`router`]), configuration, and [`run`], the one entry point the binary and tests use.
//!
//! # Embedding herald in an axum app
//!
//! An app can mount the hub inside its own router and publish from its own handlers, with no
//! second process: build one [`Hub`], [`nest`](axum::Router::nest) [`router`] under a path of your
//! choice, and call [`Hub::publish`] wherever something happens. The nested router is the whole
//! HTTP interface of the standalone server (`GET /events`, `POST /publish`, `/users`, `/stats`, …)
//! plus the dashboard and the browser client `herald.js`, so a page of the app can do
//! `import { connect } from '/push/herald.js'; connect('/push', { user: 'u1' })`.
//!
//! ```no_run
//! use axum::Router;
//! use axum::routing::post;
//! use herald::{EventType, Hub, Message, UserId};
//!
//! # async fn app() -> anyhow::Result<()> {
//! let hub = Hub::builder().history_len(10_000).build()?; // inside a Tokio runtime
//! let publisher = hub.clone();
//! let app = Router::new()
//!     .route(
//!         "/orders/{id}/ship",
//!         post(move || async move {
//!             // Everything connected as user `u1` receives it; a client that was away gets it
//!             // on reconnect, by its last event id.
//!             let message = Message::to_user(UserId::new("u1").expect("valid user id"))
//!                 .event(EventType::new("order.shipped").expect("valid type"))
//!                 .data(r#"{"order":42}"#);
//!             publisher.publish(message).await.map(|p| p.id.to_string()).unwrap_or_default()
//!         }),
//!     )
//!     .nest("/push", herald::router(hub.clone()));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(())
//! # }
//! ```
//!
//! `examples/job_stream.rs` is a complete app in this shape: it streams the output of a long job
//! to the user who started it, chunk by chunk, ending with a final event
//! (`cargo run -p herald --example job_stream`).

pub mod client;
pub mod config;
pub mod http;

use std::future::Future;

pub use config::{Config, ConfigError, RawConfig};
pub use herald_core::{
    EventId, EventType, Hub, HubBuilder, Message, Published, Selector, Targets, Topic, UserId,
};
pub use http::{HttpOptions, router, router_with};

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Hub(#[from] herald_core::HubError),
    #[error(transparent)]
    Store(#[from] herald_core::OpenError),
    #[error("serving failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A hub configured from `config`; with a data dir, its durable history is opened here.
pub fn hub_from(config: &Config) -> Result<Hub, ServeError> {
    let mut builder = Hub::builder().retention(config.retention);
    if let Some(dir) = &config.data_dir {
        let store = herald_core::DurableHistory::open(dir, config.retention)?;
        builder = builder.history(std::sync::Arc::new(store));
    }
    Ok(builder
        .idempotency_window(config.idempotency_window)
        .heartbeat(config.heartbeat)
        .retry(config.retry)
        .queue_capacity(config.queue)
        .max_connections(config.max_connections)
        .max_selectors(config.max_selectors)
        .build()?)
}

/// Serves herald on `listener` until `shutdown` completes; then refuses new streams, ends the open
/// ones (clients reconnect with their last id) and returns within `config.shutdown_timeout`.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let hub = hub_from(&config)?;
    serve(listener, hub, config, shutdown).await
}

/// As [`run`], with a hub built beforehand (by [`hub_from`] or an embedding application).
pub async fn serve(
    listener: tokio::net::TcpListener,
    hub: Hub,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let app = router_with(
        hub.clone(),
        HttpOptions {
            max_body: config.max_body,
            cors_origins: config.cors_origins.clone(),
        },
    );
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let stopping_hub = hub.clone();
    // A peer that vanishes without a reset leaves heartbeat bytes unacknowledged: the kernel drops
    // the connection once they stay so for two heartbeat intervals, and the stream leaves presence.
    let user_timeout = config.heartbeat * 2;
    let listener = axum::serve::ListenerExt::tap_io(listener, move |tcp| {
        let sock = socket2::SockRef::from(&*tcp);
        if let Err(e) = sock
            .set_tcp_nodelay(true)
            .and_then(|()| sock.set_tcp_user_timeout(Some(user_timeout)))
        {
            tracing::debug!(error = %e, "cannot set socket options");
        }
    });
    let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("shutting down: ending streams");
        stopping_hub.shutdown();
        let _ = stopping_tx.send(());
    });
    let serve = serve.into_future();
    tokio::pin!(serve);
    tokio::select! {
        result = &mut serve => result?,
        _ = stopping_rx => {
            if tokio::time::timeout(config.shutdown_timeout, &mut serve).await.is_err() {
                tracing::warn!(
                    timeout = ?config.shutdown_timeout,
                    "shutdown timeout reached; dropping the remaining connections"
                );
            }
        }
    }
    Ok(())
}
