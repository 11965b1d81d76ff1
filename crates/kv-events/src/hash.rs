//! Stable, fast 64-bit hashing used for prefix-cache block hashes and seeded sampling.
//!
//! The values must be identical across processes and builds (a router computes the same
//! chained block hashes from KV events), so this does not use `std`'s randomized hasher.

/// SplitMix64's finalizer: a strong 64-bit mixer.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hash of one full block of tokens, chained from the previous block's hash (`None` for
/// the first block), as in vLLM's prefix caching.
pub fn block_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut h = mix64(parent.unwrap_or(0x5EED_B10C_u64) ^ (tokens.len() as u64));
    for &t in tokens {
        h = mix64(h ^ u64::from(t));
    }
    h
}

/// Hash of a token sequence (used to seed greedy sampling from the prompt).
pub fn tokens_hash(tokens: &[u32]) -> u64 {
    block_hash(None, tokens)
}

/// The seed of the block-hash chain of a sequence run under the LoRA adapter `name`
/// (the parent of its first block): blocks of the same tokens under different adapters
/// (or none) hash apart, in the engine's prefix cache and in the router's KV index alike.
pub fn lora_salt(name: &str) -> u64 {
    let bytes: Vec<u32> = name.bytes().map(u32::from).collect();
    mix64(tokens_hash(&bytes) ^ 0x4c6f_5241)
}

/// A uniform f64 in [0, 1) from a 64-bit value.
#[inline]
pub fn unit_f64(x: u64) -> f64 {
    (x >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chained_hash_depends_on_parent_and_tokens() {
        let a = block_hash(None, &[1, 2, 3]);
        assert_eq!(a, block_hash(None, &[1, 2, 3]));
        assert_ne!(a, block_hash(None, &[1, 2, 4]));
        assert_ne!(block_hash(Some(a), &[5]), block_hash(Some(a ^ 1), &[5]));
    }
}
