//! Tests of the engine's K-quant path against a scalar reference.
//!
//! The engine runs K-quant weights (Q2_K … Q6_K) by dequantizing them with candle at
//! load and re-quantizing them to Q8_0 for its own kernels ([`super::q8`]). Here each
//! format is decoded a second time, element by element, straight from GGML's block
//! layout (256 values per super-block; written per element from the layout, not as
//! ggml's loops), on random blocks, and both steps are checked: candle's dequantization
//! equals the reference, and the Q8_0 product of those weights equals the f32 product of
//! the reference values within Q8_0's rounding.

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::Device;
use half::f16;

use super::q4;
use super::q8::{Q8Matrix, Q8Rows};

const QK_K: usize = 256;

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Q4_K / Q5_K's 6-bit scale and min of sub-block `j` (0..8) from the 12 packed bytes:
/// sub-blocks 0-3 keep theirs in the low 6 bits of bytes j and j+4; 4-7 have their low
/// 4 bits in byte j+4's nibbles and their high 2 bits in the top bits of bytes j-4 and j.
fn scale_min_k4(s: &[u8], j: usize) -> (f32, f32) {
    if j < 4 {
        ((s[j] & 63) as f32, (s[j + 4] & 63) as f32)
    } else {
        let sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        let m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        (sc as f32, m as f32)
    }
}

/// Value `i` (0..256) of one super-block of `dtype`, from the block's bytes.
fn reference(dtype: GgmlDType, b: &[u8], i: usize) -> f32 {
    match dtype {
        // scales[16] (low nibble scale, high nibble min), qs[64] (2 bits), d, dmin.
        GgmlDType::Q2K => {
            let (scales, qs) = (&b[0..16], &b[16..80]);
            let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
            let (half, r) = (i / 128, i % 128);
            let (j, w) = (r / 32, r % 32);
            let q = (qs[half * 32 + w] >> (2 * j)) & 3;
            let sc = scales[half * 8 + j * 2 + usize::from(w >= 16)];
            d * (sc & 0x0f) as f32 * q as f32 - dmin * (sc >> 4) as f32
        }
        // hmask[32] (high bit, cleared means -4), qs[64] (2 bits), scales[12] (16 6-bit
        // scales offset by 32: low 4 bits in bytes 0-7's nibbles, high 2 bits in bytes
        // 8-11), d.
        GgmlDType::Q3K => {
            let (hmask, qs, scales) = (&b[0..32], &b[32..96], &b[96..108]);
            let d = f16_at(b, 108);
            let (half, r) = (i / 128, i % 128);
            let (j, w) = (r / 32, r % 32);
            let low = (qs[half * 32 + w] >> (2 * j)) & 3;
            let high = (hmask[w] >> (4 * half + j)) & 1;
            let q = low as i32 - if high == 1 { 0 } else { 4 };
            let s = half * 8 + j * 2 + usize::from(w >= 16);
            let lo4 = if s < 8 {
                scales[s] & 0x0f
            } else {
                scales[s - 8] >> 4
            };
            let hi2 = (scales[8 + s % 4] >> (2 * (s / 4))) & 3;
            let sc = (lo4 | (hi2 << 4)) as i32 - 32;
            d * sc as f32 * q as f32
        }
        // d, dmin, scales[12], qs[128]: 8 sub-blocks of 32; a 64-value chunk's bytes hold
        // its first sub-block in low nibbles and its second in high nibbles.
        GgmlDType::Q4K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let (scales, qs) = (&b[4..16], &b[16..144]);
            let (g, w) = (i / 32, i % 32);
            let byte = qs[(g / 2) * 32 + w];
            let q = if g % 2 == 0 { byte & 0x0f } else { byte >> 4 };
            let (sc, m) = scale_min_k4(scales, g);
            d * sc * q as f32 - dmin * m
        }
        // Q4_K's layout plus qh[32]: bit g of qh[w] is the fifth bit of sub-block g's
        // value w.
        GgmlDType::Q5K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
            let (g, w) = (i / 32, i % 32);
            let byte = qs[(g / 2) * 32 + w];
            let low = if g % 2 == 0 { byte & 0x0f } else { byte >> 4 };
            let q = low | (((qh[w] >> g) & 1) << 4);
            let (sc, m) = scale_min_k4(scales, g);
            d * sc * q as f32 - dmin * m
        }
        // ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (i8, one per 16
        // values), d; values are offset by 32. Per 128-value half: 32 columns w, and
        // parts 0-3 at w, w+32, w+64, w+96.
        GgmlDType::Q6K => {
            let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = f16_at(b, 208);
            let (half, r) = (i / 128, i % 128);
            let (part, w) = (r / 32, r % 32);
            let lbyte = ql[half * 64 + w + 32 * (part % 2)];
            let low = if part < 2 { lbyte & 0x0f } else { lbyte >> 4 };
            let high = (qh[half * 32 + w] >> (2 * part)) & 3;
            let q = (low | (high << 4)) as i32 - 32;
            let sc = scales[half * 8 + w / 16 + 2 * part] as i8;
            d * sc as f32 * q as f32
        }
        other => unreachable!("no reference for {other:?}"),
    }
}

