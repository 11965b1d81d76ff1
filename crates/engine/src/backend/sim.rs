//! The simulated backend: a latency model on the real scheduler and block manager.
//!
//! A step lasts `overhead + prefill_per_token × new prefill tokens (cached ones are
//! free) + decode_per_seq × decodes + decode_per_ctx_token × their context length`,
//! times an optional seeded jitter, times `time_scale`. Tokens are a pure function of the
//! request's sampling seed and the position, so outputs are reproducible and do
//! not depend on batching.
//!
//! KV offloading: each preset names the KV shape of the model it stands for
//! ([`SimKv`]: layers, KV heads, head dim, element bytes), so the sim keeps KV with
//! that model's layout and byte size and goes through the same offloading tiers as the
//! real backend (the engine loop's `kv_offload`: same keys, same layout check). Its
//! payloads are zeros (exported chunks are that many zero bytes; imports check the size
//! and write nothing). What a transfer would cost is modelled instead: a chunk saved
//! costs its device-to-host copy, a chunk loaded its read from the tier (disk or
//! network, plus a round trip) and the host-to-device copy, at the preset's bandwidths;
//! the cost (less the real time the load already took) is added to the next step.

use std::time::{Duration, Instant};

use super::{Backend, BackendError};
use crate::core::step::{KvLayout, KvTier, SeqStep, TokenLogprobs};
use kv_events::hash::{mix64, unit_f64};
use tokenizer::SimTokenizer;

/// Zeros for the sim's KV payloads: a chunk of a 70B model is 80 MiB. Never written, so
/// it stays in `.bss` (the pages read as zeros without being allocated).
static ZEROS: [u8; 128 << 20] = [0; 128 << 20];

/// `n` zero bytes: a slice of [`ZEROS`], or (beyond it) an allocation.
fn zeros(n: usize) -> bytes::Bytes {
    match ZEROS.get(..n) {
        Some(z) => bytes::Bytes::from_static(z),
        None => bytes::Bytes::from(vec![0u8; n]),
    }
}

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
    /// The KV the modelled model keeps and how fast it moves between tiers.
    pub kv: SimKv,
}

/// The KV shape of the model a preset stands for, and the bandwidths of KV transfers
/// (GB/s = 10⁹ bytes per second; `f64::INFINITY` for free).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimKv {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Bytes per element (2: f16/bf16).
    pub elem_bytes: usize,
    /// Host memory to the device: every loaded chunk ends with this copy.
    pub h2d_gb_s: f64,
    /// Device to host memory: a saved chunk's copy out of the paged cache.
    pub d2h_gb_s: f64,
    /// Reading a chunk from the local disk tier.
    pub disk_gb_s: f64,
    /// Fetching a chunk from a cache server, plus `net_rtt_us` per chunk.
    pub net_gb_s: f64,
    pub net_rtt_us: f64,
}

impl SimKv {
    /// The layout the offloading tiers see.
    pub fn layout(&self) -> KvLayout {
        KvLayout {
            layers: self.layers,
            width: self.kv_heads * self.head_dim,
            elem_bytes: self.elem_bytes,
        }
    }

    /// Modelled microseconds to load a chunk of `bytes` from `tier` into the device.
    pub fn load_us(&self, tier: KvTier, bytes: usize) -> f64 {
        let at = |gb_s: f64| bytes as f64 / (gb_s * 1e3);
        at(self.h2d_gb_s)
            + match tier {
                KvTier::Cpu => 0.0,
                KvTier::Disk => at(self.disk_gb_s),
                KvTier::Remote => self.net_rtt_us + at(self.net_gb_s),
            }
    }

