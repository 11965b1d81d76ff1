//! Property 2: the scheduler, driven step by step like the engine loop (schedule → sim
//! backend → update), every invariant checked after every step; and the same-step
//! sharing of blocks being computed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use proptest::collection::vec;
use proptest::prelude::*;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use switchyard_engine::backend::Backend;
use switchyard_engine::core::block_manager::{BlockId, BlockManager};
use switchyard_engine::core::request::Request;
use switchyard_engine::core::scheduler::{
    Finished, Scheduled, Scheduler, SchedulerConfig, StepStats,
};
use switchyard_engine::core::{EngineEvent, FinishReason, NewRequest, SamplingParams};

use crate::harness::*;

#[derive(Debug, Clone)]
struct ReqSpec {
    arrive: usize,
    base: usize,
    prefix: usize,
    suffix: Vec<u32>,
    max_tokens: usize,
    greedy: bool,
    abort_at: Option<usize>,
    /// The client goes away (its receiver is dropped) at this step.
    hang_up_at: Option<usize>,
}

#[derive(Debug, Clone)]
struct SchedCase {
    num_blocks: usize,
    block_size: usize,
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    caching: bool,
    /// None: unlimited. Otherwise capped at the pool's capacity + 1, so that every
    /// request fits the pool on its own.
    max_model_len: Option<usize>,
    bases: Vec<Vec<u32>>,
    reqs: Vec<ReqSpec>,
}

fn req_spec() -> impl Strategy<Value = ReqSpec> {
    (
        0..30usize,
        0..3usize,
        0..24usize,
        vec(0u32..3, 0..8),
        1..16usize,
        any::<bool>(),
        prop::option::weighted(0.2, 0..60usize),
        prop::option::weighted(0.1, 0..60usize),
    )
        .prop_map(
            |(arrive, base, prefix, suffix, max_tokens, greedy, abort_at, hang_up_at)| ReqSpec {
                arrive,
                base,
                prefix,
                suffix,
                max_tokens,
                greedy,
                abort_at,
                hang_up_at,
            },
        )
}

fn sched_case() -> impl Strategy<Value = SchedCase> {
    (
        (
            3..20usize,
            1..5usize,
            1..6usize,
            1..24usize,
            prop::bool::weighted(0.8),
            prop::option::weighted(0.3, 2..40usize),
        ),
        vec(vec(0u32..3, 0..24), 3),
        vec(req_spec(), 1..12),
    )
        .prop_map(
            |((num_blocks, block_size, max_num_seqs, batched, caching, len), bases, reqs)| {
                SchedCase {
                    num_blocks,
                    block_size,
                    max_num_seqs,
                    max_num_batched_tokens: batched,
                    caching,
                    max_model_len: len.map(|m| m.min(num_blocks * block_size + 1)),
                    bases,
                    reqs,
                }
            },
        )
}

/// What a scheduler run did, for the sanity checks that the cases exercise everything.
#[derive(Debug, Default)]
struct SchedOutcome {
    steps: usize,
    preemptions: u64,
    chunked: u64,
    prefix_hits: u64,
    aborted_running: u64,
    /// Requests finished as aborted because their receiver was gone.
    hung_up: u64,
    /// Every request's received (token, finish reason) stream, by id.
    streams: HashMap<u64, Vec<(u32, Option<FinishReason>)>>,
}

fn drain(rx: &mut UnboundedReceiver<EngineEvent>) -> Vec<(u32, Option<FinishReason>)> {
    let mut out = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        match ev {
            EngineEvent::Token { id, finish, .. } => out.push((id, finish.map(|f| f.reason))),
            EngineEvent::Rejected(e) => panic!("rejected: {e}"),
        }
    }
    out
}

