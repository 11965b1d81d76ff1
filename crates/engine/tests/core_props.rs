//! Property tests of the engine core: the paged, prefix-caching block manager on its own,
//! the scheduler driven step by step the way the engine loop drives it, and the engine
//! loop with the sim backend (a request's output does not depend on what it is batched
//! with, preemption included).
//!
//! Besides `BlockManager::check_invariants`, the tests keep a model of the KV cache's
//! content: every token a step computes is written into its slot of the model, and
//! whatever a sequence treats as already computed (prefix-cache hits, earlier chunks) must
//! hold exactly that sequence's tokens. Writes must only ever go to blocks the sequence
//! holds alone. The block manager is also compared, op by op, with a plain reference
//! implementation of its documented policy (LRU reuse, hashless blocks first), and its
//! cache events with what is actually cached.
//!
//! `PROPTEST_CASES=N` raises (or lowers) the number of cases of every property.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use kv_events::hash::block_hash;
use switchyard_engine::backend::sim::{Latency, SimBackend};
use switchyard_engine::backend::Backend;
use switchyard_engine::core::block_manager::{BlockId, BlockManager, CacheEvent, SeqBlocks};
use switchyard_engine::core::request::Request;
use switchyard_engine::core::scheduler::{
    Finished, Scheduled, Scheduler, SchedulerConfig, StepStats,
};
use switchyard_engine::core::{EngineEvent, FinishReason, NewRequest, SamplingParams};
use switchyard_engine::engine_loop::{EngineCommand, EngineLoop};
use switchyard_engine::metrics::EngineMetrics;
use tokenizer::sim::IM_END;

// ---------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------

/// Run `cases` random cases of `test` (panics count as failures and are shrunk).
fn run_cases<S>(cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: Debug,
{
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2048,
        ..Config::default()
    });
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
}

/// A prompt: a prefix of one of the shared base sequences, then a private suffix, so
/// that prompts of different requests often share whole blocks.
fn compose(bases: &[Vec<u32>], base: usize, prefix: usize, suffix: &[u32]) -> Vec<u32> {
    let b = &bases[base % bases.len()];
    let mut t: Vec<u32> = b[..prefix.min(b.len())].to_vec();
    t.extend_from_slice(suffix);
    if t.is_empty() {
        t.push(0);
    }
    t
}

/// Clamp a request so it fits the whole KV cache on its own: the most tokens it ever
/// holds computed is `prompt + max_tokens - 1` (the last sampled token is never computed).
fn clamp_to_fit(prompt: &mut Vec<u32>, max_tokens: &mut usize, capacity: usize) {
    if prompt.len() + *max_tokens > capacity + 1 {
        let keep = (capacity + 1).saturating_sub(*max_tokens).max(1);
        prompt.truncate(keep);
        *max_tokens = (*max_tokens).min(capacity + 1 - prompt.len());
    }
    assert!(!prompt.is_empty() && *max_tokens >= 1);
}

/// The KV cache's content as the tests believe it: one slot per token position.
struct KvModel {
    bs: usize,
    slots: Vec<Vec<Option<u32>>>,
}

impl KvModel {
    fn new(num_blocks: usize, bs: usize) -> Self {
        KvModel {
            bs,
            slots: vec![vec![None; bs]; num_blocks],
        }
    }

    /// Positions `[0, upto)` of a sequence must hold its tokens.
    fn check(&self, what: &str, ids: &[BlockId], tokens: &[u32], upto: usize) {
        for (p, &tok) in tokens.iter().enumerate().take(upto) {
            let b = ids[p / self.bs] as usize;
            assert_eq!(
                self.slots[b][p % self.bs],
                Some(tok),
                "{what}: block {b} slot {} (position {p}) does not hold the sequence's token",
                p % self.bs
            );
        }
    }

    /// Compute positions `[from, to)` of a sequence; the blocks written must be private.
    fn write(
        &mut self,
        bm: &BlockManager,
        ids: &[BlockId],
        tokens: &[u32],
        from: usize,
        to: usize,
    ) {
        self.write_shared(bm, ids, tokens, from, to, &[]);
    }

