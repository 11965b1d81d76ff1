//! Times the quantized matrix kernels alone on SmolLM2-135M's shapes (`SHAPES=gemma`:
//! Gemma 3 270M's): the Q8_0 kernel (`backend::gguf::q8`), the 4-bit kernel
//! (`backend::gguf::q4`, the file's Q4_0/Q4_1/Q4_K weights kept as they are) and the
//! Q5_0 kernel (`backend::gguf::q5`), in GMAC/s by rows per call (the median of 5
//! timings), on rayon's pool and on one thread. `KERNELS=q8,q5` picks kernels (default
//! `q8,q4,q5`); `ROWS=1,16` the row counts. Block scales are f16, as GGUF files keep
//! Q8_0's, Q5_0's and Q4_1's (the kernels then stream them as f16); `SCALES=f32` gives
//! scales no f16 holds (as Q4_K's products and re-quantized blocks), streamed as f32.
//! `AB=q8` (or `q4`, `q5`) times that kernel on one shape (`AB_SHAPE`, default `lm_head`;
//! the first of `ROWS`) with f16 against f32 scales, alternating in one process
//! (`ROUNDS`, default 40): the machine's memory bandwidth drifts between runs.
//! `cargo run --release -p switchyard-engine --example q8_kernel`
use std::time::Instant;

use switchyard_engine::backend::gguf::q4::Q4Matrix;
use switchyard_engine::backend::gguf::q5::Q5Matrix;
use switchyard_engine::backend::gguf::q8::{Q8Matrix, Q8Rows};

/// 4-bit blocks of `w` (`[n, k]`): per 32 values `d = (max - min) / 15`, `m = min`.
fn q4_blocks(w: &[f32], h: bool) -> Vec<(f32, f32, [u8; 32])> {
    w.chunks_exact(32)
        .map(|b| {
            let (lo, hi) = b
                .iter()
                .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            let (d, lo) = (scale((hi - lo) / 15.0, h), scale(lo, h));
            let mut q = [0u8; 32];
            for (q, &v) in q.iter_mut().zip(b) {
                *q = if d > 0.0 {
                    ((v - lo) / d).round().clamp(0.0, 15.0) as u8
                } else {
                    0
                };
            }
            (d, lo, q)
        })
        .collect()
}

/// Q5_0 blocks of `w` as ggml quantizes them: `d = -max / 16` for the value of largest
/// magnitude `max`, `q = min(31, ⌊w/d + 16.5⌋)`.
fn q5_blocks(w: &[f32], h: bool) -> Vec<(f32, [u8; 32])> {
    w.chunks_exact(32)
        .map(|b| {
            let max = b
                .iter()
                .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let d = scale(max / -16.0, h);
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut q = [0u8; 32];
            for (q, &v) in q.iter_mut().zip(b) {
                *q = ((v * id + 16.5) as i32).clamp(0, 31) as u8;
            }
            (d, q)
        })
        .collect()
}

/// `v`, rounded to f16 when `h`.
fn scale(v: f32, h: bool) -> f32 {
    if h {
        half::f16::from_f32(v).to_f32()
    } else {
        v
    }
}

/// `w` as a Q8_0 file holds it: per 32 values an f16 scale `d` and quants in -127..=127,
/// the largest magnitude at ±127 (so quantizing the values again gives the same blocks).
fn q8_file_values(w: &[f32], h: bool) -> Vec<f32> {
    let mut out = Vec::with_capacity(w.len());
    for b in w.chunks_exact(32) {
        let (at, amax) =
            b.iter().enumerate().fold(
                (0, 0f32),
                |(i, m), (j, &v)| if v.abs() > m { (j, v.abs()) } else { (i, m) },
            );
        let d = scale(amax / 127.0, h);
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend(b.iter().enumerate().map(|(j, &v)| {
            let q = if j == at {
                127f32.copysign(v)
            } else {
                (v * id).round().clamp(-127.0, 127.0)
            };
            q * d
        }));
    }
    out
}

/// A matrix in one kernel's form.
enum Matrix {
    Q8(Q8Matrix),
    Q4(Q4Matrix),
    Q5(Q5Matrix),
}

fn weights(n: usize, k: usize) -> Vec<f32> {
    (0..n * k)
        .map(|i| ((i * 7919) % 255) as f32 / 127.0 - 1.0)
        .collect()
}

/// `m` rows of `k` activations, quantized.
fn activations(m: usize, k: usize) -> Q8Rows {
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 31) % 97) as f32 / 48.0 - 1.0)
        .collect();
    let mut xr = Q8Rows::default();
    xr.quantize(&x, k);
    xr
}

