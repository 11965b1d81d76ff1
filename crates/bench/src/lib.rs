//! `switchyard bench`: the load generator.
//!
//! Workloads (`multi-round`, `shared-prefix`, `random`, `trace`) drive any OpenAI-compatible
//! server with streaming requests and measure each one (TTFT, ITL, end-to-end, tokens,
//! errors by kind); the run ends as a table on stdout and, with `--output`, a JSON
//! report that `switchyard bench compare` reads back. `cache` measures a KV cache
//! server instead.

pub mod cache;
pub mod client;
pub mod compare;
pub mod report;
pub mod stats;
pub mod text;
pub mod workload;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;

pub use report::Report;

/// The current time: the system's, or virtual time under a paused tokio runtime
/// (`switchyard plan` runs the workloads in a discrete-event simulation).
pub fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Production Stack multi-round QA: users hold conversations that grow each round.
    MultiRound(MultiRoundArgs),
    /// Groups of requests sharing a long prefix, each with its own suffix.
    SharedPrefix(SharedPrefixArgs),
    /// Random prompts and output lengths at a Poisson rate or a fixed concurrency.
    Random(RandomArgs),
    /// Replay a trace: arrivals from a JSONL file (your own logs), at their times.
    Trace(TraceArgs),
    /// Compare JSON reports: ratios against the first, and an SVG chart.
    Compare(compare::CompareArgs),
    /// A KV cache server's PUT and GET throughput (`lm://`), every chunk checked.
    Cache(cache::CacheArgs),
}

/// Flags every workload takes.
#[derive(Debug, Clone, Args, Serialize)]
pub struct CommonArgs {
    /// The server's base URL (with or without `/v1`).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,
    /// Model name; default: the first id `GET /v1/models` lists.
    #[arg(long)]
    pub model: Option<String>,
    /// Write the JSON report here.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// A name for this run in reports and charts (default: the workload and its load).
    #[arg(long)]
    pub label: Option<String>,
    /// Seed for every random choice (prompts, lengths, arrivals).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Give up on one request after this many seconds (counted as `timeout`).
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,
    /// After `--time`, how long requests in flight may still finish (seconds); those
    /// still running then are cancelled and reported as `unfinished`.
    #[arg(long, default_value_t = 60.0)]
    pub drain_timeout: f64,
    /// Bearer token, if the server wants one.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    #[serde(skip)]
    pub api_key: Option<String>,
    /// No progress line on stderr.
    #[arg(long)]
    pub no_progress: bool,
    /// A JSON object whose fields are added to every request's body, for a server's own
    /// parameters (llama-server's per-request adapters: `'{"lora": [{"id": 0, "scale":
    /// 1.0}]}'`). Fields the client sets itself (model, messages, prompt, max_tokens,
    /// stream, stream_options, ignore_eos) are refused.
    #[arg(long, value_parser = parse_extra_body)]
    pub extra_body: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The request fields the client sets itself.
const OWN_FIELDS: [&str; 7] = [
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "stream",
    "stream_options",
    "ignore_eos",
];

fn parse_extra_body(s: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    let v: serde_json::Value = serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))?;
    let serde_json::Value::Object(m) = v else {
        return Err("not a JSON object".into());
    };
    if let Some(k) = m.keys().find(|k| OWN_FIELDS.contains(&k.as_str())) {
        return Err(format!("`{k}` is set by the client itself"));
    }
    Ok(m)
}

