//! The GGUF header reader on arbitrary bytes: an error or a header, never a panic, and
//! never an allocation larger than the input justifies (counts and lengths are checked
//! against the size first; libFuzzer's -rss_limit_mb catches a breach).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_gguf::Gguf;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = Gguf::parse(data, "fuzz") {
        assert!(g.data_offset >= 24 || g.tensors.is_empty() && g.metadata.is_empty());
        for t in &g.tensors {
            assert!(t.dims.len() <= 8);
        }
    }
});
