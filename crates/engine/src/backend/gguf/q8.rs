//! Q8_0 weight matrices and the int8 matrix kernel the GGUF backend's linear layers run on.
//!
//! Owns the packed weight layout, activation quantization and the kernel:
//! - A [`Q8Matrix`] holds `[out, in]` weights quantized per output column in blocks of 32
//!   values, as GGML's Q8_0 (`d = max|w| / 127`, `q = round(w / d)`), with the block scales
//!   in f16 where that is exact (a Q8_0 file's own blocks come back with their own f16
//!   scales) and in f32 otherwise (values re-quantized from other formats): see
//!   [`super::scales`]. Columns are stored in groups of 4, interleaved block by block (block `b`
//!   of columns `4g..4g+4`, then block `b + 1`), so that a thread walking a column group
//!   reads two sequential streams (quants and scales) however many columns it computes at
//!   once.
//! - [`Q8Rows`] holds the activations quantized the same way, per row, once per call.
//! - [`Q8Matrix::matmul`] walks the weights once per call whatever the number of rows:
//!   threads (rayon's pool) take ranges of output columns, and a micro-kernel computes the
//!   dot products of a tile of up to 4 rows by 2 columns while those columns' weight blocks
//!   sit in registers. On x86-64 with AVX2 it uses the sign trick (`|w|` times `sign(x, w)`
//!   through `maddubs`), 8 f32 lanes of partial sums per (row, column), one scale multiply
//!   per block. Elsewhere a scalar loop computes the same sums.
//!
//! Invariant: the value of output (row, column) depends only on that row's activations and
//! that column's weights, never on the number of rows in the call or on which tile slot the
//! row or column falls in: every tile shape performs the same operations in the same order
//! for each (row, column). The engine's batch invariance rests on this.

use super::scales::{self, Scales};
use rayon::prelude::*;

/// Values per quantization block.
pub const QK: usize = 32;

/// Columns per interleaved group.
pub(super) const G: usize = 4;

/// Rows and columns of the micro-kernel's tile when a call has more than one row.
const TILE_ROWS: usize = 3;
const TILE_COLS: usize = 2;

/// Calls with fewer multiply-adds than this run on the calling thread.
const PAR_MIN_MACS: usize = 1 << 17;

/// Quantize one block of 32 values; returns its scale.
fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (q, v) in q.iter_mut().zip(x) {
        // `as` saturates (and maps NaN to 0): no value leaves [-127, 127].
        *q = (v * id).round() as i8;
    }
    d
}

/// Bytes ahead of a tile's weight stream that it asks the cache for. One sequence's decode
/// streams every weight from memory once, and the hardware prefetcher alone keeps too few
/// lines in flight on this VM: a 262,144 x 640 Q8_0 product of one row ran 7-25% faster
/// with it (2,048 bytes, into L1; 1,024 and 4,096, and into L2, ran close), in
/// `examples/q8_kernel.rs` with and without it alternated in one process.
pub(super) const PREFETCH: usize = 2048;

/// Ask for the `L` cache lines `PREFETCH` bytes past `p` (a hint: an address past the
/// end of its buffer is never read, and faults nothing).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse")]
#[inline]
pub(super) fn prefetch<const L: usize>(p: *const u8) {
    use std::arch::x86_64::*;
    let p = p.wrapping_add(PREFETCH) as *const i8;
    for l in 0..L {
        // Prefetching is a hint that never faults.
        _mm_prefetch(p.wrapping_add(64 * l), _MM_HINT_T0);
    }
}

