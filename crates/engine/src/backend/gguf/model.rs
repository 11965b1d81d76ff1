//! The forward pass of llama-family decoders (Llama, Mistral, SmolLM: `llama`; Qwen2:
//! `qwen2`; Gemma 3: `gemma3`) over a packed batch: the new tokens of many sequences (prefill chunks and
//! decodes together) go through each layer as one matrix, and attention reads every
//! sequence's keys and values from the engine's paged KV blocks.
//!
//! candle supplies the weights (GGUF loading); the `gemm` crate (candle's own) the f32
//! matrix products, called directly on our buffers. Each weight is kept
//! twice when memory allows: in a quantized form for the int8 kernels, fastest for a few
//! rows (decode, memory-bound), and in f32 for the tiled gemm, several times faster for
//! many rows (prefill chunks, big decode batches). The quantized form keeps the file's
//! own blocks where a kernel runs them: Q4_0, Q4_1 and Q4_K (`q4.rs`: exact values, half
//! the bytes of Q8_0) and Q5_0 (`q5.rs`: exact values, two thirds of Q8_0's bytes); other
//! quantized sources (Q8_0 itself, K-quants of 5 and 6 bits, and anything with a LoRA
//! update merged into it) are dequantized by candle and re-quantized to Q8_0 (`q8.rs`).
//! A fused matrix whose parts differ (Gemma 3's q and k in Q5_0 beside a v in Q8_0) is
//! kept as column segments, one per run of parts that share a kernel; the three kernels
//! take the same activations, quantized once per call (`Q8Rows`). Which rows take which
//! kernel is decided per row kind ([`Kernels`]), never by the batch they happen to share
//! a step with, unless asked to. Q/K/V and gate/up are fused into one matrix each.
//! Norms and rotary embedding (angles computed once per step) are plain loops over `f32`
//! here; attention is `attention.rs`, GeGLU `act.rs`.
//!
//! Gemma 3 as llama.cpp runs it (`src/models/gemma3.cpp`): embeddings scaled by
//! `√hidden`; RMSNorm before *and* after attention and the MLP; per-head RMSNorm of q and
//! k; GeGLU with tanh-approximated GELU; q scaled by `1/√head_dim` (`1/√(hidden/heads)`
//! for the 27B); every 6th layer global (RoPE base from the file), the other five local
//! (sliding window from the file, RoPE base 10,000); NEOX rotary pairs; final logit
//! soft-capping only when the file names it. Gemma's RMSNorm multiplies by `1 + w`:
//! llama.cpp's converter already stores `1 + w` in the GGUF (the files hold exact zeros
//! where the checkpoint had -1), so every norm here multiplies by the stored weight.

use std::fs::File;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use rayon::prelude::*;

use super::act;
use super::attention::{paged_attention_with, Heads, RowInfo};
use super::kv_cache::KvCache;
use super::q4::{self, Q4Matrix};
use super::q5::{self, Q5Matrix};
use super::q8::{Q8Matrix, Q8Rows};
use crate::lora::{Geometry, LoraWeights, LowRank, Target};
use gguf::{Gguf, Value};

/// The rows of a step that run under one LoRA adapter.
#[derive(Debug)]
pub struct LoraGroup<'a> {
    pub weights: &'a LoraWeights,
    /// Row indices into the step's packed batch.
    pub rows: Vec<usize>,
}

