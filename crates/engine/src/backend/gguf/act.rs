//! The MLP's gated activation for GeGLU models (Gemma), computed as llama.cpp's CPU
//! backend computes it: the gate goes through GELU by a 65,536-entry table indexed by the
//! gate rounded to f16 (ggml's `GGML_GELU_FP16`, on by default), the table holding
//! `gelu(h)` rounded to f16 for every f16 `h`; gates at or below -10 give 0 and at or
//! above 10 give the gate itself. So the activation matches llama.cpp's to the bit, and a
//! lookup costs a fraction of a `tanhf` (which was a tenth of a Gemma prefill).
//!
//! Invariant: the SIMD and scalar paths give the same bits for every input (rounding to
//! f16 is round-to-nearest-even in both), so a row's result never depends on its
//! length, its offset or the batch around it.

use std::sync::OnceLock;

use half::f16;

/// GELU, tanh approximation (PyTorch's `approximate="tanh"`, ggml's `ggml_gelu_f32`):
/// `x/2 · (1 + tanh(√(2/π) · (x + 0.044715 x³)))`.
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x)).tanh())
}

/// `gelu(h)` rounded to f16, for every f16 bit pattern `h`, widened to f32.
fn gelu_table() -> &'static [f32] {
    static TABLE: OnceLock<Box<[f32]>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| f16::from_f32(gelu_tanh(f16::from_bits(bits).to_f32())).to_f32())
            .collect()
    })
}

/// The GELU factor of one gate value (see the module doc).
#[inline]
fn gelu_factor(table: &[f32], g: f32) -> f32 {
    if g <= -10.0 {
        0.0
    } else if g >= 10.0 {
        g
    } else {
        table[f16::from_f32(g).to_bits() as usize]
    }
}

/// `out[i] = gelu(gate[i]) · up[i]`, as llama.cpp's `ggml_vec_geglu_f32`.
pub fn geglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let n = out.len().min(gate.len()).min(up.len());
    let table = gelu_table();
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        done = n - n % 8;
        // SAFETY: AVX2, FMA and F16C were detected; every index is below `n`.
        unsafe { geglu_avx2(table, &gate[..done], &up[..done], &mut out[..done]) };
    }
    for i in done..n {
        out[i] = gelu_factor(table, gate[i]) * up[i];
    }
}

/// # Safety
/// AVX2, FMA and F16C must be present; `table` holds 65,536 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn geglu_avx2(table: &[f32], gate: &[f32], up: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    debug_assert_eq!(table.len(), 1 << 16);
    let (lo, hi) = (_mm256_set1_ps(-10.0), _mm256_set1_ps(10.0));
    for ((g, u), o) in gate
        .chunks_exact(8)
        .zip(up.chunks_exact(8))
        .zip(out.chunks_exact_mut(8))
    {
        // SAFETY: each chunk holds 8 values; an f16 bit pattern indexes the table.
        unsafe {
            let x = _mm256_loadu_ps(g.as_ptr());
            // Round to nearest even, as `f16::from_f32`; the f16 bits index the table.
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
            let idx = _mm256_cvtepu16_epi32(h);
            let mut v = _mm256_i32gather_ps::<4>(table.as_ptr(), idx);
            v = _mm256_blendv_ps(v, x, _mm256_cmp_ps::<_CMP_GE_OQ>(x, hi));
            v = _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LE_OQ>(x, lo), v);
            _mm256_storeu_ps(
                o.as_mut_ptr(),
                _mm256_mul_ps(v, _mm256_loadu_ps(u.as_ptr())),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_tanh_matches_the_formula_and_known_values() {
        let f = |x: f64| {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
        };
        for i in -2000..=2000 {
            let x = i as f32 * 0.01;
            let (got, want) = (gelu_tanh(x) as f64, f(x as f64));
            assert!(
                (got - want).abs() < 1e-6 * want.abs().max(1.0),
                "{x}: {got} vs {want}"
            );
        }
        // PyTorch's gelu(approximate="tanh") at ±1, and its limits.
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-6);
        assert!((gelu_tanh(-1.0) + 0.158_808).abs() < 1e-6);
        assert_eq!(gelu_tanh(0.0), 0.0);
        assert_eq!(gelu_tanh(30.0), 30.0);
        assert_eq!(gelu_tanh(-30.0), 0.0);
    }

    /// The activation is GELU at the gate's f16 value, rounded to f16: within f16's
    /// precision of the exact GELU, equal to it where the gate is already an f16 value,
    /// and cut off at ±10 as ggml does.
    #[test]
    fn geglu_is_gelu_through_f16_times_up() {
        let gate: Vec<f32> = super::super::test_data(4099, 7, 12.0);
        let up: Vec<f32> = super::super::test_data(4099, 8, 2.0);
        let mut out = vec![0f32; gate.len()];
        geglu(&gate, &up, &mut out);
        for ((&g, &u), &y) in gate.iter().zip(&up).zip(&out) {
            let want = if g <= -10.0 {
                0.0
            } else if g >= 10.0 {
                g * u
            } else {
                gelu_tanh(g) * u
            };
            // Two f16 roundings (the gate's and the result's), each 2^-11 relative; the
            // gate's goes through GELU's slope, at most about 1.13.
            let tol = 2.5e-3 * (g.abs() + 1.0) * u.abs() + 1e-6;
            assert!((y - want).abs() <= tol, "gelu({g}) * {u}: {y} vs {want}");
        }
        for h in [-3.0f32, -0.5, 0.0, 0.125, 1.0, 2.5, 9.5] {
            let mut y = [0f32];
            geglu(&[h], &[1.0], &mut y);
            assert_eq!(y[0], f16::from_f32(gelu_tanh(h)).to_f32(), "gelu({h})");
        }
        let mut y = [7f32; 2];
        geglu(&[-10.0, 10.0], &[3.0, 3.0], &mut y);
        assert_eq!(y, [0.0, 30.0]);
    }

    /// The SIMD lanes and the scalar tail give the same bits: a value's result does not
    /// depend on where it sits in the row.
    #[test]
    fn every_offset_gives_the_same_bits() {
        let mut gate = super::super::test_data(64, 3, 11.0);
        gate.extend([-10.0, 10.0, -9.999, 9.999, 0.0, -0.0, 1e-8, 65519.0]);
        let up = super::super::test_data(gate.len(), 4, 3.0);
        let mut whole = vec![0f32; gate.len()];
        geglu(&gate, &up, &mut whole);
        for start in 0..gate.len() {
            let mut one = [0f32];
            geglu(&gate[start..start + 1], &up[start..start + 1], &mut one);
            assert_eq!(
                one[0].to_bits(),
                whole[start].to_bits(),
                "gate {} at {start}",
                gate[start]
            );
        }
    }
}
