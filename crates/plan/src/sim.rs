//! One simulated run: a workload over a [`Stack`] in virtual time.
//!
//! Each run builds a current-thread tokio runtime started paused: its clock is virtual
//! and jumps to the next timer whenever every task waits, so the engines' modelled steps,
//! the users' think times and the arrivals of a trace take no wall time. The workload is
//! the bench's own code ([`bench::workload`]), pointed at the stack through
//! [`bench::client::Target::local`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bench::client::Target;
use bench::workload::TraceEntry;
use bench::{CommonArgs, LoadArgs, MultiRoundArgs, RandomArgs, TraceArgs};
use serde::Serialize;

use crate::stack::{Served, Stack, StackConfig, MODEL};
use crate::{WorkloadArgs, WorkloadKind};

/// A workload, ready to run (a trace read once).
#[derive(Debug, Clone)]
pub struct Workload {
    pub args: WorkloadArgs,
    trace: Option<Arc<Vec<TraceEntry>>>,
}

impl Workload {
    pub fn new(args: WorkloadArgs) -> anyhow::Result<Workload> {
        anyhow::ensure!(
            args.duration > 0.0 && args.duration.is_finite(),
            "--duration must be positive"
        );
        anyhow::ensure!(
            args.qps > 0.0 && args.qps.is_finite(),
            "--qps must be positive"
        );
        let trace = match args.workload {
            WorkloadKind::Trace => {
                let path = args
                    .trace
                    .as_ref()
                    .context("--workload trace needs --trace FILE")?;
                Some(Arc::new(bench::workload::read_trace(path)?))
            }
            _ => None,
        };
        Ok(Workload { args, trace })
    }

    fn common(&self) -> CommonArgs {
        CommonArgs {
            base_url: "sim://plan".into(),
            model: Some(MODEL.into()),
            output: None,
            label: None,
            seed: self.args.seed,
            request_timeout: 3600.0,
            drain_timeout: 600.0,
            api_key: None,
            no_progress: true,
            extra_body: None,
        }
    }

    async fn run(&self, target: Target) -> anyhow::Result<bench::Report> {
        let a = &self.args;
        let model = MODEL.to_string();
        match a.workload {
            WorkloadKind::MultiRound => {
                let m = MultiRoundArgs {
                    common: self.common(),
                    num_users: a.num_users,
                    num_rounds: a.num_rounds,
                    qps: a.qps,
                    shared_system_prompt: a.shared_system_prompt,
                    user_history_prompt: a.user_history_prompt,
                    answer_len: a.output_len,
                    question_len: a.question_len,
                    time: a.duration,
                    no_ramp_up: false,
                };
                bench::workload::multi_round_on(target, model, &m).await
            }
            WorkloadKind::Random => {
                let r = RandomArgs {
                    common: self.common(),
                    load: LoadArgs {
                        num_requests: None,
                        request_rate: a.qps,
                        concurrency: None,
                        time: Some(a.duration),
                    },
                    input_len: a.input_len,
                    output_len: a.output_len,
                    range_ratio: 0.5,
                    length_dist: bench::LengthDist::Uniform,
                    api: bench::Api::Chat,
                };
                bench::workload::random_on(&target, model, &r).await
            }
            WorkloadKind::Trace => {
                let t = TraceArgs {
                    common: self.common(),
                    file: a.trace.clone().unwrap_or_default(),
                    speedup: a.speedup,
                    time: Some(a.duration),
                    api: bench::Api::Chat,
                };
                let entries = self.trace.as_deref().map(Vec::as_slice).unwrap_or(&[]);
                bench::workload::trace_on(&target, model, &t, entries).await
            }
        }
    }
}

/// What one simulated run measured.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub engines: usize,
    pub routing: String,
    pub report: bench::Report,
    /// Prompt tokens served from the engines' prefix caches, of all looked up.
    pub cache_hit_rate: f64,
    /// Simulated seconds (first request to last answer) and the wall time the run took.
    pub simulated_s: f64,
    pub wall_s: f64,
    /// Requests each engine was sent.
    pub routed: Vec<u64>,
}

