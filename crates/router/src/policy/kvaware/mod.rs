//! Room: KV-aware routing in Dynamo's manner. The engines' KV-cache events (followed by
//! [`subscriber`] into one [`index::KvIndex`]) say which blocks each engine
//! holds; each request goes to the engine where it costs least, weighing the prefill work
//! its cache does not save against the work the engine already carries. This file owns
//! the policy and [`KvState`], what the policy, the subscriber and `/metrics` share;
//! [`tokens`] renders prompts as the engine does, [`index`] is the block index.
//!
//! Per request:
//! 1. The prompt is rendered and tokenized exactly as the engine does it ([`tokens`]),
//!    from the request body in the [`RouteCtx`].
//! 2. Its full blocks are hashed with each engine's block size (from the engine's
//!    advertisement or its events), chained as the engine chains them; each candidate's
//!    `matched` is the number of leading blocks it holds.
//! 3. `cost = overlap_weight × (prompt_blocks − matched) + in_flight × avg_blocks`, where
//!    `prompt_blocks` counts the prompt's blocks (the last one partial), `in_flight` is the
//!    requests this router has in flight to the engine and `avg_blocks` a moving average
//!    (1/8 per request) of the prompt blocks of the requests routed so far: the engine's
//!    active blocks, approximately (`--kv-overlap-weight`, default 16).
//! 4. Ranked by cost, then load (in flight, then the engine's scraped queue), then the
//!    blocks the engine holds (fewer first, so new conversations spread), then URL:
//!    nothing is random, so two routers that saw the same events and traffic agree.
//!
//! Without an event stream from any candidate, or without a prompt to hash: least load.
//! An engine without a stream among others that have one counts as holding nothing.

pub mod index;
pub mod subscriber;
pub mod tokens;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use protocol::prom::TextWriter;

use super::decisions::{self, Decisions, Family};
use super::{by_load, load_key, Policy, RouteCtx};
use crate::engines::{Endpoint, Registry};
use index::{cpu_key, seeded_prompt_hashes, EngineKey, KvIndex};

/// What a block an engine holds only in host memory (`medium: "CPU"`) is worth against one
/// in its paged cache: it need not be computed, but it must be loaded.
pub const CPU_BLOCK_WORTH: f64 = 0.5;
pub use tokens::{prompt_tokens, Tokenizers};

/// How a `kvaware` decision came out (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The first choice holds the longest cached prefix of the prompt.
    CacheHit,
    /// Some engine held a longer prefix, but load outweighed it.
    Balanced,
    /// No candidate holds any block of the prompt: the least loaded.
    Miss,
    /// No event stream (or no prompt to hash): least load.
    Fallback,
}

