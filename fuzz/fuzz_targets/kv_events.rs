//! vLLM's KV-event wire format (msgpack) as the router's subscriber decodes it from any
//! engine: arbitrary bytes give an error or a batch, never a panic; a decoded batch
//! encodes to bytes that decode to the same batch (compared as encodings: a NaN passed
//! through in `extra_keys` is not equal to itself).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_kv_events::{decode_batch, encode_batch};

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = decode_batch(data) {
        let bytes = encode_batch(&batch);
        let again = decode_batch(&bytes).expect("our own encoding decodes");
        assert_eq!(bytes, encode_batch(&again));
    }
});
