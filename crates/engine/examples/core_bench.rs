//! Engine-core benchmark: the real scheduler, block manager and engine loop with the sim
//! backend at zero latency, closed loop at fixed concurrency (a finished sequence is
//! replaced at once). Reports steps/s, output tokens/s and the core's own work per step
//! (schedule + update, the part a real engine would add to its model time).
//!
//! `cargo run --release -p switchyard-engine --example core_bench -- [seconds] [prompt] [output]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_engine::backend::sim::{Latency, SimBackend};
use switchyard_engine::core::block_manager::BlockManager;
use switchyard_engine::core::scheduler::{Scheduler, SchedulerConfig};
use switchyard_engine::core::{EngineEvent, NewRequest, SamplingParams};
use switchyard_engine::engine_loop::{EngineCommand, EngineLoop};
use switchyard_engine::metrics::EngineMetrics;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let secs = args.first().copied().unwrap_or(3) as u64;
    let prompt_len = args.get(1).copied().unwrap_or(512);
    let output_len = args.get(2).copied().unwrap_or(256);
    println!(
        "prompt {prompt_len} tokens, output {output_len} tokens, {secs} s per point, block size 16"
    );
    println!(
        "{:>11} {:>10} {:>12} {:>16} {:>14}",
        "concurrency", "steps/s", "tokens/s", "core µs/step", "core µs/token"
    );
    for conc in [1usize, 64, 256] {
        run(conc, Duration::from_secs(secs), prompt_len, output_len);
    }
}

fn run(conc: usize, dur: Duration, prompt_len: usize, output_len: usize) {
    let block_size = 16;
    let blocks = conc * (prompt_len + output_len).div_ceil(block_size) + 64;
    let bm = BlockManager::new(blocks, block_size, true);
    let sched = Scheduler::new(
        SchedulerConfig {
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            max_model_len: 8192,
        },
        bm,
    );
    let metrics = Arc::new(EngineMetrics::new("bench", block_size, blocks, true));
    let backend = Box::new(SimBackend::new(
        Latency::preset("zero").expect("zero preset"),
        1.0,
        0.0,
    ));
    let mut core = EngineLoop::new(sched, backend, metrics, vec![]);
    let mut next_id = 0u64;
    let mut rxs: Vec<UnboundedReceiver<EngineEvent>> = Vec::new();
    let mut add = |core: &mut EngineLoop, rxs: &mut Vec<UnboundedReceiver<EngineEvent>>| {
        next_id += 1;
        let (tx, rx) = unbounded_channel();
        // Distinct prompts: no prefix sharing, so every prompt is really prefilled.
        let prompt = (0..prompt_len as u32)
            .map(|i| i ^ (next_id as u32).wrapping_mul(2654435761))
            .collect();
        let params = SamplingParams {
            max_tokens: output_len,
            ignore_eos: true,
            ..Default::default()
        };
        core.handle(EngineCommand::Add(NewRequest {
            id: next_id,
            prompt,
            params,
            arrival: Instant::now(),
            events: tx,
            kv_transfer: None,
            lora: None,
        }));
        rxs.push(rx);
    };
    for _ in 0..conc {
        add(&mut core, &mut rxs);
    }
    let (steps0, nanos0) = (core.steps(), core.sched_nanos());
    let mut tokens = 0u64;
    let t0 = Instant::now();
    while t0.elapsed() < dur {
        core.step();
        let mut finished = 0;
        rxs.retain_mut(|rx| {
            let mut done = false;
            while let Ok(ev) = rx.try_recv() {
                if let EngineEvent::Token { finish, .. } = ev {
                    tokens += 1;
                    done |= finish.is_some();
                }
            }
            if done {
                finished += 1;
            }
            !done
        });
        for _ in 0..finished {
            add(&mut core, &mut rxs);
        }
    }
    let el = t0.elapsed().as_secs_f64();
    let steps = core.steps() - steps0;
    let core_us = (core.sched_nanos() - nanos0) as f64 / 1e3;
    println!(
        "{:>11} {:>10.0} {:>12.0} {:>16.1} {:>14.3}",
        conc,
        steps as f64 / el,
        tokens as f64 / el,
        core_us / steps as f64,
        core_us / tokens.max(1) as f64
    );
}