impl decisions::Outcome for Outcome {
    const ALL: &'static [Outcome] = &[
        Outcome::CacheHit,
        Outcome::Balanced,
        Outcome::Miss,
        Outcome::Fallback,
    ];

    const FAMILY: Family = Family {
        decisions: "vllm:router_kv_decisions_total",
        decisions_help: "kvaware routing decisions by outcome",
        ratio: "vllm:router_kv_matched_prefix_ratio",
        ratio_help: "Fraction of the prompt's blocks cached on the chosen engine",
    };

    fn label(self) -> &'static str {
        match self {
            Outcome::CacheHit => "cache_hit",
            Outcome::Balanced => "balanced",
            Outcome::Miss => "miss",
            Outcome::Fallback => "fallback",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What `kvaware` routing shares between the policy (rebuilt on reloads), the subscribers
/// and `/metrics`: kept for the router's life.
#[derive(Debug)]
pub struct KvState {
    pub index: RwLock<KvIndex>,
    /// `--kv-events-port`: where a real vLLM engine publishes, by convention.
    pub events_port: u16,
    /// Decisions by outcome and the matched share of the prompt's blocks
    /// (`vllm:router_kv_*`; kept across reloads).
    pub decisions: Decisions<Outcome, 4>,
    /// `--tokenizer`: how prompts are tokenized, per model.
    pub tokenizers: Tokenizers,
    /// Whether the routing logic is `kvaware`: the subscriber follows the engines' events
    /// only then.
    following: AtomicBool,
}

impl KvState {
    pub fn new(events_port: u16) -> Self {
        KvState {
            index: RwLock::new(KvIndex::default()),
            events_port,
            decisions: Decisions::default(),
            tokenizers: Default::default(),
            following: AtomicBool::new(false),
        }
    }

    pub fn with_tokenizers(mut self, t: Tokenizers) -> Self {
        self.tokenizers = t;
        self
    }

    pub fn index(&self) -> std::sync::RwLockReadGuard<'_, KvIndex> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn index_mut(&self) -> std::sync::RwLockWriteGuard<'_, KvIndex> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Set when the routing settings change: whether `kvaware` is the routing logic.
    pub fn set_following(&self, on: bool) {
        self.following.store(on, Ordering::Relaxed);
    }

    pub fn following(&self) -> bool {
        self.following.load(Ordering::Relaxed)
    }

    /// The `kvaware` metric families.
    pub fn render(&self, registry: &Registry) -> String {
        let mut w = TextWriter::new();
        self.decisions.render(&mut w);
        let idx = self.index();
        w.header(
            "vllm:router_kv_index_blocks",
            "gauge",
            "Distinct KV blocks in the router's index",
        );
        w.sample("vllm:router_kv_index_blocks", &[], idx.blocks() as f64);
        w.header(
            "vllm:router_kv_engine_blocks",
            "gauge",
            "KV blocks the index holds for each engine with an event stream",
        );
        for e in registry.snapshot().endpoints.iter() {
            if idx.has_engine(e.key) {
                w.sample(
                    "vllm:router_kv_engine_blocks",
                    &[("server", &e.url)],
                    idx.engine_blocks(e.key) as f64,
                );
            }
        }
        w.finish()
    }
}

pub struct KvAware {
    kv: Arc<KvState>,
    overlap_weight: f64,
    /// `--kv-min-match`: matches of at most this fraction of the prompt are not followed.
    min_match: f64,
    /// Moving average of routed prompts' blocks, as f64 bits (0: none yet).
    avg_blocks: AtomicU64,
}

impl std::fmt::Debug for KvAware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvAware")
            .field("overlap_weight", &self.overlap_weight)
            .finish_non_exhaustive()
    }
}

impl KvAware {
    pub fn new(kv: Arc<KvState>, overlap_weight: f64) -> Self {
        KvAware {
            kv,
            overlap_weight,
            min_match: 0.0,
            avg_blocks: AtomicU64::new(0),
        }
    }

    /// Matches of at most this fraction of the prompt are not followed (`--kv-min-match`).
    pub fn with_min_match(mut self, min_match: f64) -> Self {
        self.min_match = min_match;
        self
    }

    /// Rank and say why (the `Policy` body); records the decision's metrics.
    pub fn decide(
        &self,
        model: &str,
        body: &[u8],
        candidates: &[Arc<Endpoint>],
        order: &mut Vec<usize>,
    ) -> Outcome {
        let outcome = self.decide_inner(model, body, candidates, order);
        self.kv.decisions.record(outcome);
        outcome
    }

