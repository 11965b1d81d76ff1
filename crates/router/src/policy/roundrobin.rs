//! Round robin: each request starts one engine further along; the rest follow in order.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{Policy, RouteCtx};
use crate::engines::Endpoint;

#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "roundrobin"
    }

    fn rank(&self, _ctx: &RouteCtx<'_>, candidates: &[Arc<Endpoint>], order: &mut Vec<usize>) {
        order.clear();
        let n = candidates.len();
        if n == 0 {
            return;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        order.extend((0..n).map(|k| (start + k) % n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::engines;

    #[test]
    fn spreads_evenly_and_lists_everyone() {
        let e = engines(3);
        let p = RoundRobin::default();
        let mut counts = [0; 3];
        let mut order = Vec::new();
        for _ in 0..300 {
            p.rank(&RouteCtx::default(), &e, &mut order);
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, vec![0, 1, 2]);
            counts[order[0]] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }
}
