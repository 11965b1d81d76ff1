//! Session affinity by rendezvous (highest-random-weight) hashing of the session id with
//! each engine's URL. Every router replica with the same engines ranks identically (no
//! shared state), removing one of n engines remaps only the sessions it held (about
//! 1/n), and the ranking itself is the failover order. Without a session id: least load.

use std::sync::Arc;

use super::{by_load, Policy, RouteCtx};
use kv_events::hash::mix64;

use crate::engines::{hash_str, Endpoint};

#[derive(Debug, Default)]
pub struct Session;

impl Policy for Session {
    fn name(&self) -> &'static str {
        "session"
    }

    fn rank(&self, ctx: &RouteCtx<'_>, candidates: &[Arc<Endpoint>], order: &mut Vec<usize>) {
        let Some(session) = ctx.session else {
            return by_load(candidates, order);
        };
        let h = hash_str(session);
        order.clear();
        order.extend(0..candidates.len());
        order.sort_by_key(|&i| std::cmp::Reverse(mix64(h ^ candidates[i].key)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::engines;

    fn first(p: &Session, e: &[Arc<Endpoint>], s: &str) -> String {
        let mut order = Vec::new();
        p.rank(&RouteCtx::new("m", Some(s), 0, b""), e, &mut order);
        e[order[0]].url.clone()
    }

    #[test]
    fn sticky_balanced_and_minimal_remap() {
        let e = engines(4);
        let p = Session;
        let sessions: Vec<String> = (0..2000).map(|i| format!("user-{i}")).collect();
        let before: Vec<String> = sessions.iter().map(|s| first(&p, &e, s)).collect();
        // Same answer every time (and in any replica: no state).
        assert!(sessions
            .iter()
            .zip(&before)
            .all(|(s, b)| &first(&Session, &e, s) == b));
        for ep in &e {
            let n = before.iter().filter(|u| **u == ep.url).count();
            assert!((350..650).contains(&n), "{} got {n} of 2000", ep.url);
        }
        // Remove one engine: only its sessions move.
        let removed = e[2].url.clone();
        let fewer: Vec<_> = e.iter().filter(|x| x.url != removed).cloned().collect();
        let mut moved = 0;
        for (s, b) in sessions.iter().zip(&before) {
            let now = first(&p, &fewer, s);
            if *b != removed {
                assert_eq!(&now, b, "session {s} moved though its engine stayed");
            } else {
                moved += 1;
            }
        }
        assert!((350..650).contains(&moved), "{moved}");
    }
}
