//! Per-engine request statistics over a sliding window, in constant time and memory.
//!
//! The window is a ring of one-second buckets; recording touches one bucket (resetting
//! it when its second has passed), and reading sums the ring (only at `/metrics` time).
//! Nothing is kept per request: the Production Stack router's growing per-request maps
//! are the reason it gets OOM-killed, and its window sums are recomputed per request.

use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug, Default, Clone, Copy)]
struct Bucket {
    second: u64,
    requests: u64,
    latency_sum: f64,
    completed: u64,
    ttft_sum: f64,
    ttft_n: u64,
    itl_sum: f64,
    itl_n: u64,
    decode_tokens: u64,
}

/// A window summary.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct WindowSummary {
    pub qps: f64,
    pub avg_latency: f64,
    pub avg_ttft: f64,
    pub avg_itl: f64,
    pub avg_decoding_length: f64,
    pub completed: u64,
}

#[derive(Debug)]
pub struct RequestStats {
    epoch: Instant,
    window: u64,
    ring: Mutex<Vec<Bucket>>,
}

impl RequestStats {
    pub fn new(window_secs: u64, epoch: Instant) -> Self {
        let window = window_secs.max(1);
        RequestStats {
            epoch,
            window,
            ring: Mutex::new(vec![Bucket::default(); window as usize]),
        }
    }

    fn now_sec(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    fn with_bucket(&self, f: impl FnOnce(&mut Bucket)) {
        let sec = self.now_sec();
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let b = &mut ring[(sec % self.window) as usize];
        if b.second != sec {
            *b = Bucket {
                second: sec,
                ..Bucket::default()
            };
        }
        f(b);
    }

    /// A request arrived (counts toward QPS).
    pub fn on_arrival(&self) {
        self.with_bucket(|b| b.requests += 1);
    }

    /// A request completed: its end-to-end latency, time to first token (if any token
    /// came), summed inter-token gaps and their count, and output length.
    pub fn on_complete(
        &self,
        latency: f64,
        ttft: Option<f64>,
        itl_sum: f64,
        itl_n: u64,
        decode_tokens: u64,
    ) {
        self.with_bucket(|b| {
            b.completed += 1;
            b.latency_sum += latency;
            if let Some(t) = ttft {
                b.ttft_sum += t;
                b.ttft_n += 1;
            }
            b.itl_sum += itl_sum;
            b.itl_n += itl_n;
            b.decode_tokens += decode_tokens;
        });
    }

    pub fn summary(&self) -> WindowSummary {
        let sec = self.now_sec();
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let mut t = Bucket::default();
        for b in ring
            .iter()
            .filter(|b| sec.saturating_sub(b.second) < self.window && b.second <= sec)
        {
            t.requests += b.requests;
            t.latency_sum += b.latency_sum;
            t.completed += b.completed;
            t.ttft_sum += b.ttft_sum;
            t.ttft_n += b.ttft_n;
            t.itl_sum += b.itl_sum;
            t.itl_n += b.itl_n;
            t.decode_tokens += b.decode_tokens;
        }
        // Early on, the window is only as long as the router has run.
        let span = (sec + 1).min(self.window) as f64;
        let div = |a: f64, n: u64| if n == 0 { 0.0 } else { a / n as f64 };
        WindowSummary {
            qps: t.requests as f64 / span,
            avg_latency: div(t.latency_sum, t.completed),
            avg_ttft: div(t.ttft_sum, t.ttft_n),
            avg_itl: div(t.itl_sum, t.itl_n),
            avg_decoding_length: div(t.decode_tokens as f64, t.completed),
            completed: t.completed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_averages_what_was_recorded() {
        let s = RequestStats::new(60, Instant::now());
        s.on_arrival();
        s.on_arrival();
        s.on_complete(1.0, Some(0.2), 0.3, 3, 4);
        s.on_complete(3.0, None, 0.0, 0, 0);
        let w = s.summary();
        assert_eq!(w.completed, 2);
        assert!((w.avg_latency - 2.0).abs() < 1e-9);
        assert!((w.avg_ttft - 0.2).abs() < 1e-9);
        assert!((w.avg_itl - 0.1).abs() < 1e-9);
        assert!((w.avg_decoding_length - 2.0).abs() < 1e-9);
        assert!((w.qps - 2.0).abs() < 1e-9, "{}", w.qps);
    }
}
