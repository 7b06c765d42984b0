//! Black-box tests: each starts the real `herald` binary on port 0 and talks to it over TCP, reading
//! streams with a WHATWG SSE parser. One test binary, so the helpers in `common` are shared.

mod acme;
mod age;
mod auth;
mod behind_nginx;
mod cli;
mod clients;
mod clock;
mod cluster;
mod common;
mod control;
mod durable;
mod finite;
mod hostile;
mod input;
mod languages;
mod limits;
mod mercure;
mod metrics;
mod pki;
mod presence;
mod readme_tour;
mod redis_servers;
mod resume;
mod retention;
mod sentinel;
mod streams;
mod tls;
mod webhooks;
