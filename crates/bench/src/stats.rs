//! Collecting measurements while a run goes, and summarizing them at the end.
//!
//! Per-request figures (TTFT, end-to-end, TPOT) are kept as one `f64` each, exact
//! percentiles at the end; per-token gaps (ITL) go into a log-bucketed histogram with
//! 1% relative resolution, so memory does not grow with the tokens generated.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::client::{ErrorKind, Outcome};

/// Summary of one distribution, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Dist {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

/// Percentile with linear interpolation between closest ranks (numpy's default).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

impl Dist {
    /// From samples in seconds.
    pub fn from_secs(samples: &[f64]) -> Dist {
        if samples.is_empty() {
            return Dist::default();
        }
        let mut v: Vec<f64> = samples.iter().map(|s| s * 1000.0).collect();
        v.sort_by(f64::total_cmp);
        Dist {
            count: v.len() as u64,
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: percentile(&v, 50.0),
            p90: percentile(&v, 90.0),
            p99: percentile(&v, 99.0),
            min: v[0],
            max: v[v.len() - 1],
        }
    }
}

/// Histogram with logarithmic buckets (1% wide) from 1 µs to ~3 hours; exact count,
/// sum, min and max. Zero gaps (events that arrived in one read) have their own bucket.
#[derive(Debug, Clone)]
pub struct LogHist {
    zeros: u64,
    buckets: Vec<u64>,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

const LH_MIN: f64 = 1e-6;
const LH_GROWTH: f64 = 1.01;
const LH_BUCKETS: usize = 2400;

impl Default for LogHist {
    fn default() -> Self {
        LogHist {
            zeros: 0,
            buckets: vec![0; LH_BUCKETS],
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: 0.0,
        }
    }
}

impl LogHist {
    pub fn observe(&mut self, v: f64) {
        let v = v.max(0.0);
        self.count += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        if v < LH_MIN {
            self.zeros += 1;
            return;
        }
        let i = ((v / LH_MIN).ln() / LH_GROWTH.ln()) as usize;
        self.buckets[i.min(LH_BUCKETS - 1)] += 1;
    }

    fn quantile(&self, p: f64) -> f64 {
        // The value at rank p/100·(n−1), as `percentile` does, from the bucket holding it.
        let rank = (p / 100.0 * (self.count - 1) as f64).round() as u64;
        if rank < self.zeros {
            return 0.0;
        }
        let mut seen = self.zeros;
        for (i, &c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen > rank {
                let mid = LH_MIN * LH_GROWTH.powf(i as f64 + 0.5);
                return mid.clamp(self.min, self.max);
            }
        }
        self.max
    }

