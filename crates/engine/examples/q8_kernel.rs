//! Times the quantized matrix kernels alone on SmolLM2-135M's shapes (`SHAPES=gemma`:
//! Gemma 3 270M's): the Q8_0 kernel (`backend::gguf::q8`), the 4-bit kernel
//! (`backend::gguf::q4`, the file's Q4_0/Q4_1/Q4_K weights kept as they are) and the
//! Q5_0 kernel (`backend::gguf::q5`), in GMAC/s by rows per call (the median of 5
//! timings), on rayon's pool and on one thread. `KERNELS=q8,q5` picks kernels (default
//! `q8,q4,q5`); `ROWS=1,16` the row counts.
//! `cargo run --release -p switchyard-engine --example q8_kernel`
use std::time::Instant;

use switchyard_engine::backend::gguf::q4::Q4Matrix;
use switchyard_engine::backend::gguf::q5::Q5Matrix;
use switchyard_engine::backend::gguf::q8::{Q8Matrix, Q8Rows};

/// 4-bit blocks of `w` (`[n, k]`): per 32 values `d = (max - min) / 15`, `m = min`.
fn q4_blocks(w: &[f32]) -> Vec<(f32, f32, [u8; 32])> {
    w.chunks_exact(32)
        .map(|b| {
            let (lo, hi) = b
                .iter()
                .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            let d = (hi - lo) / 15.0;
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
fn q5_blocks(w: &[f32]) -> Vec<(f32, [u8; 32])> {
    w.chunks_exact(32)
        .map(|b| {
            let max = b
                .iter()
                .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let d = max / -16.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut q = [0u8; 32];
            for (q, &v) in q.iter_mut().zip(b) {
                *q = ((v * id + 16.5) as i32).clamp(0, 31) as u8;
            }
            (d, q)
        })
        .collect()
}

/// A matrix in one kernel's form.
enum Matrix {
    Q8(Q8Matrix),
    Q4(Q4Matrix),
    Q5(Q5Matrix),
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
    for single in [false, true] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(if single { 1 } else { 0 })
            .build()
            .expect("pool");
        println!("{}", if single { "one thread" } else { "rayon pool" });
        for kernel in kernels.split(',') {
            for &(name, n, k) in shapes {
                let w: Vec<f32> = (0..n * k)
                    .map(|i| ((i * 7919) % 255) as f32 / 127.0 - 1.0)
                    .collect();
                let mat = match kernel {
                    "q4" => {
                        Matrix::Q4(Q4Matrix::from_blocks(&q4_blocks(&w), n, k).expect("blocks"))
                    }
                    "q5" => {
                        Matrix::Q5(Q5Matrix::from_blocks(&q5_blocks(&w), n, k).expect("blocks"))
                    }
                    _ => Matrix::Q8(Q8Matrix::quantize(&w, n, k).expect("quantize")),
                };
                drop(w);
                let mut line = format!("  {kernel} {name:8} [{n:5}x{k:4}]");
                for &m in &rows {
                    let x: Vec<f32> = (0..m * k)
                        .map(|i| ((i * 31) % 97) as f32 / 48.0 - 1.0)
                        .collect();
                    let mut xr = Q8Rows::default();
                    xr.quantize(&x, k);
                    let mut out = vec![0f32; m * n];
                    let run = |out: &mut [f32]| match &mat {
                        Matrix::Q4(q) => q.matmul(&xr, out),
                        Matrix::Q5(q) => q.matmul(&xr, out),
                        Matrix::Q8(q) => q.matmul(&xr, out),
                    };
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
