//! LoRA adapters served as extra models of one engine, as vLLM serves them.
//!
//! Owns what an adapter is once loaded ([`Adapter`]: its name, id, rank and, on a backend
//! with real weights, its low-rank matrices per layer and target in the engine's own
//! layout), where adapters come from ([`peft`]: a PEFT folder, `adapter_config.json` plus
//! `adapter_model.safetensors`; [`gguf`]: llama.cpp's LoRA GGUF), and the set an engine
//! holds ([`Registry`]: loaded at start from `--lora-modules`, at runtime through
//! `POST /v1/load_lora_adapter`, at most `--max-cpu-loras` kept, least recently used
//! dropped first).
//!
//! Invariants:
//! - An adapter's weights are immutable once loaded and shared (`Arc`): a request holds
//!   its adapter until it finishes, so unloading or evicting never pulls weights from
//!   under a running request.
//! - The matrices are checked against the base model's geometry at load; a step never
//!   meets a shape it does not expect.
//! - Adapter weights are never merged into the base weights: a step applies each row's
//!   adapter (or none) to that row only, so a row's output does not depend on the
//!   adapters of the rows batched with it.
//! - Prefix caching is keyed per adapter: a request's block hashes are salted with its
//!   adapter's name, so blocks computed under different adapters are never shared.

pub mod gguf;
pub mod peft;
pub mod safetensors;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Why an adapter could not be loaded, found or removed; each maps to vLLM's status and
/// error type.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// The files are not a usable adapter for this model (400).
    #[error("{0}")]
    Invalid(String),
    /// A required field of a load or unload request is missing (400, vLLM's
    /// `InvalidUserInput`).
    #[error("{0}")]
    Missing(String),
    /// Nothing at the path (404, as vLLM answers).
    #[error("No adapter found for {0}")]
    NoAdapter(String),
    #[error("LoRA rank {rank} is greater than max_lora_rank {max}.")]
    RankTooHigh { rank: usize, max: usize },
    #[error("The lora adapter '{0}' has already been loaded.")]
    AlreadyLoaded(String),
    #[error("The lora adapter '{0}' cannot be found.")]
    NotFound(String),
    #[error("LoRA is not enabled: start the engine with --enable-lora.")]
    Disabled,
}

impl LoraError {
    /// vLLM's (status, error type) for this error.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            LoraError::NoAdapter(_) | LoraError::NotFound(_) => (404, "NotFoundError"),
            LoraError::Missing(_) | LoraError::AlreadyLoaded(_) => (400, "InvalidUserInput"),
            LoraError::Invalid(_) | LoraError::RankTooHigh { .. } | LoraError::Disabled => {
                (400, "BadRequestError")
            }
        }
    }
}

/// The projections an adapter may target, in the engine's fused layout: q/k/v are slices
/// of one matrix, gate/up of another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    /// The Hugging Face module name (`q_proj`, ...).
    pub fn hf_name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// llama.cpp's tensor name (`attn_q`, ...).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Target::Q => "attn_q",
            Target::K => "attn_k",
            Target::V => "attn_v",
            Target::O => "attn_output",
            Target::Gate => "ffn_gate",
            Target::Up => "ffn_up",
            Target::Down => "ffn_down",
        }
    }
}

/// The base model's shapes an adapter must fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    pub layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    /// The GGUF's q/k rows are permuted from Hugging Face's order (llama.cpp's converter
    /// does this for `llama` models, whose rotary pairs are interleaved): adapters from
    /// PEFT folders get the same permutation of their `B` rows.
    pub permute_qk: bool,
}

impl Geometry {
    /// (inputs, outputs) of a target's projection.
    pub fn shape(&self, t: Target) -> (usize, usize) {
        let (h, q, kv) = (
            self.hidden,
            self.n_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
        );
        match t {
            Target::Q => (h, q),
            Target::K | Target::V => (h, kv),
            Target::O => (q, h),
            Target::Gate | Target::Up => (h, self.ffn),
            Target::Down => (self.ffn, h),
        }
    }
}