/// Add each group's low-rank update for `targets` (each with the offset of its slice in
/// a `stride`-wide output row) to `y`, from the layer's input `x` (`inp` wide). Rows run
/// in parallel on the step's pool; each row's sums are in a fixed order, so a row's
/// result does not depend on the others.
fn add_lora(
    groups: &[LoraGroup<'_>],
    layer: usize,
    targets: &[(Target, usize)],
    x: &[f32],
    inp: usize,
    y: &mut [f32],
    stride: usize,
) {
    use rayon::prelude::*;
    let rows = y.len() / stride.max(1);
    let mut of_row: Vec<Option<&LoraWeights>> = vec![None; rows];
    for g in groups {
        for &r in &g.rows {
            if let Some(slot) = of_row.get_mut(r) {
                *slot = Some(g.weights);
            }
        }
    }
    y.par_chunks_mut(stride)
        .zip(x.par_chunks(inp))
        .zip(of_row.par_iter())
        .for_each_init(Vec::new, |tmp, ((yr, xr), w)| {
            let Some(w) = w else { return };
            for &(t, offset) in targets {
                if let Some(lr) = w.get(layer, t) {
                    lr.apply(xr, 1, yr, stride, offset, tmp);
                }
            }
        });
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{0}")]
    Gguf(#[from] gguf::GgufError),
    #[error(
        "{path}: unsupported architecture `{arch}` (supported: llama, mistral, qwen2, gemma3)"
    )]
    Architecture { path: String, arch: String },
    #[error("{path}: {what}")]
    Bad { path: String, what: String },
    #[error("model computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// How rotary embedding pairs dimensions: llama.cpp's `NORM` (adjacent pairs; GGUF llama
/// weights are permuted for it) or `NEOX` (halves; qwen2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    Interleaved,
    Halves,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `g·σ(g)` (SwiGLU: llama, qwen2).
    Silu,
    /// GELU, tanh approximation (GeGLU: gemma).
    GeluTanh,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub arch: String,
    pub n_layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Width of a query/key/value head (`hidden / n_heads` unless the file says otherwise:
    /// Gemma 3 270M has 4 heads of 256 over 640 dims).
    pub head_dim: usize,
    pub rope_dim: usize,
    /// RoPE base of global layers (all layers without a sliding window).
    pub rope_base: f32,
    pub rope_style: RopeStyle,
    pub eps: f32,
    pub vocab: usize,
    pub context_length: usize,
    pub act: Activation,
    /// Embeddings are multiplied by this (Gemma: `√hidden`).
    pub embed_scale: Option<f32>,
    /// Multiplies `q · k` in attention.
    pub attn_scale: f32,
    /// Sliding window of local layers, in positions (0: none).
    pub sliding_window: usize,
    /// Per layer: whether it is local (sliding-window).
    pub local_layers: Vec<bool>,
    /// RoPE base of local layers.
    pub rope_base_local: f32,
    /// Final logits become `c·tanh(logits/c)`.
    pub final_softcap: Option<f32>,
    /// Gemma's extra norms: per-head q/k norms and norms after attention and the MLP.
    pub gemma_norms: bool,
}

impl Config {
    pub fn from_gguf(g: &Gguf) -> Result<Config, ModelError> {
        let path = g.path.clone();
        let arch = g.architecture().unwrap_or("").to_string();
        let rope_style = match arch.as_str() {
            "llama" | "mistral" => RopeStyle::Interleaved,
            "qwen2" | "gemma3" => RopeStyle::Halves,
            _ => {
                return Err(ModelError::Architecture {
                    path,
                    arch: if arch.is_empty() {
                        "(none)".into()
                    } else {
                        arch
                    },
                })
            }
        };
        let int = |k: &str| -> Result<usize, ModelError> {
            let key = format!("{arch}.{k}");
            g.require(&key)?
                .as_i64()
                .filter(|v| *v > 0)
                .map(|v| v as usize)
                .ok_or_else(|| ModelError::Bad {
                    path: path.clone(),
                    what: format!("`{key}` is not a positive integer"),
                })
        };
        let float = |k: &str, default: f64| {
            g.get(&format!("{arch}.{k}"))
                .and_then(Value::as_f64)
                .unwrap_or(default) as f32
        };
        let hidden = int("embedding_length")?;
        let n_heads = int("attention.head_count")?;
        let n_kv_heads = int("attention.head_count_kv").unwrap_or(n_heads);
        let explicit_heads = g.get(&format!("{arch}.attention.key_length")).is_some();
        if (!explicit_heads && hidden % n_heads != 0) || n_heads % n_kv_heads != 0 {
            return Err(ModelError::Bad {
                path,
                what: format!(
                    "{hidden} dims, {n_heads} heads, {n_kv_heads} KV heads do not divide"
                ),
            });
        }
        let head_dim = match g.get(&format!("{arch}.attention.key_length")) {
            Some(_) => int("attention.key_length")?,
            None => hidden / n_heads,
        };
        if let Some(v) = g
            .get(&format!("{arch}.attention.value_length"))
            .and_then(Value::as_i64)
        {
            if v as usize != head_dim {
                return Err(ModelError::Bad {
                    path,
                    what: format!("value heads of {v} dims differ from key heads of {head_dim}"),
                });
            }
        }
        let rope_dim = int("rope.dimension_count")
            .unwrap_or(head_dim)
            .min(head_dim);
        let vocab = g
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .map(|a| a.len())
            .unwrap_or(0);
        let n_layers = int("block_count")?;
        let gemma = arch == "gemma3";
        // Gemma 3's local layers, as llama.cpp sets them: a window from the file (none:
        // every layer global), five local layers then one global (`set_swa_pattern(6)`),
        // unless the file lists the pattern (`attention.sliding_window_pattern`: one bool
        // per layer, or a period).
        let sliding_window = if gemma {
            g.get(&format!("{arch}.attention.sliding_window"))
                .and_then(Value::as_i64)
                .filter(|v| *v > 0)
                .map_or(0, |v| v as usize)
        } else {
            0
        };
        let local_layers: Vec<bool> = if sliding_window == 0 {
            vec![false; n_layers]
        } else {
            match g.get(&format!("{arch}.attention.sliding_window_pattern")) {
                Some(Value::Array(a)) if a.len() == n_layers => a
                    .iter()
                    .map(|v| match v {
                        Value::Bool(b) => *b,
                        other => other.as_i64().unwrap_or(0) != 0,
                    })
                    .collect(),
                other => {
                    let period = other
                        .and_then(Value::as_i64)
                        .filter(|p| *p > 0)
                        .map_or(6, |p| p as usize);
                    (0..n_layers).map(|i| i % period < period - 1).collect()
                }
            }
        };
        // llama.cpp: 1/√head_dim, but 1/√(hidden/heads) for the 27B (62 layers), from
        // gemma_pytorch's `query_pre_attn_scalar`.
        let attn_scale = if gemma && n_layers == 62 {
            1.0 / ((hidden / n_heads) as f32).sqrt()
        } else {
            1.0 / (head_dim as f32).sqrt()
        };
        let final_softcap = g
            .get(&format!("{arch}.final_logit_softcapping"))
            .and_then(Value::as_f64)
            .filter(|c| *c > 0.0)
            .map(|c| c as f32);
        Ok(Config {
            n_layers,
            act: if gemma {
                Activation::GeluTanh
            } else {
                Activation::Silu
            },
            embed_scale: gemma.then(|| (hidden as f32).sqrt()),
            attn_scale,
            sliding_window,
            local_layers,
            rope_base_local: float("rope.freq_base_swa", 10_000.0),
            final_softcap,
            gemma_norms: gemma,
            hidden,
            ffn: int("feed_forward_length")?,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_dim: rope_dim & !1,
            rope_base: float("rope.freq_base", 10_000.0),
            rope_style,
            eps: float(
                "attention.layer_norm_rms_epsilon",
                if gemma { 1e-6 } else { 1e-5 },
            ),
            vocab,
            context_length: int("context_length").unwrap_or(4096),
            arch,
        })
    }
}

impl Config {
    /// The shapes a LoRA adapter for this model must have.
    pub fn lora_geometry(&self) -> Geometry {
        Geometry {
            layers: self.n_layers,
            hidden: self.hidden,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            ffn: self.ffn,
            permute_qk: self.rope_style == RopeStyle::Interleaved,
        }
    }

    /// Width of all query heads together (`hidden` for llama-family models).
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
}

/// Which matrix kernel a group of rows uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Int8 dot products on the Q8_0 copy (activations quantized per row), `q8.rs`.
    Q8,
    /// f32 tiled gemm on the f32 copy.
    F32,
}

/// Which kernel each row of a step uses: rows `[0, split)` take `first`, the rest `rest`.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub split: usize,
    pub first: Kernel,
    pub rest: Kernel,
}

/// A matrix for the int8 kernels, in the form its source allows.
enum Quant {
    /// The file's own 4-bit blocks (Q4_0, Q4_1, Q4_K): `q4.rs`, half Q8_0's bytes.
    Q4(Q4Matrix),
    /// The file's own Q5_0 blocks: `q5.rs`, two thirds of Q8_0's bytes.
    Q5(Q5Matrix),
    /// Q8_0 (`q8.rs`): any other source, dequantized by candle and re-quantized.
    Q8(Q8Matrix),
}

