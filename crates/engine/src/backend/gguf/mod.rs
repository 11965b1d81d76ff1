//! The real CPU backend: GGUF llama-family and Gemma 3 models run on the engine core's scheduler and
//! block manager. Each step packs every scheduled sequence's new tokens (prefill chunks
//! and decodes) into one forward pass; keys and values live in the block manager's paged
//! blocks ([`kv_cache`]), so a prefix-cache hit skips real work; sampling follows vLLM's
//! ([`super::sampling`]).

mod act;
pub mod attention;
#[cfg(test)]
mod kquant_ref;
pub mod kv_cache;
pub mod model;
pub mod q4;
pub mod q5;
pub mod q8;
mod scales;

use rayon::prelude::*;

use super::sampling::{sample, History};
use super::{Backend, BackendError};
use crate::core::step::{SeqStep, TokenLogprobs};
use attention::RowInfo;
use kv_cache::{KvCache, KvDtype};
use model::{Kernel, LoraGroup, Model, Plan};

pub use model::{Config, ModelError};

/// Decode batches of at least this many rows take the f32 gemm (`usize::MAX`: never, the
/// default). The Q8_0 kernel (`q8.rs`) walks the weights once per step for any number of
/// rows and won at every batch measured: on a 2-core AVX2 machine with SmolLM2-135M,
/// 216 against 160 tok/s at 32 rows and 236 against 212 at 64 (`examples/gguf_step.rs`).
/// The gemm still runs prefill, where it is about 1.25x faster.
pub const DEFAULT_DECODE_GEMM_ROWS: usize = usize::MAX;

/// Whether this CPU has what the hand-written x86-64 kernels (`q8.rs`, `attention.rs`)
/// use: AVX2, FMA and F16C (all three part of x86-64-v3). Checked once; without them the
/// kernels take their scalar loops.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// `len` reproducible pseudo-random values, uniform in `[-scale, scale)` (xorshift).
#[cfg(test)]
pub(crate) fn test_data(len: usize, seed: u64, scale: f64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale) as f32
        })
        .collect()
}

/// One worker per core (`RAYON_NUM_THREADS` overrides), named for `top -H`.
fn step_pool() -> rayon::ThreadPool {
    let build = |n| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("gguf-step-{i}"))
            .build()
    };
    // 0 lets rayon pick (RAYON_NUM_THREADS, else the number of cores); if those threads
    // cannot be spawned, one worker; if not even that, the engine cannot start.
    build(0)
        .or_else(|_| build(1))
        .unwrap_or_else(|e| panic!("cannot start the step thread pool: {e}"))
}

pub struct GgufBackend {
    model: Model,
    /// Decode rows run on the Q8_0 kernel below this many per step, on the f32 gemm from
    /// it (`usize::MAX`: always Q8_0, so a sequence's output never depends on its batch).
    decode_gemm_rows: usize,
    cache: KvCache,
    eos: Vec<u32>,
    tokens: Vec<u32>,
    sample_rows: Vec<usize>,
    logprobs: Vec<Option<Box<TokenLogprobs>>>,
    /// The step's threads: the forward pass runs inside it, so the matrix kernels,
    /// attention and candle's gemm split work over the same workers, and the engine loop
    /// thread hands over once per step rather than once per matrix.
    pool: rayon::ThreadPool,
}

impl std::fmt::Debug for GgufBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufBackend")
            .field("model", &self.model)
            .field("blocks", &self.cache.num_blocks)
            .finish_non_exhaustive()
    }
}

impl GgufBackend {
    /// `num_blocks` KV blocks of `block_size` tokens; `eos` are held back until a
    /// request's `min_tokens`.
    pub fn new(model: Model, num_blocks: usize, block_size: usize, eos: Vec<u32>) -> Self {
        Self::with_kv_dtype(model, num_blocks, block_size, eos, KvDtype::default())
    }

    /// [`GgufBackend::new`] with the KV cache's element type.
    pub fn with_kv_dtype(
        model: Model,
        num_blocks: usize,
        block_size: usize,
        eos: Vec<u32>,
        dtype: KvDtype,
    ) -> Self {
        let c = &model.cfg;
        let cache = KvCache::with_dtype(
            c.n_layers,
            num_blocks,
            block_size,
            c.n_kv_heads,
            c.head_dim,
            dtype,
        );
        GgufBackend {
            model,
            decode_gemm_rows: DEFAULT_DECODE_GEMM_ROWS,
            cache,
            eos,
            tokens: Vec::new(),
            sample_rows: Vec::new(),
            logprobs: Vec::new(),
            pool: step_pool(),
        }
    }

    /// See [`GgufBackend::decode_gemm_rows`]; `usize::MAX` makes output batch-invariant.
    pub fn with_decode_gemm_rows(mut self, rows: usize) -> Self {
        self.decode_gemm_rows = rows;
        self
    }

    pub fn config(&self) -> &Config {
        &self.model.cfg
    }
}

impl Backend for GgufBackend {
    fn take_logprobs(&mut self, out: &mut Vec<Option<Box<TokenLogprobs>>>) {
        out.append(&mut self.logprobs);
    }

    fn lora_geometry(&self) -> Option<crate::lora::Geometry> {
        Some(self.model.cfg.lora_geometry())
    }

