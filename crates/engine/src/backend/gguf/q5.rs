//! Q5_0 weight matrices and their int8 kernel: the GGUF's own Q5_0 weights, kept as they
//! are instead of widened to Q8_0 (Gemma 3 270M Q4_K_M stores q, k, gate and up, and half
//! its v, in Q5_0).
//!
//! A Q5_0 block of 32 weights of one output column is `w = d·(q - 16)` with `q` in
//! 0..=31, so the values are exactly the file's. Against activations quantized per block
//! ([`Q8Rows`]: `x ≈ dx·xq`), a block contributes `d·dx·(Σ q·xq - 16·Σ xq)`: the first
//! sum is one `maddubs` of the unsigned 5-bit values by the signed activations (no sign
//! trick, no saturation: 31·127·2·2 < 2¹⁵), the second the activation block's integer
//! sum, computed once per row ([`Q8Rows`]' `isums`). Their difference is the block's
//! exact integer dot product (|·| ≤ 32·16·127 < 2²⁴, so exact in f32 too). 5.5 bits per
//! weight plus the file's f16 scale per block (0.6875 bytes per weight, as in the file;
//! [`super::scales`]), against Q8_0's 1.0625:
//! single-stream decode streams every weight once per token and is bound by memory
//! traffic.
//!
//! Layout and threading follow [`super::q4`]: columns in groups of 4 interleaved block by
//! block, threads over column ranges ([`par_columns`]). Per group and block: the four
//! columns' low nibbles as in `q4` (64 bytes: byte `t` of a column holds value `t` low and
//! `t + 16` high), then four 32-bit words of fifth bits laid out for the SIMD lanes that
//! use them (word 0: values 0-15 of column 0 in bits 0-15 and of column 1 in bits 16-31;
//! word 1: values 16-31 of columns 0 and 1; words 2 and 3: the same for columns 2 and 3),
//! then the four scales in their own array. A tile is up to 4 rows by one group: each
//! block's integer dot product is exact per (row, column) before any rounding, and each
//! (row, column) then runs the same scalar recurrence, `acc = fma(dot_b, d_b·dx_b, acc)`
//! over the blocks in order. So output (row, column) depends only on that row and that
//! column, never on the tile, the number of rows in the call, or whether the SIMD or the
//! scalar code ran.

#[cfg(target_arch = "x86_64")]
use super::q8::prefetch;
use super::q8::{block_index as index, par_columns, OutPtr, Q8Rows, G, QK};
use candle_core::quantized::GgmlDType;
use half::f16;

use super::scales::{self, Scales};

/// Bytes of packed low nibbles per block: byte `t` holds value `t` (low) and `t + 16`
/// (high).
const QB: usize = QK / 2;

/// Rows per tile.
const TILE_ROWS5: usize = 4;

/// A weight matrix `[n, k]` in Q5_0 blocks of 32.
pub struct Q5Matrix {
    n: usize,
    k: usize,
    /// Low nibbles, `[n / 4][k / 32][4][16]` (n rounded up to 4; padding columns are
    /// zero).
    qs: Vec<u8>,
    /// Fifth bits, `[n / 4][k / 32][4]` words in the lane order of the module doc.
    qh: Vec<u32>,
    /// Scales, `[n / 4][k / 32][4]`.
    d: Scales,
}

impl std::fmt::Debug for Q5Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q5Matrix[{}, {}]", self.n, self.k)
    }
}

/// One block of a source tensor: scale and 32 values in 0..=31 (`w = d·(q - 16)`).
pub type Block5 = (f32, [u8; QK]);

/// The GGUF types this kernel runs without widening.
pub fn supports(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q5_0)
}

/// Decode a row-major tensor's raw Q5_0 blocks (f16 `d`, 32 fifth bits `qh` as a
/// little-endian u32 whose bit `t` belongs to value `t`, 16 bytes of low nibbles: value
/// `t` low, `t + 16` high) into 32-value blocks, in order.
pub fn decode(dtype: GgmlDType, raw: &[u8]) -> Option<Vec<Block5>> {
    if dtype != GgmlDType::Q5_0 || !raw.len().is_multiple_of(22) {
        return None;
    }
    Some(
        raw.chunks_exact(22)
            .map(|b| {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let mut q = [0u8; QK];
                for t in 0..QB {
                    q[t] = (b[6 + t] & 0x0f) | ((((qh >> t) & 1) as u8) << 4);
                    q[t + QB] = (b[6 + t] >> 4) | ((((qh >> (t + QB)) & 1) as u8) << 4);
                }
                (d, q)
            })
            .collect(),
    )
}

