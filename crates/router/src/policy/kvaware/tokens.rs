//! Prompts as the engine sees them, for `kvaware`: the request body rendered and
//! tokenized exactly as the engine does it (chat: the model's template,
//! `add_generation_prompt` defaulting to true; completions: the text prompt with the
//! model's BOS where it adds one, or the token ids; a batch: its first prompt), with the
//! model's tokenizer from `--tokenizer` (a GGUF file), else the sim tokenizer and ChatML,
//! as Switchyard's sim engines do.

use std::collections::HashMap;
use std::sync::Arc;

use protocol::openai::{ChatMessage, Prompt};
use serde::Deserialize;
use tokenizer::{SimTokenizer, Tokenizer};

/// The body fields the engine builds its prompt from.
#[derive(Deserialize)]
struct PromptBody {
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    prompt: Option<Prompt>,
    #[serde(default)]
    add_generation_prompt: Option<bool>,
}

/// The tokenizers prompts are rendered with, per model (`--tokenizer`), loaded once at
/// start and kept across reloads.
pub struct Tokenizers {
    by_model: HashMap<String, Arc<dyn Tokenizer>>,
    default: Arc<dyn Tokenizer>,
}

impl std::fmt::Debug for Tokenizers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizers")
            .field("models", &self.by_model.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Default for Tokenizers {
    fn default() -> Self {
        Tokenizers {
            by_model: HashMap::new(),
            default: Arc::new(SimTokenizer::new()),
        }
    }
}

impl Tokenizers {
    /// Load `[MODEL=]PATH` specs: a bare path is every other model's tokenizer.
    pub fn load(specs: &[String]) -> Result<Tokenizers, String> {
        let mut t = Tokenizers::default();
        let mut cache: HashMap<&str, Arc<dyn Tokenizer>> = HashMap::new();
        for spec in specs {
            let (model, path) = match spec.split_once('=') {
                Some((m, p)) if !m.is_empty() => (Some(m), p),
                _ => (None, spec.as_str()),
            };
            let tok = match cache.get(path) {
                Some(t) => t.clone(),
                None => {
                    let loaded: Arc<dyn Tokenizer> =
                        tokenizer::from_gguf_path(std::path::Path::new(path))
                            .map_err(|e| format!("--tokenizer {spec}: {e}"))?;
                    cache.insert(path, loaded.clone());
                    loaded
                }
            };
            match model {
                Some(m) => {
                    t.by_model.insert(m.to_string(), tok);
                }
                None => t.default = tok,
            }
        }
        Ok(t)
    }

    pub fn for_model(&self, model: &str) -> &dyn Tokenizer {
        self.by_model.get(model).unwrap_or(&self.default).as_ref()
    }
}

/// The prompt's token ids as the engine computes them; `None` when the body has no prompt
/// (or the template refuses it: the engine will answer that request with an error).
pub fn prompt_tokens(tokenizer: &dyn Tokenizer, body: &[u8]) -> Option<Vec<u32>> {
    let b: PromptBody = serde_json::from_slice(body).ok()?;
    if let Some(messages) = b.messages {
        let text = tokenizer
            .apply_chat_template(&messages, b.add_generation_prompt.unwrap_or(true))
            .ok()?;
        return Some(tokenizer.encode(&text));
    }
    Some(match b.prompt? {
        Prompt::Text(t) => tokenizer.encode_prompt(&t),
        Prompt::Tokens(t) => t,
        Prompt::TextBatch(v) => tokenizer.encode_prompt(v.first()?),
        Prompt::TokenBatch(mut v) => {
            if v.is_empty() {
                return None;
            }
            v.swap_remove(0)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(system: &str, user: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({"model":"m","messages":[
            {"role":"system","content":system},{"role":"user","content":user}]}))
        .unwrap()
    }

    #[test]
    fn tokenizes_as_the_engine_does() {
        let t = SimTokenizer::new();
        let body = chat("be brief", "hi");
        let msgs: Vec<ChatMessage> = serde_json::from_value(json!([
            {"role":"system","content":"be brief"},{"role":"user","content":"hi"}]))
        .unwrap();
        let expect = t.encode(&tokenizer::chatml(&msgs, true));
        assert_eq!(prompt_tokens(&t, &body), Some(expect));
        let no_gen =
            br#"{"messages":[{"role":"user","content":"hi"}],"add_generation_prompt":false}"#;
        assert_eq!(
            prompt_tokens(&t, no_gen),
            Some(t.encode("<|im_start|>user\nhi<|im_end|>\n"))
        );
        assert_eq!(
            prompt_tokens(&t, br#"{"prompt":"once upon"}"#),
            Some(t.encode("once upon"))
        );
        assert_eq!(
            prompt_tokens(&t, br#"{"prompt":[5,6,7]}"#),
            Some(vec![5, 6, 7])
        );
        assert_eq!(prompt_tokens(&t, br#"{"prompt":[[1],[2]]}"#), Some(vec![1]));
        assert_eq!(prompt_tokens(&t, br#"{"input":"x"}"#), None);
    }
}