/// Drive `Scheduler::schedule` → sim backend → `Scheduler::update` as the engine loop
/// does, checking every invariant after every step. Requests ignore EOS, so every one not
/// aborted must end with exactly `max_tokens` tokens.
fn drive_scheduler(case: &SchedCase) -> SchedOutcome {
    let bs = case.block_size;
    let capacity = case.num_blocks * bs;
    let cfg = SchedulerConfig {
        max_num_seqs: case.max_num_seqs,
        max_num_batched_tokens: case.max_num_batched_tokens,
        max_model_len: case.max_model_len.unwrap_or(1 << 20),
    };
    let mut sched = Scheduler::new(cfg, BlockManager::new(case.num_blocks, bs, case.caching));
    let mut backend = zero_latency_sim(0.0);
    let mut kv = KvModel::new(case.num_blocks, bs);

    struct Live {
        id: u64,
        /// Output tokens it must end with: max_tokens, or fewer when max_model_len ends it.
        expect_len: usize,
        prompt_len: usize,
        rng_seed: u64,
        /// None once the client hung up; `received` holds what came before.
        rx: Option<UnboundedReceiver<EngineEvent>>,
        received: Vec<(u32, Option<FinishReason>)>,
        finished: bool,
        aborted: bool,
    }
    let mut pending: Vec<(usize, u64, Request)> = Vec::new();
    let mut live: HashMap<u64, Live> = HashMap::new();
    for (i, spec) in case.reqs.iter().enumerate() {
        let mut prompt = compose(&case.bases, spec.base, spec.prefix, &spec.suffix);
        let mut max_tokens = spec.max_tokens;
        let expect_len = match case.max_model_len {
            // The API rejects prompts that leave no room for output.
            Some(m) => {
                prompt.truncate(m - 1);
                max_tokens.min(m - prompt.len())
            }
            None => {
                clamp_to_fit(&mut prompt, &mut max_tokens, capacity);
                max_tokens
            }
        };
        let (tx, rx) = unbounded_channel();
        let id = i as u64 + 1;
        let prompt_len = prompt.len();
        let req = Request::new(NewRequest {
            id,
            prompt,
            params: SamplingParams {
                max_tokens,
                temperature: if spec.greedy { 0.0 } else { 1.0 },
                ignore_eos: true,
                ..SamplingParams::default()
            },
            arrival: Instant::now(),
            events: tx,
            kv_transfer: None,
            lora: None,
        });
        live.insert(
            id,
            Live {
                id,
                expect_len,
                prompt_len,
                rng_seed: req.rng_seed,
                rx: Some(rx),
                received: Vec::new(),
                finished: false,
                aborted: false,
            },
        );
        pending.push((spec.arrive, id, req));
    }
    pending.sort_by_key(|p| p.0);
    let mut pending = pending.into_iter().peekable();
    let aborts: Vec<(usize, u64)> = case
        .reqs
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.abort_at.map(|t| (t, i as u64 + 1)))
        .collect();
    let last_event = case
        .reqs
        .iter()
        .map(|s| {
            s.arrive
                .max(s.abort_at.unwrap_or(0))
                .max(s.hang_up_at.unwrap_or(0))
        })
        .max()
        .unwrap_or(0);
    let hang_ups: Vec<(usize, u64)> = case
        .reqs
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.hang_up_at.map(|t| (t, i as u64 + 1)))
        .collect();
    let total_work: usize =
        live.values().map(|l| l.expect_len).sum::<usize>() + case.reqs.len() * capacity;
    // Generous: preemption recomputes, but every step makes progress for someone.
    let max_steps = last_event + 50 + 20 * total_work;

    let mut out = SchedOutcome::default();
    let mut scheduled: Vec<Scheduled> = Vec::new();
    let mut sampled: Vec<u32> = Vec::new();
    let mut finished: Vec<Finished> = Vec::new();
    let mut stats = StepStats::default();

    for step in 0.. {
        assert!(
            step < max_steps,
            "not done after {max_steps} steps: {} waiting, {} running",
            sched.num_waiting(),
            sched.num_running()
        );
        while let Some((_, _, req)) = pending.next_if(|p| p.0 == step) {
            sched.add(req);
        }
        for &(_, id) in aborts.iter().filter(|a| a.0 == step) {
            if let Some(req) = sched.abort(id) {
                assert!(
                    req.blocks.ids.is_empty(),
                    "abort left blocks on the request"
                );
                if req.num_computed > 0 {
                    out.aborted_running += 1;
                }
                let l = live.get_mut(&id).expect("known id");
                assert!(!l.finished && !l.aborted);
                l.aborted = true;
            }
            sched.block_manager().check_invariants(
                sched
                    .running()
                    .iter()
                    .chain(sched.waiting().iter())
                    .map(|r| &r.blocks),
            );
        }
        for &(_, id) in hang_ups.iter().filter(|a| a.0 == step) {
            let l = live.get_mut(&id).expect("known id");
            if let Some(mut rx) = l.rx.take() {
                l.received = drain(&mut rx);
            }
        }
        if pending.peek().is_none() && step > last_event && sched.is_idle() {
            break;
        }
        let busy = !sched.is_idle();

        stats.clear();
        sched.schedule(&mut scheduled, &mut stats);
        out.preemptions += stats.preemptions;
        out.prefix_hits += stats.prefix_hits;

        // --- invariants of the plan ---
        if busy {
            assert!(
                !scheduled.is_empty(),
                "nothing scheduled with {} waiting and {} running",
                sched.num_waiting(),
                sched.num_running()
            );
        }
        assert!(
            sched.num_running() <= case.max_num_seqs,
            "max_num_seqs exceeded"
        );
        let total: usize = scheduled.iter().map(|s| s.num_new).sum();
        assert!(
            total <= case.max_num_batched_tokens,
            "{total} tokens scheduled > max_num_batched_tokens {}",
            case.max_num_batched_tokens
        );
        let mut seen = HashSet::new();
        for s in &scheduled {
            assert!(seen.insert(s.idx), "request scheduled twice in a step");
            let r = &sched.running()[s.idx];
            assert!(s.num_new >= 1);
            assert!(r.num_computed + s.num_new <= r.tokens.len());
            assert!(
                r.blocks.ids.len() >= sched.block_manager().blocks_for(r.num_computed + s.num_new),
                "request {} has {} blocks for {} tokens",
                r.id,
                r.blocks.ids.len(),
                r.num_computed + s.num_new
            );
            if r.num_computed + s.num_new < r.tokens.len() {
                out.chunked += 1;
            }
        }
        for r in sched.running() {
            assert_no_duplicates(&r.blocks.ids);
        }
        for r in sched.waiting() {
            assert!(r.blocks.ids.is_empty(), "a waiting request holds blocks");
            assert_eq!(r.num_computed, 0);
        }
        sched.block_manager().check_invariants(
            sched
                .running()
                .iter()
                .chain(sched.waiting().iter())
                .map(|r| &r.blocks),
        );

        // --- execute ---
        sampled.clear();
        if !scheduled.is_empty() {
            let steps = sched.seq_steps(&scheduled);
            let n_sample = steps.iter().filter(|s| s.sample).count();
            backend.execute(&steps, &mut sampled).expect("sim step");
            assert_eq!(sampled.len(), n_sample);
        }
        // The step writes every scheduled position, then reads: a request scheduled in
        // this step may have hit blocks another one computes in it.
        let sharers: Vec<(&[BlockId], &[u32])> = sched
            .running()
            .iter()
            .map(|r| (&r.blocks.ids[..], &r.tokens[..]))
            .collect();
        for s in &scheduled {
            let r = &sched.running()[s.idx];
            kv.write_shared(
                sched.block_manager(),
                &r.blocks.ids,
                &r.tokens,
                r.num_computed,
                r.num_computed + s.num_new,
                &sharers,
            );
        }
        for r in sched.running() {
            kv.check("running request", &r.blocks.ids, &r.tokens, r.num_computed);
        }

        // --- update ---
        finished.clear();
        sched.update(
            &scheduled,
            &sampled,
            &mut [],
            &[],
            &mut stats,
            &mut finished,
        );
        for f in &finished {
            assert!(
                f.request.blocks.ids.is_empty(),
                "finished request kept blocks"
            );
            let l = live.get_mut(&f.request.id).expect("known id");
            assert!(!l.finished && !l.aborted, "request finished twice");
            match f.reason {
                FinishReason::Length => {
                    assert_eq!(f.request.num_output(), l.expect_len);
                    l.finished = true;
                }
                FinishReason::Abort => {
                    assert!(l.rx.is_none(), "aborted though its client is there");
                    assert!(f.request.num_output() <= l.expect_len);
                    out.hung_up += 1;
                    l.aborted = true;
                }
                r => panic!("unexpected finish reason {r:?}"),
            }
        }
        assert!(sched.num_running() <= case.max_num_seqs);
        sched.block_manager().check_invariants(
            sched
                .running()
                .iter()
                .chain(sched.waiting().iter())
                .map(|r| &r.blocks),
        );
        out.steps = step + 1;
    }

    assert_all_free(sched.block_manager());
    for l in live.values_mut() {
        assert!(l.finished || l.aborted, "request {} never finished", l.id);
        let mut stream = std::mem::take(&mut l.received);
        if let Some(rx) = l.rx.as_mut() {
            stream.extend(drain(rx));
        }
        let expect: Vec<u32> = (0..l.expect_len)
            .map(|pos| backend.token_at(l.rng_seed, l.prompt_len + pos, pos, true))
            .collect();
        let toks: Vec<u32> = stream.iter().map(|t| t.0).collect();
        if l.finished {
            assert_eq!(toks, expect, "request {} output", l.id);
            for (i, (_, fin)) in stream.iter().enumerate() {
                let last = i + 1 == stream.len();
                assert_eq!(
                    fin.is_some(),
                    last,
                    "finish must come with the last token only"
                );
            }
            assert_eq!(stream.last().and_then(|t| t.1), Some(FinishReason::Length));
        } else {
            assert!(toks.len() < l.expect_len);
            assert_eq!(
                toks,
                expect[..toks.len()],
                "aborted request {} output",
                l.id
            );
            assert!(stream.iter().all(|t| t.1.is_none()));
        }
        out.streams.insert(l.id, stream);
    }
    out
}

