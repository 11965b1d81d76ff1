//! Incremental detokenization for streaming, in vLLM's manner: decode a short window of
//! recent tokens and emit only the new, complete text (never half a UTF-8 character).

use super::Tokenizer;

/// Per-request streaming decoder state. Memory is O(output length) in token ids only.
#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add one token; returns the new text it completes (possibly empty).
    pub fn push(&mut self, tok: &dyn Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let prefix = tok.decode_continuation(&self.ids[self.prefix_offset..self.read_offset], true);
        let full = tok.decode_continuation(&self.ids[self.prefix_offset..], true);
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let new = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            new
        } else {
            String::new()
        }
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SimTokenizer;

    #[test]
    fn concatenated_deltas_equal_full_decode() {
        let t = SimTokenizer::new();
        let ids = t.encode("Hello, wörld! 🚀 This is streamed<|im_end|>");
        let mut d = IncrementalDecoder::new();
        let streamed: String = ids.iter().map(|&i| d.push(&t, i)).collect();
        assert_eq!(streamed, t.decode(&ids, true));
    }
}