impl Q5Matrix {
    /// Build `[n, k]` from its blocks (column `c`'s blocks at `c·k/32 ..`); `None` unless
    /// `k` is a multiple of 32 and there are `n·k/32` blocks.
    pub fn from_blocks(blocks: &[Block5], n: usize, k: usize) -> Option<Q5Matrix> {
        if k == 0 || !k.is_multiple_of(QK) || blocks.len() != n * (k / QK) {
            return None;
        }
        let (kb, groups) = (k / QK, n.div_ceil(G));
        let mut qs = vec![0u8; groups * G * kb * QB];
        let mut qh = vec![0u32; groups * G * kb];
        let mut d = vec![0f32; groups * G * kb];
        for (c, col) in blocks.chunks_exact(kb).enumerate() {
            let j = c % G;
            for (b, (bd, q)) in col.iter().enumerate() {
                let i = index(kb, c, b);
                d[i] = *bd;
                for t in 0..QB {
                    qs[i * QB + t] = (q[t] & 0x0f) | ((q[t + QB] & 0x0f) << 4);
                }
                // Words 2·(j / 2) (values 0-15) and 2·(j / 2) + 1 (values 16-31), this
                // column's half chosen by j % 2.
                let w = i - j + 2 * (j / 2);
                let shift = 16 * (j % 2);
                for t in 0..QB {
                    qh[w] |= (((q[t] >> 4) & 1) as u32) << (shift + t);
                    qh[w + 1] |= (((q[t + QB] >> 4) & 1) as u32) << (shift + t);
                }
            }
        }
        let d = Scales::new(d);
        Some(Q5Matrix { n, k, qs, qh, d })
    }

    /// Value `t` (0..32) of block `b` of column `c`, as 0..=31.
    fn q(&self, c: usize, b: usize, t: usize) -> u8 {
        let kb = self.k / QK;
        let (i, j) = (index(kb, c, b), c % G);
        let byte = self.qs[i * QB + t % QB];
        let low = if t < QB { byte & 0x0f } else { byte >> 4 };
        let w = self.qh[i - j + 2 * (j / 2) + t / QB];
        low | ((((w >> (16 * (j % 2) + t % QB)) & 1) as u8) << 4)
    }

