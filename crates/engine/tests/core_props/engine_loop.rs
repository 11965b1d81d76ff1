//! Property 3: batch independence through the engine loop and the sim backend.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use proptest::collection::vec;
use proptest::prelude::*;
use tokio::sync::mpsc::unbounded_channel;

use switchyard_engine::core::block_manager::BlockManager;
use switchyard_engine::core::scheduler::{Scheduler, SchedulerConfig};
use switchyard_engine::core::{EngineEvent, FinishReason, NewRequest, SamplingParams};
use switchyard_engine::engine_loop::{EngineCommand, EngineLoop};
use switchyard_engine::metrics::EngineMetrics;
use tokenizer::sim::IM_END;

use crate::harness::*;

#[derive(Debug, Clone)]
struct EngineReq {
    id: u64,
    arrive: usize,
    prompt: Vec<u32>,
    params: SamplingParams,
    abort_at: Option<usize>,
}

#[derive(Debug, Clone)]
struct EngineCase {
    num_blocks: usize,
    block_size: usize,
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    caching: bool,
    eos_prob: f64,
    target: EngineReq,
    others: Vec<EngineReq>,
}

fn params() -> impl Strategy<Value = SamplingParams> + Clone {
    (
        1..16usize,
        0..3usize,
        prop_oneof![Just(0.0), Just(1.0)],
        prop::option::of(any::<u64>()),
        any::<bool>(),
    )
        .prop_map(
            |(max_tokens, min_tokens, temperature, seed, ignore_eos)| SamplingParams {
                max_tokens,
                min_tokens: min_tokens.min(max_tokens),
                temperature,
                seed,
                ignore_eos,
                ..SamplingParams::default()
            },
        )
}

fn engine_case() -> impl Strategy<Value = EngineCase> {
    let req = (
        0..20usize,
        0..3usize,
        0..20usize,
        vec(0u32..3, 0..6),
        params(),
        prop::option::weighted(0.15, 0..40usize),
    );
    (
        (
            3..16usize,
            1..5usize,
            1..5usize,
            1..20usize,
            prop::bool::weighted(0.8),
            prop_oneof![Just(0.0), Just(0.15)],
        ),
        vec(vec(0u32..3, 0..20), 3),
        req.clone(),
        vec(req, 0..10),
    )
        .prop_map(
            |((nb, bs, seqs, batched, caching, eos_prob), bases, target, others)| {
                let capacity = nb * bs;
                let mk = |id: u64,
                          (arrive, base, prefix, suffix, mut params, abort_at): (
                    usize,
                    usize,
                    usize,
                    Vec<u32>,
                    SamplingParams,
                    Option<usize>,
                )| {
                    let mut prompt = compose(&bases, base, prefix, &suffix);
                    // One token less than the pool: the engine rejects a prompt that leaves
                    // no room for a token after it.
                    clamp_to_fit(&mut prompt, &mut params.max_tokens, capacity - 1);
                    params.min_tokens = params.min_tokens.min(params.max_tokens);
                    EngineReq {
                        id,
                        arrive,
                        prompt,
                        params,
                        abort_at,
                    }
                };
                let mut target = mk(1000, target);
                target.abort_at = None;
                EngineCase {
                    num_blocks: nb,
                    block_size: bs,
                    max_num_seqs: seqs,
                    max_num_batched_tokens: batched,
                    caching,
                    eos_prob,
                    target,
                    others: others
                        .into_iter()
                        .enumerate()
                        .map(|(i, r)| mk(i as u64 + 1, r))
                        .collect(),
                }
            },
        )
}

/// A request's events: token, and with the last one its finish reason and stop token.
type Stream = Vec<(u32, Option<(FinishReason, Option<u32>)>)>;

