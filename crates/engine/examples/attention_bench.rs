//! Times paged attention alone: 16 decoding rows at context `CTX` (default 256) over
//! every layer of a SmolLM2- or Gemma-shaped f16 cache, with the next slice's keys and
//! values prefetched and not, taking turns in one process (asserting the same bits).
//! `cargo run --release -p switchyard-engine --example attention_bench`
//! Env: `SHAPE` (`smol` or `gemma`), `ROWS`, `CTX`, `REPS`.
use std::sync::atomic::Ordering;
use std::time::Instant;

use switchyard_engine::backend::gguf::attention::{self, Heads, RowInfo};
use switchyard_engine::backend::gguf::kv_cache::KvCache;

fn env(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let gemma = std::env::var("SHAPE").is_ok_and(|s| s == "gemma");
    // (layers, heads, kv heads, head dim)
    let (layers, nh, nkv, hd) = if gemma {
        (18, 4, 1, 256)
    } else {
        (30, 9, 3, 64)
    };
    let (rows, ctx, reps) = (env("ROWS", 16), env("CTX", 256), env("REPS", 15));
    let pfs = [false, true];
    let bs = 16;
    let per_seq = (ctx + 1).div_ceil(bs);
    // Sequences' blocks interleaved, as a busy server's tables end up.
    let tables: Vec<Vec<u32>> = (0..rows)
        .map(|r| (0..per_seq).map(|b| (b * rows + r) as u32).collect())
        .collect();
    let mut cache = KvCache::new(layers, rows * per_seq, bs, nkv, hd);
    let (kw, qw) = (nkv * hd, nh * hd);
    let mut seed = 1u64;
    let mut rand = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    for pos in 0..=ctx {
        let infos: Vec<RowInfo<'_>> = tables.iter().map(|t| RowInfo { pos, blocks: t }).collect();
        for l in 0..layers {
            let k: Vec<f32> = (0..rows * kw).map(|_| rand()).collect();
            let v: Vec<f32> = (0..rows * kw).map(|_| rand()).collect();
            cache.write(l, &infos, &k, &v);
        }
    }
    let infos: Vec<RowInfo<'_>> = tables
        .iter()
        .map(|t| RowInfo {
            pos: ctx,
            blocks: t,
        })
        .collect();
    let q: Vec<f32> = (0..rows * qw).map(|_| rand()).collect();
    let mut out = vec![0.0f32; rows * qw];
    let heads = Heads::causal(nh, nkv, hd);
    let mut times = vec![Vec::new(); pfs.len()];
    let mut first: Option<Vec<f32>> = None;
    for _ in 0..reps {
        for (i, &pf) in pfs.iter().enumerate() {
            attention::PREFETCH.store(pf, Ordering::Relaxed);
            let t = Instant::now();
            for l in 0..layers {
                attention::paged_attention_with(&cache, l, &infos, &q, &heads, &mut out);
            }
            times[i].push(t.elapsed().as_secs_f64() * 1e3);
            match &first {
                None => first = Some(out.clone()),
                Some(f) => assert_eq!(f, &out, "prefetching changed a result"),
            }
        }
    }
    for (pf, mut t) in pfs.iter().zip(times) {
        t.sort_by(f64::total_cmp);
        println!(
            "prefetch {pf:5}: median {:6.2} ms per step ({} layers, {rows} rows, ctx {ctx})",
            t[t.len() / 2],
            layers
        );
    }
}
