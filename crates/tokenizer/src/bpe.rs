//! Byte-level BPE (the GPT-2 family: SmolLM, Llama 3, Qwen2, Mistral-Nemo, ...) loaded from a
//! GGUF file's `tokenizer.ggml.*` metadata, producing the same ids as llama.cpp and as the
//! model's Hugging Face tokenizer.
//!
//! Encoding: special tokens (control and user-defined) are split out of the text first, so
//! `<|im_start|>` in a rendered chat template becomes its id; each remaining span is
//! pre-tokenized by the model's `tokenizer.ggml.pre` rules (for `smollm`: every digit alone,
//! then GPT-2's word pattern), each piece is mapped byte by byte to GPT-2's printable
//! alphabet and merged by rank. Merging uses a heap, so a piece of n bytes costs
//! O(n log n) however long it is.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use regex::Regex;

use super::template::ChatTemplate;
use super::Tokenizer;
use gguf::{Gguf, Value};
use protocol::openai::ChatMessage;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{0}")]
    Gguf(#[from] gguf::GgufError),
    #[error(
        "{path}: unsupported tokenizer model `{model}` (supported: `gpt2`, byte-level BPE, and `llama`, SentencePiece)"
    )]
    Model { path: String, model: String },
    #[error("{path}: bad tokenizer metadata: {what}")]
    Bad { path: String, what: String },
}

/// llama.cpp's GGUF token types.
const TYPE_NORMAL: i64 = 1;
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// A byte with no token of its own.
const NO_TOKEN: u32 = u32::MAX;

/// GPT-2's word pattern with its trailing `\s+(?!\S)|\s+` rewritten as a captured `(\s+)`
/// (the `regex` crate has no look-ahead; [`Splitter`] emulates it).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|(\s+)";
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|(\s+)";
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|(\s+)";

/// Pre-tokenization: regexes applied in turn, each splitting the pieces of the one before.
/// Text no regex matches is kept as its own piece (llama.cpp's behaviour).
#[derive(Debug)]
struct Splitter {
    regexes: Vec<Regex>,
}

impl Splitter {
    fn for_pre(pre: &str) -> Splitter {
        let pats: &[&str] = match pre {
            "smollm" => &[r"\p{N}", GPT2],
            "llama3" | "llama-bpe" | "llama-v3" | "falcon3" | "pixtral" => &[LLAMA3],
            "qwen2" | "deepseek-r1-qwen" | "stablelm2" => &[QWEN2],
            _ => &[GPT2],
        };
        Splitter {
            // The patterns are constants tested below; a failure is a programming error.
            regexes: pats
                .iter()
                .map(|p| Regex::new(p).expect("built-in pre-tokenizer pattern"))
                .collect(),
        }
    }

    fn split<'a>(&self, text: &'a str, out: &mut Vec<&'a str>) {
        out.clear();
        out.push(text);
        let mut next = Vec::new();
        for re in &self.regexes {
            next.clear();
            for piece in out.iter() {
                split_one(re, piece, &mut next);
            }
            std::mem::swap(out, &mut next);
        }
    }
}

fn split_one<'a>(re: &Regex, piece: &'a str, out: &mut Vec<&'a str>) {
    let mut last = 0;
    let mut pos = 0;
    let len = piece.len();
    let mut locs = re.capture_locations();
    while pos < len {
        let Some((s, mut e)) = re
            .captures_read_at(&mut locs, piece, pos)
            .map(|m| (m.start(), m.end()))
        else {
            break;
        };
        if e == s {
            pos = s + piece[s..].chars().next().map_or(1, char::len_utf8);
            continue;
        }
        // `\s+(?!\S)`: a whitespace run followed by a non-space gives its last character to
        // what follows (a run of one stays whole, as GPT-2's final `\s+` takes it).
        if locs.get(1).is_some() && e < len {
            if let Some((i, _)) = piece[s..e].char_indices().last() {
                if i > 0 {
                    e = s + i;
                }
            }
        }
        if s > last {
            out.push(&piece[last..s]);
        }
        out.push(&piece[s..e]);
        last = e;
        pos = e;
    }
    if last < len {
        out.push(&piece[last..]);
    }
}

/// GPT-2's reversible map from bytes to printable characters.
fn byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        map[b as usize] = if printable {
            b as char
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    map
}

