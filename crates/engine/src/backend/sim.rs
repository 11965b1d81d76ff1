//! The simulated backend: a latency model on the real scheduler and block manager.
//!
//! A step lasts `overhead + prefill_per_token × new prefill tokens (cached ones are
//! free) + decode_per_seq × decodes + decode_per_ctx_token × their context length`,
//! times an optional seeded jitter, times `time_scale`. Tokens are a pure function of the
//! request's sampling seed and the position, so outputs are reproducible and do
//! not depend on batching.

use std::time::{Duration, Instant};

use super::{Backend, BackendError};
use crate::core::step::{SeqStep, TokenLogprobs};
use kv_events::hash::{mix64, unit_f64};
use tokenizer::SimTokenizer;

/// Latency-model parameters (microseconds unless named otherwise).
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct LatencyModel {
    /// Fixed cost of every step (µs).
    #[arg(long = "sim-step-overhead-us")]
    pub overhead_us: Option<f64>,
    /// Cost per computed prefill token (µs); prefix-cache hits cost nothing.
    #[arg(long = "sim-prefill-us-per-token")]
    pub prefill_us_per_token: Option<f64>,
    /// Cost per decoding sequence in the batch (µs).
    #[arg(long = "sim-decode-us-per-seq")]
    pub decode_us_per_seq: Option<f64>,
    /// Cost per context token of each decoding sequence (µs), the KV read.
    #[arg(long = "sim-decode-us-per-ctx-token")]
    pub decode_us_per_ctx_token: Option<f64>,
    /// Relative jitter of a step's duration (0.1 = ±10%), seeded.
    #[arg(long = "sim-jitter")]
    pub jitter: Option<f64>,
}

/// Resolved latency parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    pub overhead_us: f64,
    pub prefill_us_per_token: f64,
    pub decode_us_per_seq: f64,
    pub decode_us_per_ctx_token: f64,
    pub jitter: f64,
}

/// Named latency presets. See ARCHITECTURE.md for where the figures come from.
pub const PRESETS: &[(&str, Latency)] = &[
    (
        // Llama-3.1-8B, bf16, one H100 SXM (3.35 TB/s, 989 TFLOP/s dense bf16), roofline:
        // weights 16 GB read per step ≈ 4.8 ms + ~0.7 ms launch overhead; prefill 16 GFLOP
        // per token at ~50% MFU ≈ 32 µs; KV 128 KiB per context token ≈ 0.04 µs to read.
        "llama-3.1-8b-h100",
        Latency {
            overhead_us: 5500.0,
            prefill_us_per_token: 32.0,
            decode_us_per_seq: 30.0,
            decode_us_per_ctx_token: 0.04,
            jitter: 0.0,
        },
    ),
    (
        // SmolLM2-135M under real vLLM on this project's 2-core CPU machine
        // (shared/vllm-reference/bench.txt): 87.7 tok/s for one stream (11.4 ms/step),
        // 51.5 tok/s per stream at 8 (19.4 ms/step), TTFT 35 ms for a ~30-token prompt.
        "smollm2-135m-cpu",
        Latency {
            overhead_us: 11400.0,
            prefill_us_per_token: 800.0,
            decode_us_per_seq: 1150.0,
            decode_us_per_ctx_token: 0.0,
            jitter: 0.0,
        },
    ),
    (
        "zero",
        Latency {
            overhead_us: 0.0,
            prefill_us_per_token: 0.0,
            decode_us_per_seq: 0.0,
            decode_us_per_ctx_token: 0.0,
            jitter: 0.0,
        },
    ),
];

impl Latency {
    pub fn preset(name: &str) -> Option<Latency> {
        PRESETS.iter().find(|(n, _)| *n == name).map(|(_, l)| *l)
    }