#[test]
fn scheduler_keeps_invariants_and_finishes_everything() {
    let preemptions = AtomicU64::new(0);
    let preempting_cases = AtomicU64::new(0);
    let chunked = AtomicU64::new(0);
    let hits = AtomicU64::new(0);
    let aborted_running = AtomicU64::new(0);
    let hung_up = AtomicU64::new(0);
    run_cases(600, sched_case(), |case| {
        let o = drive_scheduler(&case);
        preemptions.fetch_add(o.preemptions, Relaxed);
        preempting_cases.fetch_add(u64::from(o.preemptions > 0), Relaxed);
        chunked.fetch_add(o.chunked, Relaxed);
        hits.fetch_add(o.prefix_hits, Relaxed);
        aborted_running.fetch_add(o.aborted_running, Relaxed);
        hung_up.fetch_add(o.hung_up, Relaxed);
        Ok(())
    });
    eprintln!(
        "scheduler: {} preemptions in {} cases, {} chunked prefills, {} prefix-hit tokens, \
         {} running requests aborted, {} hung up",
        preemptions.load(Relaxed),
        preempting_cases.load(Relaxed),
        chunked.load(Relaxed),
        hits.load(Relaxed),
        aborted_running.load(Relaxed),
        hung_up.load(Relaxed)
    );
    assert!(preempting_cases.load(Relaxed) > 0, "no case preempted");
    assert!(chunked.load(Relaxed) > 0, "no chunked prefill");
    assert!(hits.load(Relaxed) > 0, "no prefix-cache hits");
    assert!(
        aborted_running.load(Relaxed) > 0,
        "no running request was aborted"
    );
    assert!(hung_up.load(Relaxed) > 0, "no request outlived its client");
}

