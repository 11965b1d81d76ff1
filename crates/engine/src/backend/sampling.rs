//! Choosing the next token from a row of logits, as vLLM's sampler does: penalties
//! (repetition over prompt and output; frequency and presence over the output), EOS held
//! back until `min_tokens`, then greedy at temperature 0, else temperature, top-k, top-p
//! and min-p filtering and a draw.
//!
//! The draw's random number depends only on the request's seed and the position, so a
//! seeded request gives the same text however it is batched.

use crate::core::step::TokenLogprobs;
use crate::core::SamplingParams;

/// What the sampler needs to know of a sequence.
pub struct History<'a> {
    pub prompt: &'a [u32],
    pub output: &'a [u32],
}

fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform draw in `[0, 1)` for (seed, position).
pub fn uniform(seed: u64, pos: usize) -> f64 {
    let r = mix64(seed ^ mix64(pos as u64 ^ 0x5EED));
    (r >> 11) as f64 / (1u64 << 53) as f64
}

/// Apply the penalties and the EOS hold to `logits` in place.
pub fn apply_penalties(logits: &mut [f32], p: &SamplingParams, h: &History<'_>, eos: &[u32]) {
    let n = logits.len();
    if p.repetition_penalty != 1.0 {
        let rp = p.repetition_penalty as f32;
        let mut seen = vec![false; n];
        for &t in h.prompt.iter().chain(h.output) {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        for (l, s) in logits.iter_mut().zip(&seen) {
            if *s {
                *l = if *l > 0.0 { *l / rp } else { *l * rp };
            }
        }
    }
    if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
        let mut counts = std::collections::HashMap::<u32, u32>::new();
        for &t in h.output {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= p.frequency_penalty as f32 * c as f32 + p.presence_penalty as f32;
            }
        }
    }
    if h.output.len() < p.min_tokens {
        for &t in eos.iter().chain(&p.stop_token_ids) {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// `chosen`'s log-probability under `softmax(logits)` and the `top` most likely tokens
/// (highest first, ties by id).
pub fn logprobs(logits: &[f32], chosen: u32, top: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    let lp = |i: usize| logits.get(i).map_or(f32::NEG_INFINITY, |l| l - lse);
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if best.len() < top || l > best[best.len() - 1].1 {
                let at = best.partition_point(|&(_, b)| b >= l);
                best.insert(at, (i as u32, l));
                best.truncate(top);
            }
        }
    }
    TokenLogprobs {
        logprob: lp(chosen as usize),
        top: best.into_iter().map(|(i, _)| (i, lp(i as usize))).collect(),
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Pick the token at `pos` (the index the new token will have in the sequence).
pub fn sample(
    logits: &mut [f32],
    p: &SamplingParams,
    h: &History<'_>,
    eos: &[u32],
    seed: u64,
    pos: usize,
) -> u32 {
    apply_penalties(logits, p, h, eos);
    draw(logits, p, seed, pos, true)
}

/// The draw after penalties; `prune` leaves out the negligible tokens (always, outside
/// the test that checks it changes nothing).
fn draw(logits: &[f32], p: &SamplingParams, seed: u64, pos: usize, prune: bool) -> u32 {
    if p.temperature < 1e-5 {
        return argmax(logits);
    }
    let inv_t = 1.0 / p.temperature as f32;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // Candidates as (id, prob), unnormalized. Tokens whose weight relative to the best
    // would be below e^-40 (4e-18) are left out before any exp or sort: the best weighs
    // exactly 1, so the running totals below (summed best first) are at least 1, and
    // adding such a weight to them does not change a bit. This keeps a 262,144-token
    // vocabulary from costing a full exp and sort per sampled token.
    let cutoff = if prune {
        max - 40.0 / inv_t
    } else {
        f32::NEG_INFINITY
    };
    let mut cand: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, &l)| l >= cutoff)
        .map(|(i, &l)| (i as u32, (l - max) * inv_t))
        .collect();
    // Weights 8 at a time: at temperature 1 most of a 262,144-token vocabulary is within
    // the cutoff, and a libm `expf` per token was a tenth of a 16-sequence Gemma step.
    exp_weights(&mut cand);
    cand.retain(|(_, w)| *w > 0.0);
    if cand.is_empty() {
        return argmax(logits);
    }
    let filtered = p.top_k.is_some() || p.top_p < 1.0 || p.min_p > 0.0;
    if filtered {
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = p.top_k {
            cand.truncate((k as usize).max(1));
        }
        if p.min_p > 0.0 {
            let floor = cand[0].1 * p.min_p as f32;
            let keep = cand.iter().take_while(|c| c.1 >= floor).count().max(1);
            cand.truncate(keep);
        }
        if p.top_p < 1.0 {
            let total: f32 = cand.iter().map(|c| c.1).sum();
            let mut acc = 0.0;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                acc += c.1 / total;
                if acc >= p.top_p as f32 {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep.max(1));
        }
    }
    let total: f64 = cand.iter().map(|c| c.1 as f64).sum();
    let mut target = uniform(seed, pos) * total;
    for &(id, w) in &cand {
        target -= w as f64;
        if target < 0.0 {
            return id;
        }
    }
    cand[cand.len() - 1].0
}

