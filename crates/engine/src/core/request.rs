//! A request as the engine core sees it: its tokens, sampling parameters, KV blocks,
//! progress through prefill and decode, and the channel its tokens go out on.

use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

use super::block_manager::SeqBlocks;
use super::step::TokenLogprobs;

/// Sampling parameters, validated by the API layer.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Output tokens at most (already capped so prompt + output fits the context).
    pub max_tokens: usize,
    pub min_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: Option<u32>,
    /// Drop tokens whose probability is below `min_p` × the top token's (0: off).
    pub min_p: f64,
    /// vLLM's: logits of tokens seen in the prompt or output are divided (if positive) or
    /// multiplied by it (1: off).
    pub repetition_penalty: f64,
    /// OpenAI's: subtracted from a logit once per occurrence in the output (0: off).
    pub frequency_penalty: f64,
    /// OpenAI's: subtracted from a logit once if it occurs in the output (0: off).
    pub presence_penalty: f64,
    pub seed: Option<u64>,
    pub ignore_eos: bool,
    pub stop_token_ids: Vec<u32>,
    /// Return each sampled token's log-probability and this many top alternatives.
    pub logprobs: Option<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_tokens: 16,
            min_tokens: 0,
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            logprobs: None,
        }
    }
}

/// Why a request finished, with vLLM's `finished_reason` label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    Abort,
    Error,
}

impl FinishReason {
    pub const ALL: [FinishReason; 4] = [
        FinishReason::Stop,
        FinishReason::Length,
        FinishReason::Abort,
        FinishReason::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
            FinishReason::Error => "error",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// How a request ended, sent with its last token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finish {
    pub reason: FinishReason,
    /// The stop token id when one of the request's `stop_token_ids` (not EOS) ended it.
    pub stop_token: Option<u32>,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
}

/// What the engine sends back on a request's channel.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// One new output token; `finish` is set on the last one; `logprobs` when asked for.
    Token {
        id: u32,
        finish: Option<Finish>,
        logprobs: Option<Box<TokenLogprobs>>,
    },
    /// The engine could not serve the request (e.g. it can never fit the KV cache).
    Rejected(String),
}

/// A request's part in prefill/decode disaggregation (vLLM's NixlConnector), as the
/// API layer hands it to the engine loop.
#[derive(Debug)]
pub enum KvTransfer {
    /// Prefill side: keep the prompt's blocks after the request ends, leased under
    /// `token`; the loop answers with the leased block ids (`None`: not leased).
    Lease {
        token: String,
        reply: tokio::sync::oneshot::Sender<Option<Vec<u32>>>,
    },
    /// Decode side: the prompt's KV pulled from the prefill engine, `[2][layers][t][width]`
    /// for `chunk_tokens` = t tokens (whole remote blocks), checked against this prompt;
    /// the loop writes it into fresh blocks and computes only the last prompt token.
    Import {
        data: Vec<u8>,
        chunk_tokens: usize,
        /// Real time the pull took (a modelling backend charges the rest).
        elapsed: std::time::Duration,
        /// `kv_load_failure_policy: fail`: a failed import rejects the request.
        fail_on_error: bool,
    },
}

/// A request submitted to the engine.
#[derive(Debug)]
pub struct NewRequest {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub arrival: Instant,
    pub events: UnboundedSender<EngineEvent>,
    /// P/D disaggregation, when the request takes part in it.
    pub kv_transfer: Option<KvTransfer>,
    /// The LoRA adapter the request runs under (`None`: the base model).
    pub lora: Option<std::sync::Arc<crate::lora::Adapter>>,
}

/// A request inside the core.
#[derive(Debug)]
pub struct Request {
    pub id: u64,
    /// Prompt then output tokens.
    pub tokens: Vec<u32>,
    pub num_prompt: usize,
    /// Tokens whose KV is computed (the next step starts here).
    pub num_computed: usize,
    pub params: SamplingParams,
    /// The sampler's seed: the request's `seed`, else the prompt's hash when greedy, else
    /// derived from the id. Output depends on this and the position only.
    pub rng_seed: u64,
    pub blocks: SeqBlocks,
    pub arrival: Instant,
    pub first_scheduled: Option<Instant>,
    pub last_token_at: Option<Instant>,
    pub cached_tokens: usize,
    pub num_preemptions: u32,
    pub events: UnboundedSender<EngineEvent>,
    /// Finishing (not aborted) leaves the blocks with the request instead of freeing
    /// them: the engine loop leases them to a decode engine (P/D prefill).
    pub hold_blocks: bool,
    /// Prompt tokens whose KV came from another engine (P/D decode), for metrics.
    pub external_tokens: usize,
    /// The LoRA adapter the request runs under (held until the request ends).
    pub lora: Option<std::sync::Arc<crate::lora::Adapter>>,
}

impl Request {
    pub fn new(r: NewRequest) -> Self {
        let rng_seed = match r.params.seed {
            Some(s) => kv_events::hash::mix64(s),
            None if r.params.temperature == 0.0 => kv_events::hash::tokens_hash(&r.prompt),
            None => kv_events::hash::mix64(r.id ^ 0xA5A5_5A5A),
        };
        let num_prompt = r.prompt.len();
        let mut tokens = r.prompt;
        tokens.reserve(r.params.max_tokens.min(1 << 16));
        Request {
            id: r.id,
            tokens,
            num_prompt,
            num_computed: 0,
            params: r.params,
            rng_seed,
            blocks: SeqBlocks {
                lora: r.lora.clone(),
                ..SeqBlocks::default()
            },
            arrival: r.arrival,
            first_scheduled: None,
            last_token_at: None,
            cached_tokens: 0,
            num_preemptions: 0,
            events: r.events,
            hold_blocks: matches!(r.kv_transfer, Some(KvTransfer::Lease { .. })),
            external_tokens: 0,
            lora: r.lora,
        }
    }

    pub fn num_output(&self) -> usize {
        self.tokens.len() - self.num_prompt
    }

    /// Tokens still to compute before the next sample.
    pub fn num_pending(&self) -> usize {
        self.tokens.len() - self.num_computed
    }
}