impl Quant {
    fn matmul(&self, x: &Q8Rows, out: &mut [f32]) {
        match self {
            Quant::Q4(q) => q.matmul(x, out),
            Quant::Q5(q) => q.matmul(x, out),
            Quant::Q8(q) => q.matmul(x, out),
        }
    }
}

/// A weight matrix `[out, in]` applied to rows: `y = x Wᵀ (+ b)`.
struct Linear {
    /// The quantized form (none when no part of the matrix was quantized): column
    /// segments `(width, matrix)` in output order, one per run of consecutive parts
    /// (q, k, v; gate, up) that share a kernel, so each part keeps the file's own blocks
    /// where a kernel runs them (Gemma 3's q, k in Q5_0 beside a v in Q8_0).
    quant: Vec<(usize, Quant)>,
    /// Row-major `[out, in]`, for the f32 gemm.
    f32: Option<Vec<f32>>,
    out: usize,
    bias: Option<Vec<f32>>,
}

impl Linear {
    /// `y = x Wᵀ` on the quantized form, `y` being `[rows, out]`: each segment into its
    /// own columns. A row's values depend only on that row (each kernel's invariant).
    fn quant_matmul(&self, xq: &Q8Rows, rows: usize, y: &mut [f32]) {
        if let [(_, q)] = self.quant.as_slice() {
            q.matmul(xq, y);
            return;
        }
        let mut part = Vec::new();
        let mut c0 = 0;
        for (cols, q) in &self.quant {
            part.clear();
            part.resize(rows * cols, 0f32);
            q.matmul(xq, &mut part);
            for (dst, src) in y.chunks_exact_mut(self.out).zip(part.chunks_exact(*cols)) {
                dst[c0..c0 + cols].copy_from_slice(src);
            }
            c0 += cols;
        }
    }

    fn forward(&self, x: &[f32], rows: usize, kernel: Kernel) -> Result<Vec<f32>, ModelError> {
        let inp = x.len() / rows.max(1);
        let quantized = !self.quant.is_empty();
        let mut y = match (kernel, &self.f32) {
            (Kernel::Q8, _) | (Kernel::F32, None) if quantized => {
                thread_local! {
                    static ROWS: std::cell::RefCell<Q8Rows> = Default::default();
                }
                let mut y = vec![0f32; rows * self.out];
                ROWS.with_borrow_mut(|xq| {
                    xq.quantize(x, inp);
                    self.quant_matmul(xq, rows, &mut y);
                });
                y
            }
            (_, Some(w)) => {
                let mut y = vec![0f32; rows * self.out];
                gemm_f32(x, rows, inp, w, self.out, &mut y);
                y
            }
            (_, None) => unreachable!("a Linear holds at least one form"),
        };
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(self.out) {
                for (v, bb) in row.iter_mut().zip(b) {
                    *v += bb;
                }
            }
        }
        Ok(y)
    }

    /// Rows `[0, split)` with `first`, the rest with `rest`, as one result.
    fn forward_split(
        &self,
        x: &[f32],
        rows: usize,
        split: usize,
        first: Kernel,
        rest: Kernel,
    ) -> Result<Vec<f32>, ModelError> {
        if split == 0 || split >= rows || first == rest {
            return self.forward(x, rows, if split == 0 { rest } else { first });
        }
        let inp = x.len() / rows;
        let mut a = self.forward(&x[..split * inp], split, first)?;
        a.extend(self.forward(&x[split * inp..], rows - split, rest)?);
        Ok(a)
    }

    fn f32_bytes(&self) -> usize {
        self.f32.as_ref().map_or(0, |w| w.len() * 4)
    }
}

