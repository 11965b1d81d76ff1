//! Least load: fewest requests in flight at this router; ties broken by the engine's own
//! running + waiting count from its last scrape.

use std::sync::Arc;

use super::{by_load, Policy, RouteCtx};
use crate::engines::Endpoint;

#[derive(Debug, Default)]
pub struct LeastLoad;

impl Policy for LeastLoad {
    fn name(&self) -> &'static str {
        "leastload"
    }

    fn rank(&self, _ctx: &RouteCtx<'_>, candidates: &[Arc<Endpoint>], order: &mut Vec<usize>) {
        by_load(candidates, order);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::engines;
    use std::sync::atomic::Ordering;

    #[test]
    fn prefers_fewest_in_flight_then_shortest_queue() {
        let e = engines(3);
        e[0].in_flight.store(2, Ordering::Relaxed);
        e[1].in_flight.store(1, Ordering::Relaxed);
        e[2].in_flight.store(1, Ordering::Relaxed);
        e[1].load.waiting.set(5.0);
        let mut order = Vec::new();
        LeastLoad.rank(&RouteCtx::default(), &e, &mut order);
        assert_eq!(order, vec![2, 1, 0]);
    }
}
