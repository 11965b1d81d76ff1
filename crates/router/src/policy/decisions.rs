//! Decision statistics of the tree-based policies (`prefixaware`, `kvaware`): how each
//! routing decision came out (the `outcome` label) and what share of the prompt the
//! chosen engine held, as `/metrics` families and the dashboard's `decisions`.
//!
//! Recording is a relaxed atomic increment in a fixed array (indexed by the outcome, no
//! labels taken from requests) and one histogram observation: nothing is allocated per
//! request.

use std::marker::PhantomData;

use protocol::prom::{Counter, Histogram, TextWriter};

/// Bucket bounds of the matched-prefix-ratio histograms: `matched / prompt length`.
pub const RATIO_BUCKETS: &[f64] = &[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

/// The names and help texts of one policy's decision families.
#[derive(Debug)]
pub struct Family {
    /// The counter by outcome (`..._decisions_total`).
    pub decisions: &'static str,
    pub decisions_help: &'static str,
    /// The matched-prefix-ratio histogram.
    pub ratio: &'static str,
    pub ratio_help: &'static str,
}

/// How one policy's decisions come out: a fieldless enum whose `index` is its position in
/// `ALL` (the order the series are rendered in).
pub trait Outcome: Copy + 'static {
    const ALL: &'static [Self];
    /// Where the policy's decision metrics go.
    const FAMILY: Family;
    /// The `outcome` label value.
    fn label(self) -> &'static str;
    fn index(self) -> usize;
}

/// Decisions by outcome (`N` of them) and the matched-prefix ratio of the chosen engine.
#[derive(Debug)]
pub struct Decisions<O: Outcome, const N: usize> {
    counts: [Counter; N],
    /// Matched prefix of the first-ranked engine / prompt length.
    pub matched_ratio: Histogram,
    _outcome: PhantomData<O>,
}

impl<O: Outcome, const N: usize> Default for Decisions<O, N> {
    fn default() -> Self {
        assert_eq!(O::ALL.len(), N, "one counter per outcome");
        Decisions {
            counts: std::array::from_fn(|_| Counter::default()),
            matched_ratio: Histogram::new(RATIO_BUCKETS),
            _outcome: PhantomData,
        }
    }
}

impl<O: Outcome, const N: usize> Decisions<O, N> {
    /// Count one decision.
    pub fn record(&self, outcome: O) {
        self.counts[outcome.index()].inc();
    }

    /// Decisions so far with this outcome.
    pub fn count(&self, outcome: O) -> u64 {
        self.counts[outcome.index()].get()
    }

    /// Every outcome's count, in `O::ALL` order (the dashboard's `decisions`).
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        O::ALL.iter().map(|&o| (o.label(), self.count(o))).collect()
    }

    /// The decisions counter and the ratio histogram.
    pub fn render(&self, w: &mut TextWriter) {
        let f = &O::FAMILY;
        w.header(f.decisions, "counter", f.decisions_help);
        for &o in O::ALL {
            w.sample(f.decisions, &[("outcome", o.label())], self.count(o) as f64);
        }
        w.header(f.ratio, "histogram", f.ratio_help);
        w.histogram(f.ratio, &[], &self.matched_ratio);
    }
}
