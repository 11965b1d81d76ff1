//! SentencePiece vocabularies (`tokenizer.ggml.model = "llama"`: Llama 2, Mistral v0.1,
//! Gemma) read from a GGUF file, tokenizing as llama.cpp's SPM tokenizer does, so the ids
//! equal llama.cpp's:
//!
//! 1. Special tokens are cut out of the text first, as llama.cpp's `parse_special` does:
//!    every control, user-defined and unknown token, longest text first, splits every
//!    remaining text fragment at each of its occurrences (Gemma's user-defined tokens
//!    include runs of newlines and spaces, which are matched this way too).
//! 2. Each text fragment gets a leading space when the file asks for
//!    `tokenizer.ggml.add_space_prefix` and the fragment starts the text or follows a
//!    special token; every space becomes `▁` (U+2581).
//! 3. The fragment starts as one symbol per UTF-8 character; adjacent symbols whose
//!    concatenation is a token are merged, the pair whose token has the highest score
//!    first (ties: the leftmost), until no pair is a token.
//! 4. A symbol that is no token is written as its bytes' `<0xXX>` tokens (byte fallback).
//!
//! Decoding turns `▁` back into spaces, byte tokens into their bytes, and drops the one
//! leading space `add_space_prefix` put in front of a text (llama.cpp's detokenize rule;
//! [`Tokenizer::decode_continuation`] keeps it, for text that continues a prompt).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use aho_corasick::AhoCorasick;

use super::bpe::TokenizerError;
use super::template::ChatTemplate;
use super::Tokenizer;
use gguf::{Gguf, Value};
use protocol::openai::ChatMessage;

/// llama.cpp's GGUF token types.
const TYPE_NORMAL: i64 = 1;
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;
const TYPE_BYTE: i64 = 6;
/// Not a GGUF type: a token llama.cpp makes control on top of its own type (its piece stays
/// the raw text; decoding with `skip_special` leaves it out).
const TYPE_CONTROL_OVERRIDE: i64 = -1;

/// A byte with no token of its own.
const NO_TOKEN: u32 = u32::MAX;

/// Texts llama.cpp makes end-of-generation tokens (and control tokens, whatever the file
/// says: llama-vocab.cpp's "control-looking token" list), so that generation stops where
/// llama.cpp's does. Gemma 3's `</s>` (an HTML tag there, user-defined) is one of them.
const EOG_TEXTS: [&str; 22] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>",
    "[e~[",
];

/// SentencePiece's whitespace marker.
const SPACE_MARK: &str = "\u{2581}";

/// A SentencePiece tokenizer with its chat template.
pub struct SpmTokenizer {
    /// Each token's text as decoding writes it with special tokens shown.
    pieces: Vec<Box<[u8]>>,
    /// Control and unknown tokens: left out when decoding with `skip_special`.
    skip: Vec<bool>,
    scores: Vec<f32>,
    /// Token text -> id, over the whole vocabulary (llama.cpp looks merges up there).
    ids: HashMap<Box<str>, u32>,
    /// Each byte's fallback token (`<0xXX>`), [`NO_TOKEN`] where the vocabulary has none.
    byte_ids: [u32; 256],
    unk: Option<u32>,
    /// Control, user-defined and unknown tokens, longest text first.
    specials: Vec<(Box<str>, u32)>,
    /// All of `specials`' texts, to find which occur in a text at all.
    special_finder: Option<AhoCorasick>,
    add_space_prefix: bool,
    eos: Vec<u32>,
    bos: Option<u32>,
    eos_id: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    template: Option<ChatTemplate>,
    bos_text: String,
    eos_text: String,
}

impl std::fmt::Debug for SpmTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpmTokenizer")
            .field("vocab", &self.pieces.len())
            .field("specials", &self.specials.len())
            .field("add_space_prefix", &self.add_space_prefix)
            .field("eos", &self.eos)
            .finish()
    }
}

/// A piece of the text being tokenized: raw text (a byte range) or a special token.
#[derive(Clone, Copy, Debug)]
enum Fragment {
    Text(usize, usize),
    Token(u32),
}