    /// Modelled microseconds to copy `bytes` of KV out of the device.
    pub fn save_us(&self, bytes: usize) -> f64 {
        bytes as f64 / (self.d2h_gb_s * 1e3)
    }
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
            // Llama-3.1-8B's config: 32 layers, 8 KV heads of 128, bf16 (128 KiB per
            // token, 32 MiB per 256-token chunk). H100 SXM on PCIe Gen5 x16: 64 GB/s
            // each way on paper, ~50 GB/s measured with pinned buffers (as LMCache's
            // host buffer is). Disk: one datacenter NVMe (PCIe Gen4), ~7 GB/s
            // sequential read on paper, 5 GB/s through the file system. Network: 100 GbE
            // to the cache servers (12.5 GB/s line rate, ~10 GB/s over TCP) and 100 µs
            // for a request's round trip and the server's lookup.
            kv: SimKv {
                layers: 32,
                kv_heads: 8,
                head_dim: 128,
                elem_bytes: 2,
                h2d_gb_s: 50.0,
                d2h_gb_s: 50.0,
                disk_gb_s: 5.0,
                net_gb_s: 10.0,
                net_rtt_us: 100.0,
            },
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
            // SmolLM2-135M's config: 30 layers, 3 KV heads of 64, f16 as the gguf
            // backend keeps it (22.5 KiB per token, 5.6 MiB per chunk). On a CPU the
            // "device" is host memory: a host-tier hit is one memcpy (~5 GB/s for one
            // thread on this 2-core VM); disk ~1 GB/s (a VM's virtual disk, uncached);
            // the network is loopback to `switchyard cache-server`, which moved 6 MB
            // chunks at ~2.5 GB/s GET (BENCHMARKS.md, `bench/cache-server.sh`), with
            // ~100 µs per request.
            kv: SimKv {
                layers: 30,
                kv_heads: 3,
                head_dim: 64,
                elem_bytes: 2,
                h2d_gb_s: 5.0,
                d2h_gb_s: 5.0,
                disk_gb_s: 1.0,
                net_gb_s: 2.5,
                net_rtt_us: 100.0,
            },
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
            // A tiny shape, moved for free.
            kv: SimKv {
                layers: 1,
                kv_heads: 1,
                head_dim: 8,
                elem_bytes: 2,
                h2d_gb_s: f64::INFINITY,
                d2h_gb_s: f64::INFINITY,
                disk_gb_s: f64::INFINITY,
                net_gb_s: f64::INFINITY,
                net_rtt_us: 0.0,
            },
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

/// A sim engine's profile: its latency model and KV capacity, as a JSON file that
/// `switchyard plan calibrate` writes from a real engine's measurements and
/// `switchyard engine --backend sim --sim-profile FILE` (and `switchyard plan`) reads.
/// Every preset is also a profile ([`SimProfile::preset`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SimProfile {
    pub name: String,
    /// Where the figures come from (a preset, or the engine calibrated and when).
    #[serde(default)]
    pub source: String,
    pub overhead_us: f64,
    pub prefill_us_per_token: f64,
    pub decode_us_per_seq: f64,
    pub decode_us_per_ctx_token: f64,
    /// What a client sees of a request besides the engine's steps (HTTP, the router's
    /// hop, parsing and tokenizing), µs: `plan calibrate` fits it, `plan` adds it before
    /// each request reaches its engine. The sim engine itself ignores it.
    #[serde(default)]
    pub request_overhead_us: f64,
    /// KV blocks in the pool, and tokens per block (`None`: the engine's defaults).
    #[serde(default)]
    pub num_gpu_blocks: Option<usize>,
    #[serde(default)]
    pub block_size: Option<usize>,
    /// How well the latency model explained the calibration's measurements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fit: Option<serde_json::Value>,
}

impl SimProfile {
    /// The preset `name` as a profile.
    pub fn preset(name: &str) -> Option<SimProfile> {
        let l = Latency::preset(name)?;
        Some(SimProfile {
            name: name.to_string(),
            source: "preset".into(),
            overhead_us: l.overhead_us,
            prefill_us_per_token: l.prefill_us_per_token,
            decode_us_per_seq: l.decode_us_per_seq,
            decode_us_per_ctx_token: l.decode_us_per_ctx_token,
            request_overhead_us: 0.0,
            num_gpu_blocks: None,
            block_size: None,
            fit: None,
        })
    }

    /// A preset's name, or a profile file's path.
    pub fn load(name_or_path: &str) -> Result<SimProfile, String> {
        if let Some(p) = SimProfile::preset(name_or_path) {
            return Ok(p);
        }
        let text = std::fs::read_to_string(name_or_path).map_err(|e| {
            let known: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
            format!(
                "sim profile {name_or_path:?}: not a preset ({}) and not readable: {e}",
                known.join(", ")
            )
        })?;
        let p: SimProfile =
            serde_json::from_str(&text).map_err(|e| format!("sim profile {name_or_path}: {e}"))?;
        let costs = [
            p.overhead_us,
            p.prefill_us_per_token,
            p.decode_us_per_seq,
            p.decode_us_per_ctx_token,
            p.request_overhead_us,
        ];
        if costs.iter().any(|c| !c.is_finite() || *c < 0.0) {
            return Err(format!(
                "sim profile {name_or_path}: costs must be finite and not negative"
            ));
        }
        Ok(p)
    }

