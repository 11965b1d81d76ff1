//! PEFT LoRA folders (`adapter_config.json` + `adapter_model.safetensors`, as
//! `peft.PeftModel.save_pretrained` writes them) read into the engine's layout.
//!
//! Tensor names end in `layers.<i>.<self_attn|mlp>.<module>.lora_<A|B>.weight`; `A` is
//! `[r, in]`, `B` is `[out, r]`. The scaling (`lora_alpha / r`, or `/ √r` with
//! `use_rslora`) is folded into `B`. What the engine cannot apply exactly (DoRA, biases,
//! `modules_to_save`, per-module ranks, embeddings or the output head as targets) is
//! refused with a message rather than served wrong.

use std::path::Path;

use serde::Deserialize;

use super::safetensors::SafeTensors;
use super::{Geometry, LoraError, LoraWeights, LowRank, Target};

#[derive(Debug, Deserialize)]
struct AdapterConfig {
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    rank_pattern: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    alpha_pattern: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    peft_type: Option<String>,
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> LoraError {
    LoraError::Invalid(format!("{}: {what}", path.display()))
}

/// `(layer, target, is_b)` of a PEFT tensor name.
fn parse_name(name: &str) -> Option<(usize, Target, bool)> {
    let (rest, is_b) = if let Some(r) = name
        .strip_suffix(".lora_A.weight")
        .or_else(|| name.strip_suffix(".lora_A.default.weight"))
    {
        (r, false)
    } else {
        let r = name
            .strip_suffix(".lora_B.weight")
            .or_else(|| name.strip_suffix(".lora_B.default.weight"))?;
        (r, true)
    };
    let (before, module) = rest.rsplit_once('.')?;
    let target = Target::ALL.into_iter().find(|t| t.hf_name() == module)?;
    let (before, group) = before.rsplit_once('.')?;
    let want_group = match target {
        Target::Q | Target::K | Target::V | Target::O => "self_attn",
        _ => "mlp",
    };
    if group != want_group {
        return None;
    }
    let (before, layer) = before.rsplit_once('.')?;
    if !before.ends_with("layers") {
        return None;
    }
    Some((layer.parse().ok()?, target, is_b))
}

/// Hugging Face's q/k row order to the GGUF's (llama.cpp's `permute`): within each head,
/// row `two·(d/2) + i` moves to `2·i + two`.
pub fn permute_rows(b: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = b.len() / cols;
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; b.len()];
    for h in 0..heads {
        for two in 0..2 {
            for i in 0..half {
                let from = h * hd + two * half + i;
                let to = h * hd + 2 * i + two;
                out[to * cols..(to + 1) * cols].copy_from_slice(&b[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// Read the folder: the adapter's rank, and its weights shaped for `geometry` (none
/// without one: a backend that runs no weights only needs the adapter to be valid).
pub fn load(
    dir: &Path,
    geometry: Option<&Geometry>,
) -> Result<(usize, Option<LoraWeights>), LoraError> {
    let cfg_path = dir.join("adapter_config.json");
    let cfg_text = std::fs::read_to_string(&cfg_path)
        .map_err(|_| LoraError::NoAdapter(dir.display().to_string()))?;
    let cfg: AdapterConfig = serde_json::from_str(&cfg_text)
        .map_err(|e| invalid(&cfg_path, format!("not a LoRA adapter config: {e}")))?;
    if cfg.peft_type.as_deref().is_some_and(|t| t != "LORA") {
        return Err(invalid(
            &cfg_path,
            format!("peft_type {:?} is not LORA", cfg.peft_type),
        ));
    }
    if cfg.r == 0 {
        return Err(invalid(&cfg_path, "r must be at least 1"));
    }
    if cfg.use_dora {
        return Err(invalid(
            &cfg_path,
            "DoRA adapters (use_dora) are not supported",
        ));
    }
    if cfg.fan_in_fan_out {
        return Err(invalid(
            &cfg_path,
            "fan_in_fan_out adapters are not supported",
        ));
    }
    if cfg.bias.as_deref().is_some_and(|b| b != "none") {
        return Err(invalid(
            &cfg_path,
            "LoRA biases are not supported (bias must be \"none\")",
        ));
    }
    if cfg.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(invalid(&cfg_path, "modules_to_save is not supported"));
    }
    if cfg.rank_pattern.as_ref().is_some_and(|m| !m.is_empty())
        || cfg.alpha_pattern.as_ref().is_some_and(|m| !m.is_empty())
    {
        return Err(invalid(
            &cfg_path,
            "per-module ranks (rank_pattern, alpha_pattern) are not supported",
        ));
    }
    let st_path = dir.join("adapter_model.safetensors");
    let data = std::fs::read(&st_path).map_err(|e| {
        if dir.join("adapter_model.bin").exists() {
            invalid(
                &st_path,
                "only safetensors adapters are read (adapter_model.bin is a pickle)",
            )
        } else {
            invalid(&st_path, e)
        }
    })?;
    let st = SafeTensors::parse(data)?;
    let scaling = if cfg.use_rslora {
        cfg.lora_alpha / (cfg.r as f64).sqrt()
    } else {
        cfg.lora_alpha / cfg.r as f64
    } as f32;

    let mut pairs: std::collections::BTreeMap<(usize, usize), (Option<String>, Option<String>)> =
        Default::default();
    for name in st.names() {
        let Some((layer, target, is_b)) = parse_name(name) else {
            return Err(invalid(
                &st_path,
                format!(
                    "tensor `{name}` is not a LoRA A/B matrix of an attention or MLP projection"
                ),
            ));
        };
        let e = pairs.entry((layer, target.index())).or_default();
        if is_b {
            e.1 = Some(name.to_string());
        } else {
            e.0 = Some(name.to_string());
        }
    }
    if pairs.is_empty() {
        return Err(invalid(&st_path, "no LoRA tensors"));
    }
    let mut weights = geometry.map(|g| LoraWeights {
        layers: (0..g.layers).map(|_| Default::default()).collect(),
    });
    for ((layer, ti), (a_name, b_name)) in pairs {
        let target = Target::ALL[ti];
        let (Some(a_name), Some(b_name)) = (a_name, b_name) else {
            return Err(invalid(
                &st_path,
                format!(
                    "layer {layer} {}: lora_A and lora_B must both be present",
                    target.hf_name()
                ),
            ));
        };
        let (sa, sb) = (
            st.shape(&a_name).unwrap_or(&[]),
            st.shape(&b_name).unwrap_or(&[]),
        );
        let (&[ra, inp], &[out, rb]) = (sa, sb) else {
            return Err(invalid(
                &st_path,
                format!("`{a_name}` / `{b_name}` are not matrices"),
            ));
        };
        if ra != cfg.r || rb != cfg.r {
            return Err(invalid(
                &st_path,
                format!(
                    "`{a_name}` has rank {ra} and `{b_name}` {rb}, the config says r = {}",
                    cfg.r
                ),
            ));
        }
        let Some(g) = geometry else { continue };
        if layer >= g.layers {
            return Err(invalid(
                &st_path,
                format!("layer {layer} beyond the model's {}", g.layers),
            ));
        }
        let (want_in, want_out) = g.shape(target);
        if (inp, out) != (want_in, want_out) {
            return Err(invalid(
                &st_path,
                format!(
                    "layer {layer} {}: A is [{ra}, {inp}] and B [{out}, {rb}], the model needs in {want_in}, out {want_out}",
                    target.hf_name()
                ),
            ));
        }
        let a = st.f32(&a_name).unwrap_or_default();
        let mut b: Vec<f32> = st
            .f32(&b_name)
            .unwrap_or_default()
            .into_iter()
            .map(|v| v * scaling)
            .collect();
        if a.iter().chain(&b).any(|v| !v.is_finite()) {
            return Err(invalid(
                &st_path,
                format!(
                    "layer {layer} {}: values that are not finite",
                    target.hf_name()
                ),
            ));
        }
        if g.permute_qk {
            match target {
                Target::Q => b = permute_rows(&b, g.n_heads, cfg.r),
                Target::K => b = permute_rows(&b, g.n_kv_heads, cfg.r),
                _ => {}
            }
        }
        if let Some(w) = weights.as_mut() {
            w.layers[layer][ti] = Some(LowRank { rank: cfg.r, a, b });
        }
    }
    Ok((cfg.r, weights))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_layers_and_targets() {
        assert_eq!(
            parse_name("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"),
            Some((3, Target::Q, false))
        );
        assert_eq!(
            parse_name("base_model.model.model.layers.12.mlp.down_proj.lora_B.weight"),
            Some((12, Target::Down, true))
        );
        assert_eq!(
            parse_name("base_model.model.model.layers.0.mlp.q_proj.lora_A.weight"),
            None
        );
        assert_eq!(parse_name("base_model.model.lm_head.lora_A.weight"), None);
        assert_eq!(
            parse_name("base_model.model.model.embed_tokens.lora_embedding_A"),
            None
        );
    }

    #[test]
    fn permutation_interleaves_each_heads_halves() {
        // 2 heads of 4 rows, 1 column: HF rows [a0 a1 b0 b1] per head become [a0 b0 a1 b1].
        let b = [0., 1., 2., 3., 10., 11., 12., 13.];
        assert_eq!(
            permute_rows(&b, 2, 1),
            vec![0., 2., 1., 3., 10., 12., 11., 13.]
        );
    }
}
