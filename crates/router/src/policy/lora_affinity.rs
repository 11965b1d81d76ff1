//! LoRA affinity (`--lora-affinity`): requests for one adapter gather on few engines, so
//! each engine keeps few adapters active (a step runs at most `--max-loras` of them; the
//! rest wait) and an adapter's cached prefixes stay where its requests go.
//!
//! A wrapper around the routing logic's own policy. For a request whose model is a LoRA
//! adapter (an engine lists it with a `parent`), the adapter's *home* goes first: of the
//! candidates ordered by rendezvous hash of (adapter, engine), the first whose requests in
//! flight stay under a bound of 1.25x the mean (consistent hashing with bounded loads), so
//! a busy adapter spills over to its next engines instead of queueing on one. The rest
//! keep the wrapped policy's order (failover walks it as before). Requests for a base
//! model are ranked by the wrapped policy alone.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Policy, RouteCtx};
use crate::engines::Endpoint;
use kv_events::hash::{lora_salt, mix64};

/// An engine takes an adapter's request while its requests in flight stay under this
/// multiple of the mean (counting the new one).
const LOAD_BOUND: f64 = 1.25;

pub struct LoraAffinity {
    inner: Box<dyn Policy>,
}

impl LoraAffinity {
    pub fn new(inner: Box<dyn Policy>) -> Self {
        LoraAffinity { inner }
    }
}

/// The index of the adapter's home among `candidates`: the highest rendezvous score whose
/// load is under the bound (the highest score of all when none is).
fn home(adapter: &str, candidates: &[Arc<Endpoint>]) -> Option<usize> {
    let seed = lora_salt(adapter);
    let load = |e: &Endpoint| e.in_flight.load(Ordering::Relaxed) as f64;
    let total: f64 = candidates.iter().map(|e| load(e)).sum();
    let bound = (LOAD_BOUND * (total + 1.0) / candidates.len().max(1) as f64).ceil();
    let score = |e: &Endpoint| mix64(seed ^ e.key);
    let best = |eligible: &dyn Fn(&Endpoint) -> bool| {
        candidates
            .iter()
            .enumerate()
            .filter(|(_, e)| eligible(e))
            .max_by_key(|(_, e)| score(e))
            .map(|(i, _)| i)
    };
    best(&|e| load(e) < bound).or_else(|| best(&|_| true))
}

impl Policy for LoraAffinity {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn rank(&self, ctx: &RouteCtx<'_>, candidates: &[Arc<Endpoint>], order: &mut Vec<usize>) {
        self.inner.rank(ctx, candidates, order);
        if candidates.len() < 2 || !candidates.iter().any(|e| e.is_adapter(ctx.model)) {
            return;
        }
        if let Some(h) = home(ctx.model, candidates) {
            if let Some(at) = order.iter().position(|&i| i == h) {
                order[..=at].rotate_right(1);
            }
        }
    }

    fn render_metrics(&self, w: &mut protocol::prom::TextWriter) {
        self.inner.render_metrics(w);
    }

    fn decisions(&self) -> Vec<(&'static str, u64)> {
        self.inner.decisions()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::engines;
    use crate::policy::RoundRobin;
    use serde_json::json;

    fn with_adapters(n: usize) -> Vec<Arc<Endpoint>> {
        let e = engines(n);
        for x in &e {
            let ids = ["m", "a", "b", "c", "d"];
            let cards = ids
                .iter()
                .map(|id| json!({"id": id, "parent": if *id == "m" { None } else { Some("m") }}))
                .collect();
            x.set_models(ids.iter().map(|s| s.to_string()).collect(), cards);
        }
        e
    }

    fn first(p: &LoraAffinity, e: &[Arc<Endpoint>], model: &str) -> usize {
        let mut order = Vec::new();
        p.rank(&RouteCtx::new(model, None, 0, b"{}"), e, &mut order);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (0..e.len()).collect::<Vec<_>>(),
            "every engine once"
        );
        order[0]
    }

    #[test]
    fn an_adapter_stays_home_until_its_home_is_busy_and_base_requests_go_round() {
        let e = with_adapters(4);
        let p = LoraAffinity::new(Box::new(RoundRobin::default()));
        // Idle engines: every request for an adapter goes to its one home.
        let homes: Vec<usize> = ["a", "b", "c", "d"]
            .iter()
            .map(|m| {
                let h = first(&p, &e, m);
                for _ in 0..5 {
                    assert_eq!(first(&p, &e, m), h, "{m} moved while idle");
                }
                h
            })
            .collect();
        let mut distinct = homes.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(
            distinct.len() >= 2,
            "adapters spread over engines: {homes:?}"
        );
        // The base model keeps the wrapped policy's order (round robin).
        let base: std::collections::HashSet<usize> = (0..4).map(|_| first(&p, &e, "m")).collect();
        assert_eq!(base.len(), 4);
        // A busy home spills over: its requests in flight above 1.25x the mean.
        let h = homes[0];
        e[h].in_flight.store(3, Ordering::Relaxed);
        let spill = first(&p, &e, "a");
        assert_ne!(spill, h);
        for _ in 0..3 {
            assert_eq!(first(&p, &e, "a"), spill, "the next home, consistently");
        }
        // Every engine as busy: home again.
        for x in &e {
            x.in_flight.store(3, Ordering::Relaxed);
        }
        assert_eq!(first(&p, &e, "a"), h);
    }
}
