//! Wire types shared by every Switchyard role: the OpenAI/vLLM request and response
//! bodies, the error body vLLM returns, and a small Prometheus text-format writer with
//! the `vllm:*` metric names.
//!
//! This crate does no I/O and depends on nothing of ours; everything else depends on it.

pub mod error;
pub mod openai;
pub mod prom;

pub use error::{ApiError, ErrorBody};
