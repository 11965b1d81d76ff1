//! Times the quantized matrix kernels alone on SmolLM2-135M's shapes: the Q8_0 kernel
//! (`backend::gguf::q8`) and the 4-bit kernel (`backend::gguf::q4`, the file's Q4_0/Q4_1/
//! Q4_K weights kept as they are), in GMAC/s by rows per call, on rayon's pool and on one
//! thread. `KERNELS=q8` or `q4` runs one of them; `ROWS=1,16` picks the row counts.
//! `cargo run --release -p switchyard-engine --example q8_kernel`
use std::time::Instant;

use switchyard_engine::backend::gguf::q4::Q4Matrix;
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

fn main() {
    let shapes = [
        ("qkv", 960, 576),
        ("wo", 576, 576),
        ("gate_up", 3072, 576),
        ("down", 576, 1536),
        ("lm_head", 49152, 576),
    ];
    let kernels = std::env::var("KERNELS").unwrap_or_else(|_| "q8,q4".into());
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
            for (name, n, k) in shapes {
                let w: Vec<f32> = (0..n * k)
                    .map(|i| ((i * 7919) % 255) as f32 / 127.0 - 1.0)
                    .collect();
                let q8 = Q8Matrix::quantize(&w, n, k).expect("quantize");
                let q4 = Q4Matrix::from_blocks(&q4_blocks(&w), n, k).expect("blocks");
                let mut line = format!("  {kernel} {name:8} [{n:5}x{k:4}]");
                for &m in &rows {
                    let x: Vec<f32> = (0..m * k)
                        .map(|i| ((i * 31) % 97) as f32 / 48.0 - 1.0)
                        .collect();
                    let mut xr = Q8Rows::default();
                    xr.quantize(&x, k);
                    let mut out = vec![0f32; m * n];
                    let run = |out: &mut [f32]| match kernel {
                        "q4" => q4.matmul(&xr, out),
                        _ => q8.matmul(&xr, out),
                    };
                    pool.install(|| run(&mut out));
                    let iters = (2_000_000_000 / (m * n * k)).clamp(3, 2000);
                    let t = Instant::now();
                    for _ in 0..iters {
                        pool.install(|| run(&mut out));
                    }
                    let s = t.elapsed().as_secs_f64() / iters as f64;
                    line += &format!("  m={m:<3} {:5.1}", (m * n * k) as f64 / s / 1e9);
                }
                println!("{line}  GMAC/s");
            }
        }
    }
}
