//! The result of a run: JSON for machines (`--output`), a table for people.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::stats::{Dist, RoundReport, Totals};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Counts {
    /// Requests sent (= completed + failed + unfinished).
    pub launched: u64,
    pub completed: u64,
    pub failed: u64,
    /// Still running when the drain time after `--time` ran out; cancelled, not errors.
    pub unfinished: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Throughput {
    /// Completed requests per second of the run.
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    pub input_tokens_per_s: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Tokens {
    pub prompt_total: u64,
    pub output_total: u64,
    /// Completed requests whose stream had no `usage` (their output was counted as
    /// the number of text events).
    pub usage_missing: u64,
}

/// One run. Latencies in milliseconds; `duration_s` runs from the first request sent
/// to the last one ended.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub tool: String,
    pub version: String,
    pub workload: String,
    pub label: String,
    /// The load level (qps, request rate or concurrency) for charts, if one applies.
    pub load: Option<f64>,
    pub base_url: String,
    pub model: String,
    pub started_unix: f64,
    pub duration_s: f64,
    pub requests: Counts,
    /// Failed requests by kind: connect, disconnected, http_4xx, http_5xx, http_other,
    /// truncated, stream_error, invalid, timeout.
    pub errors: BTreeMap<String, u64>,
    /// The first error message of each kind.
    pub error_examples: BTreeMap<String, String>,
    pub throughput: Throughput,
    pub tokens: Tokens,
    pub ttft_ms: Dist,
    /// Every gap between text-carrying stream events, over all requests.
    pub itl_ms: Dist,
    /// Per request: (end-to-end − TTFT) / (output tokens − 1).
    pub tpot_ms: Dist,
    pub e2e_ms: Dist,
    /// Multi-round only: by question number within a conversation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rounds: Vec<RoundReport>,
    pub config: serde_json::Value,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        workload: &str,
        label: String,
        load: Option<f64>,
        base_url: &str,
        model: String,
        config: serde_json::Value,
        t: Totals,
        launched: u64,
        started_unix: f64,
    ) -> Report {
        let d = t.duration_s.max(1e-9);
        Report {
            tool: "switchyard-bench".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            workload: workload.into(),
            label,
            load,
            base_url: base_url.into(),
            model,
            started_unix,
            duration_s: t.duration_s,
            requests: Counts {
                launched,
                completed: t.completed,
                failed: t.failed,
                unfinished: launched.saturating_sub(t.completed + t.failed),
            },
            errors: t.errors,
            error_examples: t.error_examples,
            throughput: Throughput {
                requests_per_s: t.completed as f64 / d,
                output_tokens_per_s: t.output_tokens as f64 / d,
                input_tokens_per_s: t.prompt_tokens as f64 / d,
            },
            tokens: Tokens {
                prompt_total: t.prompt_tokens,
                output_total: t.output_tokens,
                usage_missing: t.usage_missing,
            },
            ttft_ms: t.ttft_ms,
            itl_ms: t.itl_ms,
            tpot_ms: t.tpot_ms,
            e2e_ms: t.e2e_ms,
            rounds: t.rounds,
            config,
        }
    }

    /// The human-readable summary.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let r = &self.requests;
        let _ = writeln!(
            s,
            "{} → {} (model {})",
            self.label, self.base_url, self.model
        );
        let _ = writeln!(
            s,
            "duration {:.2} s   requests: {} completed, {} failed, {} unfinished",
            self.duration_s, r.completed, r.failed, r.unfinished
        );
        if !self.errors.is_empty() {
            let kinds: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(s, "errors: {}", kinds.join(", "));
            for (k, m) in &self.error_examples {
                let _ = writeln!(s, "  e.g. {k}: {m}");
            }
        }
        let t = &self.throughput;
        let _ = writeln!(
            s,
            "throughput: {:.2} req/s   {:.1} output tok/s   {:.1} input tok/s   ({} output, {} prompt tokens)",
            t.requests_per_s,
            t.output_tokens_per_s,
            t.input_tokens_per_s,
            self.tokens.output_total,
            self.tokens.prompt_total
        );
        if self.tokens.usage_missing > 0 {
            let _ = writeln!(
                s,
                "note: {} responses had no usage; their output tokens were counted as text events",
                self.tokens.usage_missing
            );
        }
        let _ = writeln!(
            s,
            "{:<6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "ms", "mean", "p50", "p90", "p99", "max", "n"
        );
        for (name, d) in [
            ("TTFT", &self.ttft_ms),
            ("ITL", &self.itl_ms),
            ("TPOT", &self.tpot_ms),
            ("E2E", &self.e2e_ms),
        ] {
            let _ = writeln!(
                s,
                "{:<6} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10}",
                name, d.mean, d.p50, d.p90, d.p99, d.max, d.count
            );
        }
        if !self.rounds.is_empty() {
            let _ = writeln!(
                s,
                "{:<6} {:>6} {:>6} {:>12} {:>12} {:>12} {:>12}",
                "round", "ok", "failed", "prompt tok", "TTFT p50", "TTFT p99", "E2E p50"
            );
            for rr in &self.rounds {
                let _ = writeln!(
                    s,
                    "{:<6} {:>6} {:>6} {:>12.0} {:>12.2} {:>12.2} {:>12.2}",
                    rr.round,
                    rr.completed,
                    rr.failed,
                    rr.prompt_tokens_mean,
                    rr.ttft_ms.p50,
                    rr.ttft_ms.p99,
                    rr.e2e_ms.p50
                );
            }
        }
        s
    }
}
