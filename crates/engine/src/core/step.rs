//! The step contract between the scheduler and whatever runs a step (vLLM v1's
//! `SchedulerOutput` / `ModelRunnerOutput` boundary), owned by the core so that backends
//! depend on the core and never the other way round.
//!
//! Going out, the scheduler describes each scheduled sequence as a [`SeqStep`] (borrowed
//! from its request: tokens, KV block table, how far it is computed, what to compute now,
//! whether to sample). Coming back, the backend gives one sampled token per sequence with
//! `sample` set, in order, and, aligned with those tokens, a [`TokenLogprobs`] where the
//! request asked for log-probabilities.

use super::request::SamplingParams;

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
    /// The LoRA adapter this sequence runs under (`None`: the base model).
    pub lora: Option<&'a crate::lora::Adapter>,
}

impl SeqStep<'_> {
    /// A decode step computes one token of an already prefilled sequence.
    pub fn is_decode(&self) -> bool {
        self.num_new == 1 && self.num_computed >= self.num_prompt
    }
}

/// A sampled token's log-probability under the model (before penalties and
/// temperature, as vLLM reports by default) and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// How a backend keeps one token's keys and values, for moving KV out of and into the
/// paged cache (offloading). A chunk of `t` tokens travels as `[2][layers][t][width]`
/// elements (keys, then values), LMCache's `KV_2LTD` layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub layers: usize,
    /// `kv_heads × head_dim`.
    pub width: usize,
    /// Bytes per element: 2 (f16) or 4 (f32).
    pub elem_bytes: usize,
}

impl KvLayout {
    pub fn bytes_per_token(&self) -> usize {
        2 * self.layers * self.width * self.elem_bytes
    }
}

/// The offloading tier a chunk of KV was loaded from (host memory, local disk, the
/// remote cache servers), told to the backend so that one modelling time can charge it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvTier {
    Cpu,
    Disk,
    Remote,
}
