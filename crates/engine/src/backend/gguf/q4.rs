//! 4-bit weight matrices and their int8 kernel: the GGUF's own 4-bit weights (Q4_0, Q4_1,
//! Q4_K), kept as they are instead of widened to Q8_0.
//!
//! Every block of 32 weights of one output column is `w = d·q + m` with `q` in 0..=15
//! (Q4_0: `m = -8d`; Q4_1: its `d` and `m`; Q4_K: each 32-value sub-block's `d·scale` and
//! `-dmin·min`), so the values are exactly the file's. Against activations quantized per
//! block ([`Q8Rows`]: `x ≈ dx·xq`), a block contributes `d·dx·Σ q·xq + m·(dx·Σ xq)`: the
//! first sum is one `maddubs` of the unsigned nibbles by the signed activations (no sign
//! trick, no saturation: 15·127·2 < 2¹⁵), the second is the activation block's sum,
//! computed once per row. Half the bytes of Q8_0 per weight: single-stream decode, which
//! streams every weight once per token, is bound by memory traffic.
//!
//! Layout and threading follow [`super::q8::Q8Matrix`]: columns in groups of 4
//! interleaved block by block (a block of a group is 64 contiguous bytes), threads over
//! column ranges. A tile is up to 4 rows by one group: each block's four integer dot
//! products are reduced to one exact `i32` per (row, column) before any rounding, and each
//! (row, column) then runs the same scalar recurrence, `acc = fma(dot_b, d_b·dx_b, acc)`
//! over the blocks in order, plus the offsets `Σ_b sums_b·m_b` in order. So output (row,
//! column) depends only on that row and that column, never on the tile, the number of
//! rows in the call, or whether the SIMD or the scalar code ran.

#[cfg(target_arch = "x86_64")]
use super::q8::prefetch;
use super::q8::{block_index as index, par_columns, OutPtr, Q8Rows, G, QK};
use candle_core::quantized::GgmlDType;
use half::f16;

use super::scales::{self, Scales};

/// Bytes of packed nibbles per block: byte `t` holds value `t` (low) and `t + 16` (high).
const QB: usize = QK / 2;

/// Rows per tile.
const TILE_ROWS4: usize = 4;

/// A weight matrix `[n, k]` in 4-bit blocks of 32 with a scale and an offset each: f16
/// as Q4_0's and Q4_1's are, Q4_K's as its 6-bit integers and the f16s per 256 weights
/// they multiply ([`super::scales`]).
pub struct Q4Matrix {
    n: usize,
    k: usize,
    /// `[n / 4][k / 32][4][16]` (n rounded up to 4; padding columns are zero).
    qs: Vec<u8>,
    /// Scales, `[n / 4][k / 32][4]`.
    d: Scales,
    /// Offsets, `[k / 32][n]`: block-major, so that the offset terms of a range of
    /// columns (`Σ_b sums[b] · m[b][c]`) are contiguous multiply-adds after the tiles.
    m: Scales,
}

impl std::fmt::Debug for Q4Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q4Matrix[{}, {}]", self.n, self.k)
    }
}

/// One block of a source tensor: scale, offset and 32 values in 0..=15.
pub type Block = (f32, f32, [u8; QK]);

/// The GGUF types this kernel runs without widening.
pub fn supports(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K)
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Q4_K's per-256-value scale and offset factors, `(d, dmin)` per super-block in order
/// (a block of 32 is `w = d·sc·q - dmin·min`); `None` for the other types.
pub fn decode_super(dtype: GgmlDType, raw: &[u8]) -> Option<Vec<(f16, f16)>> {
    if dtype != GgmlDType::Q4K || !raw.len().is_multiple_of(144) {
        return None;
    }
    Some(
        raw.chunks_exact(144)
            .map(|b| {
                (
                    f16::from_le_bytes([b[0], b[1]]),
                    f16::from_le_bytes([b[2], b[3]]),
                )
            })
            .collect(),
    )
}