/// A deterministic case that must preempt (three requests that each need up to 6 of the
/// 8 blocks) and chunk (4-token budget, 8-token prompts), and still produce every token.
#[test]
fn scheduler_preempts_under_a_small_pool() {
    let case = SchedCase {
        num_blocks: 8,
        block_size: 4,
        max_num_seqs: 3,
        max_num_batched_tokens: 6,
        caching: true,
        max_model_len: None,
        bases: vec![vec![1, 2, 0, 1, 2, 2, 0, 1]; 3],
        reqs: (0..3)
            .map(|i| ReqSpec {
                arrive: 0,
                base: 0,
                prefix: 8,
                suffix: Vec::new(),
                max_tokens: 16,
                greedy: i == 1,
                abort_at: None,
                hang_up_at: None,
            })
            .collect(),
    };
    let o = drive_scheduler(&case);
    assert!(o.preemptions > 0, "expected preemption: {o:?}");
    assert!(o.chunked > 0, "expected chunked prefill: {o:?}");
    assert!(
        o.prefix_hits > 0,
        "the shared prompt should hit the cache: {o:?}"
    );
    assert_eq!(o.streams.len(), 3);
    assert!(o.streams.values().all(|s| s.len() == 16));
}

/// Requests with the same prompt that arrive together share its full blocks in the very
/// step that computes them (blocks are cached when scheduled, as vLLM does); if that step
/// fails, the blocks leave the cache, so nothing later hits content never written.
#[test]
fn same_step_requests_share_blocks_being_computed_and_a_failed_step_uncaches_them() {
    let bs = 4;
    let cfg = SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
        max_model_len: 1 << 20,
    };
    let mut sched = Scheduler::new(cfg, BlockManager::new(16, bs, true));
    let prompt: Vec<u32> = (0..10).collect();
    let mut receivers = Vec::new();
    let mut add = |sched: &mut Scheduler, id: u64| {
        let (tx, rx) = unbounded_channel();
        receivers.push(rx);
        sched.add(Request::new(NewRequest {
            id,
            prompt: prompt.clone(),
            params: SamplingParams {
                max_tokens: 2,
                ignore_eos: true,
                ..SamplingParams::default()
            },
            arrival: Instant::now(),
            events: tx,
            kv_transfer: None,
            lora: None,
        }));
    };
    add(&mut sched, 1);
    add(&mut sched, 2);
    let (mut out, mut stats) = (Vec::new(), StepStats::default());
    sched.schedule(&mut out, &mut stats);
    assert_eq!(out.len(), 2, "both requests run in the first step");
    assert_eq!(
        stats.prefix_hits, 8,
        "the second reuses the first's 2 full blocks"
    );
    assert_eq!(out[1].num_new, 2);
    assert_eq!(
        sched.running()[0].blocks.ids[..2],
        sched.running()[1].blocks.ids[..2]
    );

    // The step fails: its blocks leave the cache, the requests are dropped.
    sched.uncache_uncomputed(&out);
    for id in [1, 2] {
        assert!(sched.abort(id).is_some());
    }
    add(&mut sched, 3);
    stats.clear();
    sched.schedule(&mut out, &mut stats);
    assert_eq!(
        stats.prefix_hits, 0,
        "no hit on blocks that were never computed"
    );
    assert_eq!(out[0].num_new, 10);
}

