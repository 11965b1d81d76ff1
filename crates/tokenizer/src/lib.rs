//! Tokenizers, shared by the engine and the router (which must tokenize exactly as the
//! engine does to follow its KV events): the [`Tokenizer`] trait, byte-level BPE and
//! SentencePiece vocabularies read from a GGUF file (ids equal to llama.cpp's;
//! [`from_gguf`] picks by `tokenizer.ggml.model`), the fast deterministic
//! [`SimTokenizer`], chat-template rendering, and incremental detokenization.
//! Pure computation: no threads, no model runtime.

pub mod bpe;
mod incremental;
pub mod sim;
pub mod spm;
pub mod template;

pub use bpe::{BpeTokenizer, TokenizerError};
pub use incremental::IncrementalDecoder;
pub use sim::SimTokenizer;
pub use spm::SpmTokenizer;

use std::sync::Arc;

/// The tokenizer a GGUF file describes: byte-level BPE for `tokenizer.ggml.model =
/// "gpt2"`, SentencePiece for `"llama"`.
pub fn from_gguf(g: &gguf::Gguf) -> Result<Arc<dyn Tokenizer>, TokenizerError> {
    match g.get("tokenizer.ggml.model").and_then(gguf::Value::as_str) {
        Some("llama") => Ok(Arc::new(SpmTokenizer::from_gguf(g)?)),
        _ => Ok(Arc::new(BpeTokenizer::from_gguf(g)?)),
    }
}

/// [`from_gguf`] on a file.
pub fn from_gguf_path(path: &std::path::Path) -> Result<Arc<dyn Tokenizer>, TokenizerError> {
    from_gguf(&gguf::Gguf::open(path)?)
}

use protocol::openai::ChatMessage;

/// Turns text into token ids and back. Implementations are immutable and shared across
/// request handlers.
pub trait Tokenizer: Send + Sync {
    /// Encode `text`; special-token markers in the text become their special ids.
    fn encode(&self, text: &str) -> Vec<u32>;
    /// Encode a completion prompt: [`Tokenizer::encode`] plus the BOS token where the model
    /// adds one (vLLM's `add_special_tokens=True`). Rendered chat prompts use `encode`, as
    /// the template writes its own BOS.
    fn encode_prompt(&self, text: &str) -> Vec<u32> {
        self.encode(text)
    }
    /// Decode ids to text; special tokens are skipped when `skip_special` is set.
    fn decode(&self, ids: &[u32], skip_special: bool) -> String;
    /// Decode ids that continue earlier text (generated tokens after a prompt, a window of
    /// incremental detokenization): no start-of-text rule applies, so SentencePiece's
    /// leading space is kept. The same as [`Tokenizer::decode`] for other vocabularies.
    fn decode_continuation(&self, ids: &[u32], skip_special: bool) -> String {
        self.decode(ids, skip_special)
    }
    /// Ids that end generation (EOS and end-of-turn).
    fn eos_token_ids(&self) -> &[u32];
    /// Render chat messages into a prompt string; an error is the template's complaint
    /// about the messages (a 400 for the client).
    fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        Ok(chatml(messages, add_generation_prompt))
    }
}

/// The ChatML template (`<|im_start|>role\ncontent<|im_end|>\n`), the one SmolLM2 and
/// Qwen use.
pub fn chatml(messages: &[ChatMessage], add_generation_prompt: bool) -> String {
    let mut s = String::new();
    for m in messages {
        s.push_str("<|im_start|>");
        s.push_str(&m.role);
        s.push('\n');
        if let Some(c) = &m.content {
            s.push_str(&c.text());
        }
        s.push_str("<|im_end|>\n");
    }
    if add_generation_prompt {
        s.push_str("<|im_start|>assistant\n");
    }
    s
}
