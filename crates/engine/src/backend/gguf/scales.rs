//! Per-block scales (and offsets) of the int8 kernels' weight matrices, stored in as few
//! bytes as keep them exact.
//!
//! A GGUF file keeps the scales of Q8_0, Q5_0, Q4_0 and Q4_1 blocks in f16, and a decode
//! step of one sequence streams every weight from memory once per token, so an f32 copy of
//! each scale is bytes for nothing (Gemma 3 270M's 262,144 x 640 Q8_0 output head: 21 MB
//! of f32 scales a token against 10.5 MB). [`Scales::new`] keeps f16 when every value
//! converts to f16 and back unchanged, else f32 (re-quantized Q6_K). Q4_K's per-block
//! values are an f16 per 256 weights times a 6-bit integer per 32
//! ([`Scales::with_super`]): those are kept as the integer and the f16, and their product,
//! exact in f32, is formed where it is read. The kernels read the same f32 values in every
//! form, so no result changes by a bit.

use half::f16;

/// How a [`Scales`] stores its values (the kernels' const parameter).
pub const F32: u8 = 0;
pub const F16: u8 = 1;
pub const SUB: u8 = 2;

/// Blocks per super-block in [`Scales::Sub`] (Q4_K: 8 blocks of 32 in 256 weights).
pub const SUPER: usize = 8;

/// One matrix's scales, in the order its kernel reads them.
pub enum Scales {
    F32(Vec<f32>),
    /// Every value is exactly an f16.
    F16(Vec<f16>),
    /// Value `i` is `sup[(i / (SUPER·stride))·stride + i % stride] · sub[i]`: with the
    /// kernels' layouts, `stride` is the number of values between one block of a column
    /// and the next (4 in a column group, `n` in a block-major array), so the `SUPER`
    /// consecutive blocks of a column share one `sup`.
    Sub {
        sup: Vec<f16>,
        sub: Vec<u8>,
        stride: usize,
    },
}

/// A [`Scales`]' storage for the SIMD loaders.
#[derive(Clone, Copy)]
pub struct Raw {
    /// F32/F16: the values; SUB: `sub`.
    a: *const u8,
    /// SUB: `sup`.
    b: *const u8,
}

impl Scales {
    /// `v`, in f16 if that loses nothing.
    pub fn new(v: Vec<f32>) -> Scales {
        if v.iter()
            .all(|&x| f16::from_f32(x).to_f32().to_bits() == x.to_bits())
        {
            Scales::F16(v.iter().map(|&x| f16::from_f32(x)).collect())
        } else {
            Scales::F32(v)
        }
    }

    /// `v` as `sup · sub` (see [`Scales::Sub`]) where every value is an integer 0..=255
    /// times its super-block's `sup` (Q4_K's `d·sc` and `-dmin·min`), the product
    /// reproducing it to the bit; else [`Scales::new`].
    pub fn with_super(v: Vec<f32>, sup: Vec<f16>, stride: usize) -> Scales {
        let at = |i: usize| (i / (SUPER * stride)) * stride + i % stride;
        if stride == 0 || v.len().div_ceil(SUPER * stride) * stride > sup.len() {
            return Scales::new(v);
        }
        let mut sub = Vec::with_capacity(v.len());
        for (i, &x) in v.iter().enumerate() {
            let d = sup[at(i)].to_f32();
            let q = if d != 0.0 { (x / d).round() } else { 0.0 };
            if !(0.0..=255.0).contains(&q) || (d * q).to_bits() != x.to_bits() {
                return Scales::new(v);
            }
            sub.push(q as u8);
        }
        Scales::Sub { sup, sub, stride }
    }

    /// Value `i`.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Scales::F32(v) => v[i],
            Scales::F16(v) => v[i].to_f32(),
            Scales::Sub { sup, sub, stride } => {
                let s = *stride;
                sup[(i / (SUPER * s)) * s + i % s].to_f32() * sub[i] as f32
            }
        }
    }

    /// The same values stored as f32 (tests: compact storage must change no result).
    #[cfg(test)]
    pub fn widened(&self) -> Scales {
        Scales::F32((0..self.len()).map(|i| self.get(i)).collect())
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        match self {
            Scales::F32(v) => v.len(),
            Scales::F16(v) => v.len(),
            Scales::Sub { sub, .. } => sub.len(),
        }
    }

    #[cfg(test)]
    pub fn is_f16(&self) -> bool {
        self.kind() == F16
    }

    /// [`F32`], [`F16`] or [`SUB`].
    pub fn kind(&self) -> u8 {
        match self {
            Scales::F32(_) => F32,
            Scales::F16(_) => F16,
            Scales::Sub { .. } => SUB,
        }
    }

    /// The storage, for [`load4`] and [`load1`] with `K = self.kind()`.
    pub fn raw(&self) -> Raw {
        match self {
            Scales::F32(v) => Raw {
                a: v.as_ptr() as *const u8,
                b: std::ptr::null(),
            },
            Scales::F16(v) => Raw {
                a: v.as_ptr() as *const u8,
                b: std::ptr::null(),
            },
            Scales::Sub { sup, sub, .. } => Raw {
                a: sub.as_ptr(),
                b: sup.as_ptr() as *const u8,
            },
        }
    }

    /// `out[j] += s · self[at + j]` for every `j`, in order (the 4-bit kernel's offsets):
    /// one multiply and one add per value, no fma, in every form.
    pub fn axpy(&self, at: usize, s: f32, out: &mut [f32]) {
        let n = out.len();
        match self {
            Scales::F32(v) => {
                for (o, m) in out.iter_mut().zip(&v[at..at + n]) {
                    *o += s * m;
                }
            }
            Scales::F16(v) => {
                let v = &v[at..at + n];
                #[cfg(target_arch = "x86_64")]
                if super::has_avx2() {
                    // SAFETY: F16C and AVX2 are present; both slices have n values.
                    unsafe { axpy_f16c(v, None, s, out) };
                    return;
                }
                for (o, m) in out.iter_mut().zip(v) {
                    *o += s * m.to_f32();
                }
            }
            Scales::Sub { sup, sub, stride } => {
                // Values at..at + n lie in one super-block row when they do not cross a
                // multiple of `stride` (the 4-bit kernel's offsets: one block, columns
                // c0..c1 of n); else value by value.
                let st = *stride;
                if at % st + n > st {
                    for (j, o) in out.iter_mut().enumerate() {
                        *o += s * self.get(at + j);
                    }
                    return;
                }
                let s0 = (at / (SUPER * st)) * st + at % st;
                let (sup, sub) = (&sup[s0..s0 + n], &sub[at..at + n]);
                #[cfg(target_arch = "x86_64")]
                if super::has_avx2() {
                    // SAFETY: F16C and AVX2 are present; the slices have n values.
                    unsafe { axpy_f16c(sup, Some(sub), s, out) };
                    return;
                }
                for ((o, d), &q) in out.iter_mut().zip(sup).zip(sub) {
                    *o += s * (d.to_f32() * q as f32);
                }
            }
        }
    }
}

