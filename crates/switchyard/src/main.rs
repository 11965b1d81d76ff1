//! `switchyard`: one binary whose subcommands are the roles of the stack.
//! Thin by design: it parses flags, sets up logging, and calls the crates.

mod up;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

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
    /// Log lines as text, or as JSON objects one per line (fields at the top level). The
    /// router logs each request (request id, model, engine, status, latency, TTFT, trace
    /// id) at debug under the target `router::access`: `--log-level info,router::access=debug`.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = LogFormat::Text,
        env = "SWITCHYARD_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// A vLLM-compatible serving engine.
    Engine(Box<EngineCmd>),
    /// One OpenAI endpoint in front of many engines and models.
    Router(Box<router::RouterArgs>),
    /// The whole stack on this machine: a router and N engines, in one command.
    Up(Box<up::UpArgs>),
    /// Load generator: multi-round QA, shared-prefix and random workloads; compare runs.
    Bench(Box<bench::BenchArgs>),
    /// The shared KV cache tier: a cache server speaking LMCache's `lm://` protocol.
    CacheServer(Box<cache::ServerArgs>),
    /// How many engines, and which routing, for a workload and an SLO (simulated in
    /// virtual time); `plan calibrate` fits the simulation to a real engine.
    Plan(Box<plan::PlanArgs>),
}

#[derive(clap::Args)]
struct EngineCmd {
    #[command(flatten)]
    engine: engine::EngineArgs,
    /// Exit when standard input closes (for supervisors such as `switchyard up`).
    #[arg(long, hide = true)]
    exit_on_stdin_close: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let level = match cli.log_level.as_str() {
        "warning" => "warn",
        "critical" => "error",
        other => other,
    };
    let filter = tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|_| "info".into());
    // Colour only for a person at a terminal: a log file or collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match cli.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_ansi(ansi)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
    }
    if matches!(cli.command, Command::Up(_)) {
        // `up`'s engines are child processes: they log as it does. Set before any thread
        // starts.
        std::env::set_var("SWITCHYARD_LOG", &cli.log_level);
        let format = match cli.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        std::env::set_var("SWITCHYARD_LOG_FORMAT", format);
    }
    match cli.command {
        // The router runs per core: single-threaded runtimes, one per worker thread.
        Command::Router(args) => current_thread()?.block_on(run_router(*args)),
        Command::Engine(cmd) => multi_thread()?.block_on(run_engine(*cmd)),
        Command::Up(args) => multi_thread()?.block_on(up::run(*args)),
        Command::Bench(args) => multi_thread()?.block_on(bench::run(*args)),
        Command::CacheServer(args) => Ok(multi_thread()?.block_on(cache::server::run(*args))?),
        // Each simulation builds its own paused runtime.
        Command::Plan(args) => plan::run(*args),
    }
}

fn multi_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn current_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

async fn run_engine(cmd: EngineCmd) -> anyhow::Result<()> {
    let args = cmd.engine;
    if cmd.exit_on_stdin_close {
        std::thread::spawn(|| {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
            std::process::exit(0);
        });
    }
    if let (engine::config::BackendKind::Sim, Some(m)) = (args.backend, &args.model) {
        if m.ends_with(".gguf") {
            tracing::warn!(
                model = %m,
                "--backend sim simulates a model under this name and does not load the file;                  leave out --backend to serve it"
            );
        }
    }
    let serving = args.serve.serving()?;
    let engine = engine::build_engine(&args)?;
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("binding {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, model = %args.served_names()[0], backend = ?args.backend, "engine listening");
    // A machine-readable readiness line for supervisors and tests.
    println!("READY {}://{addr}", serving.scheme());
    engine::serve(listener, engine, httpx::shutdown_signal(), serving).await?;
    tracing::info!("engine stopped");
    Ok(())
}

async fn run_router(args: router::RouterArgs) -> anyhow::Result<()> {
    let workers = args.workers;
    let bound = router::bind(args).await?;
    let addr = bound.addr;
    tracing::info!(%addr, engines = bound.state.registry.snapshot().endpoints.len(), "router listening");
    println!("READY {}://{addr}", bound.scheme());
    bound
        .serve_workers(workers, httpx::shutdown_signal())
        .await?;
    tracing::info!("router stopped");
    Ok(())
}