/// Every tile shape up to 4 x 4, monomorphized.
#[cfg(target_arch = "x86_64")]
macro_rules! tile_dispatch {
    ($w:expr, $x:expr, $r:expr, $c:expr, $t:expr, $rows:expr, $cols:expr, $h:block) => {
        match ($rows, $cols) {
            (1, 1) => avx2_tile::<1, 1, $h>($w, $x, $r, $c, $t),
            (1, 2) => avx2_tile::<1, 2, $h>($w, $x, $r, $c, $t),
            (1, 3) => avx2_tile::<1, 3, $h>($w, $x, $r, $c, $t),
            (1, _) => avx2_tile::<1, 4, $h>($w, $x, $r, $c, $t),
            (2, 1) => avx2_tile::<2, 1, $h>($w, $x, $r, $c, $t),
            (2, 2) => avx2_tile::<2, 2, $h>($w, $x, $r, $c, $t),
            (2, 3) => avx2_tile::<2, 3, $h>($w, $x, $r, $c, $t),
            (2, _) => avx2_tile::<2, 4, $h>($w, $x, $r, $c, $t),
            (3, 1) => avx2_tile::<3, 1, $h>($w, $x, $r, $c, $t),
            (3, 2) => avx2_tile::<3, 2, $h>($w, $x, $r, $c, $t),
            (3, 3) => avx2_tile::<3, 3, $h>($w, $x, $r, $c, $t),
            (3, _) => avx2_tile::<3, 4, $h>($w, $x, $r, $c, $t),
            (4, 1) => avx2_tile::<4, 1, $h>($w, $x, $r, $c, $t),
            (4, 2) => avx2_tile::<4, 2, $h>($w, $x, $r, $c, $t),
            (4, 3) => avx2_tile::<4, 3, $h>($w, $x, $r, $c, $t),
            (_, _) => avx2_tile::<4, 4, $h>($w, $x, $r, $c, $t),
        }
    };
}

/// A weight matrix `[n, k]` (n outputs, k inputs) in Q8_0.
pub struct Q8Matrix {
    n: usize,
    k: usize,
    /// Quants, `[n / 4][k / 32][4][32]` (n rounded up to 4; padding columns are zero).
    qs: Vec<i8>,
    /// Block scales, `[n / 4][k / 32][4]`.
    d: Scales,
}

impl std::fmt::Debug for Q8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q8Matrix[{}, {}]", self.n, self.k)
    }
}

impl Q8Matrix {
    /// Quantize row-major `[n, k]` weights; `None` unless `k` is a multiple of 32.
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Option<Q8Matrix> {
        if k == 0 || !k.is_multiple_of(QK) || w.len() != n * k {
            return None;
        }
        let (kb, groups) = (k / QK, n.div_ceil(G));
        let mut qs = vec![0i8; groups * G * k];
        let mut d = vec![0f32; groups * G * kb];
        for (c, col) in w.chunks_exact(k).enumerate() {
            for (b, x) in col.chunks_exact(QK).enumerate() {
                let i = block_index(kb, c, b);
                d[i] = quantize_block(x, &mut qs[i * QK..(i + 1) * QK]);
            }
        }
        let d = Scales::new(d);
        Some(Q8Matrix { n, k, qs, d })
    }

    /// `out[r][c] = Σ_i x[r][i] · w[c][i]` for every row of `x`; `out` is `[m, n]`.
    pub fn matmul(&self, x: &Q8Rows, out: &mut [f32]) {
        // SAFETY: `columns` writes only the columns it is given, of `out`.
        par_columns(x, self.n, self.k, out, |c0, c1, dst| unsafe {
            self.columns(x, c0, c1, dst)
        });
    }

