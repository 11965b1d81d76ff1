//! Backends run one scheduled step: the prefill chunks and decodes the scheduler chose,
//! returning the next token of every sequence that reached its end.
//!
//! `sim` models the latency of a real GPU or CPU from a few parameters; `gguf` runs real
//! llama-family models on CPU; both behind the same trait.

pub mod gguf;
pub mod sampling;
pub mod sim;

use crate::core::{SamplingParams, TokenLogprobs};

/// One sequence's part of a step.
#[derive(Debug)]
pub struct SeqStep<'a> {
    pub req_id: u64,
    /// All tokens of the sequence (prompt then output).
    pub tokens: &'a [u32],
    pub num_prompt: usize,
    /// Tokens whose KV is already computed; this step computes `num_new` from here.
    pub num_computed: usize,
    pub num_new: usize,
    /// The KV blocks holding the sequence, in order.
    pub block_ids: &'a [u32],
    /// Whether this step reaches the end of the sequence and must sample a token.
    pub sample: bool,
    pub params: &'a SamplingParams,
    pub rng_seed: u64,
}

impl SeqStep<'_> {
    /// A decode step computes one token of an already prefilled sequence.
    pub fn is_decode(&self) -> bool {
        self.num_new == 1 && self.num_computed >= self.num_prompt
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend failed: {0}")]
    Failed(String),
}

pub trait Backend: Send {
    /// Run one step; push one token per sequence with `sample` set, in order.
    fn execute(&mut self, seqs: &[SeqStep<'_>], sampled: &mut Vec<u32>)
        -> Result<(), BackendError>;
    /// The log-probabilities of the last step's sampled tokens, aligned with `sampled`
    /// (`None` where the request did not ask). Backends without a model give none.
    fn take_logprobs(&mut self, _out: &mut Vec<Option<Box<TokenLogprobs>>>) {}
}
