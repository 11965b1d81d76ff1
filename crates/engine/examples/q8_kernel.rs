//! Times the Q8_0 matrix kernel (`backend::gguf::q8`) alone on SmolLM2-135M's shapes:
//! GMAC/s by rows per call, on rayon's pool and on one thread.
//! `cargo run --release -p switchyard-engine --example q8_kernel`
use std::time::Instant;

use switchyard_engine::backend::gguf::q8::{Q8Matrix, Q8Rows};

fn main() {
    let shapes = [
        ("qkv", 960, 576),
        ("wo", 576, 576),
        ("gate_up", 3072, 576),
        ("down", 576, 1536),
        ("lm_head", 49152, 576),
    ];
    for single in [false, true] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(if single { 1 } else { 0 })
            .build()
            .expect("pool");
        println!("{}", if single { "one thread" } else { "rayon pool" });
        for (name, n, k) in shapes {
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919) % 255) as f32 / 127.0 - 1.0)
                .collect();
            let q = Q8Matrix::quantize(&w, n, k).expect("quantize");
            let mut line = format!("  {name:8} [{n:5}x{k:4}]");
            for m in [1usize, 4, 8, 16, 64] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 31) % 97) as f32 / 48.0 - 1.0)
                    .collect();
                let mut xr = Q8Rows::default();
                xr.quantize(&x, k);
                let mut out = vec![0f32; m * n];
                pool.install(|| q.matmul(&xr, &mut out));
                let iters = (2_000_000_000 / (m * n * k)).clamp(3, 2000);
                let t = Instant::now();
                for _ in 0..iters {
                    pool.install(|| q.matmul(&xr, &mut out));
                }
                let s = t.elapsed().as_secs_f64() / iters as f64;
                line += &format!("  m={m:<3} {:5.1}", (m * n * k) as f64 / s / 1e9);
            }
            println!("{line}  GMAC/s");
        }
    }
}