/// [`Scales::axpy`] on f16 values (times `sub`'s integers where given), 8 at a time: the
/// same operations per element as the scalar loops, so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn axpy_f16c(v: &[f16], sub: Option<&[u8]>, s: f32, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = out.len().min(v.len());
    let sv = _mm256_set1_ps(s);
    let mut j = 0;
    while j + 8 <= n {
        // SAFETY: j + 8 <= n for every slice.
        unsafe {
            let mut m = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(j) as *const __m128i));
            if let Some(q) = sub {
                let q = _mm_loadl_epi64(q.as_ptr().add(j) as *const __m128i);
                m = _mm256_mul_ps(m, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q)));
            }
            let o = out.as_mut_ptr().add(j);
            _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), _mm256_mul_ps(sv, m)));
        }
        j += 8;
    }
    for (t, o) in out.iter_mut().enumerate().take(n).skip(j) {
        let m = v[t].to_f32() * sub.map_or(1.0, |q| q[t] as f32);
        *o += s * m;
    }
}

/// Values `i..i + 4` (`i` a multiple of 4; for [`SUB`], with `stride` 4) as f32.
///
/// # Safety
/// F16C and AVX2 present; `r` is the storage of a [`Scales`] of kind `K` with more than
/// `i + 3` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
pub unsafe fn load4<const K: u8>(r: Raw, i: usize) -> std::arch::x86_64::__m128 {
    use std::arch::x86_64::*;
    // SAFETY: the caller's.
    unsafe {
        match K {
            F16 => _mm_cvtph_ps(_mm_loadl_epi64((r.a as *const u16).add(i) as *const __m128i)),
            SUB => {
                let q = _mm_cvtsi32_si128((r.a.add(i) as *const i32).read_unaligned());
                let d = (r.b as *const u16).add((i / (SUPER * 4)) * 4);
                let d = _mm_cvtph_ps(_mm_loadl_epi64(d as *const __m128i));
                _mm_mul_ps(d, _mm_cvtepi32_ps(_mm_cvtepu8_epi32(q)))
            }
            _ => _mm_loadu_ps((r.a as *const f32).add(i)),
        }
    }
}

/// Value `i`, broadcast to 8 lanes ([`F32`] or [`F16`] storage).
///
/// # Safety
/// F16C and AVX2 present; `r` is the storage of a [`Scales`] of kind `K` (not [`SUB`])
/// with more than `i` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
pub unsafe fn load1<const K: u8>(r: Raw, i: usize) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    debug_assert!(K != SUB);
    // SAFETY: the caller's.
    unsafe {
        if K == F16 {
            let h = _mm_cvtsi32_si128(*(r.a as *const u16).add(i) as i32);
            _mm256_broadcastss_ps(_mm_cvtph_ps(h))
        } else {
            _mm256_set1_ps(*(r.a as *const f32).add(i))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_only_when_exact() {
        let exact = vec![
            0.5,
            -0.0,
            1.0 / 1024.0,
            65504.0,
            f16::from_f32(0.1).to_f32(),
        ];
        let s = Scales::new(exact.clone());
        assert!(s.is_f16());
        for (i, &x) in exact.iter().enumerate() {
            assert_eq!(s.get(i).to_bits(), x.to_bits());
        }
        let s = Scales::new(vec![0.5, 0.1]);
        assert!(!s.is_f16(), "0.1 is no f16");
        assert_eq!(s.get(1), 0.1);
        assert!(!Scales::new(vec![1e6]).is_f16(), "beyond f16's range");
    }

    #[test]
    fn axpy_gives_the_scalar_bits() {
        let v: Vec<f32> = (0..29)
            .map(|i| f16::from_f32((i as f32 - 13.0) * 0.37).to_f32())
            .collect();
        let (h, f) = (Scales::new(v.clone()), Scales::F32(v));
        assert!(h.is_f16());
        let base: Vec<f32> = (0..21).map(|i| i as f32 * 0.011).collect();
        let (mut a, mut b) = (base.clone(), base);
        h.axpy(5, 0.123, &mut a);
        f.axpy(5, 0.123, &mut b);
        assert_eq!(
            a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
}
