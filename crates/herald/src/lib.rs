//! herald: a Server-Sent Events push hub. This crate is the server around `herald-core`: the HTTP
//! interface ([`router`]), configuration, auth, the `pub`/`sub` client, and the way to serve: the
//! binary builds a [`Node`] with [`node_from`] and serves it with [`serve_split`]; [`run`] and
//! [`serve`] do the same on one runtime.
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

pub mod acme;
pub mod auth;
pub mod client;
pub mod config;
pub mod error_code;
pub mod host;
pub mod http;
pub mod ipnet;
mod listen;
pub mod mercure;
mod sealed;
pub mod settings;
mod stream_conn;
pub mod tls;
pub mod webhook;

/// Entry points for the fuzz targets in `fuzz/` (not an API).
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::stream_conn::check_stream_head;
}

use std::future::Future;
use std::time::Duration;

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
    #[error("cannot reach Redis: {0}")]
    Redis(String),
    /// The history in Redis is kept by other retention rules than this node's.
    #[error("{0}")]
    RedisRules(herald_core::HistoryError),
    #[error("cannot start webhooks (--webhook): {0}")]
    Webhooks(String),
    #[error("serving failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A hub and, with `--redis`, its place in the cluster.
#[derive(Debug, Clone)]
pub struct Node {
    pub hub: Hub,
    pub cluster: Option<std::sync::Arc<herald_core::Cluster>>,
}

/// The node configured by `config`: its history store is opened (or Redis reached) here, so a
/// bad data dir or an unreachable Redis stops startup with its own message.
pub async fn node_from(config: &Config) -> Result<Node, ServeError> {
    let mut builder = Hub::builder().retention(config.retention.clone());
    let mut redis = None;
    if let Some((url, prefix)) = &config.redis {
        let store = herald_core::RedisHistory::connect(herald_core::RedisOptions {
            url: url.clone(),
            prefix: prefix.clone(),
            retention: config.retention.clone(),
            idempotency_window: config.idempotency_window,
            idempotency_keys: config.idempotency_keys,
            idempotency_bytes: config.idempotency_bytes,
            replicas: config.redis_replicas,
            wait_timeout: config.redis_wait_timeout,
        })
        .await
        .map_err(|e| match e {
            e @ herald_core::HistoryError::RulesDiffer { .. } => ServeError::RedisRules(e),
            e => ServeError::Redis(e.to_string()),
        })?;
        let store = std::sync::Arc::new(store);
        builder = builder.shared_history(store.clone());
        redis = Some(store);
    } else if let Some(dir) = &config.data_dir {
        let store = herald_core::DurableHistory::open(dir, config.retention.clone())?;
        builder = builder.history(std::sync::Arc::new(store));
    }
    let hub = builder
        .idempotency_window(config.idempotency_window)
        .idempotency_keys(config.idempotency_keys)
        .idempotency_bytes(config.idempotency_bytes)
        .heartbeat(config.heartbeat)
        .retry(config.retry)
        .queue_capacity(config.queue)
        .queue_bytes(config.queue_bytes)
        .max_stream_age(config.max_stream_age, config.max_stream_age_jitter)
        .max_connections(config.max_connections)
        .max_selectors(config.max_selectors)
        .max_blocks(config.limits.max_blocks)
        .build()?;
    let cluster = match redis {
        Some(store) => Some(herald_core::Cluster::start(
            hub.clone(),
            &store,
            config.cluster_report,
            Some(config.presence_grace),
        )),
        None => {
            herald_core::presence_events::start_local(&hub, config.presence_grace).await;
            None
        }
    };
    Ok(Node { hub, cluster })
}

/// Serves herald on `listener` until `shutdown` completes; then refuses new streams, ends the open
/// ones (clients reconnect with their last id) and returns within `config.shutdown_timeout`.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let node = node_from(&config).await?;
    serve(listener, node, config, shutdown).await
}

/// As [`run`], with a node built beforehand (by [`node_from`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    node: Node,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let here = tokio::runtime::Handle::current();
    serve_split(listener, node, config, shutdown, here).await
}

/// As [`serve`], with the open event streams written on the runtime `streams`. The binary runs
/// requests, the committer and timers on a runtime of their own, so that a publish is answered in
/// milliseconds even while thousands of stream tasks are busy writing a fan-out.
pub async fn serve_split(
    listener: tokio::net::TcpListener,
    node: Node,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    streams: tokio::runtime::Handle,
) -> Result<(), ServeError> {
    let hub = node.hub.clone();
    let local = listener.local_addr()?;
    let mut limits = config.limits.clone();
    if limits.allowed_hosts.is_none() && listen::is_loopback(local) {
        // DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 reaches a
        // loopback hub, but its requests still say `Host: evil.example`.
        limits.allowed_hosts = Some(host::HostPattern::loopback());
    }
    let options = HttpOptions {
        max_body: config.max_body,
        cors_origins: config.cors_origins.clone(),
        cluster: node.cluster.clone(),
        auth: config.auth.clone(),
        limits,
        metrics_route: config.metrics_listen.is_none(),
        webhooks: webhook::start(
            &hub,
            config.webhooks.clone(),
            config.data_dir.as_deref(),
            node.cluster.clone(),
        )
        .map_err(|e| ServeError::Webhooks(e.to_string()))?,
        mercure: config.mercure.clone(),
    };
    let (app, metrics_app) = http::router_and_metrics(hub.clone(), options);
    let settings = listen::ConnectionSettings {
        header_timeout: config.limits.header_timeout,
        max_head: config.limits.max_header_bytes * 2,
        user_timeout: listen::user_timeout(config.heartbeat),
        h2_max_streams: config.h2_max_streams,
        mercure: config.mercure.is_some(),
    };
    if let Some(addr) = config.metrics_listen {
        // The same accept loop as the main listener: head timeout, head size cap, reserve.
        let metrics_listener = tokio::net::TcpListener::bind(addr).await?;
        let streams = streams.clone();
        tokio::spawn(listen::serve(
            metrics_listener,
            metrics_app,
            settings,
            None,
            std::future::pending(),
            Duration::ZERO,
            streams,
        ));
    }
    if !listen::is_loopback(local) {
        if config.auth.is_open() {
            tracing::warn!(
                %local,
                "herald runs open on a non-loopback address: anyone who can reach it may subscribe, publish and control; configure --jwt-secret/--jwt-public-key and --publish-key"
            );
        } else if config.auth.subscribe_is_open() {
            tracing::warn!(
                %local,
                "--open-subscribe: anyone who can reach herald may subscribe as any user and read private messages"
            );
        }
    }
    let tls = match (&config.tls, &config.acme) {
        (Some(certificates), _) => {
            certificates.clone().watch();
            Some(tls::server_config(certificates.clone(), &[]))
        }
        (None, Some(settings)) => Some(tls::server_config(
            acme::start(settings),
            &[acme::ALPN_ACME],
        )),
        (None, None) => None,
    };
    let stop = async move {
        shutdown.await;
        tracing::info!("shutting down: ending streams");
        hub.shutdown();
    };
    // On a worker of the runtime rather than the thread that started it, so that each accepted
    // connection's task starts on the accepting thread (tokio's LIFO slot) instead of waking
    // another thread.
    tokio::spawn(listen::serve(
        listener,
        app,
        settings,
        tls,
        stop,
        config.shutdown_timeout,
        streams,
    ))
    .await
    .map_err(|e| std::io::Error::other(format!("the accept loop failed: {e}")))?;
    Ok(())
}