    /// Compute positions `[from, to)` of a sequence in a step where `sharers` (every
    /// sequence of the step, the writer included) may hold the same blocks: a block being
    /// written may be shared only with sequences that hold it at the same index and whose
    /// tokens there are the writer's (a prefix-cache hit on a block this step computes).
    fn write_shared(
        &mut self,
        bm: &BlockManager,
        ids: &[BlockId],
        tokens: &[u32],
        from: usize,
        to: usize,
        sharers: &[(&[BlockId], &[u32])],
    ) {
        for (p, &tok) in tokens.iter().enumerate().take(to).skip(from) {
            let b = ids[p / self.bs];
            let holders: Vec<&(&[BlockId], &[u32])> =
                sharers.iter().filter(|(ids, _)| ids.contains(&b)).collect();
            assert!(
                bm.ref_count(b) == 1 || bm.ref_count(b) as usize == holders.len(),
                "writing position {p} into block {b}, which is shared outside this step"
            );
            for (ids2, toks2) in holders {
                assert_eq!(
                    ids2.iter().position(|&x| x == b),
                    Some(p / self.bs),
                    "block {b} shared at another position"
                );
                if let Some(&t2) = toks2.get(p) {
                    assert_eq!(t2, tok, "block {b} shared by sequences with other tokens");
                }
            }
            self.slots[b as usize][p % self.bs] = Some(tok);
        }
    }
}

fn assert_no_duplicates(ids: &[BlockId]) {
    let set: HashSet<_> = ids.iter().collect();
    assert_eq!(
        set.len(),
        ids.len(),
        "a sequence holds a block twice: {ids:?}"
    );
}

fn assert_all_free(bm: &BlockManager) {
    bm.check_invariants([]);
    assert_eq!(bm.num_free(), bm.num_blocks(), "blocks leaked");
    for b in 0..bm.num_blocks() as BlockId {
        assert_eq!(bm.ref_count(b), 0, "block {b} still referenced");
    }
}

// ---------------------------------------------------------------------------------------
// Property 1: the block manager alone
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum BmOp {
    /// A new sequence of `compose(bases, base, prefix, suffix)`, computed in full right
    /// away; with `lookup`, starting from its longest cached prefix.
    Alloc {
        base: usize,
        prefix: usize,
        suffix: Vec<u32>,
        lookup: bool,
    },
    /// Append (and compute) tokens to a live sequence.
    Grow {
        seq: usize,
        extra: Vec<u32>,
    },
    /// Register a live sequence's full blocks among its first `upto % (len + 1)` tokens.
    Cache {
        seq: usize,
        upto: usize,
    },
    Free {
        seq: usize,
    },
    ResetPrefixCache,
}

#[derive(Debug, Clone)]
struct BmCase {
    num_blocks: usize,
    block_size: usize,
    caching: bool,
    bases: Vec<Vec<u32>>,
    ops: Vec<BmOp>,
    free_seed: u64,
}

fn bm_op() -> impl Strategy<Value = BmOp> {
    prop_oneof![
        5 => (0..3usize, 0..20usize, vec(0u32..3, 0..6), prop::bool::weighted(0.8)).prop_map(
            |(base, prefix, suffix, lookup)| BmOp::Alloc { base, prefix, suffix, lookup }
        ),
        2 => (any::<usize>(), vec(0u32..3, 1..6)).prop_map(|(seq, extra)| BmOp::Grow { seq, extra }),
        4 => (any::<usize>(), any::<usize>()).prop_map(|(seq, upto)| BmOp::Cache { seq, upto }),
        4 => any::<usize>().prop_map(|seq| BmOp::Free { seq }),
        1 => Just(BmOp::ResetPrefixCache),
    ]
}

