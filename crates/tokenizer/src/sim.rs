//! The simulation tokenizer: fast, deterministic and exactly reversible, with real-BPE-like
//! density (about four bytes of English per token).
//!
//! Text is split into words (an optional leading space, then a run of letters/digits, or a
//! single other character), and each word into pieces of at most four bytes that never
//! split a UTF-8 character. A piece's id is its bytes packed little-endian into a `u32`.
//! Bytes `0xFF` never occur in UTF-8, so ids with a `0xFF` top byte are free for special
//! tokens.

use super::Tokenizer;

pub const ENDOFTEXT: u32 = 0xFFFF_FF00;
pub const IM_START: u32 = 0xFFFF_FF01;
pub const IM_END: u32 = 0xFFFF_FF02;

const SPECIALS: &[(&str, u32)] = &[
    ("<|endoftext|>", ENDOFTEXT),
    ("<|im_start|>", IM_START),
    ("<|im_end|>", IM_END),
];

#[derive(Debug, Default, Clone)]
pub struct SimTokenizer;

impl SimTokenizer {
    pub fn new() -> Self {
        SimTokenizer
    }

    /// The id of a piece of at most four bytes (no special-token check).
    pub fn piece_id(piece: &str) -> u32 {
        let mut id = 0u32;
        for (i, b) in piece.bytes().take(4).enumerate() {
            id |= u32::from(b) << (8 * i);
        }
        id
    }

    fn encode_plain(text: &str, out: &mut Vec<u32>) {
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            // A word: optional single leading space + alphanumeric run; else one char.
            let start = i;
            let mut j = i;
            if bytes[j] == b' ' && j + 1 < bytes.len() && bytes[j + 1].is_ascii_alphanumeric() {
                j += 1;
            }
            if bytes[j].is_ascii_alphanumeric() {
                while j < bytes.len() && bytes[j].is_ascii_alphanumeric() {
                    j += 1;
                }
            } else {
                j += utf8_len(bytes[j]).max(1);
            }
            let end = j.min(bytes.len());
            Self::split_word(&text[start..end], out);
            i = end;
        }
    }

    fn split_word(word: &str, out: &mut Vec<u32>) {
        if word == "\0" {
            out.push(0);
            return;
        }
        let mut piece_start = 0;
        let mut piece_len = 0;
        for (idx, c) in word.char_indices() {
            let l = c.len_utf8();
            if piece_len + l > 4 {
                out.push(Self::piece_id(&word[piece_start..idx]));
                piece_start = idx;
                piece_len = 0;
            }
            piece_len += l;
        }
        if piece_len > 0 {
            out.push(Self::piece_id(&word[piece_start..]));
        }
    }

    /// The text of one id (special tokens as their markers).
    pub fn piece(id: u32) -> Vec<u8> {
        if let Some((s, _)) = SPECIALS.iter().find(|(_, sid)| *sid == id) {
            return s.as_bytes().to_vec();
        }
        if id == 0 {
            return vec![0];
        }
        id.to_le_bytes()
            .into_iter()
            .take_while(|b| *b != 0)
            .collect()
    }

    pub fn is_special(id: u32) -> bool {
        id >> 24 == 0xFF
    }
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7F => 1,
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF7 => 4,
        _ => 1,
    }
}

impl Tokenizer for SimTokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let mut rest = text;
        while !rest.is_empty() {
            // Find the earliest special marker.
            let next = SPECIALS
                .iter()
                .filter_map(|(s, id)| rest.find(s).map(|p| (p, *s, *id)))
                .min_by_key(|(p, _, _)| *p);
            match next {
                Some((p, s, id)) => {
                    Self::encode_plain(&rest[..p], &mut out);
                    out.push(id);
                    rest = &rest[p + s.len()..];
                }
                None => {
                    Self::encode_plain(rest, &mut out);
                    break;
                }
            }
        }
        out
    }

    fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            if skip_special && Self::is_special(id) {
                continue;
            }
            bytes.extend_from_slice(&Self::piece(id));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn eos_token_ids(&self) -> &[u32] {
        &[IM_END, ENDOFTEXT]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_text_exactly() {
        let t = SimTokenizer::new();
        for s in [
            "The capital of France is Paris.",
            "  two  spaces\nand\ttabs, numbers 12345678 and ünïcødé 🚀 emoji",
            "<|im_start|>user\nhi<|im_end|>\n",
            "a\0b",
            "",
        ] {
            let ids = t.encode(s);
            assert_eq!(t.decode(&ids, false), s, "ids {ids:?}");
        }
    }

    #[test]
    fn density_is_like_bpe() {
        let t = SimTokenizer::new();
        let text = "The quick brown fox jumps over the lazy dog and keeps running far away.";
        let n = t.encode(text).len();
        assert!(n > text.len() / 6 && n < text.len() / 2, "{n} tokens");
    }

    #[test]
    fn specials_are_single_tokens_and_skippable() {
        let t = SimTokenizer::new();
        let ids = t.encode("<|im_start|>hi<|im_end|>");
        assert_eq!(ids.first(), Some(&IM_START));
        assert_eq!(ids.last(), Some(&IM_END));
        assert_eq!(t.decode(&ids, true), "hi");
    }
}