/// Decode a row-major tensor's raw GGML blocks into 32-value blocks, in order.
pub fn decode(dtype: GgmlDType, raw: &[u8]) -> Option<Vec<Block>> {
    let mut out = Vec::new();
    match dtype {
        // f16 d, 16 bytes: value t low nibble, t + 16 high; w = d·(q - 8).
        GgmlDType::Q4_0 => {
            if !raw.len().is_multiple_of(18) {
                return None;
            }
            for b in raw.chunks_exact(18) {
                let d = f16_at(b, 0);
                let mut q = [0u8; QK];
                for t in 0..QB {
                    q[t] = b[2 + t] & 0x0f;
                    q[t + QB] = b[2 + t] >> 4;
                }
                out.push((d, -8.0 * d, q));
            }
        }
        // f16 d, f16 m, 16 bytes as Q4_0; w = d·q + m.
        GgmlDType::Q4_1 => {
            if !raw.len().is_multiple_of(20) {
                return None;
            }
            for b in raw.chunks_exact(20) {
                let mut q = [0u8; QK];
                for t in 0..QB {
                    q[t] = b[4 + t] & 0x0f;
                    q[t + QB] = b[4 + t] >> 4;
                }
                out.push((f16_at(b, 0), f16_at(b, 2), q));
            }
        }
        // Super-blocks of 256: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128
        // bytes; sub-block g (32 values) is nibble g % 2 of bytes (g / 2)·32.. and
        // w = d·sc_g·q - dmin·min_g.
        GgmlDType::Q4K => {
            if !raw.len().is_multiple_of(144) {
                return None;
            }
            for b in raw.chunks_exact(144) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let (s, qs) = (&b[4..16], &b[16..144]);
                for g in 0..8 {
                    let (sc, mn) = if g < 4 {
                        (s[g] & 63, s[g + 4] & 63)
                    } else {
                        (
                            (s[g + 4] & 0x0f) | ((s[g - 4] >> 6) << 4),
                            (s[g + 4] >> 4) | ((s[g] >> 6) << 4),
                        )
                    };
                    let mut q = [0u8; QK];
                    for (w, v) in q.iter_mut().enumerate() {
                        let byte = qs[(g / 2) * 32 + w];
                        *v = if g % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                    }
                    out.push((d * sc as f32, -dmin * mn as f32, q));
                }
            }
        }
        _ => return None,
    }
    Some(out)
}

impl Q4Matrix {
    /// Build `[n, k]` from its blocks (column `c`'s blocks at `c·k/32 ..`); `None` unless
    /// `k` is a multiple of 32 and there are `n·k/32` blocks.
    pub fn from_blocks(blocks: &[Block], n: usize, k: usize) -> Option<Q4Matrix> {
        Self::from_blocks_super(blocks, None, n, k)
    }