/// `y = x Wᵀ` for row-major `x` (`[m, k]`) and `w` (`[n, k]`), into `y` (`[m, n]`), on
/// the current rayon pool: the call candle's CPU matmul makes, without copying the
/// operands into tensors and the result out of one.
fn gemm_f32(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, y: &mut [f32]) {
    assert!(
        x.len() >= m * k && w.len() >= n * k && y.len() >= m * n,
        "gemm operands too short for [{m}, {k}] x [{n}, {k}]ᵀ"
    );
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the assert bounds every element the strides reach: x's rows are k apart,
    // w's k apart (read as the columns of Wᵀ), y's n apart.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Gemma's extra norms in a layer.
struct GemmaNorms {
    /// Per query/key head, over `head_dim`.
    q: Vec<f32>,
    k: Vec<f32>,
    /// On the attention's and the MLP's output, before each joins the residual.
    post_attn: Vec<f32>,
    post_ffn: Vec<f32>,
}

struct Layer {
    attn_norm: Vec<f32>,
    qkv: Linear,
    wo: Linear,
    ffn_norm: Vec<f32>,
    gate_up: Linear,
    down: Linear,
    gemma: Option<GemmaNorms>,
    /// Sliding-window layer (local RoPE base, window in attention).
    local: bool,
}

/// Steps of at least this many rows split their rotary embedding across the step's pool.
const PAR_ROWS: usize = 64;

/// Activations of at least this many values (rows × FFN width) split across the step's
/// pool: SiLU is a libm `exp` per value, about 0.1 ms for 16 SmolLM2 rows of 1,536, which
/// ran on one core while the other waited (each value's bits are the same either way).
const PAR_ACT: usize = 8192;

/// The f32 copies of quantized weights are kept up to this size (about a 1B model).
pub const DEFAULT_F32_BUDGET_BYTES: usize = 4 << 30;

/// A tied output head gets an f32 copy (beside the embedding table's) only up to this size.
const TIED_F32_MAX_BYTES: usize = 256 << 20;

/// A loaded model.
pub struct Model {
    pub cfg: Config,
    embed: Vec<f32>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Linear,
    /// Per rotary pair: the inverse frequency (global layers).
    inv_freq: Vec<f32>,
    /// The same for local (sliding-window) layers.
    inv_freq_local: Vec<f32>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

struct Loader<'a> {
    content: gguf_file::Content,
    file: File,
    path: &'a str,
}

impl Loader<'_> {
    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }
    fn q(&mut self, name: &str) -> Result<QTensor, ModelError> {
        if !self.has(name) {
            return Err(ModelError::Bad {
                path: self.path.to_string(),
                what: format!("missing tensor `{name}`"),
            });
        }
        Ok(self.content.tensor(&mut self.file, name, &Device::Cpu)?)
    }
    fn vec(&mut self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let v = self
            .q(name)?
            .dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if v.len() != len {
            return Err(ModelError::Bad {
                path: self.path.to_string(),
                what: format!("tensor `{name}` has {} values, expected {len}", v.len()),
            });
        }
        Ok(v)
    }
    /// Several `[out_i, in]` matrices stacked into one `[Σ out_i, in]`: when any part was
    /// quantized, in the file's own blocks for parts in Q4_0/Q4_1/Q4_K or Q5_0 and in
    /// Q8_0 for the others (column segments, [`Linear::quant`]); and in f32 (for the
    /// gemm, while the budget allows).
    fn linear(
        &mut self,
        names: &[String],
        inp: usize,
        outs: &[usize],
        biases: bool,
    ) -> Result<Linear, ModelError> {
        self.linear_merged(names, inp, outs, biases, &[])
    }

    /// [`Loader::linear`] with low-rank updates merged into the parts before they are
    /// quantized (`deltas[i]` for part `i`): the merged-weights reference for LoRA.
    fn linear_merged(
        &mut self,
        names: &[String],
        inp: usize,
        outs: &[usize],
        biases: bool,
        deltas: &[Option<&LowRank>],
    ) -> Result<Linear, ModelError> {
        let mut parts = Vec::with_capacity(names.len());
        let mut quantized = false;
        // Per part, the file's own blocks where a kernel runs them as they are (and no
        // low-rank update is merged into them).
        let mut sources = Vec::with_capacity(names.len());
        for (i, (name, &out)) in names.iter().zip(outs).enumerate() {
            let q = self.q(name)?;
            quantized |= !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
            let merged = matches!(deltas.get(i), Some(Some(_)));
            let dtype = q.dtype();
            sources.push(if merged {
                Source::Widened
            } else if q4::supports(dtype) {
                let raw = q.data()?;
                q4::decode(dtype, &raw).map_or(Source::Widened, |b| {
                    Source::Q4(b, q4::decode_super(dtype, &raw))
                })
            } else if q5::supports(dtype) {
                q5::decode(dtype, &q.data()?).map_or(Source::Widened, Source::Q5)
            } else {
                Source::Widened
            });
            let mut t = q.dequantize(&Device::Cpu)?;
            if t.dims() != [out, inp] {
                return Err(ModelError::Bad {
                    path: self.path.to_string(),
                    what: format!("tensor `{name}` is {:?}, expected [{out}, {inp}]", t.dims()),
                });
            }
            if let Some(Some(d)) = deltas.get(i) {
                let mut w = t.flatten_all()?.to_vec1::<f32>()?;
                for (o, row) in w.chunks_exact_mut(inp).enumerate() {
                    for k in 0..d.rank {
                        let b = d.b[o * d.rank + k];
                        for (v, a) in row.iter_mut().zip(&d.a[k * inp..(k + 1) * inp]) {
                            *v += b * a;
                        }
                    }
                }
                t = Tensor::from_vec(w, (out, inp), &Device::Cpu)?;
            }
            parts.push(t);
        }
        let out: usize = outs.iter().sum();
        let w = if parts.len() == 1 {
            parts.pop().unwrap_or_else(|| unreachable!())
        } else {
            Tensor::cat(&parts, 0)?
        };
        let w = w.flatten_all()?.to_vec1::<f32>()?;
        let quant = if quantized {
            quant_segments(sources, outs, inp, &w)?
        } else {
            Vec::new()
        };
        let f32 = Some(w);
        let bias = if biases {
            let mut b = Vec::with_capacity(out);
            for (name, &o) in names.iter().zip(outs) {
                let bname = name.replace(".weight", ".bias");
                if self.has(&bname) {
                    b.extend(self.vec(&bname, o)?);
                } else {
                    b.extend(std::iter::repeat_n(0.0, o));
                }
            }
            Some(b)
        } else {
            None
        };
        Ok(Linear {
            quant,
            f32,
            out,
            bias,
        })
    }
}

/// How a part of a [`Linear`] reaches the int8 kernels.
enum Source {
    /// Its own 4-bit blocks (and Q4_K's per-256 factors).
    Q4(Vec<q4::Block>, Option<Vec<(half::f16, half::f16)>>),
    /// Its own Q5_0 blocks.
    Q5(Vec<q5::Block5>),
    /// Its values (candle's dequantization, with any low-rank update merged), to Q8_0.
    Widened,
}

