//! Retries without multiplying an overload: jittered exponential backoff between
//! attempts, and a retry budget shared by the whole router (every thread): over the
//! last [`WINDOW`] seconds, retries may number at most `--retry-budget-ratio` × requests
//! plus `--retry-budget-min-per-sec` × [`WINDOW`]. When engines fail because they are
//! overloaded, retrying every failure would double the load on the others; the budget
//! caps the extra load at the ratio while still retrying the odd failure at once.
//!
//! Constant memory: a ring of one-second buckets of relaxed atomics (a bucket is reset
//! when its second comes round again; a race there loses a count, nothing more). A
//! request costs one atomic add; only a retry reads the ring.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kv_events::hash::mix64;
use protocol::prom::{Counter, TextWriter};

use crate::config::RetrySettings;

/// The budget's sliding window, in seconds.
pub const WINDOW: u64 = 10;

#[derive(Debug, Default)]
struct Bucket {
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

#[derive(Debug)]
pub struct Retries {
    pub settings: RetrySettings,
    epoch: Instant,
    ring: [Bucket; WINDOW as usize],
    /// Retries sent (after a failure).
    pub retried: Counter,
    /// Retries the budget refused (the request got the failure instead).
    pub refused: Counter,
    /// Requests moved off an engine ejected while they waited for its first byte (not
    /// retries of a failure: not charged to the budget, no backoff).
    pub moved: Counter,
}

impl Retries {
    pub fn new(settings: RetrySettings) -> Self {
        Retries {
            settings,
            epoch: Instant::now(),
            ring: Default::default(),
            retried: Counter::default(),
            refused: Counter::default(),
            moved: Counter::default(),
        }
    }

    fn now_sec(&self) -> u64 {
        // Seconds start at 1 so that a fresh bucket (second 0) never counts.
        self.epoch.elapsed().as_secs() + 1
    }

    fn bucket(&self, sec: u64) -> &Bucket {
        let b = &self.ring[(sec % WINDOW) as usize];
        let seen = b.second.load(Ordering::Relaxed);
        if seen != sec
            && b.second
                .compare_exchange(seen, sec, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            b.requests.store(0, Ordering::Relaxed);
            b.retries.store(0, Ordering::Relaxed);
        }
        b
    }

    /// A request arrived (every request, once).
    pub fn on_request(&self) {
        self.bucket(self.now_sec())
            .requests
            .fetch_add(1, Ordering::Relaxed);
    }

    /// May this request be retried? Charges the budget when it may.
    pub fn try_retry(&self) -> bool {
        let now = self.now_sec();
        let (mut requests, mut retries) = (0u64, 0u64);
        for b in &self.ring {
            let s = b.second.load(Ordering::Relaxed);
            if s + WINDOW > now && s <= now {
                requests += b.requests.load(Ordering::Relaxed);
                retries += b.retries.load(Ordering::Relaxed);
            }
        }
        let allowed = self.settings.budget_min_per_sec * WINDOW as f64
            + self.settings.budget_ratio * requests as f64;
        if (retries as f64) < allowed {
            self.bucket(now).retries.fetch_add(1, Ordering::Relaxed);
            self.retried.inc();
            true
        } else {
            self.refused.inc();
            false
        }
    }

    /// The wait before retry number `n` (0 for the first): `initial × multiplier^n`, at
    /// most the maximum, within ± the jitter factor; `salt` varies the draw.
    pub fn backoff(&self, n: u32, salt: u64) -> Duration {
        let s = &self.settings;
        let base = s.initial_backoff.as_secs_f64() * s.multiplier.powi(n.min(64) as i32);
        let base = base.min(s.max_backoff.as_secs_f64());
        // A uniform draw in [-1, 1) from the salt and the clock.
        let nanos = self.epoch.elapsed().as_nanos() as u64;
        let u = (mix64(salt ^ nanos.rotate_left(17)) >> 11) as f64 / (1u64 << 53) as f64;
        let d = base * (1.0 + s.jitter * (2.0 * u - 1.0));
        Duration::from_secs_f64(d.clamp(0.0, s.max_backoff.as_secs_f64()))
    }

    pub fn render_metrics(&self, w: &mut TextWriter) {
        for (name, help, c) in [
            (
                "vllm:router_retries_total",
                "Upstream attempts retried after a failure before the first byte",
                &self.retried,
            ),
            (
                "vllm:router_retries_refused_total",
                "Retries the retry budget refused",
                &self.refused,
            ),
            (
                "vllm:router_requests_moved_total",
                "Requests moved to another engine because theirs was ejected before its first byte",
                &self.moved,
            ),
        ] {
            w.header(name, "counter", help);
            w.sample(name, &[], c.get() as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(ratio: f64, floor: f64) -> RetrySettings {
        RetrySettings {
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
            multiplier: 2.0,
            jitter: 0.2,
            budget_ratio: ratio,
            budget_min_per_sec: floor,
        }
    }

    #[test]
    fn the_budget_allows_the_ratio_plus_the_floor() {
        let r = Retries::new(settings(0.2, 0.5));
        // Floor: 0.5/s over 10 s = 5 retries with no traffic.
        assert_eq!((0..20).filter(|_| r.try_retry()).count(), 5);
        for _ in 0..100 {
            r.on_request();
        }
        // 100 requests allow 20 more.
        assert_eq!((0..100).filter(|_| r.try_retry()).count(), 20);
        assert_eq!(r.retried.get(), 25);
        assert_eq!(r.refused.get(), 95);
    }

    #[test]
    fn backoff_grows_jittered_and_capped() {
        let r = Retries::new(settings(0.2, 10.0));
        for salt in 0..100 {
            let d0 = r.backoff(0, salt).as_secs_f64();
            assert!((0.04..=0.06).contains(&d0), "{d0}");
            let d1 = r.backoff(1, salt).as_secs_f64();
            assert!((0.08..=0.12).contains(&d1), "{d1}");
            assert!(r.backoff(10, salt) <= Duration::from_millis(200));
        }
    }
}
