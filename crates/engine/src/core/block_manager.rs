//! The paged KV block manager with automatic prefix caching, as in vLLM v1.
//!
//! Owns every KV block: its reference count, its content hash when it is full and cached,
//! and the free queue. Invariants (each checked by `check_invariants` in tests):
//! - a block is in the free queue exactly when its reference count is zero;
//! - the cache map points only at blocks whose `hash` is that key;
//! - freed blocks keep their hash and stay findable until they are reused (evicted), and
//!   reuse takes the least recently freed first (LRU);
//! - freed blocks without a hash are reused before any cached one.

use std::collections::HashMap;

use kv_events::hash::block_hash;

pub type BlockId = u32;
const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Block {
    ref_cnt: u32,
    hash: Option<u64>,
    prev: u32,
    next: u32,
    in_free: bool,
}

/// One sequence's blocks and the hashes of its full blocks.
#[derive(Debug, Default, Clone)]
pub struct SeqBlocks {
    pub ids: Vec<BlockId>,
    /// Chained hash of each full block of the sequence's tokens, computed as they fill.
    pub hashes: Vec<u64>,
    /// How many of `ids` (from the start) are registered in the prefix cache.
    pub num_cached: usize,
    /// The LoRA adapter the sequence runs under: its salt seeds the hash chain, so
    /// sequences under different adapters never share a block, whatever their tokens.
    pub lora: Option<std::sync::Arc<crate::lora::Adapter>>,
}

impl SeqBlocks {
    pub fn clear(&mut self) {
        self.ids.clear();
        self.num_cached = 0;
    }
}

/// Something that happened to the prefix cache, for KV-cache events.
#[derive(Debug, Clone)]
pub enum CacheEvent {
    Stored {
        hash: u64,
        parent: Option<u64>,
        tokens: Vec<u32>,
        /// The LoRA adapter the block was computed under.
        lora: Option<std::sync::Arc<crate::lora::Adapter>>,
    },
    Removed {
        hash: u64,
    },
    /// The whole prefix cache was dropped.
    AllCleared,
}