fn bm_case() -> impl Strategy<Value = BmCase> {
    (
        1..24usize,
        1..5usize,
        prop::bool::weighted(0.85),
        vec(vec(0u32..3, 0..20), 3),
        vec(bm_op(), 1..80),
        any::<u64>(),
    )
        .prop_map(
            |(num_blocks, block_size, caching, bases, ops, free_seed)| BmCase {
                num_blocks,
                block_size,
                caching,
                bases,
                ops,
                free_seed,
            },
        )
}

struct LiveSeq {
    blocks: SeqBlocks,
    tokens: Vec<u32>,
}

#[derive(Default)]
struct BmCounters {
    hit_blocks: AtomicU64,
    failed_allocs: AtomicU64,
    evictions: AtomicU64,
}

/// The hashes `update_hashes` must produce, computed independently.
fn expected_hashes(tokens: &[u32], bs: usize) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for chunk in tokens.chunks_exact(bs) {
        let parent = out.last().copied();
        out.push(block_hash(parent, chunk));
    }
    out
}

/// Every prefix the cache offers for a sequence holds that sequence's tokens.
fn check_lookup(bm: &BlockManager, kv: &KvModel, tokens: &[u32], hashes: &[u64]) -> Vec<BlockId> {
    let mut hits = Vec::new();
    bm.find_cached_prefix(hashes, tokens.len(), &mut hits);
    if !bm.caching() {
        assert!(hits.is_empty(), "cache hits with caching off");
    }
    assert!(
        hits.len() * bm.block_size() < tokens.len(),
        "the cached prefix must leave a token to compute"
    );
    assert_no_duplicates(&hits);
    kv.check("cache hit", &hits, tokens, hits.len() * bm.block_size());
    hits
}

/// A plain reference implementation of the block manager's documented policy (a
/// `VecDeque` free queue instead of the intrusive list): blocks are reused from the front;
/// freed blocks with a hash go to the back (LRU eviction), others to the front; a reused
/// block loses its hash. The real manager must hand out exactly the same blocks.
struct RefBm {
    bs: usize,
    caching: bool,
    ref_cnt: Vec<u32>,
    hash: Vec<Option<u64>>,
    cached: HashMap<u64, BlockId>,
    free: VecDeque<BlockId>,
}

impl RefBm {
    fn new(num_blocks: usize, bs: usize, caching: bool) -> Self {
        RefBm {
            bs,
            caching,
            ref_cnt: vec![0; num_blocks],
            hash: vec![None; num_blocks],
            cached: HashMap::new(),
            free: (0..num_blocks as BlockId).collect(),
        }
    }

    fn find(&self, hashes: &[u64], num_tokens: usize) -> Vec<BlockId> {
        if !self.caching || num_tokens == 0 {
            return Vec::new();
        }
        hashes
            .iter()
            .take((num_tokens - 1) / self.bs)
            .map_while(|h| self.cached.get(h).copied())
            .collect()
    }

    /// The blocks `allocate` must append (hits first), or None when it must refuse.
    fn allocate(&mut self, have: usize, hits: &[BlockId], total: usize) -> Option<Vec<BlockId>> {
        let need = total.div_ceil(self.bs).saturating_sub(have + hits.len());
        let hits_free = hits
            .iter()
            .filter(|&&b| self.ref_cnt[b as usize] == 0)
            .count();
        if need + hits_free > self.free.len() {
            return None;
        }
        for &b in hits {
            if self.ref_cnt[b as usize] == 0 {
                let pos = self.free.iter().position(|&f| f == b).expect("free hit");
                self.free.remove(pos);
            }
            self.ref_cnt[b as usize] += 1;
        }
        let mut out = hits.to_vec();
        for _ in 0..need {
            let b = self.free.pop_front().expect("free block");
            if let Some(h) = self.hash[b as usize].take() {
                if self.cached.get(&h) == Some(&b) {
                    self.cached.remove(&h);
                }
            }
            self.ref_cnt[b as usize] = 1;
            out.push(b);
        }
        Some(out)
    }

    fn cache(&mut self, ids: &[BlockId], hashes: &[u64], from: usize, to: usize) {
        for i in from..to {
            if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(hashes[i]) {
                e.insert(ids[i]);
                self.hash[ids[i] as usize] = Some(hashes[i]);
            }
        }
    }