    fn kv_layout(&self) -> Option<crate::core::step::KvLayout> {
        let (layers, width, elem_bytes) = self.cache.layout();
        Some(crate::core::step::KvLayout {
            layers,
            width,
            elem_bytes,
        })
    }

    fn export_kv(&mut self, blocks: &[u32], out: &mut Vec<u8>) -> bool {
        self.cache.export(blocks, out)
    }

    fn export_kv_bytes(&mut self, blocks: &[u32]) -> Option<bytes::Bytes> {
        // Sized up front: one copy out of the cache, no regrowth on the loop thread.
        let per_token = self.kv_layout()?.bytes_per_token();
        let mut out = Vec::with_capacity(blocks.len() * self.cache.block_size * per_token);
        self.cache
            .export(blocks, &mut out)
            .then(|| bytes::Bytes::from(out))
    }

    fn import_kv(
        &mut self,
        blocks: &[u32],
        data: &[u8],
        chunk_tokens: usize,
        first_token: usize,
    ) -> bool {
        self.cache.import(blocks, data, chunk_tokens, first_token)
    }

    fn execute(
        &mut self,
        seqs: &[SeqStep<'_>],
        sampled: &mut Vec<u32>,
    ) -> Result<(), BackendError> {
        self.tokens.clear();
        self.sample_rows.clear();
        // Prefill rows first, then decode rows, so each kind is one contiguous matrix.
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| seqs[i].is_decode());
        let mut rows = Vec::new();
        let mut split = 0;
        let mut sampled_seq = Vec::new();
        let mut lora: Vec<LoraGroup<'_>> = Vec::new();
        for &i in &order {
            let s = &seqs[i];
            let end = s.num_computed + s.num_new;
            if let Some(w) = s.lora.and_then(|a| a.weights.as_ref()) {
                let first = rows.len();
                let new_rows = first..first + s.num_new;
                match lora.iter_mut().find(|g| std::ptr::eq(g.weights, w)) {
                    Some(g) => g.rows.extend(new_rows),
                    None => lora.push(LoraGroup {
                        weights: w,
                        rows: new_rows.collect(),
                    }),
                }
            }
            if end > s.tokens.len() || end.div_ceil(self.cache.block_size) > s.block_ids.len() {
                return Err(BackendError::Failed(format!(
                    "request {}: step past its tokens or blocks",
                    s.req_id
                )));
            }
            for pos in s.num_computed..end {
                self.tokens.push(s.tokens[pos]);
                rows.push(RowInfo {
                    pos,
                    blocks: s.block_ids,
                });
            }
            if !s.is_decode() {
                split = rows.len();
            }
            if s.sample {
                self.sample_rows.push(rows.len() - 1);
                sampled_seq.push(i);
            }
        }
        if rows.is_empty() {
            return Ok(());
        }
        let decode_rows = rows.len() - split;
        let plan = Plan {
            split,
            first: Kernel::F32,
            rest: if decode_rows >= self.decode_gemm_rows {
                Kernel::F32
            } else {
                Kernel::Q8
            },
        };
        let (model, cache, tokens, sample_rows) = (
            &self.model,
            &mut self.cache,
            &self.tokens,
            &self.sample_rows,
        );
        let mut logits = self
            .pool
            .install(|| model.forward(cache, tokens, &rows, sample_rows, plan, &lora))
            .map_err(|e| BackendError::Failed(e.to_string()))?;
        let vocab = self.model.cfg.vocab;
        if logits.len() != sampled_seq.len() * vocab {
            return Err(BackendError::Failed("missing logits".into()));
        }
        // Each sampled row on the pool (a row's draw depends only on its logits, its
        // sequence and its seed, so the order rows run in changes nothing); tokens go out
        // in the order of `seqs`.
        let eos = &self.eos;
        let drawn: Vec<(u32, Option<Box<TokenLogprobs>>)> = self.pool.install(|| {
            logits
                .par_chunks_exact_mut(vocab)
                .zip(sampled_seq.par_iter())
                .map(|(row, &i)| {
                    let s = &seqs[i];
                    let end = s.num_computed + s.num_new;
                    let (prompt, output) = s.tokens[..end].split_at(s.num_prompt.min(end));
                    let h = History { prompt, output };
                    // Log-probabilities of the raw distribution, taken before sampling
                    // alters it.
                    let raw = s.params.logprobs.map(|k| (row.to_vec(), k));
                    let pick = sample(row, s.params, &h, eos, s.rng_seed, end);
                    let lp = raw.map(|(raw, k)| {
                        Box::new(super::sampling::logprobs(&raw, pick, k as usize))
                    });
                    (pick, lp)
                })
                .collect()
        });
        let mut picks = vec![0u32; seqs.len()];
        let mut lps: Vec<Option<Box<TokenLogprobs>>> = vec![None; seqs.len()];
        for ((pick, lp), &i) in drawn.into_iter().zip(&sampled_seq) {
            picks[i] = pick;
            lps[i] = lp;
        }
        self.logprobs.clear();
        self.logprobs.extend(
            seqs.iter()
                .zip(lps)
                .filter(|(s, _)| s.sample)
                .map(|(_, l)| l),
        );
        sampled.extend(
            seqs.iter()
                .zip(picks)
                .filter(|(s, _)| s.sample)
                .map(|(_, t)| t),
        );
        Ok(())
    }
}