    fn decide_inner(
        &self,
        model: &str,
        body: &[u8],
        candidates: &[Arc<Endpoint>],
        order: &mut Vec<usize>,
    ) -> Outcome {
        // A request for a LoRA adapter is tokenized as its base model, and matches only
        // blocks computed under the adapter.
        let parent = candidates.iter().find_map(|e| e.adapter_parent(model));
        let lora = parent.is_some().then_some(model);
        let tokenizer = self
            .kv
            .tokenizers
            .for_model(parent.as_deref().unwrap_or(model));
        let tokens = match prompt_tokens(tokenizer, body) {
            Some(t) if !t.is_empty() && !candidates.is_empty() => t,
            _ => {
                by_load(candidates, order);
                return Outcome::Fallback;
            }
        };
        let n = candidates.len();
        // Per candidate: its block size (None: no stream, or nothing learned yet).
        let mut bs: Vec<Option<usize>> = Vec::with_capacity(n);
        let mut matched = vec![0usize; n];
        // Leading blocks each candidate holds in host memory (loadable, not computed).
        let mut in_cpu = vec![0usize; n];
        let held: Vec<usize>;
        {
            let idx = self.kv.index();
            held = candidates
                .iter()
                .map(|e| idx.engine_blocks(e.key))
                .collect();
            bs.extend(candidates.iter().map(|e| {
                if idx.has_engine(e.key) {
                    idx.block_size(e.key)
                } else {
                    None
                }
            }));
            let mut sizes: Vec<usize> = bs.iter().flatten().copied().collect();
            sizes.sort_unstable();
            sizes.dedup();
            let mut keys = Vec::with_capacity(n);
            let mut which = Vec::with_capacity(n);
            let mut m = Vec::with_capacity(n);
            for &size in &sizes {
                keys.clear();
                which.clear();
                for (i, b) in bs.iter().enumerate() {
                    if *b == Some(size) {
                        keys.push(candidates[i].key);
                        which.push(i);
                    }
                }
                let hashes = seeded_prompt_hashes(&tokens, size, lora);
                idx.matched(&hashes, &keys, &mut m);
                for (j, &i) in which.iter().enumerate() {
                    matched[i] = m[j];
                }
                let cpu: Vec<EngineKey> = keys.iter().map(|&k| cpu_key(k)).collect();
                idx.matched(&hashes, &cpu, &mut m);
                for (j, &i) in which.iter().enumerate() {
                    in_cpu[i] = m[j];
                }
            }
        }
        let Some(default_bs) = bs.iter().flatten().copied().min() else {
            by_load(candidates, order);
            return Outcome::Fallback;
        };
        let prompt_blocks: Vec<usize> = bs
            .iter()
            .map(|b| tokens.len().div_ceil(b.unwrap_or(default_bs)))
            .collect();
        let avg = match f64::from_bits(self.avg_blocks.load(Ordering::Relaxed)) {
            a if a > 0.0 => a,
            _ => prompt_blocks.iter().copied().min().unwrap_or(1) as f64,
        };
        let loads: Vec<(u64, u64)> = candidates.iter().map(|e| load_key(e)).collect();
        // Blocks only in host memory count at a discount: loading them is cheaper than
        // computing them, dearer than having them in the paged cache.
        let effective = |i: usize| {
            matched[i] as f64 + CPU_BLOCK_WORTH * in_cpu[i].saturating_sub(matched[i]) as f64
        };
        let cost: Vec<f64> = (0..n)
            .map(|i| {
                self.overlap_weight * (prompt_blocks[i] as f64 - effective(i)).max(0.0)
                    + loads[i].0 as f64 * avg
            })
            .collect();
        order.clear();
        order.extend(0..n);
        let frac = |i: usize| effective(i) / prompt_blocks[i].max(1) as f64;
        let shallow = (0..n).all(|i| frac(i) <= self.min_match);
        if shallow {
            // Nothing worth following (at most a prefix every conversation shares): spread
            // new conversations by load, then over the emptiest caches.
            order.sort_by(|&a, &b| {
                loads[a]
                    .cmp(&loads[b])
                    .then(held[a].cmp(&held[b]))
                    .then_with(|| candidates[a].url.cmp(&candidates[b].url))
            });
            let first = order[0];
            self.kv.decisions.matched_ratio.observe(frac(first));
            self.learn_size(avg, prompt_blocks[first]);
            return Outcome::Miss;
        }
        order.sort_by(|&a, &b| {
            cost[a]
                .total_cmp(&cost[b])
                .then(loads[a].cmp(&loads[b]))
                .then(held[a].cmp(&held[b]))
                .then_with(|| candidates[a].url.cmp(&candidates[b].url))
        });
        let first = order[0];
        let matched_tokens = |i: usize| matched[i] * bs[i].unwrap_or(default_bs);
        let best = (0..n).map(matched_tokens).max().unwrap_or(0);
        let outcome = if best == 0 {
            Outcome::Miss
        } else if matched_tokens(first) == best {
            Outcome::CacheHit
        } else {
            Outcome::Balanced
        };
        self.kv
            .decisions
            .matched_ratio
            .observe(matched[first] as f64 / prompt_blocks[first].max(1) as f64);
        self.learn_size(avg, prompt_blocks[first]);
        outcome
    }

    /// Fold a routed prompt's size into the moving average of prompt blocks.
    fn learn_size(&self, avg: f64, blocks: usize) {
        let new_avg = avg + (blocks as f64 - avg) / 8.0;
        self.avg_blocks
            .store(new_avg.max(f64::MIN_POSITIVE).to_bits(), Ordering::Relaxed);
    }
}

