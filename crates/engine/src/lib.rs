//! The Switchyard engine: a vLLM-compatible serving engine, layered as vLLM v1's.
//!
//! From the bottom up (each layer uses only those below it):
//! - [`core`]: the scheduler, the paged prefix-caching KV block manager, the core's
//!   request, and the step contract ([`core::step`]: what a step hands a backend and
//!   what comes back). Imports no other layer.
//! - [`backend`]: what runs a step (`sim`, `gguf`) and vLLM's sampler; depends on the
//!   core only for the step contract and sampling parameters.
//! - [`engine_loop`]: the loop thread (vLLM's `EngineCore`) that owns the scheduler and
//!   a backend and steps them; the rest talks to it through [`engine_loop::EngineHandle`]
//!   (an `EngineCommand` channel in, per-request `EngineEvent` channels out).
//! - [`assembly`]: from the flags to a running engine ([`build_engine`]: tokenizer,
//!   backend, KV pool size, generation defaults, metrics, KV publisher, the loop) and the
//!   [`Engine`] bundle the handlers use.
//! - [`api`]: the OpenAI/vLLM HTTP surface ([`serve`]).
//!
//! Alongside: [`config`] (the `switchyard engine` flags), [`generation`] (default
//! sampling parameters, `--generation-config`), [`kv_offload`] (KV offloading tiers:
//! host memory, disk, remote cache servers; `--kv-transfer-config`), [`metrics`] (`vllm:*` Prometheus
//! metrics), [`kv_publisher`] (KV-cache events published as vLLM publishes them, ZMQ +
//! msgpack; the wire format is the `kv_events` crate's), [`model_store`] (where model
//! files are found and the default one fetched), [`fault`] (hidden fault-injection
//! knobs for resilience tests).

pub mod api;
pub mod assembly;
pub mod backend;
pub mod clock;
pub mod config;
pub mod core;
pub mod engine_loop;
pub mod fault;
pub mod generation;
pub mod kv_offload;
pub mod kv_publisher;
pub mod lora;
pub mod metrics;
pub mod model_store;

pub use api::serve;
pub use assembly::{build_engine, Engine, StartError};
pub use config::EngineArgs;
