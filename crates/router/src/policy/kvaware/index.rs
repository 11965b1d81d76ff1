//! The KV-cache index behind `kvaware` routing: which engines hold which blocks of tokens,
//! as their KV-cache events say.
//!
//! Blocks are keyed by a *content hash* computed here from each event's `token_ids`, chained
//! from the parent block's content hash with the engine's own function
//! ([`kv_events::hash::block_hash`]), so the router can hash a prompt's blocks itself
//! and every engine's blocks are comparable whatever hashes the engine uses (real vLLM's are
//! salted per process). The engine's hashes are opaque ids, kept per engine only to resolve
//! removals and parent links: `engine hash → (content hash, times stored)`.
//!
//! One map from content hash to the engines holding it serves every request: matching a
//! prompt of `n` blocks costs at most `n` lookups, whatever the number of engines.
//!
//! Semantics (the property test checks them against a naive model):
//! - `BlockStored`: each block's content hash is `block_hash(parent, tokens)`, the parent
//!   being the content hash of `parent_block_hash` on that engine (`None` starts a
//!   sequence). A store whose parent the engine is not known to hold, or whose tokens do not
//!   fill its blocks, is skipped (its blocks could never be matched from a prompt's start).
//!   Storing an id again counts it again (vLLM can cache two copies of a block).
//! - `BlockRemoved`: each id's count drops by one; unknown ids are ignored.
//! - `AllBlocksCleared`: the engine's blocks are dropped (it stays known, with its block
//!   size).
//! - An engine leaving: everything about it is dropped.
//!
//! A sequence stored under a LoRA adapter (`lora_name` in its first event) chains from
//! [`kv_events::hash::lora_salt`] of the name, so blocks of the same tokens under
//! different adapters (or none) never match each other, as in the engines' own caches; a
//! request for an adapter hashes its prompt from the same seed. vLLM's other
//! `extra_keys` (multimodal ids, cache salts) are not part of the content hash.
//!
//! Blocks an engine announces with `medium: "CPU"` (offloaded to host memory: loadable,
//! not computed) are kept apart under [`cpu_key`] of the engine, with the same semantics;
//! `AllBlocksCleared` (the paged cache's reset) leaves them.

use std::collections::HashMap;

use kv_events::hash::{block_hash, lora_salt};
use kv_events::{BlockStored, KvEvent};

/// An engine's identity in the index (its `Endpoint::key`).
pub type EngineKey = u64;

/// The key under which an engine's host-memory (`medium: "CPU"`) blocks are indexed.
pub fn cpu_key(engine: EngineKey) -> EngineKey {
    kv_events::hash::mix64(engine ^ 0x4350_5521_4350_5521)
}

fn is_cpu(medium: &Option<String>) -> bool {
    medium.as_deref() == Some(kv_events::MEDIUM_CPU)
}

#[derive(Debug, Default)]
struct EngineBlocks {
    /// The engine's block hash → (our content hash, times stored).
    ids: HashMap<u64, (u64, u32)>,
    /// Content hash → how many of the engine's ids map to it (present only when > 0).
    held: HashMap<u64, u32>,
    /// Tokens per block (from the engine's advertisement or its events).
    block_size: Option<usize>,
    /// This entry is an engine's host-memory blocks ([`cpu_key`]), not an engine.
    cpu: bool,
}

#[derive(Debug, Default)]
pub struct KvIndex {
    /// Content hash → the engines holding it (sorted, no duplicates).
    blocks: HashMap<u64, Vec<EngineKey>>,
    engines: HashMap<EngineKey, EngineBlocks>,
}

/// The chained content hashes of the full blocks of `tokens`.
pub fn prompt_hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
    seeded_prompt_hashes(tokens, block_size, None)
}

