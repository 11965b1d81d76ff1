//! Inputs the `kv_events` fuzz target (fuzz/fuzz_targets/kv_events.rs) once failed on,
//! kept so they never fail again: a decoded batch must encode to bytes that decode to
//! the same batch.

use switchyard_kv_events::{decode_batch, encode_batch};

fn round_trips(name: &str) {
    let path = format!(
        "{}/../../tests/fixtures/fuzz/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let data = std::fs::read(&path).expect("fixture");
    let batch = decode_batch(&data).expect("decodes");
    let again = decode_batch(&encode_batch(&batch)).expect("our own encoding decodes");
    assert_eq!(batch, again);
}

/// `extra_keys` holding a msgpack str with invalid UTF-8 came back as bin.
#[test]
fn invalid_utf8_extra_key_stays_a_str() {
    round_trips("kv_events-invalid-utf8-extra-key.bin");
}