/// One target's low-rank update `ΔW = B·A` (scaling folded into `B`).
#[derive(Debug, Clone)]
pub struct LowRank {
    pub rank: usize,
    /// `[rank, in]`, row-major.
    pub a: Vec<f32>,
    /// `[out, rank]`, row-major, times the adapter's scaling.
    pub b: Vec<f32>,
}

impl LowRank {
    /// `y[r][..] += x[r] · Aᵀ · Bᵀ` for `rows` rows; `x` is `[rows, in]`, `y` rows of
    /// `y_stride` values whose target slice starts at `y_offset`. `tmp` is scratch.
    pub fn apply(
        &self,
        x: &[f32],
        rows: usize,
        y: &mut [f32],
        y_stride: usize,
        y_offset: usize,
        tmp: &mut Vec<f32>,
    ) {
        let r = self.rank;
        if r == 0 || rows == 0 {
            return;
        }
        let inp = self.a.len() / r;
        let out = self.b.len() / r;
        tmp.clear();
        tmp.resize(r, 0.0);
        for row in 0..rows {
            let xr = &x[row * inp..(row + 1) * inp];
            for (t, arow) in tmp.iter_mut().zip(self.a.chunks_exact(inp)) {
                *t = dot(xr, arow);
            }
            let yr = &mut y[row * y_stride + y_offset..row * y_stride + y_offset + out];
            for (yv, brow) in yr.iter_mut().zip(self.b.chunks_exact(r)) {
                *yv += dot(tmp, brow);
            }
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums: vectorizes and keeps the order fixed.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// An adapter's matrices: per layer, per [`Target`] (by [`Target::index`]).
#[derive(Debug, Clone, Default)]
pub struct LoraWeights {
    pub layers: Vec<[Option<LowRank>; 7]>,
}

impl LoraWeights {
    pub fn get(&self, layer: usize, t: Target) -> Option<&LowRank> {
        self.layers.get(layer)?[t.index()].as_ref()
    }

    /// Bytes held (for logs).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .map(|l| 4 * (l.a.len() + l.b.len()))
            .sum()
    }
}

/// A loaded adapter.
#[derive(Debug)]
pub struct Adapter {
    pub name: String,
    /// vLLM's `lora_int_id`: 1, 2, ... in load order (KV events' `lora_id`).
    pub id: u32,
    pub path: String,
    pub rank: usize,
    /// Salts the request's block hashes (from the name: stable across restarts and
    /// engines, so a router sees the same hashes everywhere).
    pub salt: u64,
    /// `None` on a backend without real weights (sim): the adapter is served by name.
    pub weights: Option<LoraWeights>,
}

/// What `--lora-modules` gives: a name and a path (and the base model it belongs to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleSpec {
    pub name: String,
    pub path: String,
    pub base_model_name: Option<String>,
}

impl ModuleSpec {
    /// vLLM's two forms: `name=path`, or JSON `{"name": ..., "path": ...,
    /// "base_model_name": ...}`.
    pub fn parse(s: &str) -> Result<ModuleSpec, String> {
        let s = s.trim();
        if s.starts_with('{') {
            #[derive(serde::Deserialize)]
            struct J {
                name: String,
                path: String,
                #[serde(default)]
                base_model_name: Option<String>,
            }
            let j: J =
                serde_json::from_str(s).map_err(|e| format!("invalid --lora-modules JSON: {e}"))?;
            return Ok(ModuleSpec {
                name: j.name,
                path: j.path,
                base_model_name: j.base_model_name,
            });
        }
        match s.split_once('=') {
            Some((n, p)) if !n.is_empty() && !p.is_empty() => Ok(ModuleSpec {
                name: n.to_string(),
                path: p.to_string(),
                base_model_name: None,
            }),
            _ => Err(format!(
                "invalid --lora-modules entry `{s}`: expected name=path or JSON"
            )),
        }
    }
}

/// The engine's LoRA limits (`--max-loras`, `--max-lora-rank`, `--max-cpu-loras`).
#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub max_loras: usize,
    pub max_lora_rank: usize,
    pub max_cpu_loras: usize,
    /// The base model's geometry; `None` on a backend without real weights.
    pub geometry: Option<Geometry>,
}

