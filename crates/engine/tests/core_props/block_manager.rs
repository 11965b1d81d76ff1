//! Property 1: the block manager alone, against a reference implementation of its
//! policy and the KV-content model, events included.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use proptest::collection::vec;
use proptest::prelude::*;

use kv_events::hash::block_hash;
use switchyard_engine::core::block_manager::{BlockId, BlockManager, CacheEvent, SeqBlocks};

use crate::harness::*;

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
                    ..
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