/// `kernel`'s form of `w` (`[n, k]`), with f16 scales when `h`.
fn matrix(kernel: &str, w: &[f32], n: usize, k: usize, h: bool) -> Matrix {
    match kernel {
        "q4" => Matrix::Q4(Q4Matrix::from_blocks(&q4_blocks(w, h), n, k).expect("blocks")),
        "q5" => Matrix::Q5(Q5Matrix::from_blocks(&q5_blocks(w, h), n, k).expect("blocks")),
        _ => Matrix::Q8(Q8Matrix::quantize(&q8_file_values(w, h), n, k).expect("quantize")),
    }
}

impl Matrix {
    fn matmul(&self, x: &Q8Rows, out: &mut [f32]) {
        match self {
            Matrix::Q4(q) => q.matmul(x, out),
            Matrix::Q5(q) => q.matmul(x, out),
            Matrix::Q8(q) => q.matmul(x, out),
        }
    }
}

/// f16 against f32 scales, alternating: GMAC/s medians and the median of the rounds'
/// ratios.
fn ab(kernel: &str, n: usize, k: usize, m: usize) {
    let w = weights(n, k);
    let mats = [
        matrix(kernel, &w, n, k, true),
        matrix(kernel, &w, n, k, false),
    ];
    drop(w);
    let xr = activations(m, k);
    let mut out = vec![0f32; m * n];
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let iters = (100_000_000 / (m * n * k)).clamp(1, 400);
    let mut rates = [Vec::new(), Vec::new()];
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let mut secs = [0f64; 2];
        for j in [round % 2, 1 - round % 2] {
            mats[j].matmul(&xr, &mut out);
            let t = Instant::now();
            for _ in 0..iters {
                mats[j].matmul(&xr, &mut out);
            }
            secs[j] = t.elapsed().as_secs_f64() / iters as f64;
            rates[j].push((m * n * k) as f64 / secs[j] / 1e9);
        }
        ratios.push(secs[1] / secs[0]);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{kernel} [{n}x{k}] m={m}: f16 scales {:.1}, f32 scales {:.1} GMAC/s; f16 speed / f32 speed, median of {rounds} rounds: {:.3}",
        median(&mut rates[0]),
        median(&mut rates[1]),
        median(&mut ratios)
    );
}

fn main() {
    let shapes: &[(&str, usize, usize)] = if std::env::var("SHAPES").as_deref() == Ok("gemma") {
        &[
            ("qkv", 1536, 640),
            ("wo", 640, 1024),
            ("gate_up", 4096, 640),
            ("down", 640, 2048),
            ("lm_head", 262144, 640),
        ]
    } else {
        &[
            ("qkv", 960, 576),
            ("wo", 576, 576),
            ("gate_up", 3072, 576),
            ("down", 576, 1536),
            ("lm_head", 49152, 576),
        ]
    };
    let kernels = std::env::var("KERNELS").unwrap_or_else(|_| "q8,q4,q5".into());
    let rows: Vec<usize> = std::env::var("ROWS")
        .unwrap_or_else(|_| "1,4,8,16,64".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    if let Ok(kernel) = std::env::var("AB") {
        let name = std::env::var("AB_SHAPE").unwrap_or_else(|_| "lm_head".into());
        let &(_, n, k) = shapes.iter().find(|s| s.0 == name).expect("AB_SHAPE");
        return ab(&kernel, n, k, rows[0]);
    }
    let h = std::env::var("SCALES").as_deref() != Ok("f32");
    for single in [false, true] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(if single { 1 } else { 0 })
            .build()
            .expect("pool");
        println!("{}", if single { "one thread" } else { "rayon pool" });
        for kernel in kernels.split(',') {
            for &(name, n, k) in shapes {
                let w = weights(n, k);
                let mat = matrix(kernel, &w, n, k, h);
                drop(w);
                let mut line = format!("  {kernel} {name:8} [{n:5}x{k:4}]");
                for &m in &rows {
                    let xr = activations(m, k);
                    let mut out = vec![0f32; m * n];
                    let run = |out: &mut [f32]| mat.matmul(&xr, out);
                    pool.install(|| run(&mut out));
                    // The median of 5 timings of `iters` calls each.
                    let iters = (400_000_000 / (m * n * k)).clamp(1, 400);
                    let mut secs: Vec<f64> = (0..5)
                        .map(|_| {
                            let t = Instant::now();
                            for _ in 0..iters {
                                pool.install(|| run(&mut out));
                            }
                            t.elapsed().as_secs_f64() / iters as f64
                        })
                        .collect();
                    secs.sort_by(f64::total_cmp);
                    let s = secs[2];
                    line += &format!("  m={m:<3} {:5.1}", (m * n * k) as f64 / s / 1e9);
                }
                println!("{line}  GMAC/s");
            }
        }
    }
}