    /// The matrix's values, row-major `[n, k]` (tests).
    pub fn dequantize(&self) -> Vec<f32> {
        let kb = self.k / QK;
        let mut out = vec![0f32; self.n * self.k];
        for c in 0..self.n {
            for b in 0..kb {
                let d = self.d.get(index(kb, c, b));
                for t in 0..QK {
                    out[c * self.k + b * QK + t] = d * (self.q(c, b, t) as f32 - 16.0);
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
        debug_assert!(c0.is_multiple_of(G));
        let mut c = c0;
        while c < c1 {
            let cols = (c1 - c).min(G);
            let mut r = 0;
            while r < m {
                let rows = (m - r).min(TILE_ROWS5);
                let mut tile = [[0f32; G]; TILE_ROWS5];
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
    }

    /// Rows `[r, r + rows)` by the 4 columns of group `g` (padding columns included).
    fn tile(&self, x: &Q8Rows, r: usize, rows: usize, g: usize, tile: &mut [[f32; G]; TILE_ROWS5]) {
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2() {
            // SAFETY: AVX2 and FMA are present; the rows and the group are inside both
            // matrices.
            unsafe {
                match (rows, self.d.kind()) {
                    (1, scales::F32) => avx2_tile5::<1, { scales::F32 }>(self, x, r, g, tile),
                    (2, scales::F32) => avx2_tile5::<2, { scales::F32 }>(self, x, r, g, tile),
                    (3, scales::F32) => avx2_tile5::<3, { scales::F32 }>(self, x, r, g, tile),
                    (_, scales::F32) => avx2_tile5::<4, { scales::F32 }>(self, x, r, g, tile),
                    (1, scales::F16) => avx2_tile5::<1, { scales::F16 }>(self, x, r, g, tile),
                    (2, scales::F16) => avx2_tile5::<2, { scales::F16 }>(self, x, r, g, tile),
                    (3, scales::F16) => avx2_tile5::<3, { scales::F16 }>(self, x, r, g, tile),
                    (_, scales::F16) => avx2_tile5::<4, { scales::F16 }>(self, x, r, g, tile),
                    _ => unreachable!("a scale kind without a tile"),
                }
            }
            return;
        }
        self.scalar_tile(x, r, rows, g, tile);
    }

    /// [`Q5Matrix::tile`] without SIMD.
    fn scalar_tile(
        &self,
        x: &Q8Rows,
        r: usize,
        rows: usize,
        g: usize,
        tile: &mut [[f32; G]; TILE_ROWS5],
    ) {
        let kb = self.k / QK;
        for (dr, trow) in tile.iter_mut().enumerate().take(rows) {
            let (xq, xd) = x.row(r + dr);
            let isums = &x.isums[(r + dr) * kb..(r + dr + 1) * kb];
            for (j, out) in trow.iter_mut().enumerate() {
                let c = g * G + j;
                let mut acc = 0f32;
                for b in 0..kb {
                    let xb = &xq[b * QK..(b + 1) * QK];
                    let mut dot = 0i32;
                    for (t, &xv) in xb.iter().enumerate() {
                        dot += self.q(c, b, t) as i32 * xv as i32;
                    }
                    let dot = dot - 16 * isums[b];
                    acc = (dot as f32).mul_add(self.d.get(index(kb, c, b)) * xd[b], acc);
                }
                *out = acc;
            }
        }
    }
}

/// `R` rows by the 4 columns of group `g`.
///
/// Per block: the group's 64 nibble bytes as in [`super::q4`] (two 256-bit halves,
/// columns 0-1 and 2-3, each column's 16 bytes in one 128-bit lane) masked into values
/// 0-15 and shifted into values 16-31; each of the four fifth-bit words expanded to one
/// byte per bit (byte `t` of the 256-bit vector from bit `t`: a byte shuffle of the
/// broadcast word, an OR with every bit but the wanted one, a compare with all ones) and
/// ORed in as 16. Per row as `q4`: `maddubs` + `madd`, two `hadd`s and an unpack to the 4
/// dot products, minus 16 times the row block's sum, and one 4-wide `fma`.
///
/// # Safety
/// AVX2 and FMA present; `r + R <= x.m`; `g` a group of `w`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2_tile5<const R: usize, const K: u8>(
    w: &Q5Matrix,
    x: &Q8Rows,
    r: usize,
    g: usize,
    tile: &mut [[f32; G]; TILE_ROWS5],
) {
    use std::arch::x86_64::*;
    let k = w.k;
    let kb = k / QK;
    debug_assert!(r + R <= x.m && (g + 1) * G <= w.n.next_multiple_of(G));
    let xq: [*const i8; R] = std::array::from_fn(|i| x.qs[(r + i) * k..].as_ptr());
    let xd: [*const f32; R] = std::array::from_fn(|i| x.d[(r + i) * kb..].as_ptr());
    let xs: [*const i32; R] = std::array::from_fn(|i| x.isums[(r + i) * kb..].as_ptr());
    let ones = _mm256_set1_epi16(1);
    let low = _mm256_set1_epi8(0x0f);
    let mut acc = [_mm_setzero_ps(); R];
    let qs = w.qs.as_ptr();
    let qh = w.qh.as_ptr();
    let ds = w.d.raw();
    for b in 0..kb {
        let blk = (g * kb + b) * G;
        // SAFETY: block `b` of group `g` (64 bytes, 4 words, 4 scales) and of each row
        // (32 bytes, one scale, one sum) are inside their matrices.
        unsafe {
            // Nibbles 64 bytes a block, fifth bits 16: both streams.
            prefetch::<1>(qs.add(blk * QB));
            prefetch::<1>(qh.add(blk) as *const u8);
            let v01 = _mm256_loadu_si256(qs.add(blk * QB) as *const __m256i);
            let v23 = _mm256_loadu_si256(qs.add(blk * QB + 32) as *const __m256i);
            let h = qh.add(blk);
            let lo01 = _mm256_or_si256(_mm256_and_si256(v01, low), fifth(*h));
            let hi01 = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(v01, 4), low),
                fifth(*h.add(1)),
            );
            let lo23 = _mm256_or_si256(_mm256_and_si256(v23, low), fifth(*h.add(2)));
            let hi23 = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(v23, 4), low),
                fifth(*h.add(3)),
            );
            let d4 = scales::load4::<K>(ds, blk);
            for i in 0..R {
                let xp = xq[i].add(b * QK);
                let xlo = _mm256_broadcastsi128_si256(_mm_loadu_si128(xp as *const __m128i));
                let xhi =
                    _mm256_broadcastsi128_si256(_mm_loadu_si128(xp.add(16) as *const __m128i));
                // |q·x| ≤ 31·127: two pairs per i16 lane, two products added: < 2¹⁵.
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
                let hs = _mm256_hadd_epi32(t01, t23);
                let hs = _mm256_hadd_epi32(hs, hs);
                let dots =
                    _mm_unpacklo_epi32(_mm256_castsi256_si128(hs), _mm256_extracti128_si256(hs, 1));
                let dots = _mm_sub_epi32(dots, _mm_set1_epi32(16 * *xs[i].add(b)));
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

/// 32 bytes: byte `t` is 16 where bit `t` of `word` is set, else 0.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn fifth(word: u32) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // Byte t of the shuffled word: byte t / 8 of the word (lanes index their own copy).
    let spread = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    // Byte t: every bit set but bit t % 8.
    let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
    let b = _mm256_shuffle_epi8(_mm256_set1_epi32(word as i32), spread);
    let b = _mm256_cmpeq_epi8(_mm256_or_si256(b, others), _mm256_set1_epi64x(-1));
    _mm256_and_si256(b, _mm256_set1_epi8(0x10))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::ggml_file::qtensor_from_ggml;
    use candle_core::Device;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        super::super::test_data(len, seed, 1.0)
    }

    /// `n·k/32` random Q5_0 blocks as the file stores them: random bytes, f16 scales in
    /// ±0.01.
    fn random_raw(n: usize, k: usize, seed: u64) -> Vec<u8> {
        let bytes = data(n * k / QK * 22, seed);
        let scales = data(n * k / QK, seed + 1);
        let mut raw: Vec<u8> = bytes.iter().map(|v| ((v + 1.0) * 127.99) as u8).collect();
        for (b, s) in raw.chunks_exact_mut(22).zip(scales) {
            b[..2].copy_from_slice(&f16::from_f32(s * 0.01).to_le_bytes());
        }
        raw
    }

    /// Level `i` (0..32) of one raw Q5_0 block, in -16..=15, per element from the
    /// layout.
    fn level(b: &[u8], i: usize) -> i32 {
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let byte = b[6 + i % 16];
        let low = if i < 16 { byte & 0x0f } else { byte >> 4 };
        (low as i32 | (((qh >> i) & 1) as i32) << 4) - 16
    }

    /// Value `i` (0..32) of one raw Q5_0 block: `d·level`.
    fn reference(b: &[u8], i: usize) -> f32 {
        f16::from_le_bytes([b[0], b[1]]).to_f32() * level(b, i) as f32
    }

    fn reference_matrix(raw: &[u8]) -> Vec<f32> {
        raw.chunks_exact(22)
            .flat_map(|b| (0..QK).map(move |i| reference(b, i)))
            .collect()
    }

    fn matrix(raw: &[u8], n: usize, k: usize) -> Q5Matrix {
        let blocks = decode(GgmlDType::Q5_0, raw).expect("whole blocks");
        Q5Matrix::from_blocks(&blocks, n, k).expect("shape")
    }

    #[test]
    fn blocks_keep_the_files_values() {
        let (n, k) = (13, 160);
        let raw = random_raw(n, k, 3);
        let want = reference_matrix(&raw);
        let got = matrix(&raw, n, k).dequantize();
        let candle = qtensor_from_ggml(GgmlDType::Q5_0, &raw, vec![n, k], &Device::Cpu)
            .and_then(|t| t.dequantize(&Device::Cpu))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("dequantize");
        let mut distinct = std::collections::HashSet::new();
        for (i, ((g, w), c)) in got.iter().zip(&want).zip(&candle).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "value {i}: {g} vs reference {w}");
            assert!(
                (c - w).abs() <= 1e-6 * w.abs().max(1e-3),
                "value {i}: candle {c}"
            );
            distinct.insert(level(&raw[i / QK * 22..], i % QK));
        }
        // Every level of -16..=15 occurs.
        assert_eq!(distinct.len(), 32, "{distinct:?}");
        assert!(decode(GgmlDType::Q5_0, &raw[..21]).is_none());
        assert!(decode(GgmlDType::Q4_0, &raw[..18]).is_none());
        assert!(
            Q5Matrix::from_blocks(&decode(GgmlDType::Q5_0, &raw).expect("blocks"), n + 1, k)
                .is_none()
        );
    }

