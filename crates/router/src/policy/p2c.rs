//! Power of two choices: two engines drawn at random (from the request's nonce), the less
//! loaded first, the other second, then everyone else by load. Near least-load balance
//! without every router herding onto the same engine.

use std::sync::Arc;

use super::{by_load, load_key, Policy, RouteCtx};
use kv_events::hash::mix64;

use crate::engines::Endpoint;

#[derive(Debug, Default)]
pub struct PowerOfTwo;

impl Policy for PowerOfTwo {
    fn name(&self) -> &'static str {
        "p2c"
    }

    fn rank(&self, ctx: &RouteCtx<'_>, candidates: &[Arc<Endpoint>], order: &mut Vec<usize>) {
        let n = candidates.len();
        by_load(candidates, order);
        if n < 3 {
            return;
        }
        let r = mix64(ctx.nonce);
        let a = (r % n as u64) as usize;
        let mut b = ((r >> 32) % (n as u64 - 1)) as usize;
        if b >= a {
            b += 1;
        }
        let (first, second) = if load_key(&candidates[b]) < load_key(&candidates[a]) {
            (b, a)
        } else {
            (a, b)
        };
        order.retain(|&i| i != first && i != second);
        order.insert(0, second);
        order.insert(0, first);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::engines;
    use std::sync::atomic::Ordering;

    #[test]
    fn picks_the_less_loaded_of_two_and_lists_all() {
        let e = engines(4);
        e[0].in_flight.store(9, Ordering::Relaxed);
        let mut firsts = [0; 4];
        let mut order = Vec::new();
        for nonce in 0..400u64 {
            PowerOfTwo.rank(&RouteCtx::new("m", None, nonce, b""), &e, &mut order);
            let mut s = order.clone();
            s.sort();
            assert_eq!(s, vec![0, 1, 2, 3]);
            firsts[order[0]] += 1;
        }
        // The busy engine only wins when... never: it always meets a less loaded one.
        assert_eq!(firsts[0], 0);
        assert!(firsts[1..].iter().all(|&c| c > 80), "{firsts:?}");
    }
}