    /// Apply explicit overrides on top of a preset.
    pub fn with_overrides(mut self, m: &LatencyModel) -> Latency {
        if let Some(v) = m.overhead_us {
            self.overhead_us = v;
        }
        if let Some(v) = m.prefill_us_per_token {
            self.prefill_us_per_token = v;
        }
        if let Some(v) = m.decode_us_per_seq {
            self.decode_us_per_seq = v;
        }
        if let Some(v) = m.decode_us_per_ctx_token {
            self.decode_us_per_ctx_token = v;
        }
        if let Some(v) = m.jitter {
            self.jitter = v;
        }
        self
    }

    /// Model step duration in microseconds, before jitter and time scale.
    pub fn step_us(
        &self,
        prefill_tokens: usize,
        decode_seqs: usize,
        decode_ctx_tokens: usize,
    ) -> f64 {
        if prefill_tokens == 0 && decode_seqs == 0 {
            return 0.0;
        }
        self.overhead_us
            + self.prefill_us_per_token * prefill_tokens as f64
            + self.decode_us_per_seq * decode_seqs as f64
            + self.decode_us_per_ctx_token * decode_ctx_tokens as f64
    }
}

/// Word pieces (≤ 4 bytes each, so each is one sim token) the sim backend writes.
const WORDS: &[&str] = &[
    " the", " of", " and", " to", " a", " in", " is", " it", " you", " was", " for", " on", " are",
    " as", " be", " at", " one", " by", " hot", " but", " we", " can", " out", " all", " up",
    " use", " how", " an", " she", " do", " if", " way", " so", " no", " see", " two", " day",
    " go", " my", " who", " oil", " now", " sun", " sea", " sky", " red", " big", " new", " old",
    " end", " man", " run", " far", " sat", " ask", " own", " yes", " dog", " cat", ".", ",", " I",
    " me", " air", " few", " eat", " top",
];

pub struct SimBackend {
    latency: Latency,
    time_scale: f64,
    eos_prob: f64,
    eos_token: u32,
    steps: u64,
    words: Vec<u32>,
    /// The last step's log-probabilities, aligned with its sampled tokens.
    logprobs: Vec<Option<Box<TokenLogprobs>>>,
}

impl SimBackend {
    pub fn new(latency: Latency, time_scale: f64, eos_prob: f64) -> Self {
        SimBackend {
            latency,
            time_scale,
            eos_prob,
            eos_token: tokenizer::sim::IM_END,
            steps: 0,
            words: WORDS.iter().map(|w| SimTokenizer::piece_id(w)).collect(),
            logprobs: Vec::new(),
        }
    }

    /// The log-probabilities of the sim's own distribution at output position `pos`: EOS
    /// with `eos_prob` (from the second token on, unless ignored), else each word alike.
    /// `top`: the `k` most likely tokens (ties in word order).
    pub fn logprobs_at(&self, tok: u32, pos: usize, ignore_eos: bool, k: usize) -> TokenLogprobs {
        let p_eos = if !ignore_eos && pos > 0 {
            self.eos_prob.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let word_lp = ((1.0 - p_eos) / self.words.len() as f64).ln() as f32;
        let eos_lp = p_eos.ln() as f32;
        let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
        if p_eos > 0.0 && eos_lp >= word_lp {
            top.push((self.eos_token, eos_lp));
        }
        if p_eos < 1.0 {
            top.extend(self.words.iter().map(|&w| (w, word_lp)).take(k));
        }
        if p_eos > 0.0 && eos_lp < word_lp {
            top.push((self.eos_token, eos_lp));
        }
        top.truncate(k);
        TokenLogprobs {
            logprob: if tok == self.eos_token {
                eos_lp
            } else {
                word_lp
            },
            top,
        }
    }

    /// The token at sequence position `at` (prompt and output together), output position
    /// `pos`, for a sequence with this seed. Drawn by absolute position, as the gguf
    /// sampler draws, so a continuation (prompt + the text so far, same seed) goes on
    /// with the same tokens; the first output token is never EOS.
    pub fn token_at(&self, rng_seed: u64, at: usize, pos: usize, ignore_eos: bool) -> u32 {
        let x = mix64(rng_seed ^ mix64(at as u64 + 1));
        if !ignore_eos && pos > 0 && unit_f64(mix64(x)) < self.eos_prob {
            return self.eos_token;
        }
        self.words[(x % self.words.len() as u64) as usize]
    }
}

impl Backend for SimBackend {
    fn take_logprobs(&mut self, out: &mut Vec<Option<Box<TokenLogprobs>>>) {
        out.append(&mut self.logprobs);
    }

