//! Shared helpers: the case runner, prompt composition, the KV-content model and the
//! block-accounting assertions, and the zero-latency sim backend.

use std::collections::HashSet;
use std::fmt::Debug;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use switchyard_engine::backend::sim::{Latency, SimBackend};
use switchyard_engine::core::block_manager::{BlockId, BlockManager};

/// Run `cases` random cases of `test` (panics count as failures and are shrunk).
pub fn run_cases<S>(cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
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
pub fn compose(bases: &[Vec<u32>], base: usize, prefix: usize, suffix: &[u32]) -> Vec<u32> {
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
pub fn clamp_to_fit(prompt: &mut Vec<u32>, max_tokens: &mut usize, capacity: usize) {
    if prompt.len() + *max_tokens > capacity + 1 {
        let keep = (capacity + 1).saturating_sub(*max_tokens).max(1);
        prompt.truncate(keep);
        *max_tokens = (*max_tokens).min(capacity + 1 - prompt.len());
    }
    assert!(!prompt.is_empty() && *max_tokens >= 1);
}

/// The KV cache's content as the tests believe it: one slot per token position.
pub struct KvModel {
    bs: usize,
    slots: Vec<Vec<Option<u32>>>,
}

impl KvModel {
    pub fn new(num_blocks: usize, bs: usize) -> Self {
        KvModel {
            bs,
            slots: vec![vec![None; bs]; num_blocks],
        }
    }

    /// Positions `[0, upto)` of a sequence must hold its tokens.
    pub fn check(&self, what: &str, ids: &[BlockId], tokens: &[u32], upto: usize) {
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
    pub fn write(
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
    pub fn write_shared(
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

pub fn assert_no_duplicates(ids: &[BlockId]) {
    let set: HashSet<_> = ids.iter().collect();
    assert_eq!(
        set.len(),
        ids.len(),
        "a sequence holds a block twice: {ids:?}"
    );
}

pub fn assert_all_free(bm: &BlockManager) {
    bm.check_invariants([]);
    assert_eq!(bm.num_free(), bm.num_blocks(), "blocks leaked");
    for b in 0..bm.num_blocks() as BlockId {
        assert_eq!(bm.ref_count(b), 0, "block {b} still referenced");
    }
}

pub fn zero_latency_sim(eos_prob: f64) -> SimBackend {
    SimBackend::new(Latency::preset("zero").expect("zero preset"), 1.0, eos_prob)
}