    /// [`Q4Matrix::from_blocks`] given, for Q4_K, the factors ([`decode_super`]) that its
    /// blocks' scales and offsets are integer multiples of, 8 blocks each: those are then
    /// kept as the integers and the factors (2.5 bytes per block instead of 8; the same
    /// values).
    pub fn from_blocks_super(
        blocks: &[Block],
        supers: Option<&[(f16, f16)]>,
        n: usize,
        k: usize,
    ) -> Option<Q4Matrix> {
        if k == 0 || !k.is_multiple_of(QK) || blocks.len() != n * (k / QK) {
            return None;
        }
        let (kb, groups) = (k / QK, n.div_ceil(G));
        let mut qs = vec![0u8; groups * G * kb * QB];
        let mut d = vec![0f32; groups * G * kb];
        let mut m = vec![0f32; n * kb];
        for (c, col) in blocks.chunks_exact(kb).enumerate() {
            for (b, (bd, bm, q)) in col.iter().enumerate() {
                let i = index(kb, c, b);
                d[i] = *bd;
                m[b * n + c] = *bm;
                for t in 0..QB {
                    qs[i * QB + t] = (q[t] & 0x0f) | ((q[t + QB] & 0x0f) << 4);
                }
            }
        }
        let ns = kb / scales::SUPER;
        let (d, m) = match supers {
            Some(sup) if kb.is_multiple_of(scales::SUPER) && sup.len() == n * ns => {
                // Factors in the values' layouts: per group, super-block, column of the
                // group (stride 4), and per super-block, column (stride n).
                let mut dsup = vec![f16::ZERO; groups * ns * G];
                let mut msup = vec![f16::ZERO; ns * n];
                for c in 0..n {
                    for sb in 0..ns {
                        let (sd, smin) = sup[c * ns + sb];
                        dsup[((c / G) * ns + sb) * G + c % G] = sd;
                        msup[sb * n + c] = -smin;
                    }
                }
                (
                    Scales::with_super(d, dsup, G),
                    Scales::with_super(m, msup, n),
                )
            }
            _ => (Scales::new(d), Scales::new(m)),
        };
        Some(Q4Matrix { n, k, qs, d, m })
    }

    /// The matrix's values, row-major `[n, k]` (tests, and an f32 copy for the gemm).
    pub fn dequantize(&self) -> Vec<f32> {
        let kb = self.k / QK;
        let mut out = vec![0f32; self.n * self.k];
        for c in 0..self.n {
            for b in 0..kb {
                let i = index(kb, c, b);
                for t in 0..QB {
                    let byte = self.qs[i * QB + t];
                    let o = c * self.k + b * QK;
                    let (dd, mm) = (self.d.get(i), self.m.get(b * self.n + c));
                    out[o + t] = dd * (byte & 0x0f) as f32 + mm;
                    out[o + t + QB] = dd * (byte >> 4) as f32 + mm;
                }
            }
        }
        out
    }

    /// `out[r][c] = Σ_i x[r][i] · w[c][i]` for every row of `x`; `out` is `[m, n]`.
    pub fn matmul(&self, x: &Q8Rows, out: &mut [f32]) {
        // SAFETY: `columns` writes only the columns it is given, of `out`.
        par_columns(x, self.n, self.k, out, |c0, c1, dst| unsafe {
            self.columns(x, c0, c1, dst)
        });
    }

    /// Columns `[c0, c1)` of every row, written through `dst`; `c0` starts a group.
    ///
    /// # Safety
    /// `dst` must point to `m * n` writable floats that nothing else touches in `[c0, c1)`.
    unsafe fn columns(&self, x: &Q8Rows, c0: usize, c1: usize, dst: OutPtr) {
        let (m, n) = (x.m, self.n);
        let kb = self.k / QK;
        debug_assert!(c0.is_multiple_of(G));
        let mut c = c0;
        while c < c1 {
            let cols = (c1 - c).min(G);
            let mut r = 0;
            while r < m {
                let rows = (m - r).min(TILE_ROWS4);
                let mut tile = [[0f32; G]; TILE_ROWS4];
                self.tile(x, r, rows, c / G, &mut tile);
                for (dr, trow) in tile.iter().enumerate().take(rows) {
                    for (dc, &v) in trow.iter().enumerate().take(cols) {
                        // SAFETY: (r + dr, c + dc) is inside `[m, n]` and in `[c0, c1)`.
                        unsafe { *dst.0.add((r + dr) * n + c + dc) = v };
                    }
                }
                r += rows;
            }
            c += cols;
        }
        // The offsets' share: `Σ_b sums[r][b] · m[b][c]`, blocks in order.
        for r in 0..m {
            // SAFETY: row `r`, columns `[c0, c1)` of `[m, n]`: this call's alone.
            let out = unsafe { std::slice::from_raw_parts_mut(dst.0.add(r * n + c0), c1 - c0) };
            for (b, &s) in x.sums[r * kb..(r + 1) * kb].iter().enumerate() {
                self.m.axpy(b * n + c0, s, out);
            }
        }
    }