/// How requests arrive in the open-loop workloads.
#[derive(Debug, Clone, Args, Serialize)]
pub struct LoadArgs {
    /// Requests to send in all.
    #[arg(long)]
    pub num_requests: Option<usize>,
    /// Poisson arrival rate in requests/s; `inf` sends them all at once.
    #[arg(long, default_value_t = f64::INFINITY)]
    pub request_rate: f64,
    /// At most this many requests in flight (a closed loop when the rate is `inf`).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Stop sending after this many seconds.
    #[arg(long)]
    pub time: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// `POST /v1/chat/completions`, one user message.
    Chat,
    /// `POST /v1/completions`.
    Completions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LengthDist {
    /// Uniform in [len·(1−r), len·(1+r)] with r = `--range-ratio`.
    Uniform,
    /// Exponential with mean len (at least 1).
    Exponential,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct MultiRoundArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Users in the system at once.
    #[arg(long, default_value_t = 10)]
    pub num_users: usize,
    /// Questions per user.
    #[arg(long, default_value_t = 5)]
    pub num_rounds: usize,
    /// Overall request rate; each user asks every num_users/qps seconds (or as soon as
    /// its previous answer is in, if that is later).
    #[arg(long, default_value_t = 0.5)]
    pub qps: f64,
    /// Tokens of the system prompt every user shares.
    #[arg(long, default_value_t = 1000)]
    pub shared_system_prompt: usize,
    /// Tokens of user-specific context at the start of each conversation.
    #[arg(long, default_value_t = 2000)]
    pub user_history_prompt: usize,
    /// Tokens of each answer (`max_tokens` with `ignore_eos`).
    #[arg(long, default_value_t = 100)]
    pub answer_len: usize,
    /// Tokens of each question.
    #[arg(long, default_value_t = 16)]
    pub question_len: usize,
    /// Run for this many seconds.
    #[arg(long, default_value_t = 60.0)]
    pub time: f64,
    /// Start empty and let users join one by one, instead of starting with a full
    /// cohort part-way through their sessions (the Production Stack's ramp-up).
    #[arg(long)]
    pub no_ramp_up: bool,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct SharedPrefixArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Groups (distinct shared prefixes).
    #[arg(long, default_value_t = 64)]
    pub num_groups: usize,
    /// Requests per group.
    #[arg(long, default_value_t = 16)]
    pub prompts_per_group: usize,
    /// Tokens of each group's shared prefix.
    #[arg(long, default_value_t = 2048)]
    pub prefix_len: usize,
    /// Tokens of each request's own suffix.
    #[arg(long, default_value_t = 128)]
    pub suffix_len: usize,
    /// Output tokens per request.
    #[arg(long, default_value_t = 256)]
    pub output_len: usize,
    #[arg(long, value_enum, default_value_t = Api::Chat)]
    pub api: Api,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct RandomArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Prompt tokens (mean).
    #[arg(long, default_value_t = 256)]
    pub input_len: usize,
    /// Output tokens (mean).
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Spread of the uniform distribution (0: every request the same lengths).
    #[arg(long, default_value_t = 0.0)]
    pub range_ratio: f64,
    #[arg(long, value_enum, default_value_t = LengthDist::Uniform)]
    pub length_dist: LengthDist,
    #[arg(long, value_enum, default_value_t = Api::Chat)]
    pub api: Api,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct TraceArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// JSONL, one request per line: `timestamp` (seconds; arrivals are replayed
    /// relative to the first), `prompt` (text) or `prompt_tokens` (a count: random
    /// words that many tokens long), `output_tokens`, and optionally `session_id`
    /// (sent as `x-user-id`, for session routing). Lines in any order.
    #[arg(long)]
    pub file: PathBuf,
    /// Replay this many times faster (2: twice the rate).
    #[arg(long, default_value_t = 1.0)]
    pub speedup: f64,
    /// Stop sending after this many seconds of the replay.
    #[arg(long)]
    pub time: Option<f64>,
    #[arg(long, value_enum, default_value_t = Api::Chat)]
    pub api: Api,
}

/// Run `switchyard bench ...`.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let (report, common) = match args.command {
        BenchCommand::Compare(c) => return compare::run(&c),
        BenchCommand::Cache(c) => {
            let (output, put_only) = (c.output.clone(), c.put_only);
            let report = cache::run(c).await?;
            print!("{}", report.table());
            if let Some(path) = &output {
                let json = serde_json::to_string_pretty(&report)?;
                std::fs::write(path, json + "\n")
                    .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
            }
            if report.errors > 0 || (!put_only && report.verified != report.chunks) {
                anyhow::bail!(
                    "{} of {} chunks verified, {} errors",
                    report.verified,
                    report.chunks,
                    report.errors
                );
            }
            return Ok(());
        }
        BenchCommand::MultiRound(a) => (workload::multi_round(&a).await?, a.common),
        BenchCommand::SharedPrefix(a) => (workload::shared_prefix(&a).await?, a.common),
        BenchCommand::Random(a) => (workload::random(&a).await?, a.common),
        BenchCommand::Trace(a) => (workload::trace(&a).await?, a.common),
    };
    print!("{}", report.table());
    if let Some(path) = &common.output {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n")
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    if report.requests.completed == 0 && report.requests.launched > 0 {
        anyhow::bail!("no request completed ({} failed)", report.requests.failed);
    }
    Ok(())
}

pub(crate) fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.0, 1e9))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_body_is_an_object_without_the_clients_own_fields() {
        let m = parse_extra_body(r#"{"lora": [{"id": 1, "scale": 1.0}], "top_k": 1}"#)
            .expect("an object");
        assert_eq!(m["lora"][0]["id"], 1);
        assert_eq!(m.len(), 2);
        assert!(parse_extra_body("[1]").is_err());
        assert!(parse_extra_body("{").is_err());
        let e = parse_extra_body(r#"{"lora": [], "max_tokens": 3}"#).expect_err("own field");
        assert!(e.contains("max_tokens"), "{e}");
    }
}
