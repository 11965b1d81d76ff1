//! Prefix-aware routing in SGLang's cache-aware manner: an approximate prefix tree per
//! model remembers which engine each prompt went to, and a request follows the engine
//! holding the longest prefix of its prompt when that prefix is long enough and the
//! pool is balanced; otherwise it goes to the least loaded engine.
//!
//! Per request, with `m` the longest prefix any candidate holds and `loads` the
//! candidates' requests in flight at this router:
//! 1. Imbalanced (`max - min > balance_abs` and `max > min × balance_rel`): least load.
//! 2. `m > match_threshold × prompt length`: the engines holding `m`, least loaded first.
//! 3. Otherwise (a miss): least load. Never random: ties in load go to the engine holding
//!    the least of the tree (so new conversations spread), then to candidate order.
//!
//! The rest of the ranking (the failover order) follows the same keys. The prompt is
//! recorded for the first-ranked engine at rank time (the one the proxy tries first), as
//! SGLang does. Memory is bounded: beyond `max_chars` (text bytes plus bookkeeping, all
//! models together) the least recently used leaves are evicted, from the model whose
//! oldest leaf is oldest. Without a prompt (or an empty one): least load, nothing stored.
//!
//! Metrics (rendered by [`Policy::render_metrics`] while this is the routing logic):
//! decisions per [`Outcome`] and the share of the prompt the chosen engine held (the
//! shared [`Decisions`]), and the trees' size. Updating them is a few relaxed atomics per
//! request; the node count is summed only at `/metrics` time. The tree itself is
//! [`tree`].

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use protocol::prom::TextWriter;

pub mod tree;

use super::decisions::{self, Decisions, Family};
use super::{by_load, load_key, Policy, RouteCtx};
use crate::config::PrefixSettings;
use crate::engines::Endpoint;
use tree::{PrefixTree, Tenant};

type Tree = Arc<Mutex<PrefixTree>>;

#[derive(Debug)]
pub struct PrefixAware {
    cfg: PrefixSettings,
    /// One tree per model, each behind its own lock (models never contend).
    trees: RwLock<HashMap<String, Tree>>,
    /// Bytes held by all trees together.
    total: AtomicUsize,
    /// Logical time for LRU order, shared by all trees so their leaves compare.
    clock: AtomicU64,
    /// Decisions by outcome, and the matched prefix of the first-ranked engine / prompt
    /// length (requests with a prompt).
    stats: Decisions<Outcome, 4>,
}

/// What the policy decided for one request (for tests and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Followed the engine(s) holding the longest prefix.
    CacheHit,
    /// The match was too short: least load.
    Miss,
    /// The pool was imbalanced: least load.
    Imbalanced,
    /// No prompt text: least load, nothing recorded.
    NoPrompt,
}