/// A byte-level BPE tokenizer with its chat template.
pub struct BpeTokenizer {
    /// Each token's bytes, as decoding produces them.
    token_bytes: Vec<Box<[u8]>>,
    /// Control and unknown tokens: skipped when decoding with `skip_special`.
    skip: Vec<bool>,
    /// `(left, right)` -> `(rank, merged)`.
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Each byte's token ([`NO_TOKEN`] where the vocabulary has none).
    byte_ids: [u32; 256],
    unk: Option<u32>,
    splitter: Splitter,
    /// Control and user-defined token texts, longest first, as one alternation.
    specials: Option<Regex>,
    special_ids: HashMap<String, u32>,
    eos: Vec<u32>,
    bos: Option<u32>,
    add_bos: bool,
    template: Option<ChatTemplate>,
    bos_text: String,
    eos_text: String,
}

impl std::fmt::Debug for BpeTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpeTokenizer")
            .field("vocab", &self.token_bytes.len())
            .field("merges", &self.merges.len())
            .field("eos", &self.eos)
            .finish()
    }
}

impl BpeTokenizer {
    /// Load the tokenizer and chat template of a GGUF model file.
    pub fn from_gguf_path(path: &std::path::Path) -> Result<BpeTokenizer, TokenizerError> {
        Self::from_gguf(&Gguf::open(path)?)
    }