/// [`prompt_hashes`] of a prompt run under the LoRA adapter `lora` (its chain seeded
/// with [`kv_events::hash::lora_salt`], as the engine's and the index's are).
pub fn seeded_prompt_hashes(tokens: &[u32], block_size: usize, lora: Option<&str>) -> Vec<u64> {
    if block_size == 0 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(tokens.len() / block_size);
    let mut parent = lora.map(lora_salt);
    for chunk in tokens.chunks_exact(block_size) {
        let h = block_hash(parent, chunk);
        out.push(h);
        parent = Some(h);
    }
    out
}

impl KvIndex {
    /// Start following `engine` (it has an event stream); no-op when already known.
    pub fn attach(&mut self, engine: EngineKey) {
        self.engines.entry(engine).or_default();
    }

    /// Whether `engine` has an event stream the index follows.
    pub fn has_engine(&self, engine: EngineKey) -> bool {
        self.engines.contains_key(&engine)
    }

    pub fn set_block_size(&mut self, engine: EngineKey, block_size: usize) {
        if block_size > 0 {
            self.engines.entry(engine).or_default().block_size = Some(block_size);
        }
    }

    pub fn block_size(&self, engine: EngineKey) -> Option<usize> {
        self.engines.get(&engine).and_then(|e| e.block_size)
    }

    /// Distinct blocks (content hashes) held by any engine.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Distinct blocks `engine` holds.
    pub fn engine_blocks(&self, engine: EngineKey) -> usize {
        self.engines.get(&engine).map_or(0, |e| e.held.len())
    }

    /// The engines followed, in key order.
    pub fn engines(&self) -> Vec<EngineKey> {
        let mut v: Vec<_> = self
            .engines
            .iter()
            .filter(|(_, eb)| !eb.cpu)
            .map(|(k, _)| *k)
            .collect();
        v.sort_unstable();
        v
    }

    /// Apply one event of `engine`'s stream.
    pub fn apply(&mut self, engine: EngineKey, ev: &KvEvent) {
        match ev {
            KvEvent::BlockStored(s) if is_cpu(&s.medium) => {
                let k = cpu_key(engine);
                self.engines.entry(k).or_default().cpu = true;
                self.store(k, s)
            }
            KvEvent::BlockStored(s) => self.store(engine, s),
            KvEvent::BlockRemoved(r) if is_cpu(&r.medium) => {
                self.remove(cpu_key(engine), &r.block_hashes)
            }
            KvEvent::BlockRemoved(r) => self.remove(engine, &r.block_hashes),
            KvEvent::AllBlocksCleared => self.clear(engine),
        }
    }

    pub fn store(&mut self, engine: EngineKey, s: &BlockStored) {
        let eb = self.engines.entry(engine).or_default();
        let bs = match s.block_size as usize {
            0 => match eb.block_size {
                Some(b) => b,
                None => return,
            },
            b => {
                eb.block_size = Some(b);
                b
            }
        };
        if s.block_hashes.is_empty() || s.token_ids.len() != s.block_hashes.len() * bs {
            return;
        }
        let mut parent = match s.parent_block_hash {
            None => s.lora_name.as_deref().map(lora_salt),
            Some(p) => match eb.ids.get(&p) {
                Some(&(c, _)) => Some(c),
                None => return,
            },
        };
        for (id, tokens) in s.block_hashes.iter().zip(s.token_ids.chunks_exact(bs)) {
            let c = match eb.ids.get_mut(id) {
                Some((c, n)) => {
                    *n += 1;
                    *c
                }
                None => {
                    let c = block_hash(parent, tokens);
                    eb.ids.insert(*id, (c, 1));
                    let held = eb.held.entry(c).or_insert(0);
                    *held += 1;
                    if *held == 1 {
                        let v = self.blocks.entry(c).or_default();
                        if let Err(i) = v.binary_search(&engine) {
                            v.insert(i, engine);
                        }
                    }
                    c
                }
            };
            parent = Some(c);
        }
    }

