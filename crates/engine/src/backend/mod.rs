//! Backends run one scheduled step: the prefill chunks and decodes the scheduler chose,
//! returning the next token of every sequence that reached its end.
//!
//! `sim` models the latency of a real GPU or CPU from a few parameters; `gguf` runs real
//! llama-family models on CPU; both behind the same trait. [`sampling`] is vLLM's sampler
//! (penalties, temperature, top-k/p, min-p, log-probs) over one row of logits.
//!
//! What a step is made of (the [`SeqStep`]s in, the sampled tokens and their
//! [`TokenLogprobs`] out) is the core's step contract ([`crate::core::step`]): backends
//! depend on the core for it and nothing else; the core never sees a backend.

pub mod gguf;
pub mod sampling;
pub mod sim;

use std::time::Duration;

use crate::core::step::{KvLayout, KvTier, SeqStep, TokenLogprobs};

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
    /// The shapes LoRA adapters must have to run on this backend's model; `None` for a
    /// backend without real weights (adapters are then served by name only).
    fn lora_geometry(&self) -> Option<crate::lora::Geometry> {
        None
    }
    /// How this backend keeps KV, when it keeps real KV that can be moved out and back
    /// (offloading); `None` for backends without.
    fn kv_layout(&self) -> Option<KvLayout> {
        None
    }
    /// Append the KV of `blocks` (every slot of each, in order) to `out`, laid out as
    /// [`KvLayout`] says. False when this backend keeps none.
    fn export_kv(&mut self, _blocks: &[u32], _out: &mut Vec<u8>) -> bool {
        false
    }
    /// [`Backend::export_kv`] as one payload (what the offloading tiers keep); `None`
    /// when this backend keeps none. The sim overrides it to hand out shared zeros
    /// without copying.
    fn export_kv_bytes(&mut self, blocks: &[u32]) -> Option<bytes::Bytes> {
        let mut out = Vec::new();
        self.export_kv(blocks, &mut out)
            .then(|| bytes::Bytes::from(out))
    }
    /// Write KV laid out as [`KvLayout`] says into `blocks`: `data` holds a chunk of
    /// `chunk_tokens` tokens, of which those from `first_token` on fill the blocks in
    /// order. False (nothing written) when the sizes do not fit.
    fn import_kv(
        &mut self,
        _blocks: &[u32],
        _data: &[u8],
        _chunk_tokens: usize,
        _first_token: usize,
    ) -> bool {
        false
    }
    /// A chunk of `bytes` from `tier` was just imported (`import_kv`), which took
    /// `elapsed` of real time on the loop thread. A backend that models time (sim)
    /// charges the transfer's modelled cost beyond `elapsed` to its next step; a real
    /// one has paid it already.
    fn kv_loaded(&mut self, _tier: KvTier, _bytes: usize, _elapsed: Duration) {}
    /// In virtual time (the sim backend under `switchyard plan`): the modelled duration of
    /// the step just executed, which the loop waits on tokio's clock before handing out
    /// its tokens; taken once. Zero for a backend whose steps take real time.
    fn take_modelled_time(&mut self) -> Duration {
        Duration::ZERO
    }
    /// A backend whose KV is modelled (sim): what a P/D pull of KV costs, so that the
    /// side channel moves no payload (a header saying how many bytes a real model would
    /// have moved) and the decode engine waits the modelled time instead. `None` for a
    /// backend with real KV, which moves it.
    fn kv_network_model(&self) -> Option<NetworkModel> {
        None
    }
}

/// A modelled network for P/D transfers (already scaled by the sim's `--time-scale`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NetworkModel {
    pub rtt_us: f64,
    pub gb_s: f64,
}

impl NetworkModel {
    /// Modelled time of a pull of `bytes`: one round trip plus the bytes at line rate,
    /// written straight into device memory (RDMA, as NIXL does: no host copy).
    pub fn pull_time(&self, bytes: usize) -> Duration {
        Duration::from_secs_f64((self.rtt_us + bytes as f64 / (self.gb_s * 1e3)) / 1e6)
    }
}