    fn free(&mut self, ids: &[BlockId]) {
        for &b in ids.iter().rev() {
            self.ref_cnt[b as usize] -= 1;
            if self.ref_cnt[b as usize] == 0 {
                if self.hash[b as usize].is_some() {
                    self.free.push_back(b);
                } else {
                    self.free.push_front(b);
                }
            }
        }
    }

    fn reset(&mut self) -> bool {
        if self.free.len() != self.ref_cnt.len() {
            return false;
        }
        self.cached.clear();
        self.hash.iter_mut().for_each(|h| *h = None);
        true
    }
}

fn bm_run(case: BmCase, counters: &BmCounters) {
    let bs = case.block_size;
    let mut bm = BlockManager::new(case.num_blocks, bs, case.caching);
    let mut kv = KvModel::new(case.num_blocks, bs);
    let mut live: Vec<LiveSeq> = Vec::new();
    // Recently seen sequences (live or not), probed against the cache after every op.
    let mut history: Vec<(Vec<u32>, Vec<u64>)> = Vec::new();
    // The cached hashes as the cache events report them.
    let mut cached: HashSet<u64> = HashSet::new();
    bm.enable_events();
    let mut model = RefBm::new(case.num_blocks, bs, case.caching);

    for op in &case.ops {
        match op {
            BmOp::Alloc {
                base,
                prefix,
                suffix,
                lookup,
            } => {
                let tokens = compose(&case.bases, *base, *prefix, suffix);
                let mut sb = SeqBlocks::default();
                bm.update_hashes(&mut sb, &tokens);
                assert_eq!(sb.hashes, expected_hashes(&tokens, bs));
                let hits = if *lookup {
                    check_lookup(&bm, &kv, &tokens, &sb.hashes)
                } else {
                    Vec::new()
                };
                if *lookup {
                    assert_eq!(hits, model.find(&sb.hashes, tokens.len()), "cache lookup");
                }
                let expect = model.allocate(0, &hits, tokens.len());
                let free_before = bm.num_free();
                let hits_free = hits.iter().filter(|&&b| bm.ref_count(b) == 0).count();
                let need = bm.blocks_for(tokens.len()) - hits.len();
                if bm.allocate(&mut sb, &hits, tokens.len()) {
                    assert_eq!(Some(&sb.ids), expect.as_ref(), "allocated blocks");
                    assert!(need + hits_free <= free_before);
                    assert_eq!(sb.ids.len(), bm.blocks_for(tokens.len()));
                    assert_eq!(&sb.ids[..hits.len()], &hits[..]);
                    assert_eq!(bm.num_free(), free_before - need - hits_free);
                    assert_no_duplicates(&sb.ids);
                    counters.hit_blocks.fetch_add(hits.len() as u64, Relaxed);
                    let cached_len = hits.len() * bs;
                    kv.check("after allocate", &sb.ids, &tokens, cached_len);
                    kv.write(&bm, &sb.ids, &tokens, cached_len, tokens.len());
                    history.push((tokens.clone(), sb.hashes.clone()));
                    live.push(LiveSeq { blocks: sb, tokens });
                } else {
                    assert_eq!(expect, None, "allocation refused");
                    assert!(
                        need + hits_free > free_before,
                        "allocation of {need} (+{hits_free} free hits) refused with {free_before} free"
                    );
                    assert!(
                        sb.ids.is_empty(),
                        "a refused allocation changed the sequence"
                    );
                    assert_eq!(bm.num_free(), free_before);
                    counters.failed_allocs.fetch_add(1, Relaxed);
                }
            }
            BmOp::Grow { seq, extra } => {
                if live.is_empty() {
                    continue;
                }
                let n_live = live.len();
                let s = &mut live[seq % n_live];
                if s.tokens.len() + extra.len() > 48 {
                    continue;
                }
                let old_len = s.tokens.len();
                let old_ids = s.blocks.ids.clone();
                let free_before = bm.num_free();
                s.tokens.extend_from_slice(extra);
                let need = bm.blocks_for(s.tokens.len()) - old_ids.len();
                let expect = model.allocate(old_ids.len(), &[], s.tokens.len());
                if bm.allocate(&mut s.blocks, &[], s.tokens.len()) {
                    assert_eq!(Some(&s.blocks.ids[old_ids.len()..]), expect.as_deref());
                    assert_eq!(&s.blocks.ids[..old_ids.len()], &old_ids[..]);
                    assert_eq!(s.blocks.ids.len(), bm.blocks_for(s.tokens.len()));
                    assert_eq!(bm.num_free(), free_before - need);
                    assert_no_duplicates(&s.blocks.ids);
                    kv.write(&bm, &s.blocks.ids, &s.tokens, old_len, s.tokens.len());
                } else {
                    assert_eq!(expect, None, "grow refused");
                    assert!(need > free_before);
                    assert_eq!(s.blocks.ids, old_ids, "a refused grow changed the sequence");
                    assert_eq!(bm.num_free(), free_before);
                    s.tokens.truncate(old_len);
                    counters.failed_allocs.fetch_add(1, Relaxed);
                }
            }
            BmOp::Cache { seq, upto } => {
                if live.is_empty() {
                    continue;
                }
                let n_live = live.len();
                let s = &mut live[seq % n_live];
                let n = upto % (s.tokens.len() + 1);
                let before = s.blocks.num_cached;
                bm.cache_full_blocks(&mut s.blocks, &s.tokens, n);
                if case.caching && s.blocks.num_cached > before {
                    model.cache(&s.blocks.ids, &s.blocks.hashes, before, s.blocks.num_cached);
                }
                if case.caching {
                    assert_eq!(s.blocks.num_cached, before.max(n / bs));
                    let full = s.blocks.hashes.len();
                    assert!(full >= s.blocks.num_cached);
                    assert_eq!(
                        s.blocks.hashes,
                        expected_hashes(&s.tokens[..full * bs], bs),
                        "chained block hashes"
                    );
                    // A first registration makes the whole prefix findable. (Later ones
                    // need not: a block kept private because its content was already
                    // cached elsewhere stays unfindable once that other copy is evicted.)
                    let hits = check_lookup(&bm, &kv, &s.tokens, &s.blocks.hashes);
                    let max = (s.tokens.len() - 1) / bs;
                    if before == 0 {
                        assert!(
                            hits.len() >= s.blocks.num_cached.min(max),
                            "registered blocks are not found: {} < {}",
                            hits.len(),
                            s.blocks.num_cached.min(max)
                        );
                    }
                } else {
                    assert_eq!(s.blocks.num_cached, 0);
                }
            }
            BmOp::Free { seq } => {
                if live.is_empty() {
                    continue;
                }
                let mut s = live.swap_remove(seq % live.len());
                let before = check_lookup(&bm, &kv, &s.tokens, &s.blocks.hashes);
                let free_before = bm.num_free();
                let released = s
                    .blocks
                    .ids
                    .iter()
                    .filter(|&&b| bm.ref_count(b) == 1)
                    .count();
                model.free(&s.blocks.ids);
                bm.free(&mut s.blocks);
                assert!(s.blocks.ids.is_empty() && s.blocks.num_cached == 0);
                assert_eq!(bm.num_free(), free_before + released);
                // Freeing evicts nothing: the same prefix is still cached.
                let after = check_lookup(&bm, &kv, &s.tokens, &s.blocks.hashes);
                assert_eq!(before, after, "free changed what is cached");
            }
            BmOp::ResetPrefixCache => {
                let all_free = bm.num_free() == bm.num_blocks();
                assert_eq!(bm.reset_prefix_cache(), all_free);
                assert_eq!(model.reset(), all_free);
                if all_free {
                    // (No event reports the reset.)
                    cached.clear();
                    for (tokens, hashes) in &history {
                        let mut hits = Vec::new();
                        bm.find_cached_prefix(hashes, tokens.len(), &mut hits);
                        assert!(hits.is_empty(), "hits after reset_prefix_cache");
                    }
                }
            }
        }
        bm.check_invariants(live.iter().map(|s| &s.blocks));
        assert_eq!(bm.num_free(), model.free.len());
        for (b, &r) in model.ref_cnt.iter().enumerate() {
            assert_eq!(
                bm.ref_count(b as BlockId),
                r,
                "block {b} ref count vs model"
            );
        }
        let model_cached: HashSet<u64> = model.cached.keys().copied().collect();
        for s in &live {
            assert_no_duplicates(&s.blocks.ids);
            assert_eq!(s.blocks.ids.len(), bm.blocks_for(s.tokens.len()));
            kv.check("live sequence", &s.blocks.ids, &s.tokens, s.tokens.len());
        }
        if history.len() > 8 {
            history.remove(0);
        }
        for (tokens, hashes) in &history {
            let hits = check_lookup(&bm, &kv, tokens, hashes);
            assert_eq!(
                hits,
                model.find(hashes, tokens.len()),
                "cache lookup vs model"
            );
        }
        // The cache events describe exactly what is cached.
        for ev in bm.drain_events() {
            match ev {
                CacheEvent::Stored {
                    hash,
                    parent,
                    tokens,
                } => {
                    assert_eq!(tokens.len(), bs);
                    assert_eq!(block_hash(parent, &tokens), hash, "stored event's hash");
                    assert!(cached.insert(hash), "hash stored twice without removal");
                }
                CacheEvent::Removed { hash } => {
                    assert!(cached.remove(&hash), "removed a hash that was not stored");
                    counters.evictions.fetch_add(1, Relaxed);
                }
                CacheEvent::AllCleared => cached.clear(),
            }
        }
        let mut hits = Vec::new();
        for &h in &cached {
            bm.find_cached_prefix(&[h], bs + 1, &mut hits);
            assert_eq!(hits.len(), 1, "a stored hash is not findable");
            assert_eq!(
                Some(&hits[0]),
                model.cached.get(&h),
                "cached block vs model"
            );
        }
        assert_eq!(cached, model_cached, "cached hashes (events) vs model");
    }

    // Free what is left in a random order.
    let mut x = case.free_seed | 1;
    while !live.is_empty() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut s = live.swap_remove((x % live.len() as u64) as usize);
        model.free(&s.blocks.ids);
        bm.free(&mut s.blocks);
        bm.check_invariants(live.iter().map(|s| &s.blocks));
    }
    assert_all_free(&bm);
}