    /// Columns `[c0, c1)` of every row, written through `dst` (`[m, n]`, row-major).
    ///
    /// # Safety
    /// `dst` must point to `m * n` writable floats that nothing else touches in `[c0, c1)`.
    unsafe fn columns(&self, x: &Q8Rows, c0: usize, c1: usize, dst: OutPtr) {
        let (m, n) = (x.m, self.n);
        // One row: a whole group at a time, so 4 independent sums hide the FMA latency.
        // More rows: tiles of TILE_ROWS rows by TILE_COLS columns.
        let (tr, tc) = if m == 1 {
            (1, G)
        } else {
            (TILE_ROWS, TILE_COLS)
        };
        let mut c = c0;
        while c < c1 {
            // A tile never straddles two groups.
            let cols = (c1 - c).min(tc).min(G - c % G);
            let mut r = 0;
            while r < m {
                let rows = (m - r).min(tr);
                let mut tile = [[0f32; 4]; 4];
                self.tile(x, r, rows, c, cols, &mut tile);
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

    /// Dot products of rows `[r, r + rows)` by columns `[c, c + cols)` into `tile`.
    fn tile(&self, x: &Q8Rows, r: usize, rows: usize, c: usize, cols: usize, tile: &mut Tile) {
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2() {
            // SAFETY: AVX2 and FMA are present; the ranges are inside both matrices.
            unsafe {
                if self.d.kind() == scales::F16 {
                    tile_dispatch!(self, x, r, c, tile, rows, cols, { scales::F16 })
                } else {
                    tile_dispatch!(self, x, r, c, tile, rows, cols, { scales::F32 })
                }
            }
            return;
        }
        let kb = self.k / QK;
        for (dr, trow) in tile.iter_mut().enumerate().take(rows) {
            let (xq, xd) = x.row(r + dr);
            for (dc, out) in trow.iter_mut().enumerate().take(cols) {
                let mut acc = 0f32;
                for b in 0..kb {
                    let i = block_index(kb, c + dc, b);
                    let s: i32 = self.qs[i * QK..(i + 1) * QK]
                        .iter()
                        .zip(&xq[b * QK..(b + 1) * QK])
                        .map(|(&a, &b)| a as i32 * b as i32)
                        .sum();
                    acc += s as f32 * (self.d.get(i) * xd[b]);
                }
                *out = acc;
            }
        }
    }
}

/// Index of block `b` of column `c` among the blocks (and the scales) of a matrix whose
/// columns are interleaved in groups of [`G`], `kb` blocks per column (Q8_0, 4-bit, Q5_0).
#[inline]
pub(super) fn block_index(kb: usize, c: usize, b: usize) -> usize {
    ((c / G) * kb + b) * G + c % G
}

/// Run `columns(c0, c1, dst)` over the `n` output columns of `x · Wᵀ` (`W` is `[n, k]`,
/// `out` is `[m, n]`): on the calling thread when the call is small, else on rayon's pool
/// in chunks of columns (multiples of 4, the kernels' column groups; a few per thread so
/// that stealing evens out uneven progress). `columns` must write only columns
/// `[c0, c1)` of `out`, through `dst`. Shared by the Q8_0, 4-bit and Q5_0 kernels.
pub(super) fn par_columns(
    x: &Q8Rows,
    n: usize,
    k: usize,
    out: &mut [f32],
    columns: impl Fn(usize, usize, OutPtr) + Sync,
) {
    let m = x.m;
    assert_eq!(x.k, k, "activation width {} for a matrix of width {k}", x.k);
    assert_eq!(
        out.len(),
        m * n,
        "output of {} values for [{m}, {n}]",
        out.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let dst = OutPtr(out.as_mut_ptr());
    if threads <= 1 || m * n * k < PAR_MIN_MACS {
        columns(0, n, dst);
        return;
    }
    let chunk = n.div_ceil(threads * 4).next_multiple_of(4).max(8);
    // Chunks cover disjoint column ranges of `out`, which outlives this call; each (row,
    // column) is written by exactly one chunk.
    (0..n.div_ceil(chunk)).into_par_iter().for_each(|i| {
        let c0 = i * chunk;
        columns(c0, (c0 + chunk).min(n), dst);
    });
}

pub(super) type Tile = [[f32; 4]; 4];

/// The output pointer shared by the column chunks of one call.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: chunks write disjoint elements (see `Q8Matrix::matmul`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Activations quantized per row in Q8_0 blocks (f32 scales). Reused across calls.
#[derive(Debug, Default)]
pub struct Q8Rows {
    pub(super) m: usize,
    pub(super) k: usize,
    pub(super) qs: Vec<i8>,
    pub(super) d: Vec<f32>,
    /// Per block: its scale times the sum of its quants (`d · Σq`), for kernels whose
    /// weights carry an offset (`w = d·q + m`, [`super::q4`]).
    pub(super) sums: Vec<f32>,
    /// Per block: the sum of its quants (`Σq`), for kernels whose integer levels carry an
    /// offset (`w = d·(q - 16)`, [`super::q5`]).
    pub(super) isums: Vec<i32>,
}

impl Q8Rows {
    /// Quantize `m = x.len() / k` rows of width `k` (a multiple of 32).
    pub fn quantize(&mut self, x: &[f32], k: usize) {
        assert!(
            k > 0 && k.is_multiple_of(QK),
            "row width {k} is not a multiple of {QK}"
        );
        self.m = x.len() / k;
        self.k = k;
        self.qs.clear();
        self.qs.resize(self.m * k, 0);
        self.d.clear();
        self.d.extend(
            x[..self.m * k]
                .chunks_exact(QK)
                .zip(self.qs.chunks_exact_mut(QK))
                .map(|(x, q)| quantize_block(x, q)),
        );
        self.isums.clear();
        self.isums.extend(
            self.qs
                .chunks_exact(QK)
                .map(|q| q.iter().map(|&v| v as i32).sum::<i32>()),
        );
        self.sums.clear();
        self.sums
            .extend(self.isums.iter().zip(&self.d).map(|(&s, d)| s as f32 * d));
    }

    pub(super) fn row(&self, r: usize) -> (&[i8], &[f32]) {
        let kb = self.k / QK;
        (
            &self.qs[r * self.k..(r + 1) * self.k],
            &self.d[r * kb..(r + 1) * kb],
        )
    }
}

/// An `R x C` tile: rows `[r, r + R)` by columns `[c, c + C)`.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `r + R <= x.m` and `c + C <= w.n`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2_tile<const R: usize, const C: usize, const K: u8>(
    w: &Q8Matrix,
    x: &Q8Rows,
    r: usize,
    c: usize,
    tile: &mut Tile,
) {
    use std::arch::x86_64::*;
    let k = w.k;
    let kb = k / QK;
    debug_assert!(r + R <= x.m && c + C <= w.n.next_multiple_of(G));
    debug_assert!(c % G + C <= G, "a tile within one group");
    // Block b of column c + j: G blocks further per block.
    let wq: [*const i8; C] =
        std::array::from_fn(|j| w.qs[block_index(kb, c + j, 0) * QK..].as_ptr());
    // Scale of block b of column c + j: at index block_index(kb, c + j, 0) + b·G.
    let (wd, w0) = (w.d.raw(), block_index(kb, c, 0));
    let xq: [*const i8; R] = std::array::from_fn(|i| x.qs[(r + i) * k..].as_ptr());
    let xd: [*const f32; R] = std::array::from_fn(|i| x.d[(r + i) * kb..].as_ptr());
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    for b in 0..kb {
        // The group's 4 blocks of b (128 bytes) are one stream with the next groups'.
        prefetch::<2>(wq[0].wrapping_add(b * G * QK) as *const u8);
        // SAFETY: block `b` of each row and column is inside its matrix.
        unsafe {
            let wv: [__m256i; C] =
                std::array::from_fn(
                    |j| _mm256_loadu_si256(wq[j].add(b * G * QK) as *const __m256i),
                );
            let wa: [__m256i; C] = std::array::from_fn(|j| _mm256_sign_epi8(wv[j], wv[j]));
            let ws: [__m256; C] = std::array::from_fn(|j| scales::load1::<K>(wd, w0 + j + b * G));
            for i in 0..R {
                let xv = _mm256_loadu_si256(xq[i].add(b * QK) as *const __m256i);
                let xs = _mm256_set1_ps(*xd[i].add(b));
                for j in 0..C {
                    let p = _mm256_maddubs_epi16(wa[j], _mm256_sign_epi8(xv, wv[j]));
                    let f = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
                    acc[i][j] = _mm256_fmadd_ps(f, _mm256_mul_ps(ws[j], xs), acc[i][j]);
                }
            }
        }
    }
    for i in 0..R {
        for j in 0..C {
            tile[i][j] = hsum(acc[i][j]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        super::super::test_data(len, seed, 1.0)
    }

    /// Quantize then dequantize, as the kernel sees the values.
    fn round_trip(v: &[f32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(v.len());
        let mut q = [0i8; QK];
        for x in v.chunks_exact(QK) {
            let d = quantize_block(x, &mut q);
            out.extend(q.iter().map(|&q| q as f32 * d));
        }
        out
    }

    #[test]
    fn computes_the_dot_products_of_the_quantized_values() {
        // Odd sizes: tail rows and columns, several chunks.
        for (m, n, k) in [(7, 37, 96), (1, 1030, 64), (5, 6, 32), (16, 513, 576)] {
            let w = data(n * k, 1);
            let x = data(m * k, 2);
            let q = Q8Matrix::quantize(&w, n, k).expect("k is a multiple of 32");
            let mut xr = Q8Rows::default();
            xr.quantize(&x, k);
            let mut out = vec![0f32; m * n];
            q.matmul(&xr, &mut out);
            let (wq, xq) = (round_trip(&w), round_trip(&x));
            for r in 0..m {
                for c in 0..n {
                    let dot = |a: &[f32], b: &[f32]| -> f64 {
                        (0..k)
                            .map(|i| a[r * k + i] as f64 * b[c * k + i] as f64)
                            .sum()
                    };
                    let (want, exact) = (dot(&xq, &wq), dot(&x, &w));
                    let got = out[r * n + c] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "({r},{c}): {got} vs {want}"
                    );
                    // And the quantization error itself stays small.
                    assert!(
                        (got - exact).abs() < 0.02 * (k as f64).sqrt(),
                        "({r},{c}): {got} vs {exact}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_in_any_batch() {
        let (n, k) = (301, 128);
        let w = Q8Matrix::quantize(&data(n * k, 3), n, k).expect("quantize");
        let rows = data(13 * k, 4);
        let mut all = Q8Rows::default();
        all.quantize(&rows, k);
        let mut big = vec![0f32; 13 * n];
        w.matmul(&all, &mut big);
        for r in 0..13 {
            let mut one = Q8Rows::default();
            one.quantize(&rows[r * k..(r + 1) * k], k);
            let mut out = vec![0f32; n];
            w.matmul(&one, &mut out);
            assert_eq!(out, big[r * n..(r + 1) * n], "row {r}");
        }
    }

    /// A Q8_0 file's weights (f16 scales, each block's largest quant at ±127, as GGML
    /// writes them) come back as the same blocks, their scales kept in f16; products are
    /// the same bits as with the scales widened to f32, in any tile shape.
    #[test]
    fn a_q8_0_files_blocks_come_back_exactly_with_f16_scales() {
        let (n, k, m) = (23, 96, 6);
        let raw = data(n * k, 9);
        let (mut w, mut want) = (Vec::with_capacity(n * k), Vec::new());
        for (b, x) in raw.chunks_exact(QK).enumerate() {
            let d16 = half::f16::from_f32(0.001 + 0.0003 * b as f32);
            let mut q: Vec<i8> = x.iter().map(|v| (v * 126.0).round() as i8).collect();
            q[b % QK] = if b % 2 == 0 { 127 } else { -127 };
            w.extend(q.iter().map(|&q| q as f32 * d16.to_f32()));
            want.push((d16.to_f32(), q));
        }
        let mat = Q8Matrix::quantize(&w, n, k).expect("quantize");
        assert!(mat.d.is_f16(), "a Q8_0 file's scales are f16");
        let kb = k / QK;
        for (i, (d, q)) in want.iter().enumerate() {
            let (c, b) = (i / kb, i % kb);
            let j = block_index(kb, c, b);
            assert_eq!(mat.d.get(j), *d, "scale of column {c} block {b}");
            assert_eq!(
                &mat.qs[j * QK..(j + 1) * QK],
                q.as_slice(),
                "quants of {c}/{b}"
            );
        }
        let wide = Q8Matrix {
            d: mat.d.widened(),
            qs: mat.qs.clone(),
            ..mat
        };
        for rows in [1, m] {
            let mut x = Q8Rows::default();
            x.quantize(&data(rows * k, 10), k);
            let (mut a, mut b) = (vec![0f32; rows * n], vec![0f32; rows * n]);
            mat.matmul(&x, &mut a);
            wide.matmul(&x, &mut b);
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{rows} rows"
            );
        }
        // Values no f16 holds keep f32 scales.
        assert!(!Q8Matrix::quantize(&data(n * k, 11), n, k)
            .expect("quantize")
            .d
            .is_f16());
    }

    #[test]
    fn widths_that_are_not_blocks_are_refused() {
        assert!(Q8Matrix::quantize(&[0.0; 40], 1, 40).is_none());
        assert!(Q8Matrix::quantize(&[0.0; 64], 1, 32).is_none());
        let z = Q8Matrix::quantize(&[0.0; 64], 2, 32).expect("zeros quantize");
        let mut x = Q8Rows::default();
        x.quantize(&[1.0; 32], 32);
        let mut out = [9.0f32; 2];
        z.matmul(&x, &mut out);
        assert_eq!(out, [0.0, 0.0]);
    }
}
