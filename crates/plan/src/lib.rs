//! `switchyard plan`: how many engines, and which routing, for a workload and an SLO.
//!
//! - [`stack`]: the simulated stack (real engine loops over the sim backend, the router's
//!   real policies), served in process.
//! - [`sim`]: one run of a workload over a stack in virtual time (a paused tokio runtime:
//!   a discrete-event clock), and its figures.
//! - [`search`]: the SLO, the search for the fewest engines per routing logic, and what
//!   it prints (table, SVG chart, Helm values).
//! - [`calibrate`]: `plan calibrate`, fitting a sim profile to a running engine.

pub mod calibrate;
pub mod search;
pub mod sim;
pub mod stack;

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PlanArgs {
    #[command(subcommand)]
    pub command: Option<PlanCommand>,
    #[command(flatten)]
    pub plan: search::SearchArgs,
}

#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Fit a sim profile (latency model and KV capacity) to a running engine.
    Calibrate(calibrate::CalibrateArgs),
}

/// The workloads a plan runs (the bench's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorkloadKind {
    /// The Production Stack's multi-round QA (`--num-users`, `--num-rounds`, `--qps`...).
    MultiRound,
    /// Random prompts at a Poisson rate (`--qps`, `--input-len`, `--output-len`).
    Random,
    /// Replay a JSONL trace of arrivals (`--trace FILE`).
    Trace,
}

/// Where a workload's parameters come from.
#[derive(Debug, Clone, Args)]
pub struct WorkloadArgs {
    #[arg(long, value_enum, default_value_t = WorkloadKind::MultiRound)]
    pub workload: WorkloadKind,
    /// Seconds of traffic to simulate.
    #[arg(long, default_value_t = 300.0)]
    pub duration: f64,
    /// Requests per second (multi-round: questions per second over all users).
    #[arg(long, default_value_t = 4.0)]
    pub qps: f64,
    /// multi-round: users in the system at once.
    #[arg(long, default_value_t = 32)]
    pub num_users: usize,
    /// multi-round: questions per user.
    #[arg(long, default_value_t = 5)]
    pub num_rounds: usize,
    /// multi-round: tokens of the system prompt all users share.
    #[arg(long, default_value_t = 1000)]
    pub shared_system_prompt: usize,
    /// multi-round: tokens of user context at the start of each conversation.
    #[arg(long, default_value_t = 2000)]
    pub user_history_prompt: usize,
    /// multi-round: tokens of each question.
    #[arg(long, default_value_t = 16)]
    pub question_len: usize,
    /// Output tokens per answer (random: the mean).
    #[arg(long, default_value_t = 100)]
    pub output_len: usize,
    /// random: prompt tokens (mean).
    #[arg(long, default_value_t = 512)]
    pub input_len: usize,
    /// trace: the JSONL file (`switchyard bench trace --help` for its fields).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// trace: replay this many times faster.
    #[arg(long, default_value_t = 1.0)]
    pub speedup: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Run `switchyard plan ...` (blocking: each simulation runs its own runtime).
pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    match args.command {
        Some(PlanCommand::Calibrate(c)) => calibrate::run(&c),
        None => search::run(&args.plan),
    }
}