#[test]
fn block_manager_never_leaks_or_double_frees() {
    let counters = BmCounters::default();
    run_cases(1500, bm_case(), |case| {
        bm_run(case, &counters);
        Ok(())
    });
    eprintln!(
        "block manager: {} hit blocks, {} refused allocations, {} evictions",
        counters.hit_blocks.load(Relaxed),
        counters.failed_allocs.load(Relaxed),
        counters.evictions.load(Relaxed)
    );
    // The cases must actually exercise cache hits, a full pool and eviction.
    assert!(
        counters.hit_blocks.load(Relaxed) > 0,
        "no cache hits at all"
    );
    assert!(
        counters.failed_allocs.load(Relaxed) > 0,
        "the pool never ran out"
    );
    assert!(
        counters.evictions.load(Relaxed) > 0,
        "nothing was ever evicted"
    );
}

// ---------------------------------------------------------------------------------------
// Property 2: the scheduler, driven step by step like the engine loop
// ---------------------------------------------------------------------------------------

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

fn zero_latency_sim(eos_prob: f64) -> SimBackend {
    SimBackend::new(Latency::preset("zero").expect("zero preset"), 1.0, eos_prob)
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
        });
        live.insert(
            id,
            Live {
                id,
                expect_len,
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
            .map(|pos| backend.token_at(l.rng_seed, pos, true))
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

// ---------------------------------------------------------------------------------------
// Property 3: batch independence through the engine loop and the sim backend
// ---------------------------------------------------------------------------------------

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
