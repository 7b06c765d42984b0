//! Benchmark scenarios, one module each.

pub mod durable;