    /// Rows `[r, r + rows)` by the 4 columns of group `g` (padding columns included).
    fn tile(&self, x: &Q8Rows, r: usize, rows: usize, g: usize, tile: &mut [[f32; G]; TILE_ROWS4]) {
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2() {
            // SAFETY: AVX2 and FMA are present; the rows and the group are inside both
            // matrices.
            unsafe {
                match (rows, self.d.kind()) {
                    (1, scales::F32) => avx2_tile4::<1, { scales::F32 }>(self, x, r, g, tile),
                    (2, scales::F32) => avx2_tile4::<2, { scales::F32 }>(self, x, r, g, tile),
                    (3, scales::F32) => avx2_tile4::<3, { scales::F32 }>(self, x, r, g, tile),
                    (_, scales::F32) => avx2_tile4::<4, { scales::F32 }>(self, x, r, g, tile),
                    (1, scales::F16) => avx2_tile4::<1, { scales::F16 }>(self, x, r, g, tile),
                    (2, scales::F16) => avx2_tile4::<2, { scales::F16 }>(self, x, r, g, tile),
                    (3, scales::F16) => avx2_tile4::<3, { scales::F16 }>(self, x, r, g, tile),
                    (_, scales::F16) => avx2_tile4::<4, { scales::F16 }>(self, x, r, g, tile),
                    (1, scales::SUB) => avx2_tile4::<1, { scales::SUB }>(self, x, r, g, tile),
                    (2, scales::SUB) => avx2_tile4::<2, { scales::SUB }>(self, x, r, g, tile),
                    (3, scales::SUB) => avx2_tile4::<3, { scales::SUB }>(self, x, r, g, tile),
                    (_, scales::SUB) => avx2_tile4::<4, { scales::SUB }>(self, x, r, g, tile),
                    _ => unreachable!("a scale kind without a tile"),
                }
            }
            return;
        }
        let kb = self.k / QK;
        for (dr, trow) in tile.iter_mut().enumerate().take(rows) {
            let (xq, xd) = x.row(r + dr);
            for (j, out) in trow.iter_mut().enumerate() {
                let mut acc = 0f32;
                for b in 0..kb {
                    let i = (g * kb + b) * G + j;
                    let qb = &self.qs[i * QB..(i + 1) * QB];
                    let xb = &xq[b * QK..(b + 1) * QK];
                    let mut dot = 0i32;
                    for t in 0..QB {
                        dot += (qb[t] & 0x0f) as i32 * xb[t] as i32;
                        dot += (qb[t] >> 4) as i32 * xb[t + QB] as i32;
                    }
                    acc = (dot as f32).mul_add(self.d.get(i) * xd[b], acc);
                }
                *out = acc;
            }
        }
    }
}