    /// Summary in milliseconds.
    pub fn dist(&self) -> Dist {
        if self.count == 0 {
            return Dist::default();
        }
        Dist {
            count: self.count,
            mean: self.sum / self.count as f64 * 1000.0,
            p50: self.quantile(50.0) * 1000.0,
            p90: self.quantile(90.0) * 1000.0,
            p99: self.quantile(99.0) * 1000.0,
            min: self.min * 1000.0,
            max: self.max * 1000.0,
        }
    }
}

#[derive(Debug, Default)]
struct Acc {
    ttft: Vec<f64>,
    e2e: Vec<f64>,
    tpot: Vec<f64>,
    itl: LogHist,
    completed: u64,
    failed: u64,
    prompt_tokens: u64,
    output_tokens: u64,
    usage_missing: u64,
    errors: BTreeMap<ErrorKind, u64>,
    examples: BTreeMap<ErrorKind, String>,
    last_end: Option<Instant>,
}

#[derive(Debug, Default)]
struct RoundAcc {
    ttft: Vec<f64>,
    e2e: Vec<f64>,
    prompt_tokens: u64,
    completed: u64,
    failed: u64,
}

/// Shared by every request task of a run.
pub struct Recorder {
    pub start: Instant,
    pub in_flight: AtomicU64,
    pub launched: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub output_tokens: AtomicU64,
    acc: Mutex<Acc>,
    rounds: Mutex<Vec<RoundAcc>>,
}

/// A request in flight: counted until dropped (finished, failed or cancelled).
pub struct InFlight(Arc<Recorder>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a run measured, before it becomes a report.
#[derive(Debug, Clone, Default)]
pub struct Totals {
    pub duration_s: f64,
    pub completed: u64,
    pub failed: u64,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    pub usage_missing: u64,
    pub errors: BTreeMap<String, u64>,
    pub error_examples: BTreeMap<String, String>,
    pub ttft_ms: Dist,
    pub itl_ms: Dist,
    pub tpot_ms: Dist,
    pub e2e_ms: Dist,
    pub rounds: Vec<RoundReport>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RoundReport {
    pub round: usize,
    pub completed: u64,
    pub failed: u64,
    pub prompt_tokens_mean: f64,
    pub ttft_ms: Dist,
    pub e2e_ms: Dist,
}

impl Recorder {
    pub fn new() -> Self {
        Recorder {
            start: crate::now(),
            in_flight: AtomicU64::new(0),
            launched: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            output_tokens: AtomicU64::new(0),
            acc: Mutex::new(Acc::default()),
            rounds: Mutex::new(Vec::new()),
        }
    }

    /// Count a request as launched and in flight (until the guard drops).
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.launched.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Record a finished request (`round` counts from 1 for multi-round).
    pub fn record(&self, o: &Outcome, round: Option<usize>) {
        let now = crate::now();
        let ok = o.error.is_none();
        {
            let mut a = self.acc.lock().unwrap();
            a.last_end = Some(now);
            match &o.error {
                None => {
                    a.completed += 1;
                    a.e2e.push(o.e2e);
                    if let Some(t) = o.ttft {
                        a.ttft.push(t);
                    }
                    for &g in &o.itl {
                        a.itl.observe(g);
                    }
                    let out = match o.output_tokens {
                        Some(n) => n,
                        None => {
                            a.usage_missing += 1;
                            o.chunks
                        }
                    };
                    a.output_tokens += out;
                    a.prompt_tokens += o.prompt_tokens.unwrap_or(0);
                    if let (Some(t), true) = (o.ttft, out > 1) {
                        a.tpot.push((o.e2e - t) / (out - 1) as f64);
                    }
                    self.output_tokens.fetch_add(out, Ordering::Relaxed);
                }
                Some((kind, msg)) => {
                    a.failed += 1;
                    *a.errors.entry(*kind).or_default() += 1;
                    a.examples.entry(*kind).or_insert_with(|| msg.clone());
                }
            }
        }
        if ok {
            self.completed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(r) = round {
            let mut rounds = self.rounds.lock().unwrap();
            if rounds.len() < r {
                rounds.resize_with(r, RoundAcc::default);
            }
            let ra = &mut rounds[r - 1];
            if ok {
                ra.completed += 1;
                ra.e2e.push(o.e2e);
                if let Some(t) = o.ttft {
                    ra.ttft.push(t);
                }
                ra.prompt_tokens += o.prompt_tokens.unwrap_or(0);
            } else {
                ra.failed += 1;
            }
        }
    }

    pub fn totals(&self) -> Totals {
        let a = self.acc.lock().unwrap();
        let end = a.last_end.unwrap_or(self.start);
        let rounds = self.rounds.lock().unwrap();
        Totals {
            duration_s: (end - self.start).as_secs_f64(),
            completed: a.completed,
            failed: a.failed,
            prompt_tokens: a.prompt_tokens,
            output_tokens: a.output_tokens,
            usage_missing: a.usage_missing,
            errors: a
                .errors
                .iter()
                .map(|(k, v)| (k.name().to_string(), *v))
                .collect(),
            error_examples: a
                .examples
                .iter()
                .map(|(k, v)| (k.name().to_string(), v.clone()))
                .collect(),
            ttft_ms: Dist::from_secs(&a.ttft),
            itl_ms: a.itl.dist(),
            tpot_ms: Dist::from_secs(&a.tpot),
            e2e_ms: Dist::from_secs(&a.e2e),
            rounds: rounds
                .iter()
                .enumerate()
                .map(|(i, r)| RoundReport {
                    round: i + 1,
                    completed: r.completed,
                    failed: r.failed,
                    prompt_tokens_mean: if r.completed > 0 {
                        r.prompt_tokens as f64 / r.completed as f64
                    } else {
                        0.0
                    },
                    ttft_ms: Dist::from_secs(&r.ttft),
                    e2e_ms: Dist::from_secs(&r.e2e),
                })
                .collect(),
        }
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 2.5);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 100.0), 4.0);
        assert!((percentile(&v, 90.0) - 3.7).abs() < 1e-12);
    }

    #[test]
    fn log_hist_is_within_one_percent() {
        let mut h = LogHist::default();
        let mut exact = Vec::new();
        for i in 1..=10_000 {
            let v = 0.001 * i as f64 / 100.0; // 10 µs .. 100 ms
            h.observe(v);
            exact.push(v * 1000.0);
        }
        h.observe(0.0);
        exact.push(0.0);
        exact.sort_by(f64::total_cmp);
        let d = h.dist();
        for (got, p) in [(d.p50, 50.0), (d.p90, 90.0), (d.p99, 99.0)] {
            let want = percentile(&exact, p);
            assert!((got / want - 1.0).abs() < 0.011, "p{p}: {got} vs {want}");
        }
        assert_eq!(d.count, 10_001);
        assert_eq!(d.min, 0.0);
    }
}
