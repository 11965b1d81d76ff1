//! llama.cpp's LoRA GGUF files (`convert_lora_to_gguf.py`): `general.type = adapter`,
//! `adapter.type = lora`, `adapter.lora.alpha`, and per projection the tensors
//! `blk.<i>.<attn_q|...>.weight.lora_a` (`[r, in]`) and `.lora_b` (`[out, r]`), already in
//! the GGUF's row order (the converter permutes q/k as it does for the base model). The
//! scaling is `alpha / r` (1 when alpha is 0), as llama.cpp applies it.

use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::Device;

use super::{Geometry, LoraError, LoraWeights, LowRank, Target};

fn invalid(path: &Path, what: impl std::fmt::Display) -> LoraError {
    LoraError::Invalid(format!("{}: {what}", path.display()))
}

fn parse_name(name: &str) -> Option<(usize, Target, bool)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, is_b) = if let Some(m) = rest.strip_suffix(".weight.lora_a") {
        (m, false)
    } else {
        (rest.strip_suffix(".weight.lora_b")?, true)
    };
    let target = Target::ALL.into_iter().find(|t| t.gguf_name() == module)?;
    Some((layer.parse().ok()?, target, is_b))
}

pub fn load(
    path: &Path,
    geometry: Option<&Geometry>,
) -> Result<(usize, Option<LoraWeights>), LoraError> {
    let mut file =
        File::open(path).map_err(|_| LoraError::NoAdapter(path.display().to_string()))?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| invalid(path, format!("not a GGUF file: {e}")))?;
    let meta = |k: &str| content.metadata.get(k);
    let is_lora = meta("general.type")
        .and_then(|v| v.to_string().ok())
        .is_some_and(|s| s == "adapter")
        && meta("adapter.type")
            .and_then(|v| v.to_string().ok())
            .is_some_and(|s| s == "lora");
    if !is_lora {
        return Err(invalid(
            path,
            "not a LoRA adapter (general.type = adapter, adapter.type = lora expected)",
        ));
    }
    let alpha = meta("adapter.lora.alpha")
        .and_then(|v| v.to_f32().ok())
        .unwrap_or(0.0);
    let mut pairs: std::collections::BTreeMap<(usize, usize), (Option<String>, Option<String>)> =
        Default::default();
    for name in content.tensor_infos.keys() {
        let Some((layer, target, is_b)) = parse_name(name) else {
            return Err(invalid(
                path,
                format!(
                    "tensor `{name}` is not a LoRA A/B matrix of an attention or MLP projection"
                ),
            ));
        };
        let e = pairs.entry((layer, target.index())).or_default();
        if is_b {
            e.1 = Some(name.clone());
        } else {
            e.0 = Some(name.clone());
        }
    }
    if pairs.is_empty() {
        return Err(invalid(path, "no LoRA tensors"));
    }
    let mut rank = 0;
    let mut weights = geometry.map(|g| LoraWeights {
        layers: (0..g.layers).map(|_| Default::default()).collect(),
    });
    for ((layer, ti), (a_name, b_name)) in pairs {
        let target = Target::ALL[ti];
        let (Some(a_name), Some(b_name)) = (a_name, b_name) else {
            return Err(invalid(
                path,
                format!(
                    "layer {layer} {}: lora_a and lora_b must both be present",
                    target.gguf_name()
                ),
            ));
        };
        let mut read = |n: &str| -> Result<(Vec<usize>, Vec<f32>), LoraError> {
            let t = content
                .tensor(&mut file, n, &Device::Cpu)
                .and_then(|q| q.dequantize(&Device::Cpu))
                .map_err(|e| invalid(path, format!("`{n}`: {e}")))?;
            let dims = t.dims().to_vec();
            let v = t
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| invalid(path, format!("`{n}`: {e}")))?;
            Ok((dims, v))
        };
        let (da, a) = read(&a_name)?;
        let (db, b) = read(&b_name)?;
        let (&[ra, inp], &[out, rb]) = (da.as_slice(), db.as_slice()) else {
            return Err(invalid(
                path,
                format!("`{a_name}` / `{b_name}` are not matrices"),
            ));
        };
        if ra != rb || ra == 0 || (rank != 0 && ra != rank) {
            return Err(invalid(
                path,
                format!("`{a_name}` has rank {ra} and `{b_name}` {rb} (one rank for all expected)"),
            ));
        }
        rank = ra;
        let Some(g) = geometry else { continue };
        if layer >= g.layers {
            return Err(invalid(
                path,
                format!("layer {layer} beyond the model's {}", g.layers),
            ));
        }
        let (want_in, want_out) = g.shape(target);
        if (inp, out) != (want_in, want_out) {
            return Err(invalid(
                path,
                format!("layer {layer} {}: A is [{ra}, {inp}] and B [{out}, {rb}], the model needs in {want_in}, out {want_out}", target.gguf_name()),
            ));
        }
        let scaling = if alpha == 0.0 { 1.0 } else { alpha / ra as f32 };
        let b: Vec<f32> = b.into_iter().map(|v| v * scaling).collect();
        if a.iter().chain(&b).any(|v| !v.is_finite()) {
            return Err(invalid(
                path,
                format!(
                    "layer {layer} {}: values that are not finite",
                    target.gguf_name()
                ),
            ));
        }
        if let Some(w) = weights.as_mut() {
            w.layers[layer][ti] = Some(LowRank { rank: ra, a, b });
        }
    }
    Ok((rank, weights))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_layers_and_targets() {
        assert_eq!(
            parse_name("blk.4.attn_q.weight.lora_a"),
            Some((4, Target::Q, false))
        );
        assert_eq!(
            parse_name("blk.0.ffn_down.weight.lora_b"),
            Some((0, Target::Down, true))
        );
        assert_eq!(parse_name("blk.0.attn_norm.weight.lora_a"), None);
        assert_eq!(parse_name("token_embd.weight.lora_a"), None);
    }
}
