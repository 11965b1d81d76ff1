//! Times the GGUF backend's steps: prefill of N tokens, and decode steps of B sequences.
//! `cargo run --release -p switchyard-engine --example gguf_step -- [MODEL.gguf]`
//! Env: `PREFILL` and `BATCHES` (comma-separated sizes; empty skips), `ITERS` (decode steps),
//! `GEMM_ROWS` (`--cpu-decode-gemm-rows`; 0 never), `F32_BUDGET` (`--cpu-f32-weights-max-bytes`;
//! 0: no f32 copies, prefill on the quantized kernels too), `TEMPERATURE` (default 0:
//! greedy; 1 draws from the whole distribution, as a request that names none).
use std::time::Instant;

use gguf::Gguf;
use switchyard_engine::backend::gguf::{model, model::Model, GgufBackend};
use switchyard_engine::backend::Backend;
use switchyard_engine::core::step::SeqStep;
use switchyard_engine::core::SamplingParams;
use switchyard_engine::model_store;

fn main() {
    let path = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| model_store::ensure_default_model().expect("model"));
    let t = Instant::now();
    let budget = std::env::var("F32_BUDGET")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(model::DEFAULT_F32_BUDGET_BYTES);
    let m = Model::load_with(&Gguf::open(&path).expect("gguf"), budget).expect("load");
    eprintln!("load {:?}", t.elapsed());
    let mut be = GgufBackend::new(m, 4096, 16, vec![2]);
    if let Some(r) = std::env::var("GEMM_ROWS").ok().and_then(|v| v.parse().ok()) {
        be = be.with_decode_gemm_rows(if r == 0 { usize::MAX } else { r });
    }
    let params = SamplingParams {
        temperature: std::env::var("TEMPERATURE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
        ..Default::default()
    };
    // 64 sequences of up to 1024 tokens (16-token blocks), their blocks interleaved as a
    // busy server's tables end up (sequences grow side by side, taking the free list's next
    // block in turn): sequence i's block j is j·64 + i.
    let blocks: Vec<Vec<u32>> = (0..64)
        .map(|i| (0..64).map(|j| j * 64 + i).collect())
        .collect();
    for n in sizes("PREFILL", "128,512") {
        let toks: Vec<u32> = (0..n as u32).map(|i| 100 + i % 1000).collect();
        let step = SeqStep {
            req_id: 0,
            tokens: &toks,
            num_prompt: n,
            num_computed: 0,
            num_new: n,
            block_ids: &blocks[0],
            sample: true,
            params: &params,
            rng_seed: 0,
            lora: None,
        };
        let t = Instant::now();
        let mut out = Vec::new();
        be.execute(&[step], &mut out).expect("prefill");
        let dt = t.elapsed().as_secs_f64();
        println!(
            "prefill {n:4} tokens: {:7.1} ms  {:7.0} tok/s",
            dt * 1e3,
            n as f64 / dt
        );
    }
    for b in sizes("BATCHES", "1,4,8,16") {
        let toks: Vec<u32> = (0..257u32).map(|i| 100 + i % 1000).collect();
        let steps: Vec<SeqStep<'_>> = (0..b)
            .map(|i| SeqStep {
                req_id: i as u64,
                tokens: &toks,
                num_prompt: 256,
                num_computed: 256,
                num_new: 1,
                block_ids: &blocks[i],
                sample: true,
                params: &params,
                rng_seed: 0,
                lora: None,
            })
            .collect();
        let mut out = Vec::new();
        be.execute(&steps, &mut out).expect("warm");
        let iters: usize = std::env::var("ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10);
        let t = Instant::now();
        for _ in 0..iters {
            out.clear();
            be.execute(&steps, &mut out).expect("decode");
        }
        let dt = t.elapsed().as_secs_f64() / iters as f64;
        println!(
            "decode batch {b:2} (ctx 256): {:6.1} ms/step  {:7.1} tok/s",
            dt * 1e3,
            b as f64 / dt
        );
    }
}

fn sizes(var: &str, default: &str) -> Vec<usize> {
    std::env::var(var)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}