/// The quantized segments of a matrix whose parts (`outs[i]` rows each, `inp` wide,
/// stacked in `w`) come from `sources`: consecutive parts of one kind share a segment;
/// shapes the kernels cannot take (widths that are not whole blocks) leave none.
fn quant_segments(
    sources: Vec<Source>,
    outs: &[usize],
    inp: usize,
    w: &[f32],
) -> Result<Vec<(usize, Quant)>, ModelError> {
    let kind = |s: &Source| match s {
        Source::Q4(..) => 0,
        Source::Q5(_) => 1,
        Source::Widened => 2,
    };
    let mut segments = Vec::new();
    let (mut row0, mut i) = (0, 0);
    while i < sources.len() {
        let mut j = i + 1;
        while j < sources.len() && kind(&sources[j]) == kind(&sources[i]) {
            j += 1;
        }
        let rows: usize = outs[i..j].iter().sum();
        let q = match kind(&sources[i]) {
            0 => {
                let b: Vec<q4::Block> = sources[i..j]
                    .iter()
                    .flat_map(|s| match s {
                        Source::Q4(b, _) => b.as_slice(),
                        _ => &[],
                    })
                    .copied()
                    .collect();
                // Q4_K's factors when every part has them.
                let sup: Option<Vec<_>> = sources[i..j]
                    .iter()
                    .map(|s| match s {
                        Source::Q4(_, Some(f)) => Some(f.as_slice()),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()
                    .map(|parts| parts.concat());
                Q4Matrix::from_blocks_super(&b, sup.as_deref(), rows, inp).map(Quant::Q4)
            }
            1 => {
                let b: Vec<q5::Block5> = sources[i..j]
                    .iter()
                    .flat_map(|s| match s {
                        Source::Q5(b) => b.as_slice(),
                        _ => &[],
                    })
                    .copied()
                    .collect();
                Q5Matrix::from_blocks(&b, rows, inp).map(Quant::Q5)
            }
            _ => {
                let v = &w[row0 * inp..(row0 + rows) * inp];
                Q8Matrix::quantize(v, rows, inp).map(Quant::Q8)
            }
        };
        match q {
            Some(q) => segments.push((rows, q)),
            None => return Ok(Vec::new()),
        }
        row0 += rows;
        i = j;
    }
    Ok(segments)
}

impl Model {
    /// Load the weights of the GGUF model whose header is `g`.
    pub fn load(g: &Gguf) -> Result<Model, ModelError> {
        Self::load_with(g, DEFAULT_F32_BUDGET_BYTES)
    }

    /// [`Model::load`], keeping the f32 copies (the prefill gemm's) only while they fit
    /// `f32_budget` bytes; with none, prefill runs on the Q8_0 kernel too.
    pub fn load_with(g: &Gguf, f32_budget: usize) -> Result<Model, ModelError> {
        Self::load_inner(g, f32_budget, None)
    }

    /// The model with a LoRA adapter merged into its weights before they are quantized
    /// (as llama.cpp's `llama-export-lora` merges): the reference the engine's unmerged,
    /// per-row adapters are checked against.
    pub fn load_merged(g: &Gguf, lora: &LoraWeights) -> Result<Model, ModelError> {
        Self::load_inner(g, DEFAULT_F32_BUDGET_BYTES, Some(lora))
    }

    fn load_inner(
        g: &Gguf,
        f32_budget: usize,
        lora: Option<&LoraWeights>,
    ) -> Result<Model, ModelError> {
        let cfg = Config::from_gguf(g)?;
        let path = Path::new(&g.path);
        let mut file = File::open(path).map_err(|e| ModelError::Bad {
            path: g.path.clone(),
            what: e.to_string(),
        })?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| ModelError::Bad {
            path: g.path.clone(),
            what: format!("reading tensors: {e}"),
        })?;
        let mut ld = Loader {
            content,
            file,
            path: &g.path,
        };
        let h = cfg.hidden;
        let embed_q = ld.q("token_embd.weight")?;
        let embed = embed_q
            .dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let vocab = embed.len() / h;
        if vocab == 0 || embed.len() != vocab * h {
            return Err(ModelError::Bad {
                path: g.path.clone(),
                what: format!("token_embd.weight has {} values for {h} dims", embed.len()),
            });
        }
        let biases = cfg.arch == "qwen2";
        let kv = cfg.n_kv_heads * cfg.head_dim;
        let qd = cfg.q_dim();
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            let gemma = if cfg.gemma_norms {
                Some(GemmaNorms {
                    q: ld.vec(&n("attn_q_norm"), cfg.head_dim)?,
                    k: ld.vec(&n("attn_k_norm"), cfg.head_dim)?,
                    post_attn: ld.vec(&n("post_attention_norm"), h)?,
                    post_ffn: ld.vec(&n("post_ffw_norm"), h)?,
                })
            } else {
                None
            };
            let d = |t: Target| lora.and_then(|l| l.get(i, t));
            layers.push(Layer {
                attn_norm: ld.vec(&n("attn_norm"), h)?,
                qkv: ld.linear_merged(
                    &[n("attn_q"), n("attn_k"), n("attn_v")],
                    h,
                    &[qd, kv, kv],
                    biases,
                    &[d(Target::Q), d(Target::K), d(Target::V)],
                )?,
                wo: ld.linear_merged(&[n("attn_output")], qd, &[h], false, &[d(Target::O)])?,
                ffn_norm: ld.vec(&n("ffn_norm"), h)?,
                gate_up: ld.linear_merged(
                    &[n("ffn_gate"), n("ffn_up")],
                    h,
                    &[cfg.ffn, cfg.ffn],
                    false,
                    &[d(Target::Gate), d(Target::Up)],
                )?,
                down: ld.linear_merged(
                    &[n("ffn_down")],
                    cfg.ffn,
                    &[h],
                    false,
                    &[d(Target::Down)],
                )?,
                gemma,
                local: cfg.local_layers.get(i).copied().unwrap_or(false),
            });
        }
        let norm = ld.vec("output_norm.weight", h)?;
        let lm_head = if ld.has("output.weight") {
            ld.linear(&["output.weight".to_string()], h, &[vocab], false)?
        } else {
            // Tied embeddings: the output projection is the embedding matrix. A quantized
            // one too big for a cheap second f32 copy (Gemma's 262,144 x 640: 671 MB) is
            // kept in Q8_0 only: the head only runs on the few rows that sample.
            let q8 = match embed_q.dtype() {
                GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => None,
                _ => Q8Matrix::quantize(&embed, vocab, h),
            };
            let f32 = if q8.is_some() && embed.len() * 4 > TIED_F32_MAX_BYTES {
                None
            } else {
                Some(embed.clone())
            };
            Linear {
                quant: q8.map(|q| vec![(vocab, Quant::Q8(q))]).unwrap_or_default(),
                f32,
                out: vocab,
                bias: None,
            }
        };
        let pairs = cfg.rope_dim / 2;
        let freq_factors = if ld.has("rope_freqs.weight") {
            Some(ld.vec("rope_freqs.weight", pairs)?)
        } else {
            None
        };
        let inv_freq_for = |base: f32| -> Vec<f32> {
            (0..pairs)
                .map(|i| {
                    let f = 1.0 / base.powf(2.0 * i as f32 / cfg.rope_dim as f32);
                    f / freq_factors.as_ref().map_or(1.0, |ff| ff[i])
                })
                .collect()
        };
        let inv_freq = inv_freq_for(cfg.rope_base);
        let inv_freq_local = inv_freq_for(cfg.rope_base_local);
        let cfg = Config { vocab, ..cfg };
        let mut model = Model {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            inv_freq_local,
        };
        model.fit_f32_budget(f32_budget);
        Ok(model)
    }

    fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(|l| [&mut l.qkv, &mut l.wo, &mut l.gate_up, &mut l.down])
            .chain(std::iter::once(&mut self.lm_head))
    }

    /// Keep the f32 copies only if they fit `budget` bytes (else Q8_0 everywhere, where a
    /// Q8_0 copy exists).
    fn fit_f32_budget(&mut self, budget: usize) {
        let total: usize = self.linears_mut().map(|l| l.f32_bytes()).sum();
        if total > budget {
            for l in self.linears_mut() {
                if !l.quant.is_empty() {
                    l.f32 = None;
                }
            }
        }
    }

    /// Whether f32 copies are kept (prefill and big batches run on the gemm).
    pub fn has_f32(&self) -> bool {
        self.layers.iter().all(|l| l.qkv.f32.is_some())
    }

    fn rms_norm(&self, x: &[f32], w: &[f32], out: &mut Vec<f32>) {
        out.clear();
        out.resize(x.len(), 0.0);
        rms_norm(x, w, self.cfg.hidden, self.cfg.eps, out);
    }

    /// `(sin, cos)` of each row's position times each of `inv_freq`'s frequencies, row
    /// after row: computed once per step for every layer and head that rotates by them.
    fn rope_angles(positions: &[usize], inv_freq: &[f32]) -> Vec<(f32, f32)> {
        positions
            .iter()
            .flat_map(|&pos| inv_freq.iter().map(move |&f| (pos as f32 * f).sin_cos()))
            .collect()
    }

    /// Rotate the first `rope_dim` dims of each head of each row by its position, by the
    /// row's `angles` (from [`Self::rope_angles`]).
    fn rope(&self, x: &mut [f32], heads: usize, angles: &[(f32, f32)]) {
        let hd = self.cfg.head_dim;
        let half = self.cfg.rope_dim / 2;
        let style = self.cfg.rope_style;
        let rotate = |(row, angles): (&mut [f32], &[(f32, f32)])| {
            for head in row.chunks_exact_mut(hd) {
                for (i, &(sin, cos)) in angles.iter().enumerate() {
                    let (a, b) = match style {
                        RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                        RopeStyle::Halves => (i, i + half),
                    };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * cos - x1 * sin;
                    head[b] = x0 * sin + x1 * cos;
                }
            }
        };
        if half == 0 {
            return;
        }
        if angles.len() / half >= PAR_ROWS {
            x.par_chunks_mut(heads * hd)
                .zip(angles.par_chunks(half))
                .for_each(rotate);
        } else {
            x.chunks_mut(heads * hd)
                .zip(angles.chunks(half))
                .for_each(rotate);
        }
    }

    /// Run the packed batch: `tokens[r]` at `rows[r]`'s position in its sequence. Keys and
    /// values of every row are written to the cache first; attention then reads positions
    /// `0..=pos` of the row's sequence from it. Returns the logits (`[sample_rows, vocab]`)
    /// of the rows listed in `sample_rows`.
    pub fn forward(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        rows: &[RowInfo<'_>],
        sample_rows: &[usize],
        plan: Plan,
        lora: &[LoraGroup<'_>],
    ) -> Result<Vec<f32>, ModelError> {
        let Plan { split, first, rest } = plan;
        let cfg = &self.cfg;
        let (h, hd, nh, nkv) = (cfg.hidden, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads);
        let qd = cfg.q_dim();
        let t = tokens.len();
        let positions: Vec<usize> = rows.iter().map(|r| r.pos).collect();
        let angles = Self::rope_angles(&positions, &self.inv_freq);
        let angles_local = if self.layers.iter().any(|l| l.local) {
            Self::rope_angles(&positions, &self.inv_freq_local)
        } else {
            Vec::new()
        };
        let mut x = Vec::with_capacity(t * h);
        for &tok in tokens {
            let i = (tok as usize).min(cfg.vocab.saturating_sub(1));
            x.extend_from_slice(&self.embed[i * h..(i + 1) * h]);
        }
        if let Some(s) = cfg.embed_scale {
            x.iter_mut().for_each(|v| *v *= s);
        }
        let mut normed = Vec::new();
        let mut attn = vec![0.0f32; t * qd];
        let kvw = nkv * hd;
        let mut q = vec![0.0f32; t * qd];
        let mut k = vec![0.0f32; t * kvw];
        let mut v = vec![0.0f32; t * kvw];
        let mut post = Vec::new();
        for (li, layer) in self.layers.iter().enumerate() {
            self.rms_norm(&x, &layer.attn_norm, &mut normed);
            let mut qkv = layer.qkv.forward_split(&normed, t, split, first, rest)?;
            let w = qd + 2 * kvw;
            if !lora.is_empty() {
                let targets = [(Target::Q, 0), (Target::K, qd), (Target::V, qd + kvw)];
                add_lora(lora, li, &targets, &normed, h, &mut qkv, w);
            }
            for r in 0..t {
                let row = &qkv[r * w..(r + 1) * w];
                q[r * qd..(r + 1) * qd].copy_from_slice(&row[..qd]);
                k[r * kvw..(r + 1) * kvw].copy_from_slice(&row[qd..qd + kvw]);
                v[r * kvw..(r + 1) * kvw].copy_from_slice(&row[qd + kvw..]);
            }
            if let Some(g) = &layer.gemma {
                rms_norm_in_place(&mut q, &g.q, hd, cfg.eps);
                rms_norm_in_place(&mut k, &g.k, hd, cfg.eps);
            }
            let angles = if layer.local { &angles_local } else { &angles };
            self.rope(&mut q, nh, angles);
            self.rope(&mut k, nkv, angles);
            cache.write(li, rows, &k, &v);
            let heads = Heads {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                scale: cfg.attn_scale,
                window: if layer.local { cfg.sliding_window } else { 0 },
            };
            paged_attention_with(cache, li, rows, &q, &heads, &mut attn);
            let mut o = layer.wo.forward_split(&attn, t, split, first, rest)?;
            if !lora.is_empty() {
                add_lora(lora, li, &[(Target::O, 0)], &attn, qd, &mut o, h);
            }
            if let Some(g) = &layer.gemma {
                post.clone_from(&o);
                rms_norm(&post, &g.post_attn, h, cfg.eps, &mut o);
            }
            for (xv, ov) in x.iter_mut().zip(&o) {
                *xv += ov;
            }
            self.rms_norm(&x, &layer.ffn_norm, &mut normed);
            let mut gu = layer
                .gate_up
                .forward_split(&normed, t, split, first, rest)?;
            let ff = cfg.ffn;
            if !lora.is_empty() {
                let targets = [(Target::Gate, 0), (Target::Up, ff)];
                add_lora(lora, li, &targets, &normed, h, &mut gu, 2 * ff);
            }
            let mut act = vec![0.0f32; t * ff];
            let silu = cfg.act == Activation::Silu;
            let glu = |(a, row): (&mut [f32], &[f32])| {
                let (g, u) = row.split_at(ff);
                if silu {
                    for ((a, g), u) in a.iter_mut().zip(g).zip(u) {
                        *a = g / (1.0 + (-g).exp()) * u;
                    }
                } else {
                    act::geglu(g, u, a);
                }
            };
            if t * ff >= PAR_ACT {
                act.par_chunks_mut(ff)
                    .zip(gu.par_chunks(2 * ff))
                    .for_each(glu);
            } else {
                act.chunks_mut(ff).zip(gu.chunks(2 * ff)).for_each(glu);
            }
            let mut d = layer.down.forward_split(&act, t, split, first, rest)?;
            if !lora.is_empty() {
                add_lora(lora, li, &[(Target::Down, 0)], &act, ff, &mut d, h);
            }
            if let Some(g) = &layer.gemma {
                post.clone_from(&d);
                rms_norm(&post, &g.post_ffn, h, cfg.eps, &mut d);
            }
            for (xv, dv) in x.iter_mut().zip(&d) {
                *xv += dv;
            }
        }
        let mut last = Vec::with_capacity(sample_rows.len() * h);
        for &r in sample_rows {
            last.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        if last.is_empty() {
            return Ok(Vec::new());
        }
        self.rms_norm(&last.clone(), &self.norm, &mut last);
        let lm_split = sample_rows.iter().filter(|&&r| r < split).count();
        let mut logits =
            self.lm_head
                .forward_split(&last, sample_rows.len(), lm_split, first, rest)?;
        if let Some(c) = cfg.final_softcap {
            logits.iter_mut().for_each(|v| *v = c * (*v / c).tanh());
        }
        Ok(logits)
    }
}

/// RMSNorm of each `width`-wide row of `x` into `out` (same length), times `w`.
pub fn rms_norm(x: &[f32], w: &[f32], width: usize, eps: f32, out: &mut [f32]) {
    out.chunks_mut(width)
        .zip(x.chunks(width))
        .for_each(|(o, row)| {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
            let scale = 1.0 / (ms + eps).sqrt();
            for ((o, v), w) in o.iter_mut().zip(row).zip(w) {
                *o = v * scale * w;
            }
        });
}

/// [`rms_norm`] in place (per head: `width` is the head's).
pub fn rms_norm_in_place(x: &mut [f32], w: &[f32], width: usize, eps: f32) {
    x.chunks_mut(width).for_each(|row| {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
        let scale = 1.0 / (ms + eps).sqrt();
        for (v, w) in row.iter_mut().zip(w) {
            *v = *v * scale * w;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64, scale: f64) -> Vec<f32> {
        super::super::test_data(len, seed, scale)
    }

    /// RMSNorm against an f64 reference, with Gemma's `1 + w` weights (as llama.cpp's
    /// converter stores them: the norm multiplies by the stored value) and per head.
    #[test]
    fn rms_norm_matches_a_scalar_reference() {
        let (rows, width, eps) = (5, 640, 1e-6f32);
        let x = data(rows * width, 1, 3.0);
        // A checkpoint's raw Gemma weights w, stored as 1 + w (exact zeros where w = -1).
        let raw = data(width, 2, 1.0);
        let stored: Vec<f32> = raw.iter().map(|w| 1.0 + w).collect();
        let mut out = vec![0f32; x.len()];
        rms_norm(&x, &stored, width, eps, &mut out);
        let mut inplace = x.clone();
        rms_norm_in_place(&mut inplace, &stored, width, eps);
        for r in 0..rows {
            let row = &x[r * width..(r + 1) * width];
            let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / width as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            for d in 0..width {
                let want = row[d] as f64 * inv * (1.0 + raw[d] as f64);
                for got in [out[r * width + d], inplace[r * width + d]] {
                    assert!(
                        (got as f64 - want).abs() < 1e-5 * want.abs().max(1.0),
                        "row {r} dim {d}: {got} vs {want}"
                    );
                }
            }
        }
        // Per-head norms (q/k: width = head_dim) normalize each head on its own.
        let (heads, hd) = (4, 256);
        let q = data(heads * hd, 3, 2.0);
        let w = data(hd, 4, 1.0);
        let mut per_head = q.clone();
        rms_norm_in_place(&mut per_head, &w, hd, eps);
        for h in 0..heads {
            let mut one = vec![0f32; hd];
            rms_norm(&q[h * hd..(h + 1) * hd], &w, hd, eps, &mut one);
            assert_eq!(&per_head[h * hd..(h + 1) * hd], &one[..]);
        }
    }

    /// A fused matrix whose parts differ (q and k in Q5_0, v in Q8_0, as in Gemma 3's
    /// odd layers) keeps the Q5_0 parts in their own blocks and the Q8_0 part in Q8_0, as
    /// two column segments; its product equals the f32 product of the file's values
    /// within the activations' Q8_0 rounding, and a row's values are the same bits alone
    /// and in a batch.
    #[test]
    fn mixed_parts_keep_their_own_kernels() {
        let (inp, outs) = (96usize, [40usize, 13, 13]);
        let bytes = |len: usize, seed: u64| -> Vec<u8> {
            data(len, seed, 1.0)
                .iter()
                .map(|v| ((v + 1.0) * 127.99) as u8)
                .collect()
        };
        let with_scales = |mut raw: Vec<u8>, size: usize, seed: u64| {
            let len = raw.len();
            for (b, s) in raw.chunks_exact_mut(size).zip(data(len / size, seed, 0.01)) {
                b[..2].copy_from_slice(&half::f16::from_f32(s).to_le_bytes());
            }
            raw
        };
        let blocks = |out: usize| out * inp / 32;
        let raws = [
            with_scales(bytes(blocks(outs[0]) * 22, 1), 22, 2),
            with_scales(bytes(blocks(outs[1]) * 22, 3), 22, 4),
            with_scales(bytes(blocks(outs[2]) * 34, 5), 34, 6),
        ];
        let names = ["q.weight", "k.weight", "v.weight"].map(String::from);
        let dims: Vec<[u64; 2]> = outs.iter().map(|&o| [inp as u64, o as u64]).collect();
        let tensors: Vec<gguf::write::Tensor<'_>> = (0..3)
            .map(|i| gguf::write::Tensor {
                name: &names[i],
                dims: &dims[i],
                ggml_type: if i < 2 { 6 } else { 8 },
                data: &raws[i],
            })
            .collect();
        let path = std::env::temp_dir().join(format!("sy-mixed-{}.gguf", std::process::id()));
        gguf::write::to_file(
            &path,
            &[("general.architecture", Value::Str("x".into()))],
            &tensors,
        )
        .expect("write");
        let mut file = File::open(&path).expect("open");
        let content = gguf_file::Content::read(&mut file).expect("read");
        let spath = path.display().to_string();
        let mut ld = Loader {
            content,
            file,
            path: &spath,
        };
        let lin = ld.linear(&names, inp, &outs, false).expect("linear");
        let _ = std::fs::remove_file(&path);
        assert!(
            matches!(
                lin.quant.as_slice(),
                [(53, Quant::Q5(_)), (13, Quant::Q8(_))]
            ),
            "segments {:?}",
            lin.quant.iter().map(|(w, _)| *w).collect::<Vec<_>>()
        );
        let n: usize = outs.iter().sum();
        // The file's values, as candle dequantizes them.
        let wf = lin.f32.clone().expect("f32 copy");
        let m = 5;
        let x = data(m * inp, 7, 1.0);
        let y = lin.forward(&x, m, Kernel::Q8).expect("forward");
        for r in 0..m {
            let xr = &x[r * inp..(r + 1) * inp];
            let xmax = xr.iter().fold(0f32, |a, b| a.max(b.abs())) as f64;
            for c in 0..n {
                let wc = &wf[c * inp..(c + 1) * inp];
                let want: f64 = xr.iter().zip(wc).map(|(a, b)| *a as f64 * *b as f64).sum();
                let wsum: f64 = wc.iter().map(|b| b.abs() as f64).sum();
                // Q5_0 keeps the weights exact: only the activations round. The Q8_0 part
                // is re-quantized, exact unless a block holds -128 (random bytes do).
                let requant = if c < 53 {
                    0.0
                } else {
                    let wmax = wc.iter().fold(0f32, |a, b| a.max(b.abs())) as f64;
                    xr.iter().map(|a| a.abs() as f64).sum::<f64>() * wmax
                };
                let bound = 1.05 * (wsum * xmax + requant) / 254.0 + 1e-5 * (1.0 + want.abs());
                let g = y[r * n + c] as f64;
                assert!(
                    (g - want).abs() <= bound,
                    "({r}, {c}): {g} vs {want}, bound {bound}"
                );
            }
            let alone = lin.forward(xr, 1, Kernel::Q8).expect("forward");
            for c in 0..n {
                assert_eq!(
                    alone[c].to_bits(),
                    y[r * n + c].to_bits(),
                    "row {r} col {c}"
                );
            }
        }
    }

    fn gemma_header(extra: &[(&str, Value)]) -> Gguf {
        let mut kv: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::Str("gemma3".into())),
            ("gemma3.context_length", Value::U32(32768)),
            ("gemma3.embedding_length", Value::U32(640)),
            ("gemma3.block_count", Value::U32(18)),
            ("gemma3.feed_forward_length", Value::U32(2048)),
            ("gemma3.attention.head_count", Value::U32(4)),
            ("gemma3.attention.head_count_kv", Value::U32(1)),
            ("gemma3.attention.key_length", Value::U32(256)),
            ("gemma3.attention.value_length", Value::U32(256)),
            ("gemma3.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
            ("gemma3.rope.freq_base", Value::F32(1e6)),
            ("gemma3.attention.sliding_window", Value::U32(512)),
        ];
        kv.retain(|(k, _)| extra.iter().all(|(e, _)| e != k));
        kv.extend(extra.iter().cloned());
        Gguf::parse(&gguf::write::to_bytes(&kv, &[]), "gemma.gguf").expect("header")
    }

    /// Gemma 3 270M's metadata (as in `gemma-3-270m-q4_k_m.gguf`) gives llama.cpp's
    /// hyperparameters: 256-wide heads over 640 dims, layers 5, 11 and 17 global, local
    /// RoPE base 10,000, q scaled by 1/16, embeddings by √640, no soft-capping.
    #[test]
    fn gemma3_config_follows_llama_cpp() {
        let c = Config::from_gguf(&gemma_header(&[])).expect("config");
        assert_eq!((c.head_dim, c.q_dim(), c.n_kv_heads), (256, 1024, 1));
        assert_eq!(c.rope_style, RopeStyle::Halves);
        assert_eq!(c.act, Activation::GeluTanh);
        assert_eq!(c.sliding_window, 512);
        let global: Vec<usize> = (0..18).filter(|&i| !c.local_layers[i]).collect();
        assert_eq!(global, [5, 11, 17]);
        assert_eq!((c.rope_base, c.rope_base_local), (1e6, 1e4));
        assert_eq!(c.attn_scale, 1.0 / 16.0);
        assert_eq!(c.embed_scale, Some(640f32.sqrt()));
        assert_eq!(c.final_softcap, None);
        assert!(c.gemma_norms);
        // Soft-capping and a pattern only when the file says so.
        let c = Config::from_gguf(&gemma_header(&[
            ("gemma3.final_logit_softcapping", Value::F32(30.0)),
            ("gemma3.attention.sliding_window_pattern", Value::U32(3)),
        ]))
        .expect("config");
        assert_eq!(c.final_softcap, Some(30.0));
        let global: Vec<usize> = (0..18).filter(|&i| !c.local_layers[i]).collect();
        assert_eq!(global, [2, 5, 8, 11, 14, 17]);
        // No window: every layer global.
        let c = Config::from_gguf(&gemma_header(&[(
            "gemma3.attention.sliding_window",
            Value::U32(0),
        )]))
        .expect("config");
        assert!(c.local_layers.iter().all(|l| !l));
    }
}