/// `R` rows by the 4 columns of group `g`.
///
/// Per block: the group's 64 bytes as two 256-bit halves (columns 0-1 and 2-3, each
/// column's 16 bytes in one 128-bit lane), masked into low nibbles (values 0-15) and
/// shifted into high nibbles (values 16-31); the row's 32 activations as its first and
/// last 16 duplicated into both lanes; `maddubs` + `madd` give 4 partial sums per
/// column, two `hadd`s and an unpack reduce them to the 4 exact dot products, and one
/// 4-wide `fma` per row adds them scaled.
///
/// # Safety
/// AVX2 and FMA present; `r + R <= x.m`; `g` a group of `w`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2_tile4<const R: usize, const K: u8>(
    w: &Q4Matrix,
    x: &Q8Rows,
    r: usize,
    g: usize,
    tile: &mut [[f32; G]; TILE_ROWS4],
) {
    use std::arch::x86_64::*;
    let k = w.k;
    let kb = k / QK;
    debug_assert!(r + R <= x.m && (g + 1) * G <= w.n.next_multiple_of(G));
    let xq: [*const i8; R] = std::array::from_fn(|i| x.qs[(r + i) * k..].as_ptr());
    let xd: [*const f32; R] = std::array::from_fn(|i| x.d[(r + i) * kb..].as_ptr());
    let ones = _mm256_set1_epi16(1);
    let low = _mm256_set1_epi8(0x0f);
    let mut acc = [_mm_setzero_ps(); R];
    let qs = w.qs.as_ptr();
    let ds = w.d.raw();
    for b in 0..kb {
        let blk = (g * kb + b) * G;
        // SAFETY: block `b` of group `g` (64 bytes, 4 scales) and of each row (32 bytes,
        // one scale) are inside their matrices.
        unsafe {
            prefetch::<1>(qs.add(blk * QB));
            let v01 = _mm256_loadu_si256(qs.add(blk * QB) as *const __m256i);
            let v23 = _mm256_loadu_si256(qs.add(blk * QB + 32) as *const __m256i);
            let lo01 = _mm256_and_si256(v01, low);
            let hi01 = _mm256_and_si256(_mm256_srli_epi16(v01, 4), low);
            let lo23 = _mm256_and_si256(v23, low);
            let hi23 = _mm256_and_si256(_mm256_srli_epi16(v23, 4), low);
            let d4 = scales::load4::<K>(ds, blk);
            for i in 0..R {
                let xp = xq[i].add(b * QK);
                let xlo = _mm256_broadcastsi128_si256(_mm_loadu_si128(xp as *const __m128i));
                let xhi =
                    _mm256_broadcastsi128_si256(_mm_loadu_si128(xp.add(16) as *const __m128i));
                // |q·x| ≤ 15·127: two pairs per i16 lane, two products added: < 2¹⁵.
                let s01 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(lo01, xlo),
                    _mm256_maddubs_epi16(hi01, xhi),
                );
                let s23 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(lo23, xlo),
                    _mm256_maddubs_epi16(hi23, xhi),
                );
                let t01 = _mm256_madd_epi16(s01, ones);
                let t23 = _mm256_madd_epi16(s23, ones);
                // [c0 c0 c2 c2 | c1 c1 c3 c3] then [c0 c2 c0 c2 | c1 c3 c1 c3].
                let h = _mm256_hadd_epi32(t01, t23);
                let h = _mm256_hadd_epi32(h, h);
                let dots =
                    _mm_unpacklo_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
                let dd = _mm_mul_ps(d4, _mm_set1_ps(*xd[i].add(b)));
                acc[i] = _mm_fmadd_ps(_mm_cvtepi32_ps(dots), dd, acc[i]);
            }
        }
    }
    for i in 0..R {
        // SAFETY: `tile[i]` is 4 floats.
        unsafe { _mm_storeu_ps(tile[i].as_mut_ptr(), acc[i]) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        super::super::test_data(len, seed, 1.0)
    }

    fn random_blocks(n: usize, k: usize, seed: u64) -> Vec<Block> {
        let v = data(n * k / QK * 2, seed);
        let q = data(n * k, seed + 1);
        (0..n * k / QK)
            .map(|b| {
                let mut qq = [0u8; QK];
                for (t, x) in qq.iter_mut().enumerate() {
                    *x = ((q[b * QK + t] + 1.0) * 7.99) as u8 & 0x0f;
                }
                (v[2 * b] * 0.05, v[2 * b + 1] * 0.2, qq)
            })
            .collect()
    }

    #[test]
    fn products_equal_the_dot_products_of_the_quantized_values() {
        // Odd shapes: a padded last group, one and several rows, a width of 5 blocks.
        for &(n, k, m) in &[
            (13usize, 160usize, 1usize),
            (13, 160, 7),
            (64, 96, 16),
            (5, 32, 3),
        ] {
            let blocks = random_blocks(n, k, n as u64 * 31 + k as u64);
            let w = Q4Matrix::from_blocks(&blocks, n, k).expect("shape");
            let wf = w.dequantize();
            let x = data(m * k, 99);
            let mut rows = Q8Rows::default();
            rows.quantize(&x, k);
            let mut got = vec![0f32; m * n];
            w.matmul(&rows, &mut got);
            for r in 0..m {
                let (xq, xd) = rows.row(r);
                for c in 0..n {
                    let want: f64 = (0..k)
                        .map(|i| wf[c * k + i] as f64 * xq[i] as f64 * xd[i / QK] as f64)
                        .sum();
                    let g = got[r * n + c] as f64;
                    assert!(
                        (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "[{n}x{k}] m={m} ({r},{c}): {g} vs {want}"
                    );
                }
            }
        }
    }

    /// Every (row, column) is the scalar recurrence of the module doc, to the bit: the
    /// SIMD tiles and the scalar code compute the same floats.
    #[test]
    fn products_are_the_documented_recurrence_to_the_bit() {
        let (n, k, m) = (9, 224, 6);
        // Scales and offsets no f16 holds (Q4_K's), and f16 ones (Q4_0's, Q4_1's).
        for f16_scales in [false, true] {
            let mut blocks = random_blocks(n, k, 77);
            if f16_scales {
                let h = |v: f32| f16::from_f32(v).to_f32();
                for b in &mut blocks {
                    (b.0, b.1) = (h(b.0), h(b.1));
                }
            }
            recurrence_to_the_bit(&blocks, n, k, m, f16_scales);
        }
    }

    fn recurrence_to_the_bit(blocks: &[Block], n: usize, k: usize, m: usize, f16_scales: bool) {
        let w = Q4Matrix::from_blocks(blocks, n, k).expect("shape");
        assert_eq!((w.d.is_f16(), w.m.is_f16()), (f16_scales, f16_scales));
        let x = data(m * k, 78);
        let mut rows = Q8Rows::default();
        rows.quantize(&x, k);
        let mut got = vec![0f32; m * n];
        w.matmul(&rows, &mut got);
        let kb = k / QK;
        for r in 0..m {
            let (xq, xd) = rows.row(r);
            for c in 0..n {
                let mut acc = 0f32;
                for b in 0..kb {
                    let (d, _, q) = &blocks[c * kb + b];
                    let dot: i32 = (0..QK).map(|t| q[t] as i32 * xq[b * QK + t] as i32).sum();
                    acc = (dot as f32).mul_add(d * xd[b], acc);
                }
                for b in 0..kb {
                    acc += rows.sums[r * kb + b] * blocks[c * kb + b].1;
                }
                assert_eq!(
                    got[r * n + c].to_bits(),
                    acc.to_bits(),
                    "({r}, {c}): {} vs {acc}",
                    got[r * n + c]
                );
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_and_in_a_batch() {
        let (n, k) = (37, 256);
        let w = Q4Matrix::from_blocks(&random_blocks(n, k, 5), n, k).expect("shape");
        let x = data(13 * k, 6);
        let mut all = Q8Rows::default();
        all.quantize(&x, k);
        let mut batch = vec![0f32; 13 * n];
        w.matmul(&all, &mut batch);
        for r in [0, 4, 12] {
            let mut one = Q8Rows::default();
            one.quantize(&x[r * k..(r + 1) * k], k);
            let mut alone = vec![0f32; n];
            w.matmul(&one, &mut alone);
            for c in 0..n {
                assert_eq!(
                    alone[c].to_bits(),
                    batch[r * n + c].to_bits(),
                    "row {r} col {c}"
                );
            }
        }
    }

    /// Q4_K kept as its 6-bit integers and per-256 f16 factors gives the same bits as
    /// its values in f32, alone and batched, with a padded last group and offsets whose
    /// columns are not a multiple of 8.
    #[test]
    fn q4_k_factors_compute_the_same_bits_as_f32_scales() {
        let (n, k) = (13, 512);
        let bytes: Vec<u8> = data(n * k / 256 * 144, 41)
            .iter()
            .map(|v| ((v + 1.0) * 127.9) as u8)
            .collect();
        // Plausible factors: small positive d and dmin in every super-block.
        let mut raw = bytes.clone();
        for (i, b) in raw.chunks_exact_mut(144).enumerate() {
            b[..2].copy_from_slice(&f16::from_f32(0.002 + 1e-5 * i as f32).to_le_bytes());
            b[2..4].copy_from_slice(&f16::from_f32(0.001 + 2e-5 * i as f32).to_le_bytes());
        }
        let blocks = decode(GgmlDType::Q4K, &raw).expect("blocks");
        let sup = decode_super(GgmlDType::Q4K, &raw).expect("factors");
        let compact = Q4Matrix::from_blocks_super(&blocks, Some(&sup), n, k).expect("shape");
        let plain = Q4Matrix::from_blocks(&blocks, n, k).expect("shape");
        assert_eq!(
            (compact.d.kind(), compact.m.kind()),
            (scales::SUB, scales::SUB)
        );
        assert_eq!((plain.d.kind(), plain.m.kind()), (scales::F32, scales::F32));
        for i in 0..plain.d.len() {
            assert_eq!(
                compact.d.get(i).to_bits(),
                plain.d.get(i).to_bits(),
                "d {i}"
            );
        }
        for i in 0..plain.m.len() {
            assert_eq!(
                compact.m.get(i).to_bits(),
                plain.m.get(i).to_bits(),
                "m {i}"
            );
        }
        for m in [1, 6] {
            let mut rows = Q8Rows::default();
            rows.quantize(&data(m * k, 42 + m as u64), k);
            let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
            compact.matmul(&rows, &mut a);
            plain.matmul(&rows, &mut b);
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{m} rows"
            );
        }
        // Factors that do not fit the values leave f32.
        let wrong: Vec<_> = sup
            .iter()
            .map(|&(d, m)| (d * f16::from_f32(3.0), m))
            .collect();
        let w = Q4Matrix::from_blocks_super(&blocks, Some(&wrong), n, k).expect("shape");
        assert_eq!((w.d.kind(), w.m.kind()), (scales::F32, scales::SUB));
    }

    #[test]
    fn ggml_blocks_decode_to_their_values() {
        // Q4_0: d = 0.5, nibbles t → value t % 16 (low) and (t + 1) % 16 (high).
        let mut b = f16::from_f32(0.5).to_le_bytes().to_vec();
        b.extend((0..16u8).map(|t| (t % 16) | (((t + 1) % 16) << 4)));
        let blocks = decode(GgmlDType::Q4_0, &b).expect("one block");
        let (d, m, q) = blocks[0];
        assert_eq!((d, m), (0.5, -4.0));
        assert_eq!((q[3], q[16 + 3]), (3, 4));
        // w = d·q + m reproduces Q4_0's d·(q − 8).
        assert_eq!(d * q[3] as f32 + m, 0.5 * (3.0 - 8.0));
        // Q4_1: d and m as stored.
        let mut b = f16::from_f32(0.25).to_le_bytes().to_vec();
        b.extend(f16::from_f32(-1.0).to_le_bytes());
        b.extend([0x21u8; 16]);
        let (d, m, q) = decode(GgmlDType::Q4_1, &b).expect("one block")[0];
        assert_eq!((d, m, q[0], q[16]), (0.25, -1.0, 1, 2));
        // Sizes that are not whole blocks are refused.
        assert!(decode(GgmlDType::Q4_1, &b[..19]).is_none());
        assert!(decode(GgmlDType::Q8_0, &[0; 34]).is_none());
        assert!(Q4Matrix::from_blocks(&blocks, 2, 32).is_none());
    }
}