    pub fn remove(&mut self, engine: EngineKey, ids: &[u64]) {
        let Some(eb) = self.engines.get_mut(&engine) else {
            return;
        };
        for id in ids {
            let Some((c, n)) = eb.ids.get_mut(id) else {
                continue;
            };
            *n -= 1;
            if *n > 0 {
                continue;
            }
            let c = *c;
            eb.ids.remove(id);
            let held = eb.held.get_mut(&c).expect("held counts every id");
            *held -= 1;
            if *held == 0 {
                eb.held.remove(&c);
                drop_holder(&mut self.blocks, c, engine);
            }
        }
    }

    /// `AllBlocksCleared`: drop the engine's blocks, keep following it.
    pub fn clear(&mut self, engine: EngineKey) {
        let Some(eb) = self.engines.get_mut(&engine) else {
            return;
        };
        for (c, _) in eb.held.drain() {
            drop_holder(&mut self.blocks, c, engine);
        }
        eb.ids.clear();
    }

    /// Drop what is known of `engine`, its host-memory blocks included (a new stream or a
    /// restart: its replay says it all again).
    pub fn clear_all(&mut self, engine: EngineKey) {
        self.clear(engine);
        self.clear(cpu_key(engine));
    }

    /// The engine left: forget it entirely.
    pub fn remove_engine(&mut self, engine: EngineKey) {
        for k in [engine, cpu_key(engine)] {
            self.clear(k);
            self.engines.remove(&k);
        }
    }

    /// For each of `engines`, how many leading blocks of `hashes` it holds.
    pub fn matched(&self, hashes: &[u64], engines: &[EngineKey], out: &mut Vec<usize>) {
        out.clear();
        out.resize(engines.len(), 0);
        let mut alive: Vec<usize> = (0..engines.len()).collect();
        for (i, h) in hashes.iter().enumerate() {
            let Some(holders) = self.blocks.get(h) else {
                break;
            };
            alive.retain(|&k| holders.binary_search(&engines[k]).is_ok());
            if alive.is_empty() {
                break;
            }
            for &k in &alive {
                out[k] = i + 1;
            }
        }
    }

    /// Check the internal maps agree (tests).
    pub fn check(&self) {
        let mut expect: HashMap<u64, Vec<EngineKey>> = HashMap::new();
        for (&k, eb) in &self.engines {
            let mut held: HashMap<u64, u32> = HashMap::new();
            for &(c, n) in eb.ids.values() {
                assert!(n > 0);
                *held.entry(c).or_default() += 1;
            }
            assert_eq!(held, eb.held, "engine {k}: held counts");
            for &c in eb.held.keys() {
                expect.entry(c).or_default().push(k);
            }
        }
        for v in expect.values_mut() {
            v.sort_unstable();
        }
        assert_eq!(expect, self.blocks, "block → engines");
    }
}

