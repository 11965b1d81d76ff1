//! Routing policies. A policy ranks the engines that can serve a request, most preferred
//! first; the proxy tries them in that order, so failover is just walking the ranking
//! (pingora's `BackendSelection` idea). A policy is a function of the request, the
//! engines' current state and its own small state: unit-testable without sockets.

pub mod kvaware;
mod leastload;
mod p2c;
mod prefix;
mod roundrobin;
mod session;

use std::sync::Arc;

pub use kvaware::KvAware;
pub use leastload::LeastLoad;
pub use p2c::PowerOfTwo;
pub use prefix::PrefixAware;
pub use roundrobin::RoundRobin;
pub use session::Session;

use crate::config::{PrefixSettings, RoutingLogic};
use crate::engines::Endpoint;
use crate::kv_subscriber::KvState;

/// What a policy may look at in a request.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteCtx<'a> {
    pub model: &'a str,
    /// The session id (from the `--session-key` header or body field), if any.
    pub session: Option<&'a str>,
    /// A per-request random value (for randomized policies).
    pub nonce: u64,
    /// The prompt as text (chat: role-marked message contents in order; completions: the
    /// prompt), given only to policies whose [`Policy::needs_prompt`] is true.
    pub prompt: Option<&'a str>,
}

pub trait Policy: Send + Sync {
    fn name(&self) -> &'static str;
    /// Fill `order` with indices into `candidates`, best first (every index once).
    fn rank(&self, ctx: &RouteCtx<'_>, candidates: &[Arc<Endpoint>], order: &mut Vec<usize>);
    /// Whether `rank` reads [`RouteCtx::prompt`] (the request body is parsed for it only
    /// then).
    fn needs_prompt(&self) -> bool {
        false
    }
    /// The policy's own `/metrics` families (decisions, state size), if it keeps any.
    fn render_metrics(&self, _w: &mut protocol::prom::TextWriter) {}
    /// Its decisions so far by outcome (`cache_hit`, `miss`...), for the dashboard; empty
    /// for policies that do not classify them.
    fn decisions(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// [`Policy::rank`] with the request body at hand (for policies that read the prompt
    /// as the engine will: `kvaware` tokenizes it).
    fn rank_request(
        &self,
        ctx: &RouteCtx<'_>,
        _body: &[u8],
        candidates: &[Arc<Endpoint>],
        order: &mut Vec<usize>,
    ) {
        self.rank(ctx, candidates, order)
    }
}

pub fn build(
    logic: RoutingLogic,
    prefix: PrefixSettings,
    kv: &Arc<KvState>,
    kv_overlap_weight: f64,
    kv_min_match: f64,
) -> Box<dyn Policy> {
    match logic {
        RoutingLogic::Roundrobin => Box::new(RoundRobin::default()),
        RoutingLogic::Session => Box::new(Session),
        RoutingLogic::Leastload => Box::new(LeastLoad),
        RoutingLogic::P2c => Box::new(PowerOfTwo),
        RoutingLogic::Prefixaware => Box::new(PrefixAware::new(prefix)),
        RoutingLogic::Kvaware => {
            Box::new(KvAware::new(kv.clone(), kv_overlap_weight).with_min_match(kv_min_match))
        }
    }
}

/// Load as the router sees it: requests in flight here, then the engine's own queue.
pub(crate) fn load_key(e: &Endpoint) -> (u64, u64) {
    let inflight = e.in_flight.load(std::sync::atomic::Ordering::Relaxed);
    (inflight, e.scraped_queue().max(0.0) as u64)
}

/// All indices, least loaded first (stable: ties keep their order).
pub(crate) fn by_load(candidates: &[Arc<Endpoint>], order: &mut Vec<usize>) {
    order.clear();
    order.extend(0..candidates.len());
    order.sort_by_key(|&i| load_key(&candidates[i]));
}

#[cfg(test)]
pub(crate) mod testutil {
    use std::sync::Arc;
    use std::time::Instant;

    use crate::config::BackendSpec;
    use crate::engines::Endpoint;

    pub fn engines(n: usize) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| {
                let spec = BackendSpec {
                    url: format!("http://10.0.0.{i}:8000"),
                    model: Some("m".into()),
                    kv_events: None,
                };
                Arc::new(Endpoint::new(&spec, 10, Instant::now()))
            })
            .collect()
    }
}