#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    blocks: Vec<Block>,
    free_head: u32,
    free_tail: u32,
    num_free: usize,
    cached: HashMap<u64, BlockId>,
    caching: bool,
    /// Cache events, recorded only when enabled (drained by the engine loop).
    events: Option<Vec<CacheEvent>>,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize, caching: bool) -> Self {
        assert!(num_blocks > 0 && num_blocks < NIL as usize && block_size > 0);
        let blocks = (0..num_blocks)
            .map(|i| Block {
                ref_cnt: 0,
                hash: None,
                prev: if i == 0 { NIL } else { i as u32 - 1 },
                next: if i + 1 == num_blocks {
                    NIL
                } else {
                    i as u32 + 1
                },
                in_free: true,
            })
            .collect();
        BlockManager {
            block_size,
            blocks,
            free_head: 0,
            free_tail: num_blocks as u32 - 1,
            num_free: num_blocks,
            cached: HashMap::with_capacity(num_blocks),
            caching,
            events: None,
        }
    }

    pub fn enable_events(&mut self) {
        self.events = Some(Vec::new());
    }

    pub fn drain_events(&mut self) -> Vec<CacheEvent> {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    pub fn num_free(&self) -> usize {
        self.num_free
    }

    pub fn caching(&self) -> bool {
        self.caching
    }

    /// Fraction of blocks in use (cached-but-free blocks count as free), as vLLM reports.
    pub fn usage(&self) -> f64 {
        1.0 - self.num_free as f64 / self.blocks.len() as f64
    }

    /// Blocks needed to hold `num_tokens`.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// Extend `seq.hashes` over every full block of `tokens` not hashed yet.
    pub fn update_hashes(&self, seq: &mut SeqBlocks, tokens: &[u32]) {
        let full = tokens.len() / self.block_size;
        while seq.hashes.len() < full {
            let i = seq.hashes.len();
            let parent = i
                .checked_sub(1)
                .map(|p| seq.hashes[p])
                .or(seq.lora.as_ref().map(|a| a.salt));
            let chunk = &tokens[i * self.block_size..(i + 1) * self.block_size];
            seq.hashes.push(block_hash(parent, chunk));
        }
    }

    /// The longest run of cached blocks matching `hashes` from the start, leaving at least
    /// the last of `num_tokens` to compute (a step must compute something to sample).
    pub fn find_cached_prefix(&self, hashes: &[u64], num_tokens: usize, out: &mut Vec<BlockId>) {
        out.clear();
        if !self.caching || num_tokens == 0 {
            return;
        }
        let max_blocks = (num_tokens - 1) / self.block_size;
        for h in hashes.iter().take(max_blocks) {
            match self.cached.get(h) {
                Some(&b) => out.push(b),
                None => break,
            }
        }
    }

    /// Give `seq` enough blocks for `total_tokens`, first taking the cache hits `hits`
    /// (which must extend an empty `seq`). Returns false, changing nothing, when there are
    /// not enough free blocks.
    pub fn allocate(&mut self, seq: &mut SeqBlocks, hits: &[BlockId], total_tokens: usize) -> bool {
        let have = seq.ids.len() + hits.len();
        let need = self.blocks_for(total_tokens).saturating_sub(have);
        let hits_free = hits
            .iter()
            .filter(|&&b| self.blocks[b as usize].ref_cnt == 0)
            .count();
        if need + hits_free > self.num_free {
            return false;
        }
        for &b in hits {
            self.touch(b);
            seq.ids.push(b);
        }
        if !hits.is_empty() {
            // Hits are already cached blocks: they extend an empty sequence.
            seq.num_cached = seq.ids.len();
        }
        for _ in 0..need {
            let b = self.pop_free();
            seq.ids.push(b);
        }
        true
    }

    /// Register the full blocks among the first `num_computed` tokens in the prefix cache.
    pub fn cache_full_blocks(&mut self, seq: &mut SeqBlocks, tokens: &[u32], num_computed: usize) {
        if !self.caching {
            return;
        }
        let full = (num_computed / self.block_size).min(seq.ids.len());
        if full <= seq.num_cached {
            return;
        }
        self.update_hashes(seq, &tokens[..full * self.block_size]);
        for i in seq.num_cached..full {
            let h = seq.hashes[i];
            let b = seq.ids[i];
            if self.cached.contains_key(&h) {
                // Same content already cached in another block: keep this one private.
                continue;
            }
            self.cached.insert(h, b);
            self.blocks[b as usize].hash = Some(h);
            if let Some(ev) = self.events.as_mut() {
                let parent = i.checked_sub(1).map(|p| seq.hashes[p]);
                let chunk = tokens[i * self.block_size..(i + 1) * self.block_size].to_vec();
                ev.push(CacheEvent::Stored {
                    hash: h,
                    parent,
                    tokens: chunk,
                    lora: seq.lora.clone(),
                });
            }
        }
        seq.num_cached = full;
    }

    /// Fill free blocks with content that came from outside (an offloading tier) and
    /// register them in the prefix cache as free, cached blocks, as if a sequence had
    /// computed and released them: `hashes` are consecutive full blocks continuing the
    /// chain after `parent`, `tokens` their tokens. A request admitted next finds them as
    /// an ordinary prefix hit. Returns the blocks (in order), for the caller to write
    /// their KV; `None`, changing nothing, when caching is off, a hash is already cached,
    /// or there are not enough free blocks.
    pub fn import_cached(
        &mut self,
        hashes: &[u64],
        parent: Option<u64>,
        tokens: &[u32],
    ) -> Option<Vec<BlockId>> {
        if !self.caching
            || hashes.is_empty()
            || tokens.len() != hashes.len() * self.block_size
            || hashes.len() > self.num_free
            || hashes.iter().any(|h| self.cached.contains_key(h))
        {
            return None;
        }
        // Take them all first, so none of the new blocks is itself evicted.
        let ids: Vec<BlockId> = (0..hashes.len()).map(|_| self.pop_free()).collect();
        for (i, (&b, &h)) in ids.iter().zip(hashes).enumerate() {
            self.cached.insert(h, b);
            let blk = &mut self.blocks[b as usize];
            blk.hash = Some(h);
            blk.ref_cnt = 0;
            self.push_free_back(b);
            if let Some(ev) = self.events.as_mut() {
                let parent = if i == 0 { parent } else { Some(hashes[i - 1]) };
                let chunk = tokens[i * self.block_size..(i + 1) * self.block_size].to_vec();
                ev.push(CacheEvent::Stored {
                    hash: h,
                    parent,
                    tokens: chunk,
                    lora: None,
                });
            }
        }
        Some(ids)
    }

    /// `n` free blocks, each taken with reference count 1 (hashless until registered
    /// by [`Self::cache_full_blocks`]); `None`, changing nothing, unless `n + headroom`
    /// are free.
    pub fn allocate_fresh(&mut self, n: usize, headroom: usize) -> Option<Vec<BlockId>> {
        if n.saturating_add(headroom) > self.num_free {
            return None;
        }
        Some((0..n).map(|_| self.pop_free()).collect())
    }

    /// Take free, cached blocks back out of the prefix cache (content that was imported
    /// but could not be written).
    pub fn forget(&mut self, ids: &[BlockId]) {
        for &b in ids {
            let blk = &mut self.blocks[b as usize];
            if blk.ref_cnt != 0 {
                continue;
            }
            if let Some(h) = blk.hash.take() {
                if self.cached.get(&h) == Some(&b) {
                    self.cached.remove(&h);
                    if let Some(ev) = self.events.as_mut() {
                        ev.push(CacheEvent::Removed { hash: h });
                    }
                }
                // Without a hash it is reused first.
                self.unlink(b);
                self.push_free_front(b);
            }
        }
    }

    /// Take the blocks of `seq` from index `first` on out of the prefix cache (their
    /// content was registered but never computed: the step that would have written it
    /// failed).
    pub fn uncache_from(&mut self, seq: &mut SeqBlocks, first: usize) {
        for &b in seq.ids.iter().skip(first) {
            let Some(h) = self.blocks[b as usize].hash else {
                continue;
            };
            if self.cached.get(&h) == Some(&b) {
                self.cached.remove(&h);
                self.blocks[b as usize].hash = None;
                if let Some(ev) = self.events.as_mut() {
                    ev.push(CacheEvent::Removed { hash: h });
                }
            }
        }
        seq.num_cached = seq.num_cached.min(first);
    }

    /// Release a sequence's blocks, tail first, so its last blocks are evicted first.
    pub fn free(&mut self, seq: &mut SeqBlocks) {
        for &b in seq.ids.iter().rev() {
            let blk = &mut self.blocks[b as usize];
            debug_assert!(blk.ref_cnt > 0, "double free of block {b}");
            blk.ref_cnt = blk.ref_cnt.saturating_sub(1);
            if blk.ref_cnt == 0 {
                if blk.hash.is_some() {
                    self.push_free_back(b);
                } else {
                    self.push_free_front(b);
                }
            }
        }
        seq.clear();
    }

    /// Drop every cached hash (vLLM's `reset_prefix_cache`); refused (false) while any
    /// block is in use.
    pub fn reset_prefix_cache(&mut self) -> bool {
        if self.num_free != self.blocks.len() {
            return false;
        }
        self.cached.clear();
        for b in &mut self.blocks {
            b.hash = None;
        }
        if let Some(ev) = self.events.as_mut() {
            ev.push(CacheEvent::AllCleared);
        }
        true
    }

    fn touch(&mut self, b: BlockId) {
        if self.blocks[b as usize].ref_cnt == 0 {
            self.unlink(b);
        }
        self.blocks[b as usize].ref_cnt += 1;
    }

    fn pop_free(&mut self) -> BlockId {
        let b = self.free_head;
        debug_assert!(b != NIL);
        self.unlink(b);
        let blk = &mut self.blocks[b as usize];
        if let Some(h) = blk.hash.take() {
            if self.cached.get(&h) == Some(&b) {
                self.cached.remove(&h);
                if let Some(ev) = self.events.as_mut() {
                    ev.push(CacheEvent::Removed { hash: h });
                }
            }
        }
        self.blocks[b as usize].ref_cnt = 1;
        b
    }

    fn unlink(&mut self, b: BlockId) {
        let (prev, next) = {
            let blk = &self.blocks[b as usize];
            debug_assert!(blk.in_free);
            (blk.prev, blk.next)
        };
        if prev == NIL {
            self.free_head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.free_tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        let blk = &mut self.blocks[b as usize];
        blk.prev = NIL;
        blk.next = NIL;
        blk.in_free = false;
        self.num_free -= 1;
    }

    fn push_free_back(&mut self, b: BlockId) {
        let tail = self.free_tail;
        {
            let blk = &mut self.blocks[b as usize];
            blk.prev = tail;
            blk.next = NIL;
            blk.in_free = true;
        }
        if tail == NIL {
            self.free_head = b;
        } else {
            self.blocks[tail as usize].next = b;
        }
        self.free_tail = b;
        self.num_free += 1;
    }

    fn push_free_front(&mut self, b: BlockId) {
        let head = self.free_head;
        {
            let blk = &mut self.blocks[b as usize];
            blk.prev = NIL;
            blk.next = head;
            blk.in_free = true;
        }
        if head == NIL {
            self.free_tail = b;
        } else {
            self.blocks[head as usize].prev = b;
        }
        self.free_head = b;
        self.num_free += 1;
    }

    /// Reference count of a block (tests and invariant checks).
    pub fn ref_count(&self, b: BlockId) -> u32 {
        self.blocks[b as usize].ref_cnt
    }

    /// Panics with a description when an invariant is broken. `owners` is, for every
    /// live sequence, its block list: each block's reference count must equal the number
    /// of live sequences holding it.
    pub fn check_invariants<'a>(&self, owners: impl IntoIterator<Item = &'a SeqBlocks>) {
        let mut expected = vec![0u32; self.blocks.len()];
        for s in owners {
            for &b in &s.ids {
                expected[b as usize] += 1;
            }
        }
        let mut free_walk = 0usize;
        let mut cur = self.free_head;
        let mut prev = NIL;
        while cur != NIL {
            let blk = &self.blocks[cur as usize];
            assert!(
                blk.in_free && blk.ref_cnt == 0,
                "block {cur} in free list with ref {}",
                blk.ref_cnt
            );
            assert_eq!(blk.prev, prev, "broken free list links at {cur}");
            free_walk += 1;
            assert!(free_walk <= self.blocks.len(), "free list cycle");
            prev = cur;
            cur = blk.next;
        }
        assert_eq!(prev, self.free_tail, "free tail mismatch");
        assert_eq!(free_walk, self.num_free, "num_free mismatch");
        for (i, blk) in self.blocks.iter().enumerate() {
            assert_eq!(blk.ref_cnt, expected[i], "block {i} ref count");
            assert_eq!(blk.in_free, blk.ref_cnt == 0, "block {i} free flag");
        }
        for (h, &b) in &self.cached {
            assert_eq!(
                self.blocks[b as usize].hash,
                Some(*h),
                "cache map points at block {b} without its hash"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn imported_blocks_are_cached_free_blocks_a_request_hits() {
        let mut bm = BlockManager::new(8, 4, true);
        bm.enable_events();
        let tokens: Vec<u32> = (0..12).collect();
        let mut seq = SeqBlocks::default();
        bm.update_hashes(&mut seq, &tokens);
        let ids = bm
            .import_cached(&seq.hashes[..2], None, &tokens[..8])
            .expect("imported");
        assert_eq!(ids.len(), 2);
        assert_eq!(bm.num_free(), 8, "imported blocks are free, cached");
        let mut hits = Vec::new();
        bm.find_cached_prefix(&seq.hashes, tokens.len(), &mut hits);
        assert_eq!(hits, ids);
        assert!(
            bm.import_cached(&seq.hashes[..1], None, &tokens[..4])
                .is_none(),
            "already cached"
        );
        let stored = bm
            .drain_events()
            .into_iter()
            .filter(|e| matches!(e, CacheEvent::Stored { .. }))
            .count();
        assert_eq!(stored, 2);
        bm.forget(&ids);
        bm.find_cached_prefix(&seq.hashes, tokens.len(), &mut hits);
        assert!(hits.is_empty());
        bm.check_invariants(std::iter::empty());
        assert!(
            bm.import_cached(&[1; 9], None, &[0; 36]).is_none(),
            "more than the pool"
        );
    }

    use super::*;

    fn toks(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32)
            .map(|i| i.wrapping_mul(7).wrapping_add(salt))
            .collect()
    }

    #[test]
    fn prefix_hit_after_free_then_eviction_in_lru_order() {
        let mut bm = BlockManager::new(8, 4, true);
        let t = toks(12, 1);
        let mut a = SeqBlocks::default();
        bm.update_hashes(&mut a, &t);
        assert!(bm.allocate(&mut a, &[], 12));
        bm.cache_full_blocks(&mut a, &t, 12);
        let hashes = a.hashes.clone();
        bm.free(&mut a);
        bm.check_invariants([]);
        // All 12 tokens cached, but the last token must be recomputed: 2 blocks hit.
        let mut hits = Vec::new();
        bm.find_cached_prefix(&hashes, 12, &mut hits);
        assert_eq!(hits.len(), 2);
        let mut b = SeqBlocks::default();
        assert!(bm.allocate(&mut b, &hits, 12));
        assert_eq!(&b.ids[..2], &hits[..]);
        bm.check_invariants([&b]);
        bm.free(&mut b);
        // Fill the pool: the cached blocks are evicted and no longer found.
        let mut c = SeqBlocks::default();
        assert!(bm.allocate(&mut c, &[], 32));
        assert!(!bm.allocate(&mut SeqBlocks::default(), &[], 1));
        bm.find_cached_prefix(&hashes, 12, &mut hits);
        assert!(hits.is_empty());
        bm.check_invariants([&c]);
    }

    #[test]
    fn shared_blocks_are_reference_counted() {
        let mut bm = BlockManager::new(6, 2, true);
        let t = toks(4, 9);
        let mut a = SeqBlocks::default();
        bm.update_hashes(&mut a, &t);
        assert!(bm.allocate(&mut a, &[], 4));
        bm.cache_full_blocks(&mut a, &t, 4);
        let mut hits = Vec::new();
        let mut t2 = t.clone();
        t2.push(99);
        let mut b = SeqBlocks::default();
        bm.update_hashes(&mut b, &t2);
        bm.find_cached_prefix(&b.hashes, 5, &mut hits);
        assert_eq!(hits.len(), 2);
        assert!(bm.allocate(&mut b, &hits, 5));
        assert_eq!(bm.ref_count(hits[0]), 2);
        bm.check_invariants([&a, &b]);
        bm.free(&mut a);
        assert_eq!(bm.ref_count(hits[0]), 1);
        bm.free(&mut b);
        bm.check_invariants([]);
        assert_eq!(bm.num_free(), 6);
    }

    #[test]
    fn failed_allocation_changes_nothing() {
        let mut bm = BlockManager::new(2, 4, true);
        let mut a = SeqBlocks::default();
        assert!(!bm.allocate(&mut a, &[], 9));
        assert!(a.ids.is_empty());
        assert_eq!(bm.num_free(), 2);
        bm.check_invariants([]);
    }

    #[test]
    fn events_record_stores_and_evictions() {
        let mut bm = BlockManager::new(2, 2, true);
        bm.enable_events();
        let t = toks(4, 3);
        let mut a = SeqBlocks::default();
        assert!(bm.allocate(&mut a, &[], 4));
        bm.cache_full_blocks(&mut a, &t, 4);
        bm.free(&mut a);
        let ev = bm.drain_events();
        assert_eq!(ev.len(), 2);
        assert!(
            matches!(&ev[1], CacheEvent::Stored { parent: Some(_), tokens, .. } if tokens == &t[2..4])
        );
        let other = toks(4, 100);
        let mut b = SeqBlocks::default();
        assert!(bm.allocate(&mut b, &[], 4));
        bm.cache_full_blocks(&mut b, &other, 4);
        let ev = bm.drain_events();
        assert_eq!(
            ev.iter()
                .filter(|e| matches!(e, CacheEvent::Removed { .. }))
                .count(),
            2
        );
    }
}
