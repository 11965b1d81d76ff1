//! The engine core, modelled on vLLM v1's `vllm/v1/core`: the [`scheduler::Scheduler`]
//! (waiting and running queues, token budget, chunked prefill, preemption), the paged,
//! prefix-caching [`block_manager::BlockManager`] it owns, the core's view of a
//! [`request::Request`], and the [`step`] contract (what a scheduled step hands a backend
//! and what comes back).
//!
//! The core is plain data and policy: it imports no backend, no engine loop, no HTTP.
//! The engine loop that drives it (`engine_loop`) sits above it and the backends.

pub mod block_manager;
pub mod request;
pub mod scheduler;
pub mod step;

pub use request::{EngineEvent, Finish, FinishReason, KvTransfer, NewRequest, SamplingParams};
pub use step::{SeqStep, TokenLogprobs};
