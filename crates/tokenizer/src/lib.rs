//! Tokenizers, shared by the engine and the router (which must tokenize exactly as the
//! engine does to follow its KV events): the [`Tokenizer`] trait, byte-level BPE read from
//! a GGUF file (ids equal to llama.cpp's and Hugging Face's), the fast deterministic
//! [`SimTokenizer`], chat-template rendering, and incremental detokenization.
//! Pure computation: no threads, no model runtime.

pub mod bpe;
mod incremental;
pub mod sim;
pub mod template;

pub use bpe::{BpeTokenizer, TokenizerError};
pub use incremental::IncrementalDecoder;
pub use sim::SimTokenizer;

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