    /// The latency model: these costs, over `base`'s KV shape and bandwidths.
    pub fn latency(&self, base: Latency) -> Latency {
        Latency {
            overhead_us: self.overhead_us,
            prefill_us_per_token: self.prefill_us_per_token,
            decode_us_per_seq: self.decode_us_per_seq,
            decode_us_per_ctx_token: self.decode_us_per_ctx_token,
            ..base
        }
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
    /// Tokens per KV block (the engine's `--block-size`), for KV exports.
    block_size: usize,
    /// Modelled KV transfer time (µs, scaled) not yet charged to a step.
    pending_us: f64,
    /// Virtual time: steps do not sleep; their modelled time waits in `owed_us` for the
    /// loop ([`Backend::take_modelled_time`]).
    virtual_time: bool,
    owed_us: f64,
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
            block_size: 16,
            pending_us: 0.0,
            virtual_time: false,
            owed_us: 0.0,
        }
    }

    /// Run in virtual time: a step does not sleep, the loop waits its modelled time on
    /// tokio's (paused) clock instead.
    pub fn in_virtual_time(mut self) -> Self {
        self.virtual_time = true;
        self
    }

    /// Tokens per KV block, as the engine's block manager pages them (default 16).
    pub fn with_block_size(mut self, block_size: usize) -> Self {
        self.block_size = block_size.max(1);
        self
    }

    /// Modelled transfer time (µs, scaled) waiting to be charged to the next step.
    pub fn pending_transfer_us(&self) -> f64 {
        self.pending_us
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

    fn kv_layout(&self) -> Option<KvLayout> {
        Some(self.latency.kv.layout())
    }

    fn export_kv(&mut self, blocks: &[u32], out: &mut Vec<u8>) -> bool {
        // The bytes a real model of this shape would copy out; zeros (the tiers never
        // look inside, and the sim's tokens do not depend on KV). The copy's modelled
        // time goes to the next step.
        let n = blocks.len() * self.block_size * self.latency.kv.layout().bytes_per_token();
        out.resize(out.len() + n, 0);
        self.pending_us += self.latency.kv.save_us(n) * self.time_scale;
        true
    }

    fn export_kv_bytes(&mut self, blocks: &[u32]) -> Option<bytes::Bytes> {
        // As `export_kv`, without the copy: the tiers hold (and count) payloads of the
        // real size that all share one static page range of zeros.
        let n = blocks.len() * self.block_size * self.latency.kv.layout().bytes_per_token();
        self.pending_us += self.latency.kv.save_us(n) * self.time_scale;
        Some(zeros(n))
    }

    fn import_kv(
        &mut self,
        blocks: &[u32],
        data: &[u8],
        chunk_tokens: usize,
        first_token: usize,
    ) -> bool {
        // The same size checks as the real cache's import; nothing to write.
        data.len() == chunk_tokens * self.latency.kv.layout().bytes_per_token()
            && first_token + blocks.len() * self.block_size <= chunk_tokens
    }

    fn kv_network_model(&self) -> Option<super::NetworkModel> {
        // Scaled as every modelled time (time scale 0: free).
        Some(super::NetworkModel {
            rtt_us: self.latency.kv.net_rtt_us * self.time_scale,
            gb_s: self.latency.kv.net_gb_s / self.time_scale,
        })
    }

    fn kv_loaded(&mut self, tier: KvTier, bytes: usize, elapsed: Duration) {
        let us = self.latency.kv.load_us(tier, bytes) * self.time_scale;
        self.pending_us += (us - elapsed.as_secs_f64() * 1e6).max(0.0);
    }

    fn take_modelled_time(&mut self) -> Duration {
        Duration::from_secs_f64(std::mem::take(&mut self.owed_us).max(0.0) / 1e6)
    }

    fn execute(
        &mut self,
        seqs: &[SeqStep<'_>],
        sampled: &mut Vec<u32>,
    ) -> Result<(), BackendError> {
        let started = crate::clock::now();
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
        // KV moved since the last step (loads for requests this step admits, copies out
        // of the last step's prompts): LMCache's connector moves it around the forward
        // pass, so the step waits for it.
        us += std::mem::take(&mut self.pending_us);
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
        if self.virtual_time {
            self.owed_us += us;
        } else if us > 0.0 {
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

    /// The payloads the tiers keep are the real size, cost the modelled copy, and are
    /// not copies: every one is a slice of the same static zeros.
    #[test]
    fn exported_payloads_share_zero_pages_at_the_real_size() {
        let l = Latency::preset("llama-3.1-8b-h100").expect("preset");
        let mut sim = SimBackend::new(l, 1.0, 0.0).with_block_size(16);
        let a = sim.export_kv_bytes(&[1; 16]).expect("payload");
        let b = sim.export_kv_bytes(&[2; 16]).expect("payload");
        assert_eq!(a.len(), 256 * 128 * 1024);
        assert_eq!(a.as_ptr(), b.as_ptr(), "one static range, no copy");
        assert!(a.iter().all(|&x| x == 0));
        let copied = sim.pending_transfer_us();
        assert!(
            (copied - 2.0 * a.len() as f64 / 50e3).abs() < 1e-6,
            "{copied}"
        );
        assert!(sim.import_kv(&[3; 16], &a, 256, 0));
    }

    #[test]
    fn kv_moves_at_the_presets_size_and_its_modelled_time_goes_to_the_next_step() {
        let l = Latency::preset("llama-3.1-8b-h100").expect("preset");
        // Llama-3.1-8B: 128 KiB of KV per token, 32 MiB per 256-token chunk.
        assert_eq!(l.kv.layout().bytes_per_token(), 128 * 1024);
        let mut sim = SimBackend::new(l, 1.0, 0.0).with_block_size(16);
        assert_eq!(sim.kv_layout(), Some(l.kv.layout()));
        let mut out = Vec::new();
        assert!(sim.export_kv(&[3, 4], &mut out));
        assert_eq!(out.len(), 32 * 128 * 1024);
        // Copied out at 50 GB/s: 4194304 B -> ~84 µs.
        let saved = sim.pending_transfer_us();
        assert!((saved - 4_194_304.0 / 50e3).abs() < 1e-6, "{saved}");
        let chunk = vec![0u8; 256 * 128 * 1024];
        assert!(sim.import_kv(&[1; 16], &chunk, 256, 0));
        assert!(sim.import_kv(&[1; 15], &chunk, 256, 16), "a chunk's tail");
        assert!(
            !sim.import_kv(&[1; 16], &chunk[1..], 256, 0),
            "short payload"
        );
        assert!(!sim.import_kv(&[1; 16], &chunk, 256, 16), "past the chunk");
        // A remote chunk: 100 µs + 32 MiB at 10 GB/s + at 50 GB/s into the device.
        let remote = l.kv.load_us(KvTier::Remote, chunk.len());
        let bytes = chunk.len() as f64;
        assert!((remote - (100.0 + bytes / 10e3 + bytes / 50e3)).abs() < 1e-6);
        assert!(l.kv.load_us(KvTier::Cpu, chunk.len()) < l.kv.load_us(KvTier::Disk, chunk.len()));
        // What the load already took in real time is not charged twice.
        sim.kv_loaded(KvTier::Remote, chunk.len(), Duration::from_micros(1000));
        let pending = sim.pending_transfer_us();
        assert!(
            (pending - (saved + remote - 1000.0)).abs() < 1e-6,
            "{pending}"
        );
        sim.kv_loaded(KvTier::Cpu, chunk.len(), Duration::from_secs(1));
        assert_eq!(sim.pending_transfer_us(), pending, "never negative");
        // The next step waits for it, once.
        let params = crate::core::request::SamplingParams::default();
        let tokens = [1u32; 8];
        let step = SeqStep {
            req_id: 1,
            tokens: &tokens,
            num_prompt: 7,
            num_computed: 7,
            num_new: 1,
            block_ids: &[0],
            sample: true,
            params: &params,
            rng_seed: 1,
            lora: None,
        };
        let mut zero = SimBackend::new(Latency::preset("zero").expect("zero"), 1.0, 0.0);
        zero.pending_us = 20_000.0;
        let started = Instant::now();
        zero.execute(std::slice::from_ref(&step), &mut Vec::new())
            .expect("step");
        assert!(started.elapsed() >= Duration::from_millis(20));
        assert_eq!(zero.pending_transfer_us(), 0.0);
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