    fn execute(
        &mut self,
        seqs: &[SeqStep<'_>],
        sampled: &mut Vec<u32>,
    ) -> Result<(), BackendError> {
        let started = Instant::now();
        let (mut prefill, mut decodes, mut ctx) = (0usize, 0usize, 0usize);
        for s in seqs {
            if s.is_decode() {
                decodes += 1;
                ctx += s.num_computed;
            } else {
                prefill += s.num_new;
            }
        }
        let mut us = self.latency.step_us(prefill, decodes, ctx);
        self.steps += 1;
        if self.latency.jitter > 0.0 {
            let u = unit_f64(mix64(self.steps)) * 2.0 - 1.0;
            us *= (1.0 + self.latency.jitter * u).max(0.0);
        }
        us *= self.time_scale;
        self.logprobs.clear();
        for s in seqs.iter().filter(|s| s.sample) {
            let pos = s.tokens.len() - s.num_prompt;
            let tok = self.token_at(s.rng_seed, s.tokens.len(), pos, s.params.ignore_eos);
            sampled.push(tok);
            let lp = s
                .params
                .logprobs
                .map(|k| Box::new(self.logprobs_at(tok, pos, s.params.ignore_eos, k as usize)));
            self.logprobs.push(lp);
        }
        if us > 0.0 {
            let deadline = started + Duration::from_secs_f64(us / 1e6);
            let now = Instant::now();
            if deadline > now {
                std::thread::sleep(deadline - now);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_describe_the_sims_own_distribution() {
        let sim = SimBackend::new(Latency::preset("zero").expect("preset"), 1.0, 0.25);
        let w = sim.words.len() as f64;
        // From the second token: EOS 0.25, each word 0.75 / w; they sum to 1.
        let lp = sim.logprobs_at(sim.words[3], 5, false, 4);
        let word = (0.75 / w).ln() as f32;
        assert!((lp.logprob - word).abs() < 1e-6);
        assert_eq!(lp.top.len(), 4);
        assert_eq!(
            lp.top[0],
            (sim.eos_token, 0.25f64.ln() as f32),
            "EOS is the likeliest"
        );
        let total: f64 = lp.top[0].1.exp() as f64 + w * (lp.top[1].1 as f64).exp();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        // First token, or EOS ignored: words only, uniform.
        for (pos, ignore) in [(0, false), (7, true)] {
            let lp = sim.logprobs_at(sim.words[0], pos, ignore, 2);
            assert!((lp.logprob - (1.0 / w).ln() as f32).abs() < 1e-6);
            assert!(lp
                .top
                .iter()
                .all(|&(t, l)| t != sim.eos_token && l == lp.logprob));
        }
        assert_eq!(
            sim.logprobs_at(sim.eos_token, 3, false, 0).logprob,
            0.25f64.ln() as f32
        );
    }

    #[test]
    fn words_are_single_sim_tokens() {
        use tokenizer::Tokenizer;
        let t = SimTokenizer::new();
        for w in WORDS {
            assert_eq!(t.encode(w).len(), 1, "{w:?}");
        }
    }

    #[test]
    fn step_time_follows_the_model() {
        let l = Latency::preset("llama-3.1-8b-h100").expect("preset");
        let us = l.step_us(1000, 0, 0);
        assert!((us - (5500.0 + 32_000.0)).abs() < 1e-6);
        assert_eq!(l.step_us(0, 0, 0), 0.0);
        let decode = l.step_us(0, 10, 10_000);
        assert!((decode - (5500.0 + 300.0 + 400.0)).abs() < 1e-6);
    }
}