/// A merge candidate: adjacent symbols `left` and `right` whose concatenation (`size`
/// bytes) is a token with `score`.
#[derive(Debug)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// The heap's top is the highest score, and of equal scores the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        // Equal scores (as floats compare: -0.0 == 0.0) go to the leftmost pair.
        self.score
            .partial_cmp(&other.score)
            .unwrap_or(Ordering::Equal)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// A symbol of the text being merged: bytes `start..start + len` of it, linked to its
/// neighbours (`usize::MAX`: none). A symbol merged into its left neighbour has `len` 0.
#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: usize,
    len: usize,
    prev: usize,
    next: usize,
}

const NONE: usize = usize::MAX;

impl SpmTokenizer {
    /// Load the tokenizer and chat template of a GGUF model file.
    pub fn from_gguf_path(path: &std::path::Path) -> Result<SpmTokenizer, TokenizerError> {
        Self::from_gguf(&Gguf::open(path)?)
    }

    pub fn from_gguf(g: &Gguf) -> Result<SpmTokenizer, TokenizerError> {
        let path = g.path.clone();
        let bad = |what: String| TokenizerError::Bad {
            path: path.clone(),
            what,
        };
        let model = g
            .require("tokenizer.ggml.model")?
            .as_str()
            .unwrap_or_default();
        if model != "llama" {
            return Err(TokenizerError::Model {
                path: path.clone(),
                model: model.to_string(),
            });
        }
        let tokens: Vec<&str> = g
            .require("tokenizer.ggml.tokens")?
            .as_array()
            .ok_or_else(|| bad("tokenizer.ggml.tokens is not an array".into()))?
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| bad("tokenizer.ggml.tokens holds a non-string".into()))
            })
            .collect::<Result<_, _>>()?;
        let n = tokens.len();
        if n == 0 || n > u32::MAX as usize / 2 {
            return Err(bad(format!("{n} tokens")));
        }
        let scores: Vec<f32> = match g.get("tokenizer.ggml.scores").and_then(Value::as_array) {
            Some(a) if a.len() >= n => a
                .iter()
                .take(n)
                .map(|v| v.as_f64().unwrap_or(0.0) as f32)
                .collect(),
            Some(a) => {
                return Err(bad(format!(
                    "{} scores for {n} tokens (llama.cpp refuses this too)",
                    a.len()
                )))
            }
            None => vec![0.0; n],
        };
        let types: Vec<i64> = match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            Some(a) => (0..n)
                .map(|i| a.get(i).and_then(Value::as_i64).unwrap_or(TYPE_NORMAL))
                .collect(),
            None => vec![TYPE_NORMAL; n],
        };

        // llama.cpp's overrides: its end-of-generation texts become control tokens, except
        // `</s>` in vocabularies where it is ordinary text (Gemma 4's, PLaMo's).
        let normal_s = tokens
            .iter()
            .any(|t| *t == "<|tool_response>" || *t == "<|plamo:eos|>");
        let mut types = types;
        let mut eog: Vec<u32> = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            if !EOG_TEXTS.contains(t) {
                continue;
            }
            if *t == "</s>" && normal_s {
                types[i] = TYPE_NORMAL;
                continue;
            }
            eog.push(i as u32);
            if !matches!(types[i], TYPE_CONTROL) {
                types[i] = TYPE_CONTROL_OVERRIDE;
            }
        }
        let mut ids: HashMap<Box<str>, u32> = HashMap::with_capacity(n);
        let mut pieces = Vec::with_capacity(n);
        let mut skip = Vec::with_capacity(n);
        let mut specials: Vec<(Box<str>, u32)> = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            let id = i as u32;
            // llama.cpp names empty tokens so that every text maps to one id.
            let text: Box<str> = if t.is_empty() {
                format!("[EMPTY_{i}]").into()
            } else {
                (*t).into()
            };
            let ty = types[i];
            let piece: Vec<u8> = match ty {
                TYPE_NORMAL => text.replace(SPACE_MARK, " ").into_bytes(),
                TYPE_CONTROL | TYPE_UNKNOWN | TYPE_USER_DEFINED | TYPE_CONTROL_OVERRIDE => {
                    text.as_bytes().to_vec()
                }
                TYPE_BYTE => match byte_of(&text) {
                    Some(b) => vec![b],
                    None => return Err(bad(format!("byte token {i} is `{text}`"))),
                },
                // Unused and undefined tokens decode to nothing, as in llama.cpp.
                _ => Vec::new(),
            };
            pieces.push(piece.into_boxed_slice());
            skip.push(matches!(
                ty,
                TYPE_CONTROL | TYPE_UNKNOWN | TYPE_CONTROL_OVERRIDE
            ));
            if matches!(
                ty,
                TYPE_CONTROL | TYPE_USER_DEFINED | TYPE_UNKNOWN | TYPE_CONTROL_OVERRIDE
            ) {
                specials.push((text.clone(), id));
            }
            ids.insert(text, id);
        }
        let mut byte_ids = [NO_TOKEN; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            if let Some(&id) = ids.get(format!("<0x{b:02X}>").as_str()) {
                *slot = id;
            } else if b < 0x80 {
                // llama.cpp's second choice: the byte itself as a token.
                if let Some(&id) = ids.get(char::from(b as u8).to_string().as_str()) {
                    *slot = id;
                }
            }
        }
        // Longest first; equal lengths by id (llama.cpp's sort leaves their order open).
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let special_finder = if specials.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::new(specials.iter().map(|(t, _)| t.as_bytes()))
                    .map_err(|e| bad(format!("special tokens: {e}")))?,
            )
        };

        let id_of = |key: &str| {
            g.get(key)
                .and_then(Value::as_i64)
                .filter(|i| *i >= 0 && (*i as usize) < n)
                .map(|i| i as u32)
        };
        let bos = id_of("tokenizer.ggml.bos_token_id");
        let eos_id = id_of("tokenizer.ggml.eos_token_id");
        let mut eos: Vec<u32> = eos_id.into_iter().collect();
        if let Some(eot) = id_of("tokenizer.ggml.eot_token_id") {
            if !eos.contains(&eot) {
                eos.push(eot);
            }
        }
        for id in eog {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        let flag =
            |key: &str, default: bool| g.get(key).and_then(Value::as_bool).unwrap_or(default);
        let template = match g.get("tokenizer.chat_template").and_then(Value::as_str) {
            Some(src) => Some(src),
            // A Gemma vocabulary without a template of its own (base models ship none):
            // Gemma 3's instruction template, as the instruction-tuned files carry it.
            None if ids.contains_key("<start_of_turn>") && ids.contains_key("<end_of_turn>") => {
                Some(super::template::GEMMA3_TEMPLATE)
            }
            None => None,
        };
        let template = match template {
            Some(src) => {
                Some(ChatTemplate::new(src).map_err(|e| bad(format!("chat template: {e}")))?)
            }
            None => None,
        };
        let text_of = |id: Option<u32>| {
            id.map(|i| tokens[i as usize].to_string())
                .unwrap_or_default()
        };
        Ok(SpmTokenizer {
            pieces,
            skip,
            scores,
            ids,
            byte_ids,
            unk: id_of("tokenizer.ggml.unknown_token_id"),
            specials,
            special_finder,
            // SentencePiece's default (llama.cpp's for SPM) is to add the prefix.
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix", true),
            eos,
            bos,
            eos_id,
            add_bos: flag("tokenizer.ggml.add_bos_token", true),
            add_eos: flag("tokenizer.ggml.add_eos_token", false),
            template,
            bos_text: text_of(bos),
            eos_text: text_of(eos_id),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// The bytes one token decodes to (special tokens as their text).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.pieces.get(id as usize).map_or(&[], |b| b)
    }

    /// Whether the file asks for a space in front of each text (`add_space_prefix`).
    pub fn adds_space_prefix(&self) -> bool {
        self.add_space_prefix
    }

    /// Step 1: the text cut into raw fragments and special tokens.
    fn partition(&self, text: &str) -> Vec<Fragment> {
        let mut frags = vec![Fragment::Text(0, text.len())];
        let Some(finder) = &self.special_finder else {
            return frags;
        };
        // Only the specials that occur somewhere can split anything.
        let mut present: Vec<usize> = finder
            .find_overlapping_iter(text)
            .map(|m| m.pattern().as_usize())
            .collect();
        if present.is_empty() {
            return frags;
        }
        present.sort_unstable();
        present.dedup();
        let mut next = Vec::new();
        for &si in &present {
            let (special, id) = (&*self.specials[si].0, self.specials[si].1);
            next.clear();
            for f in &frags {
                let Fragment::Text(mut start, end) = *f else {
                    next.push(*f);
                    continue;
                };
                while let Some(at) = text[start..end].find(special) {
                    if at > 0 {
                        next.push(Fragment::Text(start, start + at));
                    }
                    next.push(Fragment::Token(id));
                    start += at + special.len();
                }
                if start < end {
                    next.push(Fragment::Text(start, end));
                }
            }
            std::mem::swap(&mut frags, &mut next);
        }
        frags
    }

    /// Steps 2-4 for one raw fragment.
    fn encode_fragment(&self, raw: &str, space_prefix: bool, out: &mut Vec<u32>) {
        let mut text = String::with_capacity(raw.len() + 3);
        if space_prefix {
            text.push(' ');
        }
        text.push_str(raw);
        let text = text.replace(' ', SPACE_MARK);
        let mut syms: Vec<Symbol> = Vec::with_capacity(text.len());
        for (start, c) in text.char_indices() {
            let i = syms.len();
            syms.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: if i == 0 { NONE } else { i - 1 },
                next: i + 1,
            });
        }
        let Some(last) = syms.last_mut() else {
            return;
        };
        last.next = NONE;
        let mut heap = BinaryHeap::new();
        let try_add =
            |heap: &mut BinaryHeap<Bigram>, syms: &[Symbol], left: usize, right: usize| {
                if left == NONE || right == NONE {
                    return;
                }
                let (s, size) = (syms[left].start, syms[left].len + syms[right].len);
                if let Some(&id) = self.ids.get(&text[s..s + size]) {
                    heap.push(Bigram {
                        score: self.scores[id as usize],
                        left,
                        right,
                        size,
                    });
                }
            };
        for i in 1..syms.len() {
            try_add(&mut heap, &syms, i - 1, i);
        }
        while let Some(b) = heap.pop() {
            let (l, r) = (syms[b.left], syms[b.right]);
            // Stale: one side was merged away, or grew, since this pair was queued.
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
                continue;
            }
            syms[b.left].len += r.len;
            syms[b.right].len = 0;
            syms[b.left].next = r.next;
            if r.next != NONE {
                syms[r.next].prev = b.left;
            }
            try_add(&mut heap, &syms, l.prev, b.left);
            try_add(&mut heap, &syms, b.left, r.next);
        }
        let mut i = 0;
        while i != NONE {
            let s = syms[i];
            let piece = &text[s.start..s.start + s.len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        match self.byte_ids[b as usize] {
                            NO_TOKEN => out.extend(self.unk),
                            id => out.push(id),
                        }
                    }
                }
            }
            i = s.next;
        }
    }

    fn detokenize(&self, ids: &[u32], skip_special: bool, strip_leading_space: bool) -> String {
        let mut ids = ids;
        let mut remove_space = strip_leading_space && self.add_space_prefix;
        if skip_special && self.add_bos && self.bos.is_some() && ids.first() == self.bos.as_ref() {
            remove_space = false;
            ids = &ids[1..];
        }
        if skip_special
            && self.add_eos
            && self.eos_id.is_some()
            && ids.last() == self.eos_id.as_ref()
        {
            ids = &ids[..ids.len() - 1];
        }
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let i = id as usize;
            let piece: &[u8] = match self.pieces.get(i) {
                Some(_) if skip_special && self.skip[i] => &[],
                Some(p) => p,
                None => &[],
            };
            let piece = match piece {
                [b' ', rest @ ..] if remove_space => rest,
                p => p,
            };
            remove_space = false;
            bytes.extend_from_slice(piece);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// The byte of a `<0xXX>` token.
fn byte_of(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then_some(())?;
    u8::from_str_radix(hex, 16).ok()
}

impl Tokenizer for SpmTokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let mut prev_special = true;
        for f in self.partition(text) {
            match f {
                // Only an empty text is an empty fragment: it has no tokens at all.
                Fragment::Text(s, e) if s == e => {}
                Fragment::Text(s, e) => {
                    self.encode_fragment(
                        &text[s..e],
                        self.add_space_prefix && prev_special,
                        &mut out,
                    );
                    prev_special = false;
                }
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
            }
        }
        out
    }

    fn encode_prompt(&self, text: &str) -> Vec<u32> {
        let mut ids = self.encode(text);
        // Always, as llama.cpp (and Hugging Face) do: a text starting with `<bos>` gets two.
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            ids.insert(0, bos);
        }
        if let (true, Some(eos)) = (self.add_eos, self.eos_id) {
            ids.push(eos);
        }
        ids
    }

    /// llama.cpp's detokenize: with `skip_special` control tokens are left out (and a BOS
    /// in front keeps the text's leading space); without, they are written as their text.
    fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        self.detokenize(ids, skip_special, true)
    }

    fn decode_continuation(&self, ids: &[u32], skip_special: bool) -> String {
        self.detokenize(ids, skip_special, false)
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
    use protocol::openai::MessageContent;

    /// A small SentencePiece vocabulary written as a GGUF file.
    fn vocab(add_space_prefix: bool, template: bool) -> SpmTokenizer {
        let mut toks: Vec<(String, f32, i64)> = vec![
            ("<unk>".into(), 0.0, TYPE_UNKNOWN),
            ("<s>".into(), 0.0, TYPE_CONTROL),
            ("</s>".into(), 0.0, TYPE_CONTROL),
            ("<start_of_turn>".into(), 0.0, TYPE_CONTROL),
            ("<end_of_turn>".into(), 0.0, TYPE_CONTROL),
            ("\n\n".into(), 0.0, TYPE_USER_DEFINED),
        ];
        for b in 0..=255u8 {
            toks.push((format!("<0x{b:02X}>"), 0.0, TYPE_BYTE));
        }
        for (t, s) in [
            ("▁", -1.0),
            ("h", -2.0),
            ("e", -2.0),
            ("l", -2.0),
            ("o", -2.0),
            ("w", -2.0),
            ("r", -2.0),
            ("d", -2.0),
            ("he", -3.0),
            ("ll", -3.5),
            ("hell", -4.0),
            ("hello", -5.0),
            ("▁hello", -4.5),
            ("▁w", -6.0),
            ("or", -6.0),
            ("▁wor", -7.0),
            ("ld", -6.5),
            ("▁world", -5.5),
            ("▁▁", -8.0),
            ("é", -2.0),
        ] {
            toks.push((t.into(), s, TYPE_NORMAL));
        }
        let mut meta = vec![
            ("tokenizer.ggml.model", Value::Str("llama".into())),
            (
                "tokenizer.ggml.tokens",
                Value::Array(toks.iter().map(|t| Value::Str(t.0.clone())).collect()),
            ),
            (
                "tokenizer.ggml.scores",
                Value::Array(toks.iter().map(|t| Value::F32(t.1)).collect()),
            ),
            (
                "tokenizer.ggml.token_type",
                Value::Array(toks.iter().map(|t| Value::I32(t.2 as i32)).collect()),
            ),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
            ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
            (
                "tokenizer.ggml.add_space_prefix",
                Value::Bool(add_space_prefix),
            ),
        ];
        if !template {
            // No `<start_of_turn>`: falls back to ChatML.
            meta[1] = (
                "tokenizer.ggml.tokens",
                Value::Array(
                    toks.iter()
                        .map(|t| Value::Str(t.0.replace("start_of_turn", "sot")))
                        .collect(),
                ),
            );
        }
        let bytes = gguf::write::to_bytes(&meta, &[]);
        let g = Gguf::parse(&bytes, "test.gguf").unwrap();
        SpmTokenizer::from_gguf(&g).unwrap()
    }

    fn texts(t: &SpmTokenizer, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&i| String::from_utf8_lossy(t.token_bytes(i)).into_owned())
            .collect()
    }

    #[test]
    fn merges_by_score_and_falls_back_to_bytes() {
        let t = vocab(false, true);
        assert_eq!(texts(&t, &t.encode("hello world")), ["hello", " world"]);
        // `ll` outranks `he` only by score; `hell` then `hello`.
        assert_eq!(texts(&t, &t.encode("hello")), ["hello"]);
        // No token for `x` or `€`: their bytes.
        let ids = t.encode("x€");
        assert_eq!(ids.len(), 4);
        assert_eq!(t.decode(&ids, false), "x€");
        // Two spaces: `▁w` outscores `▁▁`, so the first space stays alone.
        assert_eq!(texts(&t, &t.encode("  world")), [" ", " world"]);
    }

    #[test]
    fn space_prefix_follows_specials_and_is_dropped_on_decode() {
        let t = vocab(true, true);
        let ids = t.encode("hello<end_of_turn>hello");
        assert_eq!(texts(&t, &ids), [" hello", "<end_of_turn>", " hello"]);
        assert_eq!(t.decode(&ids, false), "hello<end_of_turn> hello");
        assert_eq!(t.decode(&t.encode("hello world"), false), "hello world");
        // After a BOS the leading space stays (llama.cpp); a continuation keeps it too.
        let mut with_bos = t.encode_prompt("hello");
        assert_eq!(with_bos[0], 1);
        assert_eq!(t.decode(&with_bos, true), " hello");
        with_bos.remove(0);
        assert_eq!(t.decode_continuation(&with_bos, true), " hello");
        let t = vocab(false, true);
        assert_eq!(texts(&t, &t.encode("hello")), ["hello"]);
        // An empty text has no tokens, even with the space prefix.
        assert!(vocab(true, true).encode("").is_empty());
    }

    #[test]
    fn specials_are_cut_out_longest_first() {
        let t = vocab(false, true);
        let ids = t.encode("<start_of_turn>user\n\nhi<end_of_turn>");
        assert_eq!(ids[0], 3);
        assert!(
            ids.contains(&5),
            "user-defined `\\n\\n` is matched in the text"
        );
        assert_eq!(*ids.last().unwrap(), 4);
        assert_eq!(t.decode(&ids, true), "user\n\nhi");
        assert_eq!(
            t.decode(&ids, false),
            "<start_of_turn>user\n\nhi<end_of_turn>"
        );
        assert!(t.eos_token_ids().contains(&4));
    }

    #[test]
    fn incremental_decoding_equals_full_decoding() {
        let t = vocab(true, true);
        let ids = t.encode("hello world é€ hello");
        let mut d = crate::IncrementalDecoder::new();
        let streamed: String = ids.iter().map(|&i| d.push(&t, i)).collect();
        assert_eq!(streamed, t.decode_continuation(&ids, true));
        assert_eq!(streamed, " hello world é€ hello");
    }

    #[test]
    fn gemma_vocabularies_get_gemmas_template() {
        let msg = |role: &str, text: &str| ChatMessage {
            role: role.into(),
            content: Some(MessageContent::Text(text.into())),
            name: None,
        };
        let t = vocab(false, true);
        let chat = [
            msg("user", "Hi"),
            msg("assistant", "Hello!"),
            msg("user", " Bye "),
        ];
        assert_eq!(
            t.apply_chat_template(&chat, true).unwrap(),
            "<s><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
        let t = vocab(false, false);
        assert!(t
            .apply_chat_template(&chat, true)
            .unwrap()
            .starts_with("<|im_start|>user\nHi"));
    }
}
