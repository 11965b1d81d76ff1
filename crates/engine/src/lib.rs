//! The Switchyard engine: a vLLM-compatible serving engine.
//!
//! - [`core`]: the scheduler, the KV block manager and the step contract (vLLM v1's
//!   design); imports no other layer.
//! - [`backend`]: what runs a step (`sim`, `gguf`); depends on the core's step contract.
//! - [`engine_loop`]: the loop thread that owns the scheduler and a backend, and the
//!   `EngineHandle` the rest talks to it through.
//! - [`api`]: the OpenAI/vLLM HTTP surface.
//! - [`metrics`]: `vllm:*` Prometheus metrics.
//! - [`config`]: the `switchyard engine` flags.
//! - [`generation`]: default sampling parameters (`--generation-config`).
//! - [`kv_publisher`]: KV-cache events published as vLLM publishes them (ZMQ + msgpack;
//!   the wire format is the `kv_events` crate's).

pub mod api;
pub mod backend;
pub mod config;
pub mod core;
pub mod engine_loop;
pub mod generation;
pub mod kv_publisher;
pub mod metrics;
pub mod model_store;

pub use api::{build_engine, serve, Engine};
pub use config::EngineArgs;