    pub fn from_gguf(g: &Gguf) -> Result<BpeTokenizer, TokenizerError> {
        let path = g.path.clone();
        let bad = |what: String| TokenizerError::Bad {
            path: path.clone(),
            what,
        };
        let model = g
            .require("tokenizer.ggml.model")?
            .as_str()
            .unwrap_or_default();
        if model != "gpt2" {
            return Err(TokenizerError::Model {
                path: path.clone(),
                model: model.to_string(),
            });
        }
        let strings = |key: &str| -> Result<Vec<&str>, TokenizerError> {
            g.require(key)?
                .as_array()
                .ok_or_else(|| bad(format!("{key} is not an array")))?
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| bad(format!("{key} holds a non-string")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        if tokens.is_empty() || tokens.len() > u32::MAX as usize / 2 {
            return Err(bad(format!("{} tokens", tokens.len())));
        }
        let types: Vec<i64> = match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            Some(a) => a
                .iter()
                .map(|v| v.as_i64().unwrap_or(TYPE_NORMAL))
                .collect(),
            None => vec![TYPE_NORMAL; tokens.len()],
        };
        let merges_txt = strings("tokenizer.ggml.merges")?;

        let b2c = byte_to_char();
        let mut c2b: HashMap<char, u8> = HashMap::with_capacity(256);
        for (b, c) in b2c.iter().enumerate() {
            c2b.insert(*c, b as u8);
        }
        let mut ids: HashMap<&str, u32> = HashMap::with_capacity(tokens.len());
        let mut token_bytes = Vec::with_capacity(tokens.len());
        let mut skip = Vec::with_capacity(tokens.len());
        let mut specials: Vec<(&str, u32)> = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            let id = i as u32;
            ids.entry(t).or_insert(id);
            let ty = types.get(i).copied().unwrap_or(TYPE_NORMAL);
            let raw = matches!(ty, TYPE_CONTROL | TYPE_USER_DEFINED | TYPE_UNKNOWN);
            let bytes: Vec<u8> = if raw {
                t.as_bytes().to_vec()
            } else {
                let mut v = Vec::with_capacity(t.len());
                for c in t.chars() {
                    match c2b.get(&c) {
                        Some(b) => v.push(*b),
                        None => {
                            let mut buf = [0u8; 4];
                            v.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                        }
                    }
                }
                v
            };
            token_bytes.push(bytes.into_boxed_slice());
            skip.push(matches!(ty, TYPE_CONTROL | TYPE_UNKNOWN));
            if matches!(ty, TYPE_CONTROL | TYPE_USER_DEFINED) && !t.is_empty() {
                specials.push((t, id));
            }
        }
        // Some vocabularies lack a few control bytes: those become the unknown token (or
        // nothing), as they cannot be written otherwise.
        let mut byte_ids = [NO_TOKEN; 256];
        for (b, c) in b2c.iter().enumerate() {
            let mut buf = [0u8; 4];
            if let Some(&id) = ids.get(&*c.encode_utf8(&mut buf)) {
                byte_ids[b] = id;
            }
        }
        let mut merges = HashMap::with_capacity(merges_txt.len());
        let mut joined = String::new();
        for (rank, m) in merges_txt.iter().enumerate() {
            let Some((l, r)) = m.split_once(' ') else {
                return Err(bad(format!("merge {rank} `{m}` has no space")));
            };
            joined.clear();
            joined.push_str(l);
            joined.push_str(r);
            if let (Some(&li), Some(&ri), Some(&mi)) =
                (ids.get(l), ids.get(r), ids.get(joined.as_str()))
            {
                merges.entry((li, ri)).or_insert((rank as u32, mi));
            }
        }
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let special_re = if specials.is_empty() {
            None
        } else {
            let alt: Vec<String> = specials.iter().map(|(t, _)| regex::escape(t)).collect();
            Some(Regex::new(&alt.join("|")).map_err(|e| bad(format!("special tokens: {e}")))?)
        };
        let special_ids = specials
            .iter()
            .map(|(t, id)| (t.to_string(), *id))
            .collect();
        let id_of = |key: &str| {
            g.get(key)
                .and_then(Value::as_i64)
                .filter(|i| *i >= 0 && (*i as usize) < tokens.len())
                .map(|i| i as u32)
        };
        let bos = id_of("tokenizer.ggml.bos_token_id");
        let mut eos: Vec<u32> = id_of("tokenizer.ggml.eos_token_id").into_iter().collect();
        if let Some(eot) = id_of("tokenizer.ggml.eot_token_id") {
            if !eos.contains(&eot) {
                eos.push(eot);
            }
        }
        // End-of-turn markers that llama.cpp also stops on when they are control tokens.
        for name in [
            "<|im_end|>",
            "<|eot_id|>",
            "<|end|>",
            "<end_of_turn>",
            "<|endoftext|>",
        ] {
            if let Some(&id) = ids.get(name) {
                if skip[id as usize] && !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        let text_of = |id: Option<u32>| {
            id.map(|i| tokens[i as usize].to_string())
                .unwrap_or_default()
        };
        let template = match g.get("tokenizer.chat_template").and_then(Value::as_str) {
            Some(src) => {
                Some(ChatTemplate::new(src).map_err(|e| bad(format!("chat template: {e}")))?)
            }
            None => None,
        };
        Ok(BpeTokenizer {
            token_bytes,
            skip,
            merges,
            byte_ids,
            unk: id_of("tokenizer.ggml.unknown_token_id"),
            splitter: Splitter::for_pre(
                g.get("tokenizer.ggml.pre")
                    .and_then(Value::as_str)
                    .unwrap_or("default"),
            ),
            specials: special_re,
            special_ids,
            eos,
            bos,
            add_bos: g
                .get("tokenizer.ggml.add_bos_token")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            template,
            bos_text: text_of(bos),
            eos_text: text_of(id_of("tokenizer.ggml.eos_token_id")),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// The id of a special token's text, if it is one.
    pub fn special_id(&self, text: &str) -> Option<u32> {
        self.special_ids.get(text).copied()
    }

    /// The token bytes the vocabulary cannot spell become (`tokenizer.ggml.unknown_token_id`;
    /// SmolLM2's is `<|endoftext|>`, as in its Hugging Face tokenizer), if the file names one.
    pub fn unknown_id(&self) -> Option<u32> {
        self.unk
    }

    /// Whether every byte of `text` has a token of its own; a byte without one encodes as
    /// [`BpeTokenizer::unknown_id`] (or nothing), so only such text round-trips exactly.
    pub fn can_spell(&self, text: &str) -> bool {
        text.bytes().all(|b| self.byte_ids[b as usize] != NO_TOKEN)
    }

    /// The bytes one token decodes to.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes.get(id as usize).map_or(&[], |b| b)
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        let mut pieces = Vec::new();
        self.splitter.split(text, &mut pieces);
        let mut syms = Vec::new();
        let mut heap = BinaryHeap::new();
        for piece in pieces {
            self.bpe(piece.as_bytes(), &mut syms, &mut heap, out);
        }
    }

    /// Merge one pre-tokenized piece. `syms` holds `(id, prev, next)` with `usize::MAX`
    /// for none; merged-away symbols get id `u32::MAX`.
    #[allow(clippy::type_complexity)]
    fn bpe(
        &self,
        bytes: &[u8],
        syms: &mut Vec<(u32, usize, usize)>,
        heap: &mut BinaryHeap<Reverse<(u32, usize, usize, u32, u32)>>,
        out: &mut Vec<u32>,
    ) {
        const NONE: usize = usize::MAX;
        let emit = |id: u32, out: &mut Vec<u32>| {
            if id != NO_TOKEN {
                out.push(id);
            } else if let Some(u) = self.unk {
                out.push(u);
            }
        };
        if bytes.len() == 1 {
            emit(self.byte_ids[bytes[0] as usize], out);
            return;
        }
        syms.clear();
        heap.clear();
        let n = bytes.len();
        for (i, b) in bytes.iter().enumerate() {
            syms.push((
                self.byte_ids[*b as usize],
                if i == 0 { NONE } else { i - 1 },
                if i + 1 == n { NONE } else { i + 1 },
            ));
        }
        let push = |heap: &mut BinaryHeap<_>, syms: &[(u32, usize, usize)], l: usize| {
            let r = syms[l].2;
            if r == NONE {
                return;
            }
            if let Some(&(rank, _)) = self.merges.get(&(syms[l].0, syms[r].0)) {
                heap.push(Reverse((rank, l, r, syms[l].0, syms[r].0)));
            }
        };
        for l in 0..n - 1 {
            push(heap, syms, l);
        }
        while let Some(Reverse((_, l, r, lid, rid))) = heap.pop() {
            // Stale entries: either side merged since, or no longer adjacent.
            if syms[l].0 != lid || syms[r].0 != rid || syms[l].2 != r {
                continue;
            }
            let Some(&(_, merged)) = self.merges.get(&(lid, rid)) else {
                continue;
            };
            let next = syms[r].2;
            syms[l].0 = merged;
            syms[l].2 = next;
            syms[r].0 = u32::MAX;
            if next != NONE {
                syms[next].1 = l;
            }
            let prev = syms[l].1;
            if prev != NONE {
                push(heap, syms, prev);
            }
            push(heap, syms, l);
        }
        let mut i = 0;
        while i != NONE {
            emit(syms[i].0, out);
            i = syms[i].2;
        }
    }
}

impl Tokenizer for BpeTokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let mut last = 0;
        if let Some(re) = &self.specials {
            for m in re.find_iter(text) {
                if m.start() > last {
                    self.encode_plain(&text[last..m.start()], &mut out);
                }
                if let Some(&id) = self.special_ids.get(m.as_str()) {
                    out.push(id);
                }
                last = m.end();
            }
        }
        if last < text.len() {
            self.encode_plain(&text[last..], &mut out);
        }
        out
    }

    fn encode_prompt(&self, text: &str) -> Vec<u32> {
        let mut ids = self.encode(text);
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        ids
    }

    fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let i = id as usize;
            if i >= self.token_bytes.len() || (skip_special && self.skip[i]) {
                continue;
            }
            bytes.extend_from_slice(&self.token_bytes[i]);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }

    fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        match &self.template {
            Some(t) => t.render(
                messages,
                add_generation_prompt,
                &self.bos_text,
                &self.eos_text,
            ),
            None => Ok(super::chatml(messages, add_generation_prompt)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(pre: &str, text: &str) -> Vec<String> {
        let s = Splitter::for_pre(pre);
        let mut out = Vec::new();
        s.split(text, &mut out);
        out.into_iter().map(str::to_string).collect()
    }

    #[test]
    fn gpt2_whitespace_lookahead_is_emulated() {
        assert_eq!(pieces("gpt2", "Hello world"), ["Hello", " world"]);
        assert_eq!(pieces("gpt2", "a   b"), ["a", "  ", " b"]);
        assert_eq!(pieces("gpt2", "a\n\nb"), ["a", "\n", "\n", "b"]);
        assert_eq!(pieces("gpt2", "end  "), ["end", "  "]);
        assert_eq!(pieces("gpt2", "it's 42!"), ["it", "'s", " 42", "!"]);
    }

    #[test]
    fn smollm_isolates_digits() {
        assert_eq!(
            pieces("smollm", "abc 2024x"),
            ["abc", " ", "2", "0", "2", "4", "x"]
        );
        assert_eq!(pieces("smollm", "3.14"), ["3", ".", "1", "4"]);
    }

    #[test]
    fn llama3_groups_three_digits() {
        assert_eq!(pieces("llama3", "12345 ok"), ["123", "45", " ok"]);
        assert_eq!(pieces("qwen2", "12 ok"), ["1", "2", " ok"]);
    }

    #[test]
    fn byte_map_is_a_bijection() {
        let m = byte_to_char();
        let set: std::collections::HashSet<char> = m.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(m[b' ' as usize], 'Ġ');
        assert_eq!(m[b'\n' as usize], 'Ċ');
    }
}