    #[test]
    fn products_equal_the_dot_products_of_the_reference_values() {
        // Odd shapes: a padded last group, one and several rows, a width of 5 blocks;
        // (64, 640, 16) runs in several threads' chunks.
        for &(n, k, m) in &[
            (13usize, 160usize, 1usize),
            (13, 160, 7),
            (64, 640, 16),
            (5, 32, 3),
        ] {
            let raw = random_raw(n, k, n as u64 * 31 + k as u64);
            let wf = reference_matrix(&raw);
            let w = matrix(&raw, n, k);
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
        let raw = random_raw(n, k, 77);
        let w = matrix(&raw, n, k);
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
                    let blk = &raw[(c * kb + b) * 22..(c * kb + b + 1) * 22];
                    let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                    let dot: i32 = (0..QK).map(|t| level(blk, t) * xq[b * QK + t] as i32).sum();
                    acc = (dot as f32).mul_add(d * xd[b], acc);
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

    /// The scalar code (CPUs without AVX2) computes the same bits as `matmul`.
    #[test]
    fn the_scalar_tiles_compute_the_same_bits() {
        let (n, k, m) = (11, 192, 5);
        let w = matrix(&random_raw(n, k, 12), n, k);
        let mut rows = Q8Rows::default();
        rows.quantize(&data(m * k, 13), k);
        let mut got = vec![0f32; m * n];
        w.matmul(&rows, &mut got);
        assert_scalar_tiles_give(&w, &rows, &got);
    }

    /// Every (row, column) of the scalar tiles of `w` by `rows` is `got`'s, to the bit.
    fn assert_scalar_tiles_give(w: &Q5Matrix, rows: &Q8Rows, got: &[f32]) {
        let (n, m) = (w.n, rows.m);
        for g in 0..n.div_ceil(G) {
            for r in 0..m {
                let mut tile = [[0f32; G]; TILE_ROWS5];
                w.scalar_tile(rows, r, 1, g, &mut tile);
                for (j, v) in tile[0].iter().enumerate().take(G.min(n - g * G)) {
                    let c = g * G + j;
                    assert_eq!(v.to_bits(), got[r * n + c].to_bits(), "({r}, {c})");
                }
            }
        }
    }

    /// The file's f16 scales are streamed as f16; the same matrix with its scales widened
    /// to f32 computes the same bits, and so does a matrix whose scales no f16 holds, on
    /// the f32 path, against the scalar tiles.
    #[test]
    fn f16_and_f32_scales_compute_the_same_bits() {
        let (n, k, m) = (10, 160, 5);
        let w = matrix(&random_raw(n, k, 21), n, k);
        assert!(w.d.is_f16());
        let mut rows = Q8Rows::default();
        rows.quantize(&data(m * k, 22), k);
        let mut got = vec![0f32; m * n];
        w.matmul(&rows, &mut got);
        let wide = Q5Matrix {
            d: w.d.widened(),
            qs: w.qs.clone(),
            qh: w.qh.clone(),
            ..w
        };
        let mut again = vec![0f32; m * n];
        wide.matmul(&rows, &mut again);
        assert_eq!(got, again);
        let odd: Vec<Block5> = (0..n * k / QK)
            .map(|b| {
                let q: [u8; QK] = std::array::from_fn(|t| ((b * 7 + t * 3) % 32) as u8);
                (0.0123 + b as f32 * 1e-4, q)
            })
            .collect();
        let w = Q5Matrix::from_blocks(&odd, n, k).expect("shape");
        assert!(!w.d.is_f16());
        w.matmul(&rows, &mut got);
        assert_scalar_tiles_give(&w, &rows, &got);
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_and_in_a_batch() {
        let (n, k) = (37, 256);
        let w = matrix(&random_raw(n, k, 5), n, k);
        let x = data(13 * k, 6);
        let mut all = Q8Rows::default();
        all.quantize(&x, k);
        let mut batch = vec![0f32; 13 * n];
        w.matmul(&all, &mut batch);
        for r in 0..13 {
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
}