impl Policy for KvAware {
    fn name(&self) -> &'static str {
        "kvaware"
    }

    fn decisions(&self) -> Vec<(&'static str, u64)> {
        self.kv.decisions.counts()
    }

    fn rank(&self, ctx: &RouteCtx<'_>, candidates: &[Arc<Endpoint>], order: &mut Vec<usize>) {
        self.decide(ctx.model, ctx.body, candidates, order);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::engines;
    use index::prompt_hashes;
    use kv_events::{BlockStored, KvEvent};
    use serde_json::json;
    use tokenizer::SimTokenizer;

    const BS: usize = 16;

    fn setup(n: usize) -> (Vec<Arc<Endpoint>>, Arc<KvState>, KvAware) {
        let e = engines(n);
        let kv = Arc::new(KvState::new(5557));
        for x in &e {
            kv.index_mut().attach(x.key);
            kv.index_mut().set_block_size(x.key, BS);
        }
        let p = KvAware::new(kv.clone(), 1.0);
        (e, kv, p)
    }

    fn chat(system: &str, user: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({"model":"m","messages":[
            {"role":"system","content":system},{"role":"user","content":user}]}))
        .unwrap()
    }

    /// Make engine `e` hold the full blocks of `tokens` (as its events would say).
    fn cache(kv: &KvState, e: &Endpoint, tokens: &[u32]) {
        let hashes = prompt_hashes(tokens, BS);
        let full = hashes.len() * BS;
        kv.index_mut().apply(
            e.key,
            &KvEvent::BlockStored(BlockStored::new(hashes, None, tokens[..full].to_vec(), BS)),
        );
    }

    fn route(p: &KvAware, e: &[Arc<Endpoint>], body: &[u8]) -> (usize, Outcome) {
        let mut order = Vec::new();
        let o = p.decide("m", body, e, &mut order);
        let mut s = order.clone();
        s.sort();
        assert_eq!(s, (0..e.len()).collect::<Vec<_>>(), "every engine once");
        (order[0], o)
    }

    #[test]
    fn blocks_in_host_memory_count_at_a_discount() {
        let (e, kv, p) = setup(3);
        let body = chat(&"Long shared context words. ".repeat(40), "q");
        let tokens = prompt_tokens(&SimTokenizer::new(), &body).expect("tokens");
        // Engine 1 holds the prompt's blocks only in host memory (medium CPU); engine 2
        // in its paged cache; engine 0 nothing.
        let hashes = prompt_hashes(&tokens, BS);
        let full = hashes.len() * BS;
        let mut cpu = BlockStored::new(hashes.clone(), None, tokens[..full].to_vec(), BS);
        cpu.medium = Some(kv_events::MEDIUM_CPU.into());
        kv.index_mut().apply(e[1].key, &KvEvent::BlockStored(cpu));
        cache(&kv, &e[2], &tokens);
        assert_eq!(route(&p, &e, &body).0, 2, "the paged cache first");
        kv.index_mut().apply(e[2].key, &KvEvent::AllBlocksCleared);
        assert_eq!(route(&p, &e, &body).0, 1, "then host memory, over nothing");
        // The paged cache's reset leaves host memory; the engine's own removal does not.
        kv.index_mut().apply(e[1].key, &KvEvent::AllBlocksCleared);
        assert_eq!(route(&p, &e, &body).0, 1);
        kv.index_mut().apply(
            e[1].key,
            &KvEvent::BlockRemoved(kv_events::BlockRemoved {
                block_hashes: hashes.clone(),
                medium: Some(kv_events::MEDIUM_CPU.into()),
                group_idx: Some(0),
            }),
        );
        assert_eq!(kv.index().engine_blocks(index::cpu_key(e[1].key)), 0);
        assert_eq!(
            kv.index().engines().len(),
            3,
            "host-memory entries are not engines"
        );
        kv.index_mut().remove_engine(e[1].key);
        kv.index().check();
    }

    /// Blocks computed under a LoRA adapter match only requests for that adapter, and a
    /// base-model request never follows them (the engine could not reuse them).
    #[test]
    fn lora_blocks_match_only_their_adapter() {
        let (e, kv, p) = setup(3);
        for x in &e {
            x.set_models(
                vec!["m".into(), "sql".into()],
                vec![
                    json!({"id":"m","parent":null}),
                    json!({"id":"sql","parent":"m"}),
                ],
            );
        }
        assert!(e[0].is_adapter("sql") && !e[0].is_adapter("m"));
        let sys = "You are a careful assistant. ".repeat(40);
        let body = chat(&sys, "q");
        let tokens = prompt_tokens(&SimTokenizer::new(), &body).unwrap();
        // Engine 1 holds the prompt under the adapter, engine 2 under the base model.
        let hashes: Vec<u64> = prompt_hashes(&tokens, BS).iter().map(|h| h ^ 1).collect();
        let full = hashes.len() * BS;
        let mut stored = BlockStored::new(hashes, None, tokens[..full].to_vec(), BS);
        stored.lora_id = Some(1);
        stored.lora_name = Some("sql".into());
        kv.index_mut()
            .apply(e[1].key, &KvEvent::BlockStored(stored));
        cache(&kv, &e[2], &tokens);
        let mut order = Vec::new();
        let sql = serde_json::to_vec(&json!({"model":"sql","messages":[
            {"role":"system","content":sys},{"role":"user","content":"q"}]}))
        .unwrap();
        assert_eq!(p.decide("sql", &sql, &e, &mut order), Outcome::CacheHit);
        assert_eq!(order[0], 1, "the adapter's own blocks");
        assert_eq!(p.decide("m", &body, &e, &mut order), Outcome::CacheHit);
        assert_eq!(order[0], 2, "the base model's blocks, not the adapter's");
        // Another adapter of the same tokens matches neither.
        for x in &e {
            x.set_models(
                vec!["m".into(), "chat".into()],
                vec![json!({"id":"chat","parent":"m"})],
            );
        }
        assert_eq!(p.decide("chat", &sql, &e, &mut order), Outcome::Miss);
    }

    #[test]
    fn a_shared_system_prompt_alone_does_not_pull_new_conversations() {
        let (e, kv, p) = setup(3);
        let p = p.with_min_match(0.3);
        let sys = "You are a careful assistant. ".repeat(10);
        // Engine 0 holds the shared system prompt (and is otherwise the emptiest).
        let sys_tokens = prompt_tokens(&SimTokenizer::new(), &chat(&sys, "")).unwrap();
        cache(&kv, &e[0], &sys_tokens);
        // Engine 1 holds more, but of something else.
        cache(
            &kv,
            &e[1],
            &(0..400).map(|i| 90_000 + i).collect::<Vec<u32>>(),
        );
        let long_q = "tell me about the sea and the sun and the sky ".repeat(40);
        let (first, o) = route(&p, &e, &chat(&sys, &long_q));
        assert_eq!(o, Outcome::Miss, "a match this shallow is not followed");
        assert_eq!(
            first, 2,
            "the emptiest idle engine takes the new conversation"
        );
        // Without the rule, the system prompt wins.
        let (first, _) = route(&KvAware::new(kv.clone(), 4.0), &e, &chat(&sys, &long_q));
        assert_eq!(first, 0);
    }

    #[test]
    fn follows_the_engine_holding_the_prefix() {
        let (e, kv, p) = setup(4);
        let sys = "You are a careful assistant. ".repeat(40);
        let body = chat(&sys, "first question");
        let tokens = prompt_tokens(&SimTokenizer::new(), &body).unwrap();
        cache(&kv, &e[2], &tokens[..tokens.len() / 2]);
        let (first, o) = route(&p, &e, &chat(&sys, "another question"));
        assert_eq!((first, o), (2, Outcome::CacheHit));
        // A prompt nobody holds: the least loaded, ties by URL.
        e[0].in_flight.store(1, Ordering::Relaxed);
        let (first, o) = route(&p, &e, &chat("unrelated", "x"));
        assert_eq!((first, o), (1, Outcome::Miss));
        assert_eq!(kv.decisions.count(Outcome::CacheHit), 1);
        assert_eq!(kv.decisions.count(Outcome::Miss), 1);
    }

    #[test]
    fn load_outweighs_a_short_match_but_not_a_long_one() {
        let (e, kv, p) = setup(2);
        let long = "shared context words ".repeat(100);
        let tokens = prompt_tokens(&SimTokenizer::new(), &chat(&long, "q")).unwrap();
        let blocks = tokens.len().div_ceil(BS);
        // Engine 0 holds almost all of it and has one request in flight (of about this
        // size): cost ≈ 1 + blocks·1 vs blocks for the idle engine... a long match wins
        // only while the saved prefill exceeds the extra active blocks.
        cache(&kv, &e[0], &tokens);
        e[0].in_flight.store(1, Ordering::Relaxed);
        let (first, o) = route(&p, &e, &chat(&long, "q"));
        // cost0 = 1 (the partial block) + 1×blocks, cost1 = blocks: the idle engine wins.
        assert_eq!((first, o), (1, Outcome::Balanced), "{blocks} blocks");
        // With more weight on the prefill saved, the cache wins.
        let p2 = KvAware::new(kv.clone(), 2.0);
        let (first, o) = route(&p2, &e, &chat(&long, "q"));
        assert_eq!((first, o), (0, Outcome::CacheHit));
        // Idle holder: the cache, trivially.
        e[0].in_flight.store(0, Ordering::Relaxed);
        assert_eq!(route(&p, &e, &chat(&long, "q")), (0, Outcome::CacheHit));
    }

    #[test]
    fn no_stream_or_no_prompt_falls_back_to_least_load() {
        let e = engines(3);
        let kv = Arc::new(KvState::new(5557));
        let p = KvAware::new(kv.clone(), 1.0);
        e[0].in_flight.store(2, Ordering::Relaxed);
        e[1].in_flight.store(1, Ordering::Relaxed);
        e[2].in_flight.store(3, Ordering::Relaxed);
        assert_eq!(route(&p, &e, &chat("a", "b")), (1, Outcome::Fallback));
        let (_, kv2, p2) = setup(3);
        let _ = kv2;
        assert_eq!(route(&p2, &e, br#"{"model":"m"}"#).1, Outcome::Fallback);
        assert_eq!(kv.decisions.count(Outcome::Fallback), 1);
    }

    #[test]
    fn metrics_keep_their_names_and_labels() {
        let (e, kv, p) = setup(2);
        route(&p, &e, &chat("a", "b"));
        let registry = Registry::new(10);
        let page = kv.render(&registry);
        for line in [
            "# TYPE vllm:router_kv_decisions_total counter",
            "vllm:router_kv_decisions_total{outcome=\"cache_hit\"} 0",
            "vllm:router_kv_decisions_total{outcome=\"balanced\"} 0",
            "vllm:router_kv_decisions_total{outcome=\"miss\"} 1",
            "vllm:router_kv_decisions_total{outcome=\"fallback\"} 0",
            "# TYPE vllm:router_kv_matched_prefix_ratio histogram",
            "vllm:router_kv_matched_prefix_ratio_count 1",
            "# TYPE vllm:router_kv_index_blocks gauge",
        ] {
            assert!(page.contains(line), "{line} missing in\n{page}");
        }
        assert_eq!(
            p.decisions(),
            vec![
                ("cache_hit", 0),
                ("balanced", 0),
                ("miss", 1),
                ("fallback", 0)
            ]
        );
    }

    #[test]
    fn two_replicas_fed_the_same_events_agree() {
        let e = engines(4);
        let mk = || {
            let kv = Arc::new(KvState::new(5557));
            for x in &e {
                kv.index_mut().attach(x.key);
                kv.index_mut().set_block_size(x.key, BS);
            }
            (kv.clone(), KvAware::new(kv, 1.0))
        };
        let (kv_a, a) = mk();
        let (kv_b, b) = mk();
        let t = SimTokenizer::new();
        for u in 0..20u64 {
            let body = chat(&format!("user {u} notes ").repeat(30), &format!("q{u}"));
            let tokens = prompt_tokens(&t, &body).unwrap();
            if u % 3 == 0 {
                for kv in [&kv_a, &kv_b] {
                    cache(kv, &e[(u % 4) as usize], &tokens);
                }
            }
            assert_eq!(route(&a, &e, &body), route(&b, &e, &body), "user {u}");
        }
    }
}
