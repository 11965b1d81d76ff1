//! Default sampling parameters for requests that leave them out, as vLLM's
//! `--generation-config` and `--override-generation-config` set them.
//!
//! - `auto` (the default): what the model's publisher recommends. A GGUF file may carry it
//!   (`general.sampling.*`, llama.cpp's keys); for files that carry none, a small table of
//!   model cards' published settings, matched by the published file name (the default
//!   SmolLM2-135M-Instruct's card recommends temperature 0.2, top-p 0.9).
//! - `vllm`: vLLM's own neutral defaults (temperature 1, top-p 1, no top-k...).
//! - a folder holding `generation_config.json`, or such a file (Hugging Face's format).
//!
//! The override's JSON keys win over all of these. A request's own fields win over both.

use std::path::Path;

use serde::Deserialize;

/// Defaults for the sampling fields a request may omit (`None`: the engine's own default).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct GenerationDefaults {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    /// Hugging Face's name for the default `max_tokens`.
    #[serde(alias = "max_tokens")]
    pub max_new_tokens: Option<i64>,
}

/// Model cards' recommended sampling, for GGUF files that carry none: (file name prefix,
/// lowercase; the defaults).
const MODEL_CARDS: &[(&str, GenerationDefaults)] = &[(
    // huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct: `temperature=0.2, top_p=0.9`.
    "smollm2-135m-instruct",
    GenerationDefaults {
        temperature: Some(0.2),
        top_p: Some(0.9),
        top_k: None,
        min_p: None,
        repetition_penalty: None,
        max_new_tokens: None,
    },
)];

impl GenerationDefaults {
    pub fn is_empty(&self) -> bool {
        *self == GenerationDefaults::default()
    }

    /// `other`'s fields where it has them, else ours.
    pub fn overlay(&self, other: &GenerationDefaults) -> GenerationDefaults {
        GenerationDefaults {
            temperature: other.temperature.or(self.temperature),
            top_p: other.top_p.or(self.top_p),
            top_k: other.top_k.or(self.top_k),
            min_p: other.min_p.or(self.min_p),
            repetition_penalty: other.repetition_penalty.or(self.repetition_penalty),
            max_new_tokens: other.max_new_tokens.or(self.max_new_tokens),
        }
    }

    /// `--override-generation-config`'s JSON (unknown keys are refused, so a typo is not
    /// silently ignored).
    pub fn parse_override(s: &str) -> Result<GenerationDefaults, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Strict {
            temperature: Option<f64>,
            top_p: Option<f64>,
            top_k: Option<i64>,
            min_p: Option<f64>,
            repetition_penalty: Option<f64>,
            #[serde(alias = "max_tokens")]
            max_new_tokens: Option<i64>,
        }
        let v: Strict = serde_json::from_str(s)
            .map_err(|e| format!("invalid --override-generation-config: {e}"))?;
        let d = GenerationDefaults {
            temperature: v.temperature,
            top_p: v.top_p,
            top_k: v.top_k,
            min_p: v.min_p,
            repetition_penalty: v.repetition_penalty,
            max_new_tokens: v.max_new_tokens,
        };
        d.check()
            .map_err(|e| format!("--override-generation-config: {e}"))?;
        Ok(d)
    }

    /// The ranges requests are held to, so a bad default fails at start, not per request.
    pub fn check(&self) -> Result<(), String> {
        let bad =
            |name: &str, v: &dyn std::fmt::Display| Err(format!("{name} {v} is out of range"));
        if let Some(t) = self.temperature.filter(|t| !(*t >= 0.0 && t.is_finite())) {
            return bad("temperature", &t);
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return bad("top_p", &p);
        }
        if let Some(k) = self.top_k.filter(|k| *k < -1 || *k > u32::MAX as i64) {
            return bad("top_k", &k);
        }
        if let Some(p) = self.min_p.filter(|p| !(0.0..=1.0).contains(p)) {
            return bad("min_p", &p);
        }
        if let Some(r) = self.repetition_penalty.filter(|r| !(*r > 0.0 && *r <= 2.0)) {
            return bad("repetition_penalty", &r);
        }
        if let Some(m) = self.max_new_tokens.filter(|m| *m < 1) {
            return bad("max_new_tokens", &m);
        }
        Ok(())
    }

    /// What a GGUF file carries under llama.cpp's `general.sampling.*` keys.
    pub fn from_gguf(header: &gguf::Gguf) -> GenerationDefaults {
        let f = |k: &str| header.get(k).and_then(|v| v.as_f64());
        GenerationDefaults {
            temperature: f("general.sampling.temp"),
            top_p: f("general.sampling.top_p"),
            top_k: header
                .get("general.sampling.top_k")
                .and_then(|v| v.as_i64()),
            min_p: f("general.sampling.min_p"),
            repetition_penalty: f("general.sampling.penalty_repeat"),
            max_new_tokens: None,
        }
    }

    /// The model card's recommendation for a published file name, if we know it.
    pub fn from_model_card(file: &Path) -> GenerationDefaults {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        MODEL_CARDS
            .iter()
            .find(|(prefix, _)| name.starts_with(prefix))
            .map(|(_, d)| d.clone())
            .unwrap_or_default()
    }
}

