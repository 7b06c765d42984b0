//! herald: a Server-Sent Events push hub. This crate is the server around `herald-core`: the HTTP
//! interface ([`router`]), configuration, and [`run`], the one entry point the binary and tests use.

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
