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
    /// With a KV cache server: prompt tokens loaded from the KV tiers (the engines' host
    /// memory and the server) rather than computed, and what the server held at the end
    /// (chunks, bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_loaded_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_server_held: Option<(usize, u64)>,
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
    let (report, hit, routed, simulated, offload) = rt.block_on(async {
        let stack = Stack::start(cfg)?;
        let target = Target::local(
            "sim://plan",
            Arc::new(Served(stack.clone())),
            Duration::from_secs(3600),
        );
        let t0 = tokio::time::Instant::now();
        let report = workload.run(target).await?;
        let simulated = t0.elapsed().as_secs_f64();
        anyhow::Ok((
            report,
            stack.cache_hit_rate(),
            stack.routed(),
            simulated,
            stack.kv_offload(),
        ))
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
        kv_loaded_tokens: offload.1.map(|_| offload.0),
        kv_server_held: offload.1,
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
            kv_cache_server: None,
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

    /// With a KV cache server behind round-robin engines, a user's later rounds, sent to
    /// engines that never saw the conversation, load it from the server instead of
    /// computing it: more prompt tokens hit, TTFT drops, and the server never holds more
    /// than its capacity (a server of two chunks holds two, and helps less).
    #[test]
    fn a_kv_cache_server_turns_recomputation_into_remote_hits() {
        let workload = Workload::new(WorkloadArgs {
            workload: crate::WorkloadKind::MultiRound,
            duration: 60.0,
            qps: 2.0,
            num_users: 8,
            num_rounds: 4,
            shared_system_prompt: 256,
            user_history_prompt: 1024,
            question_len: 16,
            output_len: 20,
            input_len: 0,
            trace: None,
            speedup: 1.0,
            seed: 1,
        })
        .expect("workload");
        let profile = SimProfile::preset("llama-3.1-8b-h100").expect("preset");
        // Llama-3.1-8B: 128 KiB of KV per token, 32 MiB per 256-token chunk.
        let chunk = 32u64 << 20;
        let cfg = |server: Option<u64>| StackConfig {
            engines: 4,
            routing: RoutingLogic::Roundrobin,
            profile: profile.clone(),
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            max_model_len: 8192,
            block_size: 16,
            num_blocks: 16384,
            stats_interval: Duration::from_secs(15),
            kv_overlap_weight: 16.0,
            kv_min_match: 0.3,
            prefix: PrefixSettings::default(),
            kv_cache_server: server,
        };
        let off = simulate(&cfg(None), &workload).expect("without");
        let on = simulate(&cfg(Some(64 << 30)), &workload).expect("with");
        let small = simulate(&cfg(Some(2 * chunk)), &workload).expect("small");
        for (what, r) in [("without", &off), ("with", &on), ("two chunks", &small)] {
            eprintln!(
                "{what}: hit {:.3}, TTFT mean {:.1} ms, loaded {:?}, held {:?}",
                r.cache_hit_rate, r.report.ttft_ms.mean, r.kv_loaded_tokens, r.kv_server_held
            );
        }
        for r in [&off, &on, &small] {
            assert_eq!(r.report.requests.failed, 0, "{:?}", r.report.requests);
            assert_eq!(r.report.requests.completed, off.report.requests.completed);
        }
        assert!(off.report.requests.completed >= 32);
        assert_eq!((off.kv_loaded_tokens, off.kv_server_held), (None, None));
        let loaded = on.kv_loaded_tokens.expect("loaded");
        let (chunks, bytes) = on.kv_server_held.expect("held");
        assert!(loaded >= 256 * 16, "{loaded} tokens loaded");
        assert_eq!(
            bytes,
            chunks as u64 * chunk,
            "payloads of the model's real size"
        );
        assert!(bytes <= 64 << 30);
        assert!(
            on.cache_hit_rate > off.cache_hit_rate + 0.1,
            "hit rate {:.3} with the server, {:.3} without",
            on.cache_hit_rate,
            off.cache_hit_rate
        );
        let (t_on, t_off) = (on.report.ttft_ms.mean, off.report.ttft_ms.mean);
        assert!(
            t_on < 0.9 * t_off,
            "TTFT mean {t_on:.1} ms with, {t_off:.1} ms without"
        );
        let (small_chunks, small_bytes) = small.kv_server_held.expect("held");
        assert!(small_chunks <= 2 && small_bytes <= 2 * chunk);
        assert!(
            small.cache_hit_rate < on.cache_hit_rate,
            "{:.3} with two chunks, {:.3} with 64 GiB",
            small.cache_hit_rate,
            on.cache_hit_rate
        );
    }
}
