//! The Switchyard engine: a vLLM-compatible serving engine.
//!
//! - [`core`]: the engine loop, scheduler and KV block manager (vLLM v1's design).
//! - [`backend`]: what runs a step (`sim` now).
//! - [`tokenizer`]: tokenizers (sim, byte-level BPE from GGUF), chat templates, incremental
//!   detokenization.
//! - [`gguf`]: GGUF header reader (metadata, tensor descriptors).
//! - [`api`]: the OpenAI/vLLM HTTP surface.
//! - [`metrics`]: `vllm:*` Prometheus metrics.
//! - [`config`]: the `switchyard engine` flags.
//! - [`kv_events`]: KV-cache events published as vLLM publishes them (ZMQ + msgpack).

pub mod api;
pub mod backend;
pub mod config;
pub mod core;
pub mod gguf;
pub mod hash;
pub mod kv_events;
pub mod metrics;
pub mod model_store;
pub mod tokenizer;

pub use api::{build_engine, serve, Engine};
pub use config::EngineArgs;