/// Read an adapter from `path` (a PEFT folder, or a llama.cpp LoRA `.gguf`).
pub fn read_adapter(
    path: &str,
    cfg: &LoraConfig,
) -> Result<(usize, Option<LoraWeights>), LoraError> {
    let p = Path::new(path);
    if !p.exists() {
        return Err(LoraError::NoAdapter(path.to_string()));
    }
    let (rank, weights) = if p.is_file() {
        gguf::load(p, cfg.geometry.as_ref())?
    } else {
        peft::load(p, cfg.geometry.as_ref())?
    };
    if rank > cfg.max_lora_rank {
        return Err(LoraError::RankTooHigh {
            rank,
            max: cfg.max_lora_rank,
        });
    }
    Ok((rank, weights))
}

/// One registered adapter: where it comes from, and its weights while they are kept.
#[derive(Debug)]
struct Entry {
    path: String,
    /// The base model it was registered for (`--lora-modules` JSON's `base_model_name`).
    base: Option<String>,
    id: u32,
    rank: usize,
    /// The loaded adapter; `None` once dropped from memory past `--max-cpu-loras`
    /// (read again from `path` when next asked for).
    loaded: Option<Arc<Adapter>>,
    /// When it was last used (for least-recently-used eviction).
    tick: u64,
}

#[derive(Debug, Default)]
struct Inner {
    by_name: HashMap<String, Entry>,
    next_id: u32,
    tick: u64,
}

/// The adapters an engine serves, shared by the API handlers. Every registered adapter
/// is listed and can be asked for; at most `--max-cpu-loras` are kept in memory, the
/// least recently used dropped first and read again from their path when needed (as
/// vLLM's CPU adapter cache does).
#[derive(Debug)]
pub struct Registry {
    pub config: LoraConfig,
    inner: Mutex<Inner>,
}

/// An adapter's listing (`/v1/models`).
#[derive(Debug, Clone)]
pub struct Listed {
    pub name: String,
    pub path: String,
    pub id: u32,
    pub base_model_name: Option<String>,
}

/// Salt of an adapter's block hashes, from its name ([`kv_events::hash::lora_salt`]: the
/// router's KV index seeds its chains the same way).
pub fn salt_for(name: &str) -> u64 {
    kv_events::hash::lora_salt(name)
}