/// An adapter as the registry makes one, without weights (the scheduler only needs its
/// identity).
fn adapter(name: &str, id: u32) -> std::sync::Arc<switchyard_engine::lora::Adapter> {
    std::sync::Arc::new(switchyard_engine::lora::Adapter {
        name: name.into(),
        id,
        path: format!("/adapters/{name}"),
        rank: 8,
        salt: switchyard_engine::lora::salt_for(name),
        weights: None,
    })
}

fn lora_request(
    id: u64,
    prompt: &[u32],
    lora: Option<std::sync::Arc<switchyard_engine::lora::Adapter>>,
    receivers: &mut Vec<UnboundedReceiver<EngineEvent>>,
) -> Request {
    let (tx, rx) = unbounded_channel();
    receivers.push(rx);
    Request::new(NewRequest {
        id,
        prompt: prompt.to_vec(),
        params: SamplingParams {
            max_tokens: 2,
            ignore_eos: true,
            ..SamplingParams::default()
        },
        arrival: Instant::now(),
        events: tx,
        kv_transfer: None,
        lora,
    })
}

/// Prefix caching is keyed per adapter: the same prompt under two adapters (or under an
/// adapter and the base model) shares no block, and its block hashes differ; under the
/// same adapter it hits.
#[test]
fn prefix_cache_is_keyed_per_lora_adapter() {
    let bs = 4;
    let cfg = SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
        max_model_len: 1 << 20,
    };
    let mut sched = Scheduler::new(cfg, BlockManager::new(32, bs, true)).with_max_loras(4);
    let prompt: Vec<u32> = (0..10).collect();
    let (a, b) = (adapter("sql", 1), adapter("chat", 2));
    let mut rx = Vec::new();
    sched.add(lora_request(1, &prompt, Some(a.clone()), &mut rx));
    sched.add(lora_request(2, &prompt, Some(b.clone()), &mut rx));
    sched.add(lora_request(3, &prompt, None, &mut rx));
    let (mut out, mut stats) = (Vec::new(), StepStats::default());
    sched.schedule(&mut out, &mut stats);
    assert_eq!(out.len(), 3, "all three run in the first step");
    assert_eq!(
        stats.prefix_hits, 0,
        "no request reuses another adapter's blocks"
    );
    let running = sched.running();
    let hashes: Vec<&[u64]> = running.iter().map(|r| &r.blocks.hashes[..2]).collect();
    assert_ne!(hashes[0], hashes[1], "sql vs chat");
    assert_ne!(hashes[0], hashes[2], "sql vs base");
    assert_ne!(hashes[1], hashes[2], "chat vs base");
    for i in 0..3 {
        for j in 0..i {
            assert!(
                running[i].blocks.ids[..2]
                    .iter()
                    .all(|id| !running[j].blocks.ids.contains(id)),
                "requests {i} and {j} share a block"
            );
        }
    }
    let sql_blocks = running[0].blocks.ids[..2].to_vec();

    // The same prompt under "sql" again: its 2 full blocks are hits, the very blocks.
    sched.add(lora_request(4, &prompt, Some(a), &mut rx));
    stats.clear();
    sched.schedule(&mut out, &mut stats);
    assert_eq!(
        stats.prefix_hits, 8,
        "the second sql request reuses sql's 2 blocks"
    );
    let r4 = sched
        .running()
        .iter()
        .find(|r| r.id == 4)
        .expect("request 4 runs");
    assert_eq!(r4.blocks.ids[..2], sql_blocks[..]);
}

