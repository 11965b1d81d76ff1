//! The byte-level BPE tokenizer of the default model (SmolLM2; path from
//! SWITCHYARD_FUZZ_MODEL, else the model store's cache): any text encodes and decodes
//! back to itself, and decoding token by token (the engine's incremental detokenizer)
//! gives the same text as decoding all at once.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use switchyard_tokenizer::{BpeTokenizer, IncrementalDecoder, Tokenizer};

fn tokenizer() -> &'static BpeTokenizer {
    static T: OnceLock<BpeTokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let path = std::env::var("SWITCHYARD_FUZZ_MODEL").unwrap_or_else(|_| {
            let home = std::env::var("HOME").unwrap_or_default();
            format!("{home}/.cache/switchyard/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
        BpeTokenizer::from_gguf_path(std::path::Path::new(&path))
            .unwrap_or_else(|e| panic!("set SWITCHYARD_FUZZ_MODEL to a llama-family GGUF: {e}"))
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Special-token markers in the text become special ids, which skip_special=false
    // decodes back to the same marker text.
    let t = tokenizer();
    let ids = t.encode(text);
    // Bytes the vocabulary has no token for (SmolLM2 lacks some C0 controls and UTF-8
    // lead bytes no training text had) become the unknown token, as in Hugging Face's
    // tokenizer: no round trip for those.
    if t.can_spell(text) {
        assert_eq!(t.decode(&ids, false), text);
    }
    let mut inc = IncrementalDecoder::new();
    let mut pieces = String::new();
    for &id in &ids {
        pieces.push_str(&inc.push(t, id));
    }
    assert_eq!(pieces, t.decode(&ids, true));
});
