//! Property tests of the engine core: the paged, prefix-caching block manager on its own
//! ([`block_manager`]), the scheduler driven step by step the way the engine loop drives
//! it ([`scheduler`]), and the engine loop with the sim backend (a request's output does
//! not depend on what it is batched with, preemption included: [`engine_loop`]).
//!
//! Besides `BlockManager::check_invariants`, the tests keep a model of the KV cache's
//! content ([`harness::KvModel`]): every token a step computes is written into its slot
//! of the model, and whatever a sequence treats as already computed (prefix-cache hits,
//! earlier chunks) must hold exactly that sequence's tokens. Writes must only ever go to
//! blocks the sequence holds alone. The block manager is also compared, op by op, with a
//! plain reference implementation of its documented policy (LRU reuse, hashless blocks
//! first), and its cache events with what is actually cached.
//!
//! `PROPTEST_CASES=N` raises (or lowers) the number of cases of every property.

mod block_manager;
mod engine_loop;
mod harness;
mod scheduler;