/// `w ← e^w` for every candidate ([`exp`]), on AVX2 where present: the same operations
/// either way, so the same bits.
fn exp_weights(cand: &mut [(u32, f32)]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::backend::gguf::has_avx2() {
        // SAFETY: AVX2 and FMA are present.
        done = unsafe { exp_weights_avx2(cand) };
    }
    for c in &mut cand[done..] {
        c.1 = exp(c.1);
    }
}

// e^x = 2^n · e^r, n = round(x·log2 e), r = x − n·ln 2 (in two parts), e^r by Cephes'
// single-precision polynomial (within about 1 ulp of e^x on [-87, 0]).
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];
/// Below this (and for NaN) the weight is 0: −∞ logits (tokens held back) stay impossible.
const EXP_MIN: f32 = -87.0;

/// e^x for x ≤ 0 (the draw's weights, relative to the best token's), 0 below −87: the
/// scalar twin of [`exp_weights_avx2`], operation for operation.
fn exp(x: f32) -> f32 {
    if x.is_nan() || x < EXP_MIN {
        return 0.0;
    }
    let x = x.min(0.0);
    let n = (x * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = EXP_P[0];
    for c in &EXP_P[1..] {
        p = p.mul_add(r, *c);
    }
    let e = (p * r).mul_add(r, r) + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// [`exp`] on the weights of `cand` 8 at a time; returns how many it did (a multiple of 8).
///
/// # Safety
/// AVX2 and FMA present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_weights_avx2(cand: &mut [(u32, f32)]) -> usize {
    use std::arch::x86_64::*;
    let n8 = cand.len() / 8 * 8;
    for chunk in cand[..n8].chunks_exact_mut(8) {
        let x = _mm256_setr_ps(
            chunk[0].1, chunk[1].1, chunk[2].1, chunk[3].1, chunk[4].1, chunk[5].1, chunk[6].1,
            chunk[7].1,
        );
        let ok = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(EXP_MIN));
        let x = _mm256_min_ps(x, _mm256_setzero_ps());
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
        );
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
        let mut p = _mm256_set1_ps(EXP_P[0]);
        for c in &EXP_P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let e = _mm256_add_ps(
            _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r),
            _mm256_set1_ps(1.0),
        );
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        let w = _mm256_and_ps(_mm256_mul_ps(e, scale), ok);
        let mut out = [0f32; 8];
        // SAFETY: 8 floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), w) };
        for (c, w) in chunk.iter_mut().zip(out) {
            c.1 = w;
        }
    }
    n8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    const H: History<'static> = History {
        prompt: &[],
        output: &[],
    };

    #[test]
    fn leaving_out_negligible_tokens_draws_the_same_tokens() {
        // A large vocabulary with a realistic spread of logits (a few leaders, a long
        // tail), at several temperatures and filters: the same token for every draw.
        let vocab = 50_000;
        let logits: Vec<f32> = crate::backend::gguf::test_data(vocab, 17, 1.0)
            .into_iter()
            .enumerate()
            .map(|(i, v)| v * 6.0 + if i % 997 == 0 { 12.0 } else { 0.0 })
            .collect();
        let mut differ = 0;
        let mut draws = 0;
        for (temperature, top_p, top_k, min_p) in [
            (0.2, 0.9, None, 0.0),
            (0.8, 0.95, Some(40), 0.0),
            (1.0, 1.0, None, 0.0),
            (1.5, 0.9, None, 0.05),
            (3.0, 1.0, None, 0.0),
        ] {
            let p = SamplingParams {
                temperature,
                top_p,
                top_k,
                min_p,
                ..Default::default()
            };
            for pos in 0..200 {
                let mut l = logits.clone();
                let got = sample(&mut l, &p, &H, &[], 7, pos);
                let want = draw(&logits, &p, 7, pos, false);
                draws += 1;
                differ += usize::from(got != want);
            }
        }
        assert_eq!(differ, 0, "{differ} of {draws} draws changed");
    }

    /// The draw's exp is within 2 ulp of libm's on [-87, 0], exactly 1 at 0, 0 below -87
    /// and for -inf and NaN, and the SIMD path gives the scalar path's bits.
    #[test]
    fn the_weights_exp_is_accurate_and_the_same_bits_either_way() {
        let xs: Vec<f32> = (0..200_003)
            .map(|i| -87.0 * (i as f32 / 200_002.0))
            .chain([
                0.0,
                -0.0,
                -1e-30,
                -87.0,
                -87.01,
                -100.0,
                f32::NEG_INFINITY,
                f32::NAN,
            ])
            .collect();
        let mut cand: Vec<(u32, f32)> = xs.iter().map(|&x| (0, x)).collect();
        exp_weights(&mut cand);
        for (&x, &(_, w)) in xs.iter().zip(&cand) {
            assert_eq!(
                w.to_bits(),
                exp(x).to_bits(),
                "e^{x}: SIMD {w} scalar {}",
                exp(x)
            );
            if x >= -87.0 {
                let want = x.exp();
                let ulp = (want.to_bits() as i64 - w.to_bits() as i64).abs();
                assert!(ulp <= 2, "e^{x}: {w} against {want} ({ulp} ulp)");
            } else {
                assert_eq!(w, 0.0, "e^{x}");
            }
        }
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn logprobs_are_normalized_and_ranked() {
        let l = [1.0f32, 3.0, 2.0, 3.0];
        let lp = logprobs(&l, 2, 3);
        let z: f32 = l.iter().map(|x| x.exp()).sum();
        assert!((lp.logprob - (2.0f32.exp() / z).ln()).abs() < 1e-5);
        assert_eq!(
            lp.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![1, 3, 2]
        );
        assert!(lp.top[0].1 <= 0.0 && lp.top[0].1 >= lp.top[2].1);
        assert!(logprobs(&l, 0, 0).top.is_empty());
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut l = vec![0.1, 2.0, -1.0, 1.9];
        assert_eq!(sample(&mut l, &params(), &H, &[], 1, 0), 1);
    }

    #[test]
    fn min_tokens_holds_eos_back() {
        let p = SamplingParams {
            min_tokens: 2,
            ..params()
        };
        let mut l = vec![5.0, 1.0, 0.0];
        assert_eq!(sample(&mut l, &p, &H, &[0], 1, 0), 1);
        let out = [1u32, 1];
        let h = History {
            prompt: &[],
            output: &out,
        };
        let mut l = vec![5.0, 1.0, 0.0];
        assert_eq!(sample(&mut l, &p, &h, &[0], 1, 2), 0);
    }

    #[test]
    fn penalties_move_the_choice() {
        let out = [0u32, 0, 0];
        let h = History {
            prompt: &[],
            output: &out,
        };
        let p = SamplingParams {
            frequency_penalty: 0.5,
            ..params()
        };
        let mut l = vec![2.0, 1.0];
        assert_eq!(sample(&mut l, &p, &h, &[], 1, 3), 1, "2 - 3*0.5 < 1");
        let p = SamplingParams {
            repetition_penalty: 2.5,
            ..params()
        };
        let mut l = vec![2.0, 1.0];
        assert_eq!(sample(&mut l, &p, &h, &[], 1, 3), 1, "2 / 2.5 < 1");
    }

    #[test]
    fn seeded_draws_are_reproducible_and_follow_the_filters() {
        let p = SamplingParams {
            temperature: 1.0,
            top_k: Some(2),
            ..Default::default()
        };
        let base = vec![3.0f32, 2.9, 2.8, -10.0];
        let mut seen = std::collections::HashSet::new();
        for pos in 0..200 {
            let a = sample(&mut base.clone(), &p, &H, &[], 42, pos);
            let b = sample(&mut base.clone(), &p, &H, &[], 42, pos);
            assert_eq!(a, b);
            seen.insert(a);
        }
        assert_eq!(
            seen,
            [0, 1].into_iter().collect(),
            "top_k=2 keeps the two best"
        );
        let p = SamplingParams {
            temperature: 1.0,
            min_p: 0.5,
            ..Default::default()
        };
        for pos in 0..100 {
            let t = sample(&mut [5.0, 0.0, 4.8, -1.0], &p, &H, &[], 7, pos);
            assert!(
                t == 0 || t == 2,
                "min_p drops tokens far below the best: {t}"
            );
        }
    }
}