/// `--max-loras`: a waiting request for an adapter beyond the cap of distinct adapters
/// running waits, and the requests behind it (same adapter, base model) are admitted, as
/// vLLM's scheduler skips it; once the running adapter's requests finish, it runs.
#[test]
fn max_loras_caps_distinct_running_adapters() {
    let cfg = SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
        max_model_len: 1 << 20,
    };
    let mut sched = Scheduler::new(cfg, BlockManager::new(64, 4, true)).with_max_loras(1);
    let (a, b) = (adapter("sql", 1), adapter("chat", 2));
    let mut rx = Vec::new();
    sched.add(lora_request(1, &[1, 2, 3], Some(a.clone()), &mut rx));
    sched.add(lora_request(2, &[4, 5, 6], Some(b), &mut rx));
    sched.add(lora_request(3, &[7, 8, 9], Some(a), &mut rx));
    sched.add(lora_request(4, &[10, 11, 12], None, &mut rx));
    let (mut out, mut stats) = (Vec::new(), StepStats::default());
    sched.schedule(&mut out, &mut stats);
    let mut ids: Vec<u64> = sched.running().iter().map(|r| r.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, [1, 3, 4], "chat waits while sql runs");
    assert_eq!(
        sched.waiting().iter().map(|r| r.id).collect::<Vec<_>>(),
        [2]
    );
    // Finish sql's requests: chat is admitted.
    for id in [1, 3] {
        assert!(sched.abort(id).is_some());
    }
    stats.clear();
    sched.schedule(&mut out, &mut stats);
    let mut ids: Vec<u64> = sched.running().iter().map(|r| r.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, [2, 4]);
}