/// Run requests through an `EngineLoop` with the zero-latency sim backend, step by step;
/// returns each request's event stream (token, finish reason, stop token) and the number
/// of preemptions.
fn run_engine(case: &EngineCase, reqs: &[EngineReq]) -> (HashMap<u64, Stream>, u64) {
    let metrics = Arc::new(EngineMetrics::new(
        "sim",
        case.block_size,
        case.num_blocks,
        case.caching,
    ));
    let sched = Scheduler::new(
        SchedulerConfig {
            max_num_seqs: case.max_num_seqs,
            max_num_batched_tokens: case.max_num_batched_tokens,
            max_model_len: 1 << 20,
        },
        BlockManager::new(case.num_blocks, case.block_size, case.caching),
    );
    let mut lp = EngineLoop::new(
        sched,
        Box::new(zero_latency_sim(case.eos_prob)),
        metrics.clone(),
        vec![IM_END],
    );
    let mut rxs = HashMap::new();
    let last_event = reqs
        .iter()
        .map(|r| r.arrive.max(r.abort_at.unwrap_or(0)))
        .max()
        .unwrap_or(0);
    let capacity = case.num_blocks * case.block_size;
    let max_steps = last_event
        + 50
        + 20 * reqs
            .iter()
            .map(|r| r.params.max_tokens + capacity)
            .sum::<usize>();
    let mut step = 0;
    loop {
        for r in reqs.iter().filter(|r| r.arrive == step) {
            let (tx, rx) = unbounded_channel();
            rxs.insert(r.id, rx);
            lp.handle(EngineCommand::Add(NewRequest {
                id: r.id,
                prompt: r.prompt.clone(),
                params: r.params.clone(),
                arrival: Instant::now(),
                events: tx,
                kv_transfer: None,
                lora: None,
            }));
        }
        for r in reqs.iter().filter(|r| r.abort_at == Some(step)) {
            lp.handle(EngineCommand::Abort {
                id: r.id,
                reason: FinishReason::Abort,
                // The test keeps every receiver until the end.
                events: None,
            });
        }
        if step > last_event && lp.scheduler().is_idle() {
            break;
        }
        let busy = !lp.scheduler().is_idle();
        let progressed = lp.step();
        assert!(progressed || !busy, "the engine stalled with work to do");
        let s = lp.scheduler();
        assert!(s.num_running() <= case.max_num_seqs);
        s.block_manager().check_invariants(
            s.running()
                .iter()
                .chain(s.waiting().iter())
                .map(|r| &r.blocks),
        );
        step += 1;
        assert!(step < max_steps, "not done after {max_steps} steps");
    }
    assert_all_free(lp.scheduler().block_manager());
    let streams = rxs
        .into_iter()
        .map(|(id, mut rx)| {
            let mut out = Vec::new();
            while let Ok(ev) = rx.try_recv() {
                match ev {
                    EngineEvent::Token { id, finish, .. } => {
                        out.push((id, finish.map(|f| (f.reason, f.stop_token))))
                    }
                    EngineEvent::Rejected(e) => panic!("request {id} rejected: {e}"),
                }
            }
            (id, out)
        })
        .collect();
    (streams, metrics.preemptions.get())
}

#[test]
fn output_does_not_depend_on_batching() {
    let preempted_cases = AtomicU64::new(0);
    let batched_cases = AtomicU64::new(0);
    run_cases(600, engine_case(), |case| {
        let alone = EngineReq {
            arrive: 0,
            ..case.target.clone()
        };
        let (solo, _) = run_engine(&case, std::slice::from_ref(&alone));
        let mut all = case.others.clone();
        all.push(case.target.clone());
        let (batched, preemptions) = run_engine(&case, &all);
        let solo = &solo[&case.target.id];
        let got = &batched[&case.target.id];
        prop_assert_eq!(got, solo, "the target's stream changed when batched");
        // The stream ends with exactly one finish, on its last token.
        prop_assert!(!solo.is_empty());
        prop_assert!(solo.iter().rev().skip(1).all(|t| t.1.is_none()));
        let (reason, _) = solo.last().and_then(|t| t.1).expect("finish on last token");
        let p = &case.target.params;
        match reason {
            FinishReason::Length => prop_assert_eq!(solo.len(), p.max_tokens),
            FinishReason::Stop => {
                prop_assert!(!p.ignore_eos && solo.len() >= p.min_tokens.max(1));
                prop_assert_eq!(solo.last().map(|t| t.0), Some(IM_END));
            }
            r => prop_assert!(false, "unexpected finish {:?}", r),
        }
        if p.ignore_eos {
            prop_assert_eq!(solo.len(), p.max_tokens);
        }
        // The others that were not aborted also finish.
        for r in case.others.iter().filter(|r| r.abort_at.is_none()) {
            let s = &batched[&r.id];
            prop_assert!(
                s.last().and_then(|t| t.1).is_some(),
                "request {} unfinished",
                r.id
            );
        }
        preempted_cases.fetch_add(u64::from(preemptions > 0), Relaxed);
        batched_cases.fetch_add(u64::from(!case.others.is_empty()), Relaxed);
        Ok(())
    });
    eprintln!(
        "batch independence: {} cases batched, {} with preemption",
        batched_cases.load(Relaxed),
        preempted_cases.load(Relaxed)
    );
    assert!(preempted_cases.load(Relaxed) > 0, "no case preempted");
    assert!(batched_cases.load(Relaxed) > 0);
}

/// Deterministic: the same greedy request alone and among others under a pool small
/// enough to preempt, with chunked prefill.
#[test]
fn batching_and_preemption_do_not_change_output() {
    let params = SamplingParams {
        max_tokens: 20,
        temperature: 0.0,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let target = EngineReq {
        id: 99,
        arrive: 0,
        prompt: vec![1, 2, 3, 4, 5, 6, 7, 8, 9],
        params: params.clone(),
        abort_at: None,
    };
    let case = EngineCase {
        num_blocks: 10,
        block_size: 4,
        max_num_seqs: 4,
        max_num_batched_tokens: 5,
        caching: true,
        eos_prob: 0.0,
        target: target.clone(),
        others: (1..=4)
            .map(|id| EngineReq {
                id,
                arrive: id as usize,
                prompt: vec![1, 2, 3, 4, 5, 6, 7, id as u32 + 10],
                params: SamplingParams {
                    seed: Some(id),
                    ..params.clone()
                },
                abort_at: (id == 3).then_some(15),
            })
            .collect(),
    };
    let (solo, _) = run_engine(&case, std::slice::from_ref(&target));
    let mut all = case.others.clone();
    all.insert(1, target.clone());
    let (batched, preemptions) = run_engine(&case, &all);
    assert!(preemptions > 0, "expected preemption");
    assert_eq!(solo[&99].len(), 20);
    assert_eq!(batched[&99], solo[&99]);
}
