//! The engine core, modelled on vLLM v1: one loop ([`engine_loop`]) owns the
//! [`scheduler::Scheduler`] and its [`block_manager::BlockManager`]; HTTP handlers talk to
//! it only through channels ([`EngineHandle`]). The [`step`] contract (what a scheduled
//! step hands a backend and what comes back) is the core's: backends depend on it, the
//! scheduler never sees a backend.

pub mod block_manager;
pub mod engine_loop;
pub mod request;
pub mod scheduler;
pub mod step;

pub use engine_loop::{spawn_engine, EngineCommand, EngineHandle};
pub use request::{EngineEvent, Finish, FinishReason, NewRequest, SamplingParams};
pub use step::{SeqStep, TokenLogprobs};
