//! `switchyard`: one binary whose subcommands are the roles of the stack.
//! Thin by design: it parses flags, sets up logging, and calls the crates.

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "The vLLM Production Stack, in Rust"
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace) or a tracing filter.
    #[arg(long, global = true, default_value = "info", env = "SWITCHYARD_LOG")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A vLLM-compatible serving engine.
    Engine(Box<engine::EngineArgs>),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log_level)
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Engine(args) => rt.block_on(run_engine(*args)),
    }
}

async fn run_engine(args: engine::EngineArgs) -> anyhow::Result<()> {
    let engine = engine::build_engine(&args)?;
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("binding {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, model = %args.served_names()[0], backend = ?args.backend, "engine listening");
    // A machine-readable readiness line for supervisors and tests.
    println!("READY http://{addr}");
    engine::serve(listener, engine, httpx::shutdown_signal()).await?;
    tracing::info!("engine stopped");
    Ok(())
}