fn drop_holder(blocks: &mut HashMap<u64, Vec<EngineKey>>, c: u64, engine: EngineKey) {
    if let Some(v) = blocks.get_mut(&c) {
        if let Ok(i) = v.binary_search(&engine) {
            v.remove(i);
        }
        if v.is_empty() {
            blocks.remove(&c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_events::BlockRemoved;
    use proptest::prelude::*;
    use std::collections::HashSet;

    const BS: usize = 4;

    fn stored(ids: Vec<u64>, parent: Option<u64>, tokens: Vec<u32>) -> KvEvent {
        KvEvent::BlockStored(BlockStored::new(ids, parent, tokens, BS))
    }

    #[test]
    fn sim_engine_hashes_equal_content_hashes() {
        // A Switchyard engine's block hashes are the content hashes themselves.
        let tokens: Vec<u32> = (0..12).collect();
        let engine_hashes = prompt_hashes(&tokens, BS);
        let mut idx = KvIndex::default();
        idx.apply(
            1,
            &stored(engine_hashes[..2].to_vec(), None, tokens[..8].to_vec()),
        );
        idx.apply(
            1,
            &stored(
                engine_hashes[2..].to_vec(),
                Some(engine_hashes[1]),
                tokens[8..].to_vec(),
            ),
        );
        let mut m = Vec::new();
        idx.matched(&engine_hashes, &[1, 2], &mut m);
        assert_eq!(m, [3, 0]);
        assert_eq!(idx.block_size(1), Some(BS));
        // Opaque ids (vLLM's salted hashes) index the same content.
        idx.apply(2, &stored(vec![77, 78], None, tokens[..8].to_vec()));
        idx.matched(&engine_hashes, &[1, 2], &mut m);
        assert_eq!(m, [3, 2]);
        assert_eq!(idx.blocks(), 3);
        // Removing the middle block cuts the match there.
        idx.apply(
            1,
            &KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![engine_hashes[1]],
                medium: None,
                group_idx: None,
            }),
        );
        idx.matched(&engine_hashes, &[1, 2], &mut m);
        assert_eq!(m, [1, 2]);
        idx.apply(2, &KvEvent::AllBlocksCleared);
        idx.matched(&engine_hashes, &[1, 2], &mut m);
        assert_eq!(m, [1, 0]);
        assert!(idx.has_engine(2));
        idx.remove_engine(1);
        assert!(!idx.has_engine(1));
        assert_eq!(idx.blocks(), 0);
        idx.check();
    }

    #[test]
    fn stores_with_unknown_parents_or_ragged_tokens_are_skipped() {
        let mut idx = KvIndex::default();
        idx.apply(1, &stored(vec![5], Some(99), vec![1, 2, 3, 4]));
        idx.apply(1, &stored(vec![6, 7], None, vec![1, 2, 3, 4, 5]));
        assert_eq!(idx.blocks(), 0);
        idx.check();
    }

    // ------------------------------------------------------------------------------
    // Property test: the index against a naive model.

    /// The naive model: per engine, id → (content, count); everything else derived by
    /// scanning.
    #[derive(Default, Clone)]
    struct Naive {
        engines: HashMap<EngineKey, HashMap<u64, (u64, u32)>>,
    }

    impl Naive {
        fn store(&mut self, e: EngineKey, ids: &[u64], parent: Option<u64>, tokens: &[u32]) {
            let m = self.engines.entry(e).or_default();
            if tokens.len() != ids.len() * BS {
                return;
            }
            let mut p = match parent {
                None => None,
                Some(p) => match m.get(&p) {
                    Some(&(c, _)) => Some(c),
                    None => return,
                },
            };
            for (i, id) in ids.iter().enumerate() {
                let c = m
                    .get(id)
                    .map(|x| x.0)
                    .unwrap_or_else(|| block_hash(p, &tokens[i * BS..(i + 1) * BS]));
                m.entry(*id).or_insert((c, 0)).1 += 1;
                p = Some(c);
            }
        }
        fn remove(&mut self, e: EngineKey, id: u64) {
            if let Some(m) = self.engines.get_mut(&e) {
                if let Some(x) = m.get_mut(&id) {
                    x.1 -= 1;
                    if x.1 == 0 {
                        m.remove(&id);
                    }
                }
            }
        }
        fn holds(&self, e: EngineKey, c: u64) -> bool {
            self.engines
                .get(&e)
                .is_some_and(|m| m.values().any(|x| x.0 == c))
        }
        fn matched(&self, hashes: &[u64], e: EngineKey) -> usize {
            hashes.iter().take_while(|&&h| self.holds(e, h)).count()
        }
        fn distinct(&self) -> usize {
            let s: HashSet<u64> = self
                .engines
                .values()
                .flat_map(|m| m.values().map(|x| x.0))
                .collect();
            s.len()
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Engine, document, first block, number of blocks, whether ids are opaque.
        Store(u64, usize, usize, usize, bool),
        /// Engine, document, block (its id under both id schemes is removed).
        Remove(u64, usize, usize, bool),
        RemoveUnknown(u64, u64),
        Clear(u64),
        Leave(u64),
    }

    const DOCS: usize = 3;
    const DOC_BLOCKS: usize = 6;
    const ENGINES: u64 = 3;

    fn docs() -> Vec<Vec<u32>> {
        // Documents 0 and 1 share their first two blocks, so engines share blocks.
        let mut d: Vec<Vec<u32>> = (0..DOCS)
            .map(|k| {
                (0..DOC_BLOCKS * BS)
                    .map(|i| (k * 1000 + i) as u32)
                    .collect()
            })
            .collect();
        let shared = d[0][..2 * BS].to_vec();
        d[1][..2 * BS].copy_from_slice(&shared);
        d
    }

    /// The engine's id for a block: the content hash itself (Switchyard) or an opaque,
    /// engine-salted value (vLLM), per the op's flag.
    fn id_of(e: u64, content: u64, opaque: bool) -> u64 {
        if opaque {
            kv_events::hash::mix64(content ^ e.wrapping_mul(0x1234_5678_9abc_def1))
        } else {
            content
        }
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..ENGINES, 0..DOCS, 0..DOC_BLOCKS, 1..4usize, any::<bool>())
                .prop_map(|(e, d, b, n, o)| Op::Store(e, d, b, n, o)),
            3 => (0..ENGINES, 0..DOCS, 0..DOC_BLOCKS, any::<bool>())
                .prop_map(|(e, d, b, o)| Op::Remove(e, d, b, o)),
            1 => (0..ENGINES, any::<u64>()).prop_map(|(e, h)| Op::RemoveUnknown(e, h)),
            1 => (0..ENGINES).prop_map(Op::Clear),
            1 => (0..ENGINES).prop_map(Op::Leave),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn index_matches_naive_model(ops in proptest::collection::vec(op(), 1..80)) {
            let docs = docs();
            let content: Vec<Vec<u64>> = docs.iter().map(|d| prompt_hashes(d, BS)).collect();
            let mut idx = KvIndex::default();
            let mut naive = Naive::default();
            for op in ops {
                match op {
                    Op::Store(e, d, b, n, opaque) => {
                        let end = (b + n).min(DOC_BLOCKS);
                        let ids: Vec<u64> =
                            (b..end).map(|k| id_of(e, content[d][k], opaque)).collect();
                        let parent = (b > 0).then(|| id_of(e, content[d][b - 1], opaque));
                        let tokens = docs[d][b * BS..end * BS].to_vec();
                        naive.store(e, &ids, parent, &tokens);
                        idx.apply(e, &stored(ids, parent, tokens));
                    }
                    Op::Remove(e, d, b, opaque) => {
                        let id = id_of(e, content[d][b], opaque);
                        naive.remove(e, id);
                        idx.apply(e, &KvEvent::BlockRemoved(BlockRemoved {
                            block_hashes: vec![id], medium: None, group_idx: None,
                        }));
                    }
                    Op::RemoveUnknown(e, h) => {
                        naive.remove(e, h);
                        idx.remove(e, &[h]);
                    }
                    Op::Clear(e) => {
                        naive.engines.remove(&e);
                        idx.apply(e, &KvEvent::AllBlocksCleared);
                    }
                    Op::Leave(e) => {
                        naive.engines.remove(&e);
                        idx.remove_engine(e);
                    }
                }
                idx.check();
                prop_assert_eq!(idx.blocks(), naive.distinct());
                let engines: Vec<u64> = (0..ENGINES).collect();
                let mut m = Vec::new();
                for hashes in &content {
                    idx.matched(hashes, &engines, &mut m);
                    for (k, &e) in engines.iter().enumerate() {
                        prop_assert_eq!(m[k], naive.matched(hashes, e), "engine {}", e);
                    }
                }
            }
        }
    }
}