impl Registry {
    pub fn new(config: LoraConfig) -> Registry {
        Registry {
            config,
            inner: Mutex::new(Inner {
                next_id: 1,
                ..Default::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register and load an adapter from `path` under `name`. Reads the files on the
    /// calling thread: call it off the async runtime.
    pub fn load(&self, name: &str, path: &str) -> Result<Arc<Adapter>, LoraError> {
        self.load_for(name, path, None)
    }

    /// [`Registry::load`] for a named base model (listed as the adapter's `parent`).
    pub fn load_for(
        &self,
        name: &str,
        path: &str,
        base: Option<&str>,
    ) -> Result<Arc<Adapter>, LoraError> {
        if name.is_empty() || path.is_empty() {
            return Err(LoraError::Missing(
                "Both 'lora_name' and 'lora_path' must be provided.".into(),
            ));
        }
        if self.lock().by_name.contains_key(name) {
            return Err(LoraError::AlreadyLoaded(name.to_string()));
        }
        let (rank, weights) = read_adapter(path, &self.config)?;
        let mut g = self.lock();
        if g.by_name.contains_key(name) {
            return Err(LoraError::AlreadyLoaded(name.to_string()));
        }
        let id = g.next_id;
        g.next_id += 1;
        let a = self.keep(&mut g, name, path, id, rank, weights);
        if let Some(e) = g.by_name.get_mut(name) {
            e.base = base.map(str::to_string);
        }
        Ok(a)
    }

    /// Insert a freshly read adapter as loaded, evicting others past the limit.
    fn keep(
        &self,
        g: &mut Inner,
        name: &str,
        path: &str,
        id: u32,
        rank: usize,
        weights: Option<LoraWeights>,
    ) -> Arc<Adapter> {
        let keep = self.config.max_cpu_loras.max(1);
        loop {
            let loaded: Vec<(&String, u64)> = g
                .by_name
                .iter()
                .filter(|(n, e)| e.loaded.is_some() && n.as_str() != name)
                .map(|(n, e)| (n, e.tick))
                .collect();
            if loaded.len() < keep {
                break;
            }
            let Some(oldest) = loaded
                .iter()
                .min_by_key(|(_, t)| *t)
                .map(|(n, _)| (*n).clone())
            else {
                break;
            };
            tracing::info!(adapter = %oldest, "LoRA adapter dropped from memory (--max-cpu-loras)");
            if let Some(e) = g.by_name.get_mut(&oldest) {
                e.loaded = None;
            }
        }
        g.tick += 1;
        let a = Arc::new(Adapter {
            name: name.to_string(),
            id,
            path: path.to_string(),
            rank,
            salt: salt_for(name),
            weights,
        });
        if let Some(w) = &a.weights {
            tracing::info!(adapter = %name, path, rank, bytes = w.bytes(), "LoRA adapter loaded");
        }
        let tick = g.tick;
        let base = g.by_name.get(name).and_then(|e| e.base.clone());
        g.by_name.insert(
            name.to_string(),
            Entry {
                path: path.to_string(),
                base,
                id,
                rank,
                loaded: Some(a.clone()),
                tick,
            },
        );
        a
    }

    pub fn unload(&self, name: &str) -> Result<(), LoraError> {
        if name.is_empty() {
            return Err(LoraError::Missing(
                "'lora_name' needs to be provided to unload a LoRA adapter.".into(),
            ));
        }
        match self.lock().by_name.remove(name) {
            Some(_) => Ok(()),
            None => Err(LoraError::NotFound(name.to_string())),
        }
    }

    /// Whether `name` is a registered adapter.
    pub fn contains(&self, name: &str) -> bool {
        self.lock().by_name.contains_key(name)
    }

    /// The adapter served as `name` if it is in memory (marked used now): `Ok(None)` when
    /// it must be read again ([`Registry::resolve`]), `Err` when there is no such adapter.
    pub fn get_loaded(&self, name: &str) -> Result<Option<Arc<Adapter>>, LoraError> {
        let mut g = self.lock();
        g.tick += 1;
        let tick = g.tick;
        let e = g
            .by_name
            .get_mut(name)
            .ok_or_else(|| LoraError::NotFound(name.to_string()))?;
        e.tick = tick;
        Ok(e.loaded.clone())
    }

    /// The adapter served as `name`, read again from its path if it was dropped from
    /// memory (blocking: call it off the async runtime).
    pub fn resolve(&self, name: &str) -> Result<Arc<Adapter>, LoraError> {
        if let Some(a) = self.get_loaded(name)? {
            return Ok(a);
        }
        let (path, id) = {
            let g = self.lock();
            let e = g
                .by_name
                .get(name)
                .ok_or_else(|| LoraError::NotFound(name.to_string()))?;
            (e.path.clone(), e.id)
        };
        let (rank, weights) = read_adapter(&path, &self.config)?;
        let mut g = self.lock();
        match g.by_name.get(name) {
            // Unloaded, or replaced, while it was being read.
            Some(e) if e.id != id => return Err(LoraError::NotFound(name.to_string())),
            None => return Err(LoraError::NotFound(name.to_string())),
            Some(e) => {
                if let Some(a) = &e.loaded {
                    return Ok(a.clone());
                }
            }
        }
        Ok(self.keep(&mut g, name, &path, id, rank, weights))
    }

    /// Every registered adapter, in load order.
    pub fn list(&self) -> Vec<Listed> {
        let mut v: Vec<Listed> = self
            .lock()
            .by_name
            .iter()
            .map(|(n, e)| Listed {
                name: n.clone(),
                path: e.path.clone(),
                id: e.id,
                base_model_name: e.base.clone(),
            })
            .collect();
        v.sort_by_key(|l| l.id);
        v
    }

    /// How many adapters are in memory now.
    pub fn num_loaded(&self) -> usize {
        self.lock()
            .by_name
            .values()
            .filter(|e| e.loaded.is_some())
            .count()
    }

    /// The rank an adapter was registered with.
    pub fn rank(&self, name: &str) -> Option<usize> {
        self.lock().by_name.get(name).map(|e| e.rank)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_specs_in_both_of_vllms_forms() {
        assert_eq!(
            ModuleSpec::parse("sql=/a/b").unwrap(),
            ModuleSpec {
                name: "sql".into(),
                path: "/a/b".into(),
                base_model_name: None
            }
        );
        let j = ModuleSpec::parse(r#"{"name":"x","path":"/p","base_model_name":"m"}"#).unwrap();
        assert_eq!(
            (j.name.as_str(), j.base_model_name.as_deref()),
            ("x", Some("m"))
        );
        for bad in ["nopath", "=x", "x=", "{\"name\":1}"] {
            assert!(ModuleSpec::parse(bad).is_err(), "{bad}");
        }
    }

    /// A small llama-like geometry (2 heads of 4, 1 KV head).
    fn tiny() -> Geometry {
        Geometry {
            layers: 2,
            hidden: 8,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 4,
            ffn: 12,
            permute_qk: true,
        }
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 + 1.0) * 0.618 + seed as f32 * 1.37).sin())
            .collect()
    }

    fn tmp_dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("sy-lora-unit-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    /// The same adapter written as a PEFT folder (Hugging Face's row order, scaling
    /// `lora_alpha / r` applied by the reader) and as llama.cpp's LoRA GGUF (ggml's
    /// reversed dims, q/k rows already permuted as `convert_lora_to_gguf.py` writes them,
    /// `adapter.lora.alpha`) reads into the same matrices; a GGUF that is not an adapter,
    /// and an adapter for other shapes, are refused.
    #[test]
    fn a_llama_cpp_gguf_adapter_reads_as_the_same_peft_adapter() {
        let g = tiny();
        let (r, alpha) = (2usize, 4.0f32);
        let targets = [Target::Q, Target::K, Target::V, Target::Down];
        // (layer, target, A [r, in], B [out, r]) in Hugging Face's order.
        let mut mats = Vec::new();
        for layer in 0..g.layers {
            for (k, &t) in targets.iter().enumerate() {
                let (inp, out) = g.shape(t);
                let seed = (layer * 10 + k) as u32;
                mats.push((layer, t, values(r * inp, seed), values(out * r, seed + 100)));
            }
        }

        // PEFT folder.
        let peft_dir = tmp_dir("peft");
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (layer, t, a, b) in &mats {
            let group = if matches!(t, Target::Down) {
                "mlp"
            } else {
                "self_attn"
            };
            let (inp, out) = g.shape(*t);
            for (ab, m, shape) in [("A", a, [r, inp]), ("B", b, [out, r])] {
                let name = format!(
                    "base_model.model.model.layers.{layer}.{group}.{}.lora_{ab}.weight",
                    t.hf_name()
                );
                let start = data.len();
                for v in m.iter() {
                    data.extend_from_slice(&v.to_le_bytes());
                }
                header.insert(
                    name,
                    serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
                );
            }
        }
        let h = serde_json::Value::Object(header).to_string();
        let mut st = (h.len() as u64).to_le_bytes().to_vec();
        st.extend_from_slice(h.as_bytes());
        st.extend_from_slice(&data);
        std::fs::write(peft_dir.join("adapter_model.safetensors"), st).expect("write");
        std::fs::write(
            peft_dir.join("adapter_config.json"),
            format!(r#"{{"peft_type":"LORA","r":{r},"lora_alpha":{alpha},"bias":"none","target_modules":["q_proj"]}}"#),
        )
        .expect("write");

        // llama.cpp's GGUF: dims in ggml order (`ne0` = columns), q/k rows permuted per head:
        // within a head, row `two·(hd/2) + i` goes to `2·i + two`.
        let permute = |b: &[f32], heads: usize| {
            let hd = b.len() / r / heads;
            let mut out = vec![0f32; b.len()];
            for h in 0..heads {
                for i in 0..hd / 2 {
                    for two in 0..2 {
                        let (from, to) = (h * hd + two * (hd / 2) + i, h * hd + 2 * i + two);
                        out[to * r..(to + 1) * r].copy_from_slice(&b[from * r..(from + 1) * r]);
                    }
                }
            }
            out
        };
        let mut owned: Vec<(String, [u64; 2], Vec<u8>)> = Vec::new();
        for (layer, t, a, b) in &mats {
            let (inp, out) = g.shape(*t);
            let b = match t {
                Target::Q => permute(b, g.n_heads),
                Target::K => permute(b, g.n_kv_heads),
                _ => b.clone(),
            };
            let bytes = |m: &[f32]| m.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
            let base = format!("blk.{layer}.{}.weight", t.gguf_name());
            owned.push((format!("{base}.lora_a"), [inp as u64, r as u64], bytes(a)));
            owned.push((format!("{base}.lora_b"), [r as u64, out as u64], bytes(&b)));
        }
        let tensors: Vec<::gguf::write::Tensor<'_>> = owned
            .iter()
            .map(|(name, dims, data)| ::gguf::write::Tensor {
                name,
                dims,
                ggml_type: 0,
                data,
            })
            .collect();
        let gguf_dir = tmp_dir("gguf");
        let gguf_path = gguf_dir.join("adapter.gguf");
        let meta = |kind: &str| {
            vec![
                ("general.type", ::gguf::Value::Str(kind.into())),
                ("adapter.type", ::gguf::Value::Str("lora".into())),
                ("adapter.lora.alpha", ::gguf::Value::F32(alpha)),
            ]
        };
        ::gguf::write::to_file(&gguf_path, &meta("adapter"), &tensors).expect("write");

        let cfg = LoraConfig {
            max_loras: 1,
            max_lora_rank: 8,
            max_cpu_loras: 1,
            geometry: Some(g.clone()),
        };
        let (rp, wp) = read_adapter(peft_dir.to_str().expect("utf-8"), &cfg).expect("PEFT");
        let (rg, wg) = read_adapter(gguf_path.to_str().expect("utf-8"), &cfg).expect("GGUF");
        assert_eq!((rp, rg), (r, r));
        let (wp, wg) = (wp.expect("weights"), wg.expect("weights"));
        let mut compared = 0;
        for layer in 0..g.layers {
            for t in Target::ALL {
                match (wp.get(layer, t), wg.get(layer, t)) {
                    (None, None) => assert!(!targets.contains(&t)),
                    (Some(p), Some(q)) => {
                        assert_eq!((p.a.len(), p.b.len()), (q.a.len(), q.b.len()));
                        let diff = p.a.iter().chain(&p.b).zip(q.a.iter().chain(&q.b));
                        for (x, y) in diff {
                            assert!((x - y).abs() < 1e-6, "layer {layer} {t:?}: {x} vs {y}");
                        }
                        compared += 1;
                    }
                    other => panic!("layer {layer} {t:?}: only one has it: {other:?}"),
                }
            }
        }
        assert_eq!(compared, g.layers * targets.len());
        // The scaling is in B: alpha / r = 2 times the file's values (v is not permuted).
        let (_, _, _, b_v) = &mats[2];
        assert_eq!(wg.get(0, Target::V).map(|l| l.b[0]), Some(b_v[0] * 2.0));

        // Not an adapter; an adapter for other shapes.
        ::gguf::write::to_file(&gguf_path, &meta("model"), &tensors).expect("write");
        let e = read_adapter(gguf_path.to_str().expect("utf-8"), &cfg).expect_err("a model");
        assert_eq!(e.status().0, 400, "{e}");
        let other = LoraConfig {
            geometry: Some(Geometry { hidden: 16, ..g }),
            ..cfg
        };
        let e = read_adapter(peft_dir.to_str().expect("utf-8"), &other).expect_err("shapes");
        assert!(e.to_string().contains("the model needs in 16"), "{e}");
        let _ = std::fs::remove_dir_all(peft_dir);
        let _ = std::fs::remove_dir_all(gguf_dir);
    }

    /// A minimal PEFT folder (one q_proj pair of rank `r`).
    fn tiny_peft(tag: &str, r: usize) -> String {
        let d = tmp_dir(tag);
        let n = r * 8 * 4;
        let h = format!(
            r#"{{"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":{{"dtype":"F32","shape":[{r},8],"data_offsets":[0,{a}]}},"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight":{{"dtype":"F32","shape":[8,{r}],"data_offsets":[{a},{ab}]}}}}"#,
            a = n,
            ab = 2 * n
        );
        let mut st = (h.len() as u64).to_le_bytes().to_vec();
        st.extend_from_slice(h.as_bytes());
        st.resize(st.len() + 2 * n, 0);
        std::fs::write(d.join("adapter_model.safetensors"), st).expect("write");
        std::fs::write(
            d.join("adapter_config.json"),
            format!(r#"{{"peft_type":"LORA","r":{r},"lora_alpha":8}}"#),
        )
        .expect("write");
        d.to_str().expect("utf-8").to_string()
    }

    /// At most `--max-cpu-loras` adapters stay in memory, the least recently used dropped
    /// first and read again from its path when asked for (same id); a request holding an
    /// adapter keeps it through an unload; vLLM's errors for names and ranks.
    #[test]
    fn the_registry_keeps_the_most_recently_used_and_rereads_the_rest() {
        let reg = Registry::new(LoraConfig {
            max_loras: 1,
            max_lora_rank: 4,
            max_cpu_loras: 2,
            geometry: None,
        });
        let (a, b, c) = (tiny_peft("ra", 2), tiny_peft("rb", 2), tiny_peft("rc", 4));
        let held = reg.load("a", &a).expect("a");
        reg.load("b", &b).expect("b");
        assert!(
            reg.get_loaded("a").expect("a").is_some(),
            "a used now: b is the oldest"
        );
        reg.load("c", &c).expect("c");
        assert_eq!(reg.num_loaded(), 2);
        assert!(
            reg.get_loaded("b").expect("registered").is_none(),
            "b dropped"
        );
        let b2 = reg.resolve("b").expect("read again");
        assert_eq!((b2.id, b2.rank), (2, 2));
        assert_eq!(reg.num_loaded(), 2);
        assert_eq!(
            reg.list()
                .iter()
                .map(|l| (l.name.as_str(), l.id))
                .collect::<Vec<_>>(),
            [("a", 1), ("b", 2), ("c", 3)]
        );
        reg.unload("a").expect("unload");
        assert_eq!(held.name, "a", "a request's adapter outlives its unload");
        assert!(matches!(reg.resolve("a"), Err(LoraError::NotFound(_))));
        assert!(matches!(reg.unload("a"), Err(LoraError::NotFound(_))));
        assert!(matches!(
            reg.load("b", &b),
            Err(LoraError::AlreadyLoaded(_))
        ));
        assert!(matches!(reg.load("", &b), Err(LoraError::Missing(_))));
        let big = tiny_peft("rbig", 8);
        let e = reg.load("big", &big).expect_err("rank 8 > 4");
        assert_eq!(
            e.to_string(),
            "LoRA rank 8 is greater than max_lora_rank 4."
        );
        assert!(!reg.contains("big"));
        assert!(matches!(
            reg.load("x", "/no/such/adapter"),
            Err(LoraError::NoAdapter(_))
        ));
        for d in [a, b, c, big] {
            let _ = std::fs::remove_dir_all(d);
        }
    }

    #[test]
    fn low_rank_update_equals_the_dense_product() {
        let (inp, out, r, rows) = (10, 6, 3, 2);
        let a: Vec<f32> = (0..r * inp).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..out * r).map(|i| (i as f32 * 0.11).cos()).collect();
        let x: Vec<f32> = (0..rows * inp).map(|i| i as f32 / 7.0 - 1.0).collect();
        let lr = LowRank {
            rank: r,
            a: a.clone(),
            b: b.clone(),
        };
        // Rows of 9 values, the target's slice at 2..8.
        let mut y = vec![1.0f32; rows * 9];
        lr.apply(&x, rows, &mut y, 9, 2, &mut Vec::new());
        for row in 0..rows {
            for c in 0..9 {
                let want = if (2..8).contains(&c) {
                    let o = c - 2;
                    1.0 + (0..inp)
                        .map(|i| {
                            let w: f32 = (0..r).map(|k| b[o * r + k] * a[k * inp + i]).sum();
                            w * x[row * inp + i]
                        })
                        .sum::<f32>()
                } else {
                    1.0
                };
                assert!(
                    (y[row * 9 + c] - want).abs() < 1e-4,
                    "row {row} col {c}: {} vs {want}",
                    y[row * 9 + c]
                );
            }
        }
    }
}