impl RunResult {
    /// Simulated engine-seconds per wall-clock second.
    pub fn speed(&self) -> f64 {
        self.engines as f64 * self.simulated_s / self.wall_s.max(1e-9)
    }
}

/// Run `workload` over a stack of `cfg` in virtual time.
pub fn simulate(cfg: &StackConfig, workload: &Workload) -> anyhow::Result<RunResult> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()?;
    let wall = Instant::now();
    let (report, hit, routed, simulated) = rt.block_on(async {
        let stack = Stack::start(cfg);
        let target = Target::local(
            "sim://plan",
            Arc::new(Served(stack.clone())),
            Duration::from_secs(3600),
        );
        let t0 = tokio::time::Instant::now();
        let report = workload.run(target).await?;
        let simulated = t0.elapsed().as_secs_f64();
        anyhow::Ok((report, stack.cache_hit_rate(), stack.routed(), simulated))
    })?;
    // The engine tasks end with the runtime.
    drop(rt);
    Ok(RunResult {
        engines: cfg.engines,
        routing: routing_name(cfg.routing),
        report,
        cache_hit_rate: hit,
        simulated_s: simulated,
        wall_s: wall.elapsed().as_secs_f64(),
        routed,
    })
}

pub fn routing_name(r: router::config::RoutingLogic) -> String {
    clap::ValueEnum::to_possible_value(&r)
        .map(|v| v.get_name().to_string())
        .unwrap_or_else(|| format!("{r:?}").to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::backend::sim::SimProfile;
    use router::config::{PrefixSettings, RoutingLogic};

    /// A trace's arrivals replay at their times in virtual time: every request served,
    /// the run as long as the trace, each TTFT the model's (nothing queues at this rate),
    /// and a session's requests all on one engine.
    #[test]
    fn a_trace_replays_in_virtual_time() {
        let dir = std::env::temp_dir().join(format!("sy-plan-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("trace.jsonl");
        let lines: Vec<String> = (0..30)
            .map(|i| {
                format!(
                    r#"{{"timestamp": {}, "prompt_tokens": 100, "output_tokens": 10, "session_id": "s{}"}}"#,
                    1000.0 + 10.0 * i as f64,
                    i % 2
                )
            })
            .collect();
        std::fs::write(&path, lines.join("\n")).expect("write");
        let args = WorkloadArgs {
            workload: WorkloadKind::Trace,
            duration: 1000.0,
            qps: 1.0,
            num_users: 1,
            num_rounds: 1,
            shared_system_prompt: 0,
            user_history_prompt: 0,
            question_len: 1,
            output_len: 1,
            input_len: 1,
            trace: Some(path),
            speedup: 1.0,
            seed: 1,
        };
        let workload = Workload::new(args).expect("workload");
        let profile = SimProfile {
            overhead_us: 20_000.0,
            prefill_us_per_token: 40.0,
            decode_us_per_seq: 1000.0,
            decode_us_per_ctx_token: 0.0,
            ..SimProfile::preset("zero").expect("preset")
        };
        let cfg = StackConfig {
            engines: 2,
            routing: RoutingLogic::Session,
            profile,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            max_model_len: 8192,
            block_size: 16,
            num_blocks: 4096,
            stats_interval: Duration::from_secs(15),
            kv_overlap_weight: 16.0,
            kv_min_match: 0.3,
            prefix: PrefixSettings::default(),
        };
        let r = simulate(&cfg, &workload).expect("simulate");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            (r.report.requests.completed, r.report.requests.failed),
            (30, 0)
        );
        assert!(r.simulated_s >= 290.0, "{}", r.simulated_s);
        // The chat template adds a few tokens to the 100 words: 20 ms + ~4.4 ms.
        let t = &r.report.ttft_ms;
        assert!(t.min >= 23.0 && t.max <= 26.0, "{t:?}");
        let mut routed = r.routed.clone();
        routed.sort_unstable();
        assert!(
            routed == [15, 15] || routed == [0, 30],
            "each session's requests on one engine: {:?}",
            r.routed
        );
    }
}