/// Bytes of one super-block, and where its f16 scales sit.
fn layout(dtype: GgmlDType) -> (usize, &'static [usize]) {
    match dtype {
        GgmlDType::Q2K => (84, &[80, 82]),
        GgmlDType::Q3K => (110, &[108]),
        GgmlDType::Q4K => (144, &[0, 2]),
        GgmlDType::Q5K => (176, &[0, 2]),
        GgmlDType::Q6K => (210, &[208]),
        other => unreachable!("not a K-quant: {other:?}"),
    }
}

/// xorshift64*: reproducible random bytes without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// `rows × cols` weights of `dtype` in random blocks: every quant and scale byte random,
/// the f16 super-block scales random in ±(0.0005..0.02) (finite, as in real files).
fn random_blocks(dtype: GgmlDType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let (size, scales) = layout(dtype);
    let mut rng = Rng(seed | 1);
    let blocks = rows * cols / QK_K;
    let mut raw = vec![0u8; blocks * size];
    for block in raw.chunks_exact_mut(size) {
        for byte in block.iter_mut() {
            *byte = rng.next() as u8;
        }
        for &at in scales {
            let sign = if rng.next() & 1 == 0 { 1.0 } else { -1.0 };
            let v = f16::from_f32(sign * (0.0005 + 0.0195 * rng.unit()));
            block[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    raw
}

fn reference_matrix(dtype: GgmlDType, raw: &[u8]) -> Vec<f32> {
    let (size, _) = layout(dtype);
    raw.chunks_exact(size)
        .flat_map(|b| (0..QK_K).map(move |i| reference(dtype, b, i)))
        .collect()
}

const KQUANTS: [GgmlDType; 5] = [
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

#[test]
fn dequantization_equals_the_scalar_reference() {
    let (rows, cols) = (24, 512);
    for (n, dtype) in KQUANTS.into_iter().enumerate() {
        let raw = random_blocks(dtype, rows, cols, 0x5eed + n as u64);
        let want = reference_matrix(dtype, &raw);
        let t = qtensor_from_ggml(dtype, &raw, vec![rows, cols], &Device::Cpu)
            .expect("blocks of the right size load");
        let got = t
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("dequantize");
        assert_eq!(got.len(), want.len(), "{dtype:?}");
        let mut distinct = std::collections::HashSet::new();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // Equal up to the order of two f32 multiplications.
            let tol = 1e-6 * w.abs().max(1e-3);
            assert!(
                (g - w).abs() <= tol,
                "{dtype:?} value {i} (block {}, element {}): candle {g}, reference {w}",
                i / QK_K,
                i % QK_K
            );
            distinct.insert(w.to_bits());
        }
        // Random blocks exercise every quant level: the comparison saw real variety.
        assert!(
            distinct.len() > 1000,
            "{dtype:?}: {} distinct values",
            distinct.len()
        );
    }
}

/// The whole path the loader takes for a K-quant matrix (candle's dequantization, then
/// Q8_0) multiplied by activations, against the f32 product of the reference values.
#[test]
fn requantized_products_equal_the_reference_within_q8_rounding() {
    let (n, k, m) = (40, 768, 5);
    let mut rng = Rng(77);
    let x: Vec<f32> = (0..m * k).map(|_| rng.unit() * 2.0 - 1.0).collect();
    for (s, dtype) in KQUANTS.into_iter().enumerate() {
        let raw = random_blocks(dtype, n, k, 0xabc + s as u64);
        let w = reference_matrix(dtype, &raw);
        let deq = qtensor_from_ggml(dtype, &raw, vec![n, k], &Device::Cpu)
            .and_then(|t| t.dequantize(&Device::Cpu))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("dequantize");
        let q8 = Q8Matrix::quantize(&deq, n, k).expect("k is a multiple of 32");
        let mut rows = Q8Rows::default();
        rows.quantize(&x, k);
        let mut got = vec![0f32; m * n];
        q8.matmul(&rows, &mut got);
        for r in 0..m {
            for c in 0..n {
                let (xr, wc) = (&x[r * k..(r + 1) * k], &w[c * k..(c + 1) * k]);
                let want: f64 = xr.iter().zip(wc).map(|(a, b)| *a as f64 * *b as f64).sum();
                // Q8_0 rounds each weight and activation to half a step of its block's
                // scale (largest magnitude / 127): at most max|w| / 254 and max|x| / 254
                // (row maxima bound the block maxima); a little slack for the product of
                // the two errors and f32 sums.
                let (wmax, xmax) = (
                    wc.iter().fold(0f32, |a, b| a.max(b.abs())) as f64,
                    xr.iter().fold(0f32, |a, b| a.max(b.abs())) as f64,
                );
                let (xsum, wsum): (f64, f64) = (
                    xr.iter().map(|a| a.abs() as f64).sum(),
                    wc.iter().map(|b| b.abs() as f64).sum(),
                );
                let bound = 1.05 * (xsum * wmax + wsum * xmax) / 254.0 + 1e-5;
                let g = got[r * n + c] as f64;
                assert!(
                    (g - want).abs() <= bound,
                    "{dtype:?} [{r}, {c}]: Q8_0 path {g}, reference {want}, bound {bound}"
                );
            }
        }
        // And the error is Q8_0's rounding, far below the products themselves.
        let err: f64 = (0..m * n)
            .map(|i| {
                let (r, c) = (i / n, i % n);
                let want: f64 = x[r * k..(r + 1) * k]
                    .iter()
                    .zip(&w[c * k..(c + 1) * k])
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                (got[i] as f64 - want).powi(2)
            })
            .sum::<f64>()
            .sqrt();
        let norm: f64 = (0..m * n)
            .map(|i| {
                let (r, c) = (i / n, i % n);
                x[r * k..(r + 1) * k]
                    .iter()
                    .zip(&w[c * k..(c + 1) * k])
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    .powi(2)
            })
            .sum::<f64>()
            .sqrt();
        assert!(
            err < 0.02 * norm,
            "{dtype:?}: relative error {}",
            err / norm
        );
    }
}

/// The 4-bit kernel keeps Q4_K (and Q4_0, Q4_1) as the file has them: its blocks decode
/// to the reference's values (Q4_K) and to candle's (Q4_0, Q4_1), and its products equal
/// the f32 products of those values within the activations' Q8_0 rounding.
#[test]
fn four_bit_blocks_stay_exact() {
    let (n, k) = (12, 512);
    let raw = random_blocks(GgmlDType::Q4K, n, k, 0x4b);
    let want = reference_matrix(GgmlDType::Q4K, &raw);
    let blocks = q4::decode(GgmlDType::Q4K, &raw).expect("whole blocks");
    let w = q4::Q4Matrix::from_blocks(&blocks, n, k).expect("shape");
    let got = w.dequantize();
    for (i, (g, r)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - r).abs() <= 1e-6 * r.abs().max(1e-3),
            "Q4_K value {i}: {g} vs {r}"
        );
    }
    for (dtype, size) in [(GgmlDType::Q4_0, 18usize), (GgmlDType::Q4_1, 20)] {
        let mut rng = Rng(size as u64);
        let mut raw = vec![0u8; n * k / 32 * size];
        for b in raw.chunks_exact_mut(size) {
            b.iter_mut().for_each(|v| *v = rng.next() as u8);
            for at in (0..if size == 18 { 2 } else { 4 }).step_by(2) {
                let v = f16::from_f32(rng.unit() * 0.02 - 0.01);
                b[at..at + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        let candle = qtensor_from_ggml(dtype, &raw, vec![n, k], &Device::Cpu)
            .and_then(|t| t.dequantize(&Device::Cpu))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("dequantize");
        let ours = q4::Q4Matrix::from_blocks(&q4::decode(dtype, &raw).expect("blocks"), n, k)
            .expect("shape")
            .dequantize();
        for (i, (a, b)) in ours.iter().zip(&candle).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                "{dtype:?} value {i}: {a} vs candle {b}"
            );
        }
    }
    // Products against the reference values.
    let m = 3;
    let mut rng = Rng(9);
    let x: Vec<f32> = (0..m * k).map(|_| rng.unit() * 2.0 - 1.0).collect();
    let mut rows = Q8Rows::default();
    rows.quantize(&x, k);
    let mut out = vec![0f32; m * n];
    w.matmul(&rows, &mut out);
    for r in 0..m {
        for c in 0..n {
            let (xr, wc) = (&x[r * k..(r + 1) * k], &want[c * k..(c + 1) * k]);
            let exact: f64 = xr.iter().zip(wc).map(|(a, b)| *a as f64 * *b as f64).sum();
            let xmax = xr.iter().fold(0f32, |a, b| a.max(b.abs())) as f64;
            let wsum: f64 = wc.iter().map(|b| b.abs() as f64).sum();
            let bound = 1.05 * wsum * xmax / 254.0 + 1e-5;
            let g = out[r * n + c] as f64;
            assert!(
                (g - exact).abs() <= bound,
                "Q4_K product [{r}, {c}]: {g} vs {exact} (bound {bound})"
            );
        }
    }
}
