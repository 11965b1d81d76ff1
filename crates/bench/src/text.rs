//! Deterministic randomness and prompt text with a known token count.
//!
//! Every word is a space plus at most three lowercase ASCII letters: exactly one token
//! for the sim engine's tokenizer, and one token for real BPE tokenizers (Llama 3,
//! Qwen, GPT-2 families) in nearly every case, so `n` words ≈ `n` tokens.

/// SplitMix64: small, fast, good enough for workload shapes; seeded, so runs repeat.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    /// A generator derived from this seed and a stream id (a user, a group, ...).
    pub fn derive(seed: u64, stream: u64) -> Self {
        let mut r = Rng::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ stream);
        r.next_u64();
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// Uniform integer in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// Exponential with the given mean.
    pub fn exp(&mut self, mean: f64) -> f64 {
        -mean * self.unit().ln()
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// 64 short words, each one token.
pub const WORDS: [&str; 64] = [
    " the", " of", " and", " to", " in", " is", " it", " you", " was", " for", " on", " are",
    " as", " be", " at", " one", " by", " hot", " but", " we", " can", " out", " all", " up",
    " use", " how", " an", " she", " do", " if", " way", " so", " no", " see", " two", " day",
    " go", " my", " who", " oil", " now", " sun", " sea", " sky", " red", " big", " new", " old",
    " end", " man", " run", " far", " sat", " ask", " own", " yes", " dog", " cat", " me", " air",
    " few", " eat", " top", " box",
];

/// Append `n` random one-token words to `out`.
pub fn push_words(rng: &mut Rng, n: usize, out: &mut String) {
    out.reserve(n * 4);
    let mut bits = 0u64;
    let mut left = 0;
    for _ in 0..n {
        if left == 0 {
            bits = rng.next_u64();
            left = 10;
        }
        out.push_str(WORDS[(bits & 63) as usize]);
        bits >>= 6;
        left -= 1;
    }
}

/// `n` random one-token words.
pub fn words(rng: &mut Rng, n: usize) -> String {
    let mut s = String::new();
    push_words(rng, n, &mut s);
    s
}

/// Count the words `push_words` makes (for tests: a space starts each).
pub fn count_words(s: &str) -> usize {
    s.split_ascii_whitespace().count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_have_the_asked_length_and_shape() {
        let mut r = Rng::new(1);
        let s = words(&mut r, 1000);
        assert_eq!(count_words(&s), 1000);
        for w in WORDS {
            assert!(
                w.starts_with(' ')
                    && w.len() <= 4
                    && w[1..].bytes().all(|b| b.is_ascii_lowercase())
            );
        }
    }

    #[test]
    fn derived_streams_differ_and_repeat() {
        let a = words(&mut Rng::derive(7, 1), 32);
        let b = words(&mut Rng::derive(7, 2), 32);
        assert_ne!(a, b);
        assert_eq!(a, words(&mut Rng::derive(7, 1), 32));
    }

    #[test]
    fn exp_has_the_right_mean() {
        let mut r = Rng::new(3);
        let n = 100_000;
        let m: f64 = (0..n).map(|_| r.exp(2.0)).sum::<f64>() / n as f64;
        assert!((m - 2.0).abs() < 0.05, "{m}");
    }
}