impl decisions::Outcome for Outcome {
    const ALL: &'static [Outcome] = &[
        Outcome::CacheHit,
        Outcome::Miss,
        Outcome::Imbalanced,
        Outcome::NoPrompt,
    ];

    const FAMILY: Family = Family {
        decisions: "vllm:router_prefix_decisions_total",
        decisions_help: "prefixaware routing decisions by outcome",
        ratio: "vllm:router_prefix_matched_prefix_ratio",
        ratio_help: "Fraction of the prompt the chosen engine was sent before (prefixaware)",
    };

    fn label(self) -> &'static str {
        match self {
            Outcome::CacheHit => "cache_hit",
            Outcome::Miss => "miss",
            Outcome::Imbalanced => "imbalanced",
            Outcome::NoPrompt => "no_prompt",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

fn lock(t: &Tree) -> std::sync::MutexGuard<'_, PrefixTree> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

impl PrefixAware {
    pub fn new(cfg: PrefixSettings) -> Self {
        PrefixAware {
            cfg,
            trees: RwLock::new(HashMap::new()),
            total: AtomicUsize::new(0),
            clock: AtomicU64::new(1),
            stats: Decisions::default(),
        }
    }

    /// Decisions so far with this outcome.
    pub fn decisions(&self, outcome: Outcome) -> u64 {
        self.stats.count(outcome)
    }

    /// Live nodes in the trees of all models (locks each tree in turn).
    pub fn stored_nodes(&self) -> usize {
        let trees: Vec<Tree> = self
            .trees
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        trees.iter().map(|t| lock(t).nodes()).sum()
    }

    /// Bytes held by the trees of all models.
    pub fn stored_bytes(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    fn tree(&self, model: &str) -> Tree {
        if let Some(t) = self
            .trees
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
        {
            return t.clone();
        }
        self.trees
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(model.to_string())
            .or_default()
            .clone()
    }

    /// Rank and say why (the `Policy::rank` body); counts the decision.
    pub fn decide(
        &self,
        ctx: &RouteCtx<'_>,
        candidates: &[Arc<Endpoint>],
        order: &mut Vec<usize>,
    ) -> Outcome {
        let outcome = self.decide_inner(ctx, candidates, order);
        self.stats.record(outcome);
        outcome
    }

    fn decide_inner(
        &self,
        ctx: &RouteCtx<'_>,
        candidates: &[Arc<Endpoint>],
        order: &mut Vec<usize>,
    ) -> Outcome {
        let text = match ctx.prompt() {
            Some(t) if !t.is_empty() && !candidates.is_empty() => t.as_bytes(),
            _ => {
                by_load(candidates, order);
                return Outcome::NoPrompt;
            }
        };
        let loads: Vec<(u64, u64)> = candidates.iter().map(|e| load_key(e)).collect();
        let min = loads.iter().map(|l| l.0).min().unwrap_or(0);
        let max = loads.iter().map(|l| l.0).max().unwrap_or(0);
        let imbalanced =
            max - min > self.cfg.balance_abs && max as f64 > min as f64 * self.cfg.balance_rel;

        let tree = self.tree(ctx.model);
        let mut held: Vec<(Tenant, usize)> = Vec::with_capacity(candidates.len());
        let (outcome, over, ratio) = {
            let mut t = lock(&tree);
            // Taken under the lock, so each tree sees its times in order.
            let now = self.clock.fetch_add(1, Ordering::Relaxed);
            t.match_tenants(text, &mut held);
            let matched: Vec<usize> = candidates
                .iter()
                .map(|e| {
                    held.iter()
                        .find(|(k, _)| *k == e.key)
                        .map_or(0, |&(_, n)| n)
                })
                .collect();
            let share: Vec<usize> = candidates.iter().map(|e| t.held(e.key)).collect();
            let best = matched.iter().copied().max().unwrap_or(0);
            let outcome = if imbalanced {
                Outcome::Imbalanced
            } else if best as f64 > self.cfg.match_threshold * text.len() as f64 {
                Outcome::CacheHit
            } else {
                Outcome::Miss
            };
            order.clear();
            order.extend(0..candidates.len());
            if outcome == Outcome::CacheHit {
                order.sort_by_key(|&i| (Reverse(matched[i]), loads[i], share[i]));
            } else {
                order.sort_by_key(|&i| (loads[i], share[i], Reverse(matched[i])));
            }
            let ratio = matched[order[0]] as f64 / text.len() as f64;
            let grew = t.insert(text, candidates[order[0]].key, now);
            // Counted before the lock is released, so no eviction can subtract it first.
            let total = self.total.fetch_add(grew, Ordering::Relaxed) + grew;
            (outcome, total > self.cfg.max_chars, ratio)
        };
        self.stats.matched_ratio.observe(ratio);
        if over {
            self.evict();
        }
        outcome
    }

    /// Evict least recently used leaves until the trees hold at most a little under the
    /// cap (the slack amortizes the sweep), taking from the model whose oldest leaf is
    /// oldest. Locks one tree at a time.
    fn evict(&self) {
        let cap = self.cfg.max_chars;
        let low = cap - cap / 32;
        while self.total.load(Ordering::Relaxed) > cap {
            let trees: Vec<Tree> = self
                .trees
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned()
                .collect();
            let mut oldest: Vec<(u64, &Tree)> = trees
                .iter()
                .filter_map(|t| lock(t).oldest().map(|o| (o, t)))
                .collect();
            oldest.sort_by_key(|&(o, _)| o);
            let Some(&(_, victim)) = oldest.first() else {
                return;
            };
            // Stop taking from the victim once its oldest is newer than the runner-up's.
            let until = oldest.get(1).map_or(u64::MAX, |&(o, _)| o);
            let mut t = lock(victim);
            while self.total.load(Ordering::Relaxed) > low && t.oldest().is_some_and(|o| o <= until)
            {
                let freed = t.evict_lru();
                self.total.fetch_sub(freed, Ordering::Relaxed);
            }
        }
    }
}

impl Policy for PrefixAware {
    fn name(&self) -> &'static str {
        "prefixaware"
    }

    fn decisions(&self) -> Vec<(&'static str, u64)> {
        self.stats.counts()
    }

    fn rank(&self, ctx: &RouteCtx<'_>, candidates: &[Arc<Endpoint>], order: &mut Vec<usize>) {
        self.decide(ctx, candidates, order);
    }

    fn render_metrics(&self, w: &mut TextWriter) {
        self.stats.render(w);
        const B: &str = "vllm:router_prefix_tree_bytes";
        w.header(
            B,
            "gauge",
            "Memory charged to the prefix trees (text plus bookkeeping), all models",
        );
        w.sample(B, &[], self.stored_bytes() as f64);
        const N: &str = "vllm:router_prefix_tree_nodes";
        w.header(N, "gauge", "Nodes in the prefix trees, all models");
        w.sample(N, &[], self.stored_nodes() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::engines;

    fn route(p: &PrefixAware, e: &[Arc<Endpoint>], prompt: &str) -> (usize, Outcome) {
        let mut order = Vec::new();
        let o = p.decide(&RouteCtx::with_prompt("m", prompt), e, &mut order);
        let mut s = order.clone();
        s.sort();
        assert_eq!(s, (0..e.len()).collect::<Vec<_>>(), "every engine once");
        (order[0], o)
    }

    fn conversation(user: usize, rounds: usize) -> String {
        let mut s = format!("<|system|>you help user {user}. ");
        for r in 0..rounds {
            s += &format!(
                "<|user|>question {r} of user {user}, with some words <|assistant|>answer {r} "
            );
        }
        s
    }

    fn set_load(e: &[Arc<Endpoint>], loads: &[u64]) {
        for (x, &l) in e.iter().zip(loads) {
            x.in_flight.store(l, Ordering::Relaxed);
        }
    }

    #[test]
    fn conversations_stick_and_spread() {
        let e = engines(3);
        let p = PrefixAware::new(PrefixSettings::default());
        let mut owner = HashMap::new();
        for round in 1..=5 {
            for user in 0..6 {
                let (first, outcome) = route(&p, &e, &conversation(user, round));
                let o = *owner.entry(user).or_insert(first);
                assert_eq!(o, first, "user {user} round {round} moved");
                if round == 1 {
                    assert_eq!(outcome, Outcome::Miss);
                } else {
                    assert_eq!(outcome, Outcome::CacheHit);
                }
            }
        }
        // Misses with equal load go to the engine holding the least: two users each.
        let mut per = [0; 3];
        for o in owner.values() {
            per[*o] += 1;
        }
        assert_eq!(per, [2, 2, 2]);
    }

    #[test]
    fn equal_holders_break_ties_by_load() {
        let e = engines(3);
        let p = PrefixAware::new(PrefixSettings::default());
        let text = "<|system|>shared prompt text, long enough to matter. ".repeat(4);
        // Route the same text with each engine least loaded in turn: all three hold it
        // (imbalance forces least load).
        for i in 0..3 {
            set_load(&e, &[100, 100, 100]);
            e[i].in_flight.store(0, Ordering::Relaxed);
            let (first, o) = route(&p, &e, &text);
            assert_eq!((first, o), (i, Outcome::Imbalanced));
        }
        for i in 0..3 {
            set_load(&e, &[4, 4, 4]);
            e[i].in_flight.store(3, Ordering::Relaxed);
            let (first, o) = route(&p, &e, &format!("{text}{i} asks"));
            assert_eq!((first, o), (i, Outcome::CacheHit));
        }
    }

    #[test]
    fn imbalance_switches_to_least_load() {
        let e = engines(3);
        let p = PrefixAware::new(PrefixSettings {
            balance_abs: 4,
            balance_rel: 1.5,
            ..PrefixSettings::default()
        });
        let c1 = conversation(1, 1);
        let (owner, _) = route(&p, &e, &c1);
        let c2 = conversation(1, 2);
        // Busy but within the thresholds (abs 4): still follow the cache.
        set_load(&e, &[0, 0, 0]);
        e[owner].in_flight.store(4, Ordering::Relaxed);
        assert_eq!(route(&p, &e, &c2), (owner, Outcome::CacheHit));
        // Abs exceeded but not rel (10 vs 7 < 1.5x): balanced, the cache wins.
        set_load(&e, &[7, 7, 7]);
        e[owner].in_flight.store(10, Ordering::Relaxed);
        assert_eq!(
            route(&p, &e, &conversation(1, 3)),
            (owner, Outcome::CacheHit)
        );
        // Past both thresholds: least load.
        set_load(&e, &[0, 0, 0]);
        e[owner].in_flight.store(5, Ordering::Relaxed);
        let (first, o) = route(&p, &e, &conversation(1, 4));
        assert_eq!(o, Outcome::Imbalanced);
        assert_ne!(first, owner);
    }

    #[test]
    fn misses_go_to_the_least_loaded_never_random() {
        let e = engines(4);
        let p = PrefixAware::new(PrefixSettings::default());
        set_load(&e, &[3, 1, 2, 5]);
        for i in 0..50 {
            let (first, o) = route(&p, &e, &format!("{:x} unique", kv_events::hash::mix64(i)));
            assert_eq!(o, Outcome::Miss);
            assert_eq!(first, 1);
        }
        // A short partial match (< threshold) is still a miss.
        let base = "x".repeat(100);
        set_load(&e, &[0, 0, 0, 0]);
        let (holder, _) = route(&p, &e, &base);
        set_load(&e, &[1, 1, 1, 1]);
        e[holder].in_flight.store(2, Ordering::Relaxed);
        let (first, o) = route(&p, &e, &(base.clone() + &"y".repeat(150)));
        assert_eq!(o, Outcome::Miss);
        assert_ne!(first, holder);
        // No prompt: least load, nothing stored.
        let before = p.stored_bytes();
        set_load(&e, &[2, 0, 1, 1]);
        let mut order = Vec::new();
        let o = p.decide(&RouteCtx::default(), &e, &mut order);
        assert_eq!((o, order[0]), (Outcome::NoPrompt, 1));
        assert_eq!(p.stored_bytes(), before);
    }

    #[test]
    fn memory_stays_under_the_cap() {
        let e = engines(3);
        let cap = 64 * 1024;
        let p = PrefixAware::new(PrefixSettings {
            max_chars: cap,
            ..PrefixSettings::default()
        });
        let mut peak = 0;
        for i in 0..5000u64 {
            let model = if i % 3 == 0 { "a" } else { "b" };
            let prompt = format!(
                "<|user|>{} unique prompt {i} {}",
                kv_events::hash::mix64(i),
                "z".repeat((i % 200) as usize)
            );
            let mut order = Vec::new();
            p.decide(&RouteCtx::with_prompt(model, &prompt), &e, &mut order);
            peak = peak.max(p.stored_bytes());
            assert!(p.stored_bytes() <= cap, "{} > {cap}", p.stored_bytes());
        }
        assert!(peak > cap / 2, "the cap was reached: {peak}");
        // The account matches the trees.
        let trees = p.trees.read().unwrap_or_else(|x| x.into_inner());
        let sum: usize = trees.values().map(|t| lock(t).bytes()).sum();
        assert_eq!(sum, p.stored_bytes());
        for t in trees.values() {
            lock(t).check();
        }
        // Recent prompts survive; the oldest are gone.
        drop(trees);
        let recent = format!(
            "<|user|>{} unique prompt 4999 {}",
            kv_events::hash::mix64(4999),
            "z".repeat(199)
        );
        let t = p.tree("b");
        let mut m = Vec::new();
        lock(&t).match_tenants(recent.as_bytes(), &mut m);
        assert!(m.iter().any(|&(_, n)| n == recent.len()));
        let old = format!("<|user|>{} unique prompt 1 ", kv_events::hash::mix64(1));
        lock(&t).match_tenants(old.as_bytes(), &mut m);
        assert!(m.iter().all(|&(_, n)| n < old.len()));
    }

    #[test]
    fn metrics_count_decisions_and_size() {
        let e = engines(3);
        let p = PrefixAware::new(PrefixSettings::default());
        let page = |p: &PrefixAware| {
            let mut w = TextWriter::new();
            p.render_metrics(&mut w);
            w.finish()
        };
        let empty = page(&p);
        assert!(empty.contains("vllm:router_prefix_decisions_total{outcome=\"cache_hit\"} 0.0\n"));
        assert!(empty.contains("vllm:router_prefix_tree_bytes 0.0\n"));
        assert!(empty.contains("vllm:router_prefix_tree_nodes 0.0\n"));
        for round in 1..=4 {
            for user in 0..2 {
                route(&p, &e, &conversation(user, round));
            }
        }
        let mut order = Vec::new();
        p.decide(&RouteCtx::default(), &e, &mut order);
        set_load(&e, &[0, 0, 100]);
        route(&p, &e, &conversation(0, 5));
        assert_eq!(p.decisions(Outcome::Miss), 2);
        assert_eq!(p.decisions(Outcome::CacheHit), 6);
        assert_eq!(p.decisions(Outcome::NoPrompt), 1);
        assert_eq!(p.decisions(Outcome::Imbalanced), 1);
        // One observation per request with a prompt; hits see most of their prompt.
        assert_eq!(p.stats.matched_ratio.count(), 9);
        assert!(
            p.stats.matched_ratio.sum() > 6.0 * 0.5,
            "{}",
            p.stats.matched_ratio.sum()
        );
        assert!(p.stored_bytes() > 0 && p.stored_nodes() > 0);
        let text = page(&p);
        for line in [
            "# TYPE vllm:router_prefix_decisions_total counter".to_string(),
            "vllm:router_prefix_decisions_total{outcome=\"cache_hit\"} 6.0".to_string(),
            "vllm:router_prefix_decisions_total{outcome=\"miss\"} 2.0".to_string(),
            "vllm:router_prefix_decisions_total{outcome=\"imbalanced\"} 1.0".to_string(),
            "vllm:router_prefix_decisions_total{outcome=\"no_prompt\"} 1.0".to_string(),
            "vllm:router_prefix_matched_prefix_ratio_count 9".to_string(),
            "vllm:router_prefix_matched_prefix_ratio_bucket{le=\"+Inf\"} 9".to_string(),
            format!("vllm:router_prefix_tree_bytes {}.0", p.stored_bytes()),
            format!("vllm:router_prefix_tree_nodes {}.0", p.stored_nodes()),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn shared_across_threads() {
        let e = engines(3);
        let p = Arc::new(PrefixAware::new(PrefixSettings::default()));
        let owners: Vec<usize> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|k| {
                    let (p, e) = (p.clone(), e.clone());
                    s.spawn(move || {
                        let mut first = None;
                        for round in 1..=20 {
                            let (f, _) = route(&p, &e, &conversation(k, round));
                            assert!(first.is_none_or(|x| x == f), "moved");
                            first = Some(f);
                        }
                        first.unwrap_or(0)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("thread")).collect()
        });
        assert_eq!(owners.len(), 4);
    }
}