/// `--generation-config`: where default sampling parameters come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GenerationSource {
    /// The model's own recommendation (file metadata, else its model card).
    Auto,
    /// vLLM's neutral defaults.
    Vllm,
    /// A `generation_config.json` (or a folder holding one).
    Path(std::path::PathBuf),
}

impl GenerationSource {
    pub fn parse(s: &str) -> Result<GenerationSource, String> {
        Ok(match s {
            "auto" => GenerationSource::Auto,
            "vllm" => GenerationSource::Vllm,
            p => GenerationSource::Path(p.into()),
        })
    }
}

/// Resolve the defaults: the source's, then the override on top. `model` is the GGUF file
/// and its header, when the backend has one.
pub fn resolve(
    source: &GenerationSource,
    overrides: Option<&GenerationDefaults>,
    model: Option<(&Path, &gguf::Gguf)>,
) -> Result<GenerationDefaults, String> {
    let base = match source {
        GenerationSource::Vllm => GenerationDefaults::default(),
        GenerationSource::Auto => match model {
            Some((path, header)) => {
                let own = GenerationDefaults::from_gguf(header);
                if own.is_empty() {
                    GenerationDefaults::from_model_card(path)
                } else {
                    own
                }
            }
            None => GenerationDefaults::default(),
        },
        GenerationSource::Path(p) => {
            let file = if p.is_dir() {
                p.join("generation_config.json")
            } else {
                p.clone()
            };
            let text = std::fs::read_to_string(&file)
                .map_err(|e| format!("--generation-config {}: {e}", file.display()))?;
            // Hugging Face's file has many other keys (eos ids, do_sample...): ignored.
            serde_json::from_str::<GenerationDefaults>(&text)
                .map_err(|e| format!("--generation-config {}: {e}", file.display()))?
        }
    };
    let d = match overrides {
        Some(o) => base.overlay(o),
        None => base,
    };
    d.check()
        .map_err(|e| format!("default sampling parameters: {e}"))?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kv: Vec<(&str, gguf::Value)>) -> gguf::Gguf {
        let bytes = gguf::write::to_bytes(&kv, &[]);
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("switchyard-gen-{}-{n}.gguf", std::process::id()));
        std::fs::write(&path, bytes).expect("write");
        let g = gguf::Gguf::open(&path).expect("open");
        let _ = std::fs::remove_file(&path);
        g
    }

    #[test]
    fn auto_prefers_the_file_then_the_model_card() {
        let empty = header(vec![(
            "general.architecture",
            gguf::Value::Str("llama".into()),
        )]);
        let card = Path::new("/x/SmolLM2-135M-Instruct.Q4_1.gguf");
        let d = resolve(&GenerationSource::Auto, None, Some((card, &empty))).expect("ok");
        assert_eq!((d.temperature, d.top_p), (Some(0.2), Some(0.9)));
        let unknown = Path::new("/x/other.gguf");
        let d = resolve(&GenerationSource::Auto, None, Some((unknown, &empty))).expect("ok");
        assert!(d.is_empty(), "{d:?}");
        let own = header(vec![
            ("general.architecture", gguf::Value::Str("llama".into())),
            ("general.sampling.temp", gguf::Value::F32(0.6)),
            ("general.sampling.top_k", gguf::Value::I32(20)),
        ]);
        let d = resolve(&GenerationSource::Auto, None, Some((card, &own))).expect("ok");
        assert!((d.temperature.unwrap_or(0.0) - 0.6).abs() < 1e-6, "{d:?}");
        assert_eq!((d.top_k, d.top_p), (Some(20), None), "the file wins whole");
        let d = resolve(&GenerationSource::Vllm, None, Some((card, &empty))).expect("ok");
        assert!(d.is_empty());
    }

    #[test]
    fn override_wins_and_is_checked() {
        let o = GenerationDefaults::parse_override(r#"{"temperature":0.5,"max_tokens":7}"#)
            .expect("ok");
        let empty = header(vec![(
            "general.architecture",
            gguf::Value::Str("llama".into()),
        )]);
        let card = Path::new("SmolLM2-135M-Instruct.Q4_1.gguf");
        let d = resolve(&GenerationSource::Auto, Some(&o), Some((card, &empty))).expect("ok");
        assert_eq!(
            (d.temperature, d.top_p, d.max_new_tokens),
            (Some(0.5), Some(0.9), Some(7))
        );
        assert!(GenerationDefaults::parse_override(r#"{"temprature":0.5}"#).is_err());
        assert!(GenerationDefaults::parse_override(r#"{"top_p":0}"#).is_err());
        assert!(GenerationDefaults::parse_override("[1]").is_err());
    }

    #[test]
    fn hugging_face_file_is_read_from_a_folder() {
        let dir = std::env::temp_dir().join(format!("switchyard-genc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(
            dir.join("generation_config.json"),
            r#"{"bos_token_id":1,"do_sample":true,"temperature":0.7,"top_k":50,"max_new_tokens":64}"#,
        )
        .expect("write");
        let d = resolve(&GenerationSource::Path(dir.clone()), None, None).expect("ok");
        assert_eq!(
            (d.temperature, d.top_k, d.max_new_tokens),
            (Some(0.7), Some(50), Some(64))
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert!(resolve(&GenerationSource::Path(dir), None, None).is_err());
    }
}
